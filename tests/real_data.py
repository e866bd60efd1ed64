"""The real test data in tests/data: where it is, what it should hold, what is missing."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

#: The folder of real data the suite reads (see its README.md for sources and licences).
DATA = Path(__file__).resolve().parent / "data"
#: Checksum list of every data file, in ``sha256sum`` format, paths relative to DATA.
CHECKSUMS = "SHA256SUMS"
#: Files in DATA that describe the data rather than being data.
NOT_DATA = {CHECKSUMS, "README.md", ".gitattributes"}


def listed_files(folder: Path = DATA) -> dict[str, str]:
    """Relative path → SHA-256 of every data file ``folder/SHA256SUMS`` lists.

    Raises:
        FileNotFoundError: the checksum list itself is missing.
    """
    listed = {}
    for line in (folder / CHECKSUMS).read_text("utf-8").splitlines():
        digest, _, path = line.partition("  ")
        listed[path] = digest
    return listed


def missing_files(folder: Path = DATA) -> list[str]:
    """The listed data files that are not in ``folder`` (all of them if the list is missing)."""
    if not (folder / CHECKSUMS).is_file():
        return [CHECKSUMS]
    return [path for path in listed_files(folder) if not (folder / path).is_file()]


def require_files(folder: Path = DATA) -> Path:
    """``folder`` once every listed data file is in it; else fail the test, naming what is missing.

    A failure, not a skip: a clone without its data must not pass by running fewer tests.
    """
    missing = missing_files(folder)
    if missing:
        pytest.fail(f"real test data missing from {folder}: {', '.join(missing)} "
                    f"({CHECKSUMS} lists the data files, README.md their sources)", pytrace=False)
    return folder


def files_on_disk(folder: Path = DATA) -> list[str]:
    """Relative paths of the data files present under ``folder`` (descriptions excluded)."""
    paths = (p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    return sorted(p for p in paths if p not in NOT_DATA)


def sha256(path: Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    return hashlib.sha256(path.read_bytes()).hexdigest()
