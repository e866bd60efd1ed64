"""Opening the inputs of a patch index lazily: seasonal mosaics, the label raster, clear counts.

Every input is opened as a (band, y, x) dask-backed array whose chunks are a multiple of the
patch size, so a patch never straddles two chunks and reading one patch reads one chunk.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import xarray as xr
from odc.geo.geobox import GeoBox

from clc_dask.errors import ConfigError, InputError
from clc_dask.grid import assert_same_grid
from clc_dask.rasters import geobox_of, open_raster

log = logging.getLogger(__name__)

#: A raster input: a GeoTIFF/COG path, a Zarr mosaic store, or a lazy DataArray.
Source = str | os.PathLike[str] | xr.DataArray
#: Chunk edge (pixels) aimed at when opening rasters; rounded down to a multiple of the patch size.
READ_CHUNK = 2048


def aligned_chunk(patch_size: int) -> int:
    """The read chunk edge (px): :data:`READ_CHUNK` rounded down to a multiple of ``patch_size``."""
    return patch_size * max(1, READ_CHUNK // patch_size)


def open_source(source: Source, patch_size: int, what: str,
                variable: str = "reflectance") -> tuple[xr.DataArray, str]:
    """Open a raster (GeoTIFF/COG, or a Zarr store's ``variable``) lazily, chunks aligned to patches.

    Returns:
        The (band, y, x) array and the resolved path ("" for an in-memory array).
    """
    chunk = aligned_chunk(patch_size)
    if isinstance(source, xr.DataArray):
        arr = source if "band" in source.dims else source.expand_dims(band=["1"])
        arr = arr.transpose("band", "y", "x").chunk({"band": -1, "y": chunk, "x": chunk})
        return arr, ""
    path = Path(source)
    if not path.exists():
        raise InputError(f"The {what} {path} does not exist: check the path.")
    if path.is_dir():  # a Zarr mosaic store (clc-dask mosaic --format zarr)
        try:
            ds = xr.open_zarr(path)
        except Exception as exc:
            raise InputError(f"Cannot open the {what} {path} as Zarr: {exc}.") from exc
        if variable not in ds:
            raise InputError(f"The Zarr store {path} has no '{variable}' variable (has {list(ds.data_vars)}).")
        arr = ds[variable]
        arr = arr if "band" in arr.dims else arr.expand_dims(band=[variable])
        arr = arr.transpose("band", "y", "x").chunk({"band": -1, "y": chunk, "x": chunk})
        return arr, str(path.resolve())
    arr = open_raster(path, chunks={"band": -1, "y": chunk, "x": chunk})
    return arr, str(path.resolve())


def find_clear_count(mosaic: str | os.PathLike[str]) -> Path | None:
    """The clear-count raster written beside a mosaic by ``clc-dask mosaic`` (or None).

    COG mosaics have ``<stem>_clear_count.tif`` beside them; Zarr mosaics hold a
    ``clear_count`` variable (the store itself is returned).
    """
    path = Path(mosaic)
    if path.is_dir():
        return path if (path / "clear_count").exists() else None
    sidecar = path.with_name(f"{path.stem}_clear_count{path.suffix or '.tif'}")
    return sidecar if sidecar.is_file() else None


def clear_counts_beside(mosaics: Mapping[str, str | os.PathLike[str]],
                        clear_counts: Mapping[str, Path] | None = None) -> dict[str, Path]:
    """The given clear-count rasters, completed by those written beside the mosaics.

    Args:
        mosaics: season → mosaic path.
        clear_counts: season → clear-count raster given explicitly (kept as given).

    Returns:
        season → clear-count raster, for every season that has one.
    """
    out = dict(clear_counts or {})
    for season, path in mosaics.items():
        if season not in out and (found := find_clear_count(path)) is not None:
            log.info("using clear counts %s for %s", found, season)
            out[season] = found
    return out


def check_integer(arr: xr.DataArray, what: str) -> None:
    """Raise :class:`InputError` unless ``arr`` holds integers (DN or class codes)."""
    if arr.dtype.kind not in "iu":
        raise InputError(
            f"The {what} has data type {arr.dtype}, not integer: mosaics must hold uint16 DN "
            "(reflectance × 10000) and label rasters integer CLC codes."
        )


@dataclass
class Sources:
    """The lazily opened inputs of a patch index.

    ``mosaics``/``labels``/``clear`` are the selected bands, for whole-raster statistics.
    ``mosaic_files``/``label_file`` are the arrays as opened (every band), for patch windows:
    a window must be sliced straight from the opened array. Slicing a derived array (a band
    selection) makes dask's slice fusion re-define that array's shared keys differently in
    every submitted graph, which corrupts the distributed scheduler's state.
    """

    mosaics: dict[str, xr.DataArray]
    labels: xr.DataArray
    clear: dict[str, xr.DataArray]
    mosaic_files: dict[str, xr.DataArray]
    band_index: dict[str, list[int]]
    label_file: xr.DataArray


@dataclass
class OpenedSources:
    """:class:`Sources` with what the index records about them."""

    sources: Sources
    mosaic_paths: dict[str, str]
    label_path: str
    clear_paths: dict[str, str]
    bands: tuple[str, ...]
    geobox: GeoBox


def open_sources(
    mosaics: Mapping[str, Source],
    labels: Source,
    clear_counts: Mapping[str, Source] | None,
    bands: tuple[str, ...] | None,
    patch_size: int,
) -> OpenedSources:
    """Open every input lazily and check bands, data types and grids.

    Args:
        mosaics: season → mosaic (band, y, x) DN.
        labels: single-band CLC code raster.
        clear_counts: season → clear-observation count raster (optional).
        bands: band order to use; None = every band of the first mosaic.
        patch_size: patch edge (px), to align the chunks.

    Raises:
        ConfigError: no mosaic, or a clear-count raster for a season without a mosaic.
        InputError: missing files, missing bands, non-integer or multi-band label rasters.
        GridMismatchError: inputs on different grids.
    """
    if not mosaics:
        raise ConfigError("No mosaic given: `mosaics` must map at least one season to a mosaic.")
    opened: dict[str, xr.DataArray] = {}
    files: dict[str, xr.DataArray] = {}
    band_index: dict[str, list[int]] = {}
    paths: dict[str, str] = {}
    geobox: GeoBox | None = None
    first = ""
    for season, source in mosaics.items():
        if source is None or (isinstance(source, str) and not source):
            raise ConfigError(f"Season {season!r} has no mosaic: give its path in `mosaics`.")
        arr, path = open_source(source, patch_size, f"{season} mosaic")
        check_integer(arr, f"{season} mosaic")
        available = tuple(str(b) for b in arr["band"].values)
        wanted = bands or available
        missing = [b for b in wanted if b not in available]
        if missing:
            raise InputError(
                f"The {season} mosaic has bands {list(available)} but {missing} are needed for "
                f"{list(wanted)}: make the mosaic with these bands or choose other `bands`."
            )
        bands = tuple(wanted)
        gbox = geobox_of(arr)
        if geobox is None:
            geobox, first = gbox, season
        else:
            assert_same_grid(gbox, geobox, f"{season} mosaic", f"{first} mosaic")
        opened[season] = arr.sel(band=list(bands))
        files[season] = arr
        band_index[season] = [available.index(b) for b in bands]
        paths[season] = path
    assert geobox is not None and bands is not None
    label_arr, label_path = open_source(labels, patch_size, "label raster")
    check_integer(label_arr, "label raster")
    if label_arr.sizes["band"] != 1:
        raise InputError(
            f"The label raster has {label_arr.sizes['band']} bands: give a single-band raster of CLC codes."
        )
    assert_same_grid(geobox_of(label_arr), geobox, "label", f"{first} mosaic")
    clear: dict[str, xr.DataArray] = {}
    clear_paths: dict[str, str] = {}
    for season, source in (clear_counts or {}).items():
        if season not in opened:
            raise ConfigError(
                f"A clear-count raster was given for season {season!r}, which has no mosaic "
                f"(mosaics: {', '.join(opened)}): add its mosaic to `mosaics` or drop it from "
                "`clear_counts`."
            )
        arr, path = open_source(source, patch_size, f"{season} clear-count raster", variable="clear_count")
        assert_same_grid(geobox_of(arr), geobox, f"{season} clear-count", f"{first} mosaic")
        clear[season] = arr.isel(band=0)
        clear_paths[season] = path
    sources = Sources(opened, label_arr.isel(band=0), clear, files, band_index, label_arr)
    return OpenedSources(sources, paths, label_path, clear_paths, tuple(bands), geobox)
