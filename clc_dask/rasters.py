"""Reading and writing rasters: chunked GeoTIFF → COG, atomically, with colour tables.

Every write goes to a temporary file next to the target and is renamed into place only
when complete, so a killed job never leaves a file that looks finished.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import dask
import dask.array as da
import numpy as np
import rasterio
import rasterio.shutil
import rioxarray  # noqa: F401  (registers the .rio accessor)
import xarray as xr
from odc.geo.geobox import GeoBox
from odc.geo.xr import xr_coords
from rasterio.windows import Window

from clc_dask.errors import ClcDaskError, InputError, OutputError
from clc_dask.stores import atomic_path

log = logging.getLogger(__name__)

COG_OPTIONS = {"COMPRESS": "DEFLATE", "PREDICTOR": "2", "BLOCKSIZE": "512", "BIGTIFF": "IF_SAFER"}


def check_writable(path: str | os.PathLike[str], overwrite: bool = True) -> Path:
    """Fail early (before any compute) if ``path`` cannot be written."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise OutputError(f"{path} exists: pass `overwrite` to replace it, or choose another `out`.")
    parent = path.parent if str(path.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"Cannot create the folder {parent}: {exc.strerror}. Choose another `out`.") from exc
    if not os.access(parent, os.W_OK):
        raise OutputError(f"Cannot write to {parent}: permission denied. Choose another `out`.")
    return path


def geobox_of(array: xr.DataArray) -> GeoBox:
    """The GeoBox of a georeferenced DataArray (raises if it has none)."""
    gbox = array.odc.geobox
    if gbox is None:
        raise InputError("This array has no georeference (CRS and x/y coordinates): cannot place it on a grid.")
    return gbox


def to_dataarray(data: np.ndarray | da.Array, geobox: GeoBox, band_names: Sequence[str] | None = None,
                 name: str | None = None, nodata: int | float | None = 0) -> xr.DataArray:
    """Wrap a (y, x) or (band, y, x) array as a DataArray on ``geobox`` (coords, CRS, nodata)."""
    coords = xr_coords(geobox)
    if data.ndim == 2:
        arr = xr.DataArray(data, dims=("y", "x"), coords=coords, name=name)
    else:
        bands = list(band_names) if band_names else [str(i + 1) for i in range(data.shape[0])]
        arr = xr.DataArray(data, dims=("band", "y", "x"), coords={"band": bands, **coords}, name=name)
    arr = arr.rio.write_crs(geobox.crs.to_wkt())
    arr = arr.rio.write_transform(geobox.affine)
    if nodata is not None:
        arr = arr.rio.write_nodata(nodata)
    return arr


def open_raster(path: str | os.PathLike[str], chunks: int | Mapping[str, int] | None = 2048) -> xr.DataArray:
    """Open a GeoTIFF/COG lazily as (band, y, x) with band names from its descriptions."""
    path = str(path)
    if not path.startswith(("http://", "https://", "/vsi")) and not Path(path).exists():
        raise InputError(f"Raster {path} does not exist: check the path.")
    try:
        arr = rioxarray.open_rasterio(path, chunks=chunks if chunks else None, lock=False)
    except Exception as exc:
        raise InputError(f"Cannot open raster {path}: {exc}. Is it a GeoTIFF?") from exc
    with rasterio.open(path) as src:
        names = [d or str(i + 1) for i, d in enumerate(src.descriptions)]
    arr = arr.assign_coords(band=names)
    return arr


@contextlib.contextmanager
def reading(path: str | os.PathLike[str], what: str = "raster") -> Iterator[None]:
    """Turn a failure to read ``path`` (e.g. a file cut short: GDAL's "IReadBlock failed")
    raised in the block — also from dask tasks computed there — into :class:`InputError`
    naming the file. Other errors pass unchanged."""
    try:
        yield
    except ClcDaskError:
        raise
    except Exception as exc:
        chain, cause = [], exc  # GDAL names the file in the error a "Read failed" was raised from
        while cause is not None and len(chain) < 8:
            chain.append(str(cause))
            cause = cause.__cause__ or cause.__context__
        if not any(str(path) in text or Path(path).name in text for text in chain):
            raise
        text = next(t for t in chain if str(path) in t or Path(path).name in t)
        raise InputError(
            f"Cannot read the {what} {path}: {text.strip()}. The file is damaged or cut short (e.g. a "
            "copy that did not finish): write it again, or check the disk it is on."
        ) from exc


