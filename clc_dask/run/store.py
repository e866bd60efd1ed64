"""The layout of a run's output store, its lock, and the run-wide files tiles are written into.

Store layout::

    STORE/manifest.json          finished tiles (the completion record, see :mod:`.manifest`)
    STORE/manifest.journal       records appended since the last snapshot
    STORE/run.yaml               the resolved config
    STORE/items.json             the scenes used (STAC item collection)
    STORE/tiles/<row_col>/       classes.tif (phase 1), generalized.tif (phase 2)
    STORE/polygons.gpkg          the generalized map as one layer ``clc`` (+ .qml/.sld styles)
    STORE/generalize/            the whole-map generalization's state (tile tables, decisions)
    STORE/map.zarr               (formats: zarr) classes/generalized, one chunk per tile
    STORE/stac/collection.json   STAC Collection + one Item per finished tile
    STORE/performance-report.html  (--performance-report)
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import logging
import os
import socket
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import dask.array as da
import numpy as np
import xarray as xr
import zarr
from odc.geo.xr import xr_coords

from clc_dask.errors import ConfigError, OutputError
from clc_dask.grid import Tile, TileGrid
from clc_dask.stores import ZARR_FORMAT, atomic_path, fsync_directory, remove_leftovers, write_zarr

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
JOURNAL_NAME = "manifest.journal"
CONFIG_FILE = "run.yaml"
ITEMS_FILE = "items.json"
ZARR_STORE = "map.zarr"
TILES_DIR = "tiles"
STYLES_DIR = "styles"
STAC_DIR = "stac"
PERFORMANCE_REPORT = "performance-report.html"
LOCK_FILE = ".lock"
#: Output files of a tile (asset name → file name).
TILE_FILES = {"classes": "classes.tif", "generalized": "generalized.tif"}
#: The state of the whole-map generalization (tile tables, decisions), kept for resuming.
GENERALIZE_DIR = "generalize"
#: The run's one vector layer.
POLYGONS_FILE = "polygons.gpkg"
POLYGONS_LAYER = "clc"
#: Folders and files of a store that belong to a run (removed by ``overwrite``).
RUN_OUTPUTS = (TILES_DIR, STAC_DIR, ZARR_STORE, STYLES_DIR, ITEMS_FILE, CONFIG_FILE, PERFORMANCE_REPORT,
               POLYGONS_FILE, "polygons.qml", "polygons.sld", GENERALIZE_DIR)


@contextlib.contextmanager
def store_lock(store: Path) -> Iterator[None]:
    """Hold ``store/.lock`` (an advisory file lock, released by the OS even on SIGKILL).

    The holder writes who it is into the lock file (``pid``, ``host``, ``started``), so that a
    second run on the same store is refused with a message naming the first.

    Raises:
        OutputError: another process holds the lock.
    """
    store.mkdir(parents=True, exist_ok=True)
    with open(store / LOCK_FILE, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise OutputError(
                f"Another run holds the store {store} ({_holder(fh)}): wait for it to finish (or stop "
                "it), then run again with `resume`. Two runs must not write one store."
            ) from None
        try:
            _write_holder(fh)
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _write_holder(fh: IO[str]) -> None:
    """Write this process's pid, host and start time into the held lock file."""
    fh.seek(0)
    fh.truncate()
    started = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    fh.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": started}) + "\n")
    fh.flush()


def lock_holder(store: Path) -> dict[str, Any] | None:
    """Who last held ``store/.lock`` (``pid``, ``host``, ``started``), or None if unknown."""
    try:
        return json.loads((Path(store) / LOCK_FILE).read_text(encoding="utf-8") or "null")
    except (OSError, ValueError):
        return None


def _holder(fh: IO[str]) -> str:
    """The holder of a lock file as words, e.g. ``pid 123 on host node-1, since …``."""
    fh.seek(0)
    try:
        holder = json.loads(fh.read() or "null")
    except ValueError:
        holder = None
    if not isinstance(holder, dict) or "pid" not in holder:
        return "a process that has not yet written its pid"
    return f"pid {holder['pid']} on host {holder.get('host', '?')}, since {holder.get('started', '?')}"


def remove_leftovers_unless_locked(store: Path) -> list[Path]:
    """Remove the temporary files in ``store`` (see :func:`clc_dask.stores.remove_leftovers`),
    unless another process holds its lock (then it may be writing them: nothing is removed).

    For a command that stopped after its workers were closed, which may have been cut off
    while writing.
    """
    if not (Path(store) / LOCK_FILE).exists():
        return []
    try:
        with store_lock(Path(store)):
            return remove_leftovers(store)
    except OutputError:
        return []


def tile_dir(store: Path, tile: Tile) -> Path:
    """The folder of a tile's files."""
    return store / TILES_DIR / tile.name


def create_zarr(path: Path, grid: TileGrid, variables: Sequence[str], dtype: np.dtype, level: int) -> None:
    """Create the run's Zarr store (metadata and coordinates only) if it does not exist.

    Zarr chunks equal the tiles, so every tile is written as exactly one chunk per variable
    (aligned region writes never lose data; xarray#8371). Missing chunks read as 0 (no
    data); the manifest, not the chunks, says which tiles are finished (xarray#10117).
    """
    if (path / "zarr.json").exists() or (path / ".zgroup").exists():
        return
    gbox = grid.geobox
    size = grid.tile_size
    shape = (gbox.shape.y, gbox.shape.x)
    data_vars = {}
    for name in variables:
        lazy = da.zeros(shape, chunks=(size, size), dtype=dtype)
        data_vars[name] = xr.DataArray(lazy, dims=("y", "x"), attrs={
            "nodata": 0, "clc_level": level, "long_name": f"CLC Level-{level} codes ({name})"})
    ds = xr.Dataset(data_vars, coords=xr_coords(gbox, crs_coord_name="spatial_ref"))
    for name in variables:
        ds[name].attrs["grid_mapping"] = "spatial_ref"
    encoding = {name: {"chunks": (size, size), "_FillValue": None} for name in variables}
    write_zarr(ds, path, encoding, compute=False)
    log.info("created Zarr store %s (%d×%d px, chunks %d px, Zarr v%d)", path, shape[0], shape[1], size,
             ZARR_FORMAT)


def write_zarr_tile(path: Path, tile: Tile, tile_size: int, arrays: Mapping[str, np.ndarray | None]) -> dict[str, Path]:
    """Write a tile into its chunk of each variable; returns the chunk files written.

    Chunks are written even when they hold only no data, so that every finished tile has
    its files (and checksums) in the manifest.
    """
    ys, xs = tile.pixel_slices
    files = {}
    with zarr.config.set({"array.write_empty_chunks": True}):
        for name, values in arrays.items():
            if values is None:
                continue
            array = zarr.open_array(path / name, mode="r+")
            if tuple(array.chunks) != (tile_size, tile_size):
                raise ConfigError(
                    f"Zarr store {path} has chunks {tuple(array.chunks)}, not the run's {tile_size} px tiles: "
                    "start the run again with `overwrite` (or choose another output.store)."
                )
            array[ys, xs] = values
            index = (ys.start // tile_size, xs.start // tile_size)
            chunk = path / name / array.metadata.encode_chunk_key(index)
            fsync_directory(chunk.parent)  # Zarr renames the chunk file into place: keep its entry
            files[f"zarr:{name}"] = chunk
    return files


def write_text(path: Path, text: str) -> Path:
    """Write a small text file atomically."""
    with atomic_path(path, suffix=path.suffix) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path
