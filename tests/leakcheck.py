"""Find planted secrets in the files a run wrote and in the logs it printed.

Plant unique strings (a fake secret key, a fake SAS token) where a user's credentials would
be, run the code, then::

    from leakcheck import assert_no_leaks

    assert_no_leaks(["PLANTED-SECRET-1f3a", "PLANTED-TOKEN-9c2e"],
                    paths=[store], logs={"caplog": caplog.text, "stderr": err})

Every file under ``paths`` is read as bytes (streamed, so stores of any size can be
scanned; ``.gz`` files and zip archives are also searched decompressed), and each planted
string is looked for as is and in the forms it takes when written on the way: percent-
encoded (URLs), JSON-escaped, UTF-16 and base64 (HTTP basic auth). :func:`assert_no_leaks`
fails when nothing was scanned, so a check aimed at an empty folder cannot pass.
"""

from __future__ import annotations

import base64
import gzip
import json
import os
import zipfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

BLOCK = 16 * 1024 * 1024  # bytes read at a time


@dataclass(frozen=True)
class Leak:
    """One place where a planted string was found."""

    planted: str
    where: str  # a file path (``archive.zip!member``), or a log's name
    offset: int  # byte offset of the match
    form: str  # "as is", "percent-encoded", "JSON-escaped", "UTF-16", "base64"

    def __str__(self) -> str:
        return f"{self.planted!r} ({self.form}) in {self.where} at byte {self.offset}"


@dataclass
class Scan:
    """What :func:`find_leaks` looked at, and what it found."""

    files: int = 0
    bytes: int = 0
    logs: int = 0
    leaks: list[Leak] = field(default_factory=list)


def encoded_forms(planted: str) -> dict[str, bytes]:
    """The byte patterns under which ``planted`` may be stored or printed."""
    raw = planted.encode()
    forms = {"as is": raw, "percent-encoded": quote(planted, safe="").encode(),
             "JSON-escaped": json.dumps(planted)[1:-1].encode(),
             "UTF-16": planted.encode("utf-16-le")}
    for shift in range(3):  # base64 of the string at each alignment within a longer text
        encoded = base64.b64encode(b"\0" * shift + raw)
        core = encoded[4 if shift else 0: len(encoded) - 4]
        if len(core) >= 8:
            forms[f"base64/{shift}"] = core
    unique: dict[str, bytes] = {}
    for name, pattern in forms.items():
        if pattern not in unique.values():
            unique[name] = pattern
    return unique


def find_leaks(
    planted: Iterable[str],
    paths: Iterable[str | os.PathLike[str]] = (),
    logs: Mapping[str, str] | Iterable[str] = (),
) -> Scan:
    """Search files (folders are walked) and log texts for planted strings.

    Args:
        planted: the strings that must not appear (each at least 8 characters, so that a
            match means a leak and not chance).
        paths: files or folders to read.
        logs: captured texts (``caplog.text``, stdout, stderr), by name or as a list.
    """
    patterns = {}
    for secret in planted:
        if len(secret) < 8:
            raise ValueError(f"planted string {secret!r} is too short to be told from chance")
        for form, pattern in encoded_forms(secret).items():
            patterns[pattern] = (secret, form.split("/")[0])
    scan = Scan()
    named = logs.items() if isinstance(logs, Mapping) else ((f"log {i}", t) for i, t in enumerate(logs))
    for name, text in named:
        scan.logs += 1
        scan.leaks += _search(_blocks_of_text(text), patterns, name)
    for path in _files(paths):
        scan.files += 1
        scan.bytes += path.stat().st_size
        for where, blocks in _contents(path):
            scan.leaks += _search(blocks, patterns, where)
    return scan


def assert_no_leaks(
    planted: Iterable[str],
    paths: Iterable[str | os.PathLike[str]] = (),
    logs: Mapping[str, str] | Iterable[str] = (),
) -> Scan:
    """:func:`find_leaks`, failing on any leak, or when there was nothing to scan."""
    scan = find_leaks(list(planted), list(paths), logs)
    assert scan.files or scan.logs, "nothing was scanned: no file under the paths, and no log"
    assert not scan.leaks, "planted secrets found:\n" + "\n".join(map(str, scan.leaks))
    return scan


def _files(paths: Iterable[str | os.PathLike[str]]) -> Iterator[Path]:
    for start in map(Path, paths):
        if start.is_file():
            yield start
        elif start.is_dir():
            for root, _, names in os.walk(start):
                for name in sorted(names):
                    candidate = Path(root) / name
                    if candidate.is_file():
                        yield candidate


def _contents(path: Path) -> Iterator[tuple[str, Iterator[bytes]]]:
    """The file's bytes, and those of what it holds compressed (gzip, zip members)."""
    yield str(path), _blocks_of_file(path)
    if path.suffix == ".gz":
        with gzip.open(path, "rb") as fh:
            yield f"{path}!gunzip", _blocks_of_stream(fh)
    elif zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            for member in archive.namelist():
                with archive.open(member) as fh:
                    yield f"{path}!{member}", _blocks_of_stream(fh)


def _blocks_of_file(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as fh:
        yield from _blocks_of_stream(fh)


def _blocks_of_stream(fh: object) -> Iterator[bytes]:
    while block := fh.read(BLOCK):  # type: ignore[attr-defined]
        yield block


def _blocks_of_text(text: str) -> Iterator[bytes]:
    yield text.encode("utf-8", errors="surrogateescape")


def _search(blocks: Iterable[bytes], patterns: Mapping[bytes, tuple[str, str]], where: str) -> list[Leak]:
    """Matches of ``patterns`` in a stream of blocks (matches across block edges included)."""
    overlap = max(map(len, patterns)) - 1
    found: dict[tuple[str, str, int], Leak] = {}
    tail, start = b"", 0  # ``tail`` ends the previous blocks; ``start`` is its offset
    for block in blocks:
        data = tail + block
        for pattern, (secret, form) in patterns.items():
            at = data.find(pattern)
            while at != -1:
                key = (secret, form, start + at)
                found.setdefault(key, Leak(secret, where, start + at, form))
                at = data.find(pattern, at + 1)
        keep = min(overlap, len(data))
        start += len(data) - keep
        tail = data[len(data) - keep:] if keep else b""
    return list(found.values())
