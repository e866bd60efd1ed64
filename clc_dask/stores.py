"""Writing outputs so that nothing half-written ever looks complete.

Every file and every directory store (Zarr, STAC catalog, run outputs) clc-dask writes is
first built under a temporary name beside its target — ``.<name>.clc-partial-<random><suffix>``
— fsynced, and renamed into place only when complete; the parent directory is fsynced after
the rename, so the new name survives a power cut. A killed process leaves only temporary
names behind, which :func:`remove_leftovers` recognises and deletes (a run does this when it
takes its store's lock).

A write that fails because the disk is full or a file-size limit (``ulimit -f``) was reached
raises :class:`~clc_dask.errors.OutputError` naming the file and saying to free space,
whatever the writer (GDAL, torch, Zarr) made of the failure.

Zarr stores are all written in one format, :data:`ZARR_FORMAT` (Zarr v3), with Zarr chunks
equal to dask chunks.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import logging
import os
import resource
import shutil
import uuid
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from clc_dask.errors import ClcDaskError, OutputError

log = logging.getLogger(__name__)

#: Marks every temporary name clc-dask creates (files and directories).
PARTIAL_MARK = ".clc-partial-"
#: The one Zarr format of every store clc-dask writes.
ZARR_FORMAT = 3
#: Error numbers that mean "no room to write": disk full, file too large, quota exceeded.
NO_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EFBIG, errno.EDQUOT})
#: Free bytes under which a failed write is put down to a full disk (writers such as GDAL and
#: torch report a failed write without its error number).
NEARLY_FULL_BYTES = 16 << 20


def no_space_reason(written: Path | list[Path], error: BaseException) -> str | None:
    """Why a write failed for lack of room, or None if that was not the cause.

    Looks at the error's chain (an ``OSError`` with ``ENOSPC``/``EFBIG``/``EDQUOT``), then at
    the facts: the file-size limit (``RLIMIT_FSIZE``) reached by one of the files being
    written (``written``), or the disk holding them nearly full.
    """
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in NO_SPACE_ERRNOS:
            return os.strerror(seen.errno)
        seen = seen.__cause__ or seen.__context__
    files = [written] if isinstance(written, Path) else list(written)
    sizes = [_size(f) for f in files]
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if limit != resource.RLIM_INFINITY and sizes and max(sizes) >= limit:
        return f"the file-size limit of this process (ulimit -f) of {limit} bytes was reached"
    folder = files[0].parent if files else None
    with contextlib.suppress(OSError):
        free = shutil.disk_usage(folder).free if folder is not None else None
        if free is not None and free < NEARLY_FULL_BYTES:
            return f"the disk is full ({free} bytes free)"
    return None


def _size(path: Path) -> int:
    try:
        if path.is_dir():
            return max((_size(p) for p in path.rglob("*") if p.is_file()), default=0)
        return path.stat().st_size
    except OSError:
        return 0


def _no_space_error(target: Path, reason: str) -> OutputError:
    return OutputError(
        f"Cannot write {target}: {reason}. Free space on its disk (or raise the limit), then run the "
        "command again; nothing was left in its place (a run continues with `resume`)."
    )


def temporary_name(target: Path, suffix: str = "") -> Path:
    """A fresh temporary path beside ``target`` (hidden, marked with :data:`PARTIAL_MARK`)."""
    return target.with_name(f".{target.name}{PARTIAL_MARK}{uuid.uuid4().hex[:12]}{suffix}")


def is_partial(path: Path) -> bool:
    """True for a temporary name made by :func:`temporary_name` (or the older ``.stac-partial-``)."""
    name = Path(path).name
    return name.startswith(".") and (PARTIAL_MARK in name or name.startswith(".stac-partial-"))


def file_sha256(path: str | os.PathLike[str]) -> str:
    """SHA-256 hex digest of a file (checkpoint identity, run manifests, STAC checksums)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(functools.partial(fh.read, 1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fsync_directory(path: str | os.PathLike[str]) -> None:
    """Flush a directory's entries (renames, new files) to disk; a no-op where unsupported."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _fsync_tree(root: Path) -> None:
    for folder, _, files in os.walk(root):
        for name in files:
            _fsync_file(Path(folder) / name)
        fsync_directory(folder)


@contextlib.contextmanager
def _space_errors(target: Path, written: Any) -> Iterator[None]:
    """Turn a failed write into :class:`OutputError` when it failed for lack of room.

    ``written()`` lists the temporary files being written. clc-dask's own errors (e.g. a
    failed read while computing the data) pass unchanged, and so do other failures.
    """
    try:
        yield
    except ClcDaskError:
        raise
    except Exception as exc:
        reason = no_space_reason(written(), exc)
        if reason is None:
            raise
        raise _no_space_error(target, reason) from exc


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str], suffix: str = "") -> Iterator[Path]:
    """Yield a temporary file path beside ``target``; on success it is fsynced and renamed
    onto ``target`` (permissions as a new file's), and the folder fsynced. On failure the
    temporary file (and any ``<tmp>.*`` sidecar a writer left) is removed.

    Args:
        target: the file to produce.
        suffix: suffix of the temporary name (e.g. ``.tif``, for writers that pick a driver by
            extension).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(target, suffix or ".part")
    tmp.touch()
    try:
        with _space_errors(target, lambda: [tmp, *tmp.parent.glob(tmp.name + ".*")]):
            yield tmp
            _fsync_file(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, target)
        fsync_directory(target.parent)
    finally:
        if tmp.exists():
            tmp.unlink()
        for sidecar in tmp.parent.glob(tmp.name + ".*"):
            sidecar.unlink()


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield an empty temporary directory beside ``target``; on success its files are
    fsynced and it replaces ``target`` (an existing ``target`` is moved aside, then removed).

    On failure the temporary directory is removed and ``target`` is left as it was.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(target)
    tmp.mkdir()
    old: Path | None = None
    try:
        with _space_errors(target, lambda: [tmp]):
            yield tmp
            _fsync_tree(tmp)
        if target.exists() or target.is_symlink():
            old = temporary_name(target, ".old")
            os.replace(target, old)
        os.replace(tmp, target)
        fsync_directory(target.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            _remove(old)


@contextlib.contextmanager
def staging_directory(beside: str | os.PathLike[str]) -> Iterator[Path]:
    """A temporary directory beside ``beside`` (same file system, so its files can be
    renamed into place), removed at the end whatever happens."""
    tmp = temporary_name(Path(beside), ".staging")
    tmp.mkdir(parents=True)
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def move_into_place(moves: Mapping[Path, Path]) -> None:
    """Rename finished files (e.g. written in a :func:`staging_directory`) onto their targets,
    one after the other, then fsync the targets' folders."""
    for source, target in moves.items():
        os.replace(source, target)
    for folder in {Path(t).parent for t in moves.values()}:
        fsync_directory(folder)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def remove_leftovers(folder: str | os.PathLike[str], recursive: bool = True) -> list[Path]:
    """Delete temporary files and directories a killed writer left in ``folder``.

    Only call this while no other process writes there (a run holds its store's lock).

    Returns:
        The paths removed.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = folder.rglob(".*") if recursive else folder.glob(".*")
    removed = [p for p in sorted(found) if is_partial(p)]
    # a partial directory's contents go with it
    removed = [p for p in removed if not any(q in p.parents for q in removed)]
    for path in removed:
        _remove(path)
    if removed:
        log.info("removed %d leftover temporary file(s) in %s", len(removed), folder)
    return removed


def write_zarr(dataset: Any, target: str | os.PathLike[str], encoding: Mapping[str, Any] | None = None,
               *, compute: bool = True) -> Path:
    """Write an ``xarray.Dataset`` as a Zarr store (:data:`ZARR_FORMAT`, consolidated
    metadata), atomically: the store appears at ``target`` only when complete.

    Args:
        dataset: the data; dask-backed variables are computed chunk by chunk.
        target: the store directory (replaced if it exists).
        encoding: per-variable encoding (chunks, fill values) passed to ``to_zarr``.
        compute: False writes only metadata and coordinates (arrays filled later by region).
    """
    target = Path(target)
    with atomic_directory(target) as tmp, warnings.catch_warnings():
        # consolidated metadata is an extension in Zarr v3; xarray still opens it fastest
        warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
        dataset.to_zarr(tmp, mode="w", encoding=dict(encoding or {}), consolidated=True,
                        zarr_format=ZARR_FORMAT, compute=compute)
    return target