def write_geotiff(
    array: xr.DataArray,
    path: str | os.PathLike[str],
    *,
    nodata: int | float | None = 0,
    colormap: Mapping[int, tuple[int, int, int, int]] | None = None,
    band_names: Sequence[str] | None = None,
    cog: bool = True,
    tags: Mapping[str, str] | None = None,
    overwrite: bool = True,
) -> Path:
    """Write a 2-D or (band, y, x) DataArray (numpy or dask) as a tiled COG, atomically.

    Chunks are computed and written one window at a time (memory stays at one chunk per
    thread); the finished GeoTIFF is then copied to a COG with overviews and renamed into
    place. ``colormap`` (code → RGBA) is embedded for single-band code rasters.
    """
    path = check_writable(path, overwrite)
    gbox = geobox_of(array)
    data = array.data if array.ndim == 3 else array.data[None]
    if band_names is None and array.ndim == 3 and "band" in array.coords:
        band_names = [str(b) for b in array["band"].values]
    profile = {
        "driver": "GTiff", "width": gbox.shape.x, "height": gbox.shape.y, "count": data.shape[0],
        "dtype": np.dtype(array.dtype).name, "crs": gbox.crs.to_wkt(), "transform": gbox.affine,
        "nodata": nodata, "tiled": True, "blockxsize": 512, "blockysize": 512,
        "compress": "DEFLATE", "BIGTIFF": "IF_SAFER",
    }
    with atomic_path(path, suffix=".tif") as tmp:
        # a sidecar of the temporary file: atomic_path removes it whatever happens (after a
        # failed write, once it has seen whether a file-size limit was reached)
        plain = tmp.with_name(tmp.name + ".plain.tif") if cog else tmp
        with rasterio.open(plain, "w", **profile) as dst:
            _write_blocks(dst, data)
            if band_names:
                for i, name in enumerate(band_names, start=1):
                    dst.set_band_description(i, str(name))
            if colormap is not None and data.shape[0] == 1:
                dst.write_colormap(1, dict(colormap))
            if tags:
                dst.update_tags(**{k: str(v) for k, v in tags.items()})
        if cog:
            rasterio.shutil.copy(plain, tmp, driver="COG", **COG_OPTIONS,
                                 RESAMPLING="NEAREST" if colormap is not None else "AVERAGE")
            plain.unlink()
        _check_complete(tmp)
    log.info("wrote %s (%d×%d px, %d band(s))", path, gbox.shape.y, gbox.shape.x, data.shape[0])
    return path


def _check_complete(path: Path) -> None:
    """Read the last block of every band of a file just written: GDAL does not always report
    a write cut short (a full disk, a file-size limit), and such a file must never be kept."""
    try:
        with rasterio.open(path) as src:
            height, width = src.block_shapes[0]
            row, col = (src.height - 1) // height * height, (src.width - 1) // width * width
            src.read(window=Window(col, row, src.width - col, src.height - row))
    except rasterio.errors.RasterioError as exc:
        raise OSError(f"{path} was not written completely: {exc}") from exc


def _write_blocks(dst: rasterio.io.DatasetWriter, data: np.ndarray | da.Array) -> None:
    """Compute ``data`` chunk by chunk (dask) and write each into its window."""
    if not isinstance(data, da.Array):
        dst.write(np.asarray(data))
        return
    ychunks, xchunks = data.chunks[1], data.chunks[2]
    data = data.rechunk({0: -1})
    y0 = 0
    for iy, ny in enumerate(ychunks):
        x0 = 0
        blocks = [data.blocks[0, iy, ix] for ix in range(len(xchunks))]
        for block, nx in zip(dask.compute(*blocks), xchunks, strict=True):
            dst.write(block, window=Window(x0, y0, nx, ny))
            x0 += nx
        y0 += ny
