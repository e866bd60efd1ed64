"""Labels: a CLC vector or raster → a CLC code raster on the run's grid, as a lazy dask array.

Two kinds of source:

* **Vector** (GeoPackage, Shapefile, FileGDB, … anything GDAL/pyogrio reads): polygons with a
  code field (``CODE_18`` by default; values may be text ``"311"`` or numbers). Only features
  near the grid are read (the layer's spatial index), they are reprojected to the grid CRS and
  rasterized **per chunk**: while the graph is built, each chunk gets the polygons that
  intersect it (an STRtree query on the chunk's box), clipped to the chunk plus one pixel, and
  only those travel with that chunk's task. Pixels take the code of the polygon holding their
  centre (``rasterize(all_touched=False)``), so class areas are unbiased and the result does
  not depend on the chunking.
* **Raster** (GeoTIFF/COG/VRT): either 3-digit (or 2-digit) CLC codes, or the EEA's
  ``GRID_CODE`` 1…44 (0/48/49/50/255 = no data). Which one is detected from the values present
  where the raster overlaps the grid, or forced with ``grid_code=True/False``. The codes are
  reduced to the asked level first, then warped onto the grid with odc-geo (chunked): nearest
  neighbour when the grid's pixels are no larger than the source's, the majority (``mode``) of
  the source pixels when the grid is coarser (downsampling), so a 100 m pixel gets the class
  covering most of it rather than whichever one its centre happens to hit.

The CLC "special" codes 990/995/999 (unclassified land, unclassified water, no data) become 0,
like GRID_CODE 48/49/50. Everything is checked (fields, codes, CRS, overlap) while the graph is
built, so a bad input fails before anything is written.
"""

from __future__ import annotations

import logging
import os
import uuid
import warnings
from collections.abc import Sequence
from pathlib import Path

import dask
import dask.array as da
import geopandas as gpd
import numpy as np
import pandas as pd
import pyogrio
import rasterio
import rasterio.features
import shapely
import xarray as xr
from dask.highlevelgraph import HighLevelGraph
from odc.geo import CRS
from odc.geo.geobox import GeoBox, GeoboxTiles
from odc.geo.overlap import compute_reproject_roi
from odc.geo.xr import xr_reproject
from rasterio.errors import NotGeoreferencedWarning

from clc_dask import classes
from clc_dask.errors import ConfigError, InputError
from clc_dask.grid import DEFAULT_TILE_SIZE, chunk_size_for, resolve_grid
from clc_dask.rasters import geobox_of, open_raster, to_dataarray, write_geotiff

log = logging.getLogger(__name__)

DEFAULT_FIELD = "CODE_18"
#: CLC codes meaning "no class" (990 unclassified land, 995 unclassified water, 999 no data).
SPECIAL_NODATA_CODES = (990, 995, 999)
#: GeoTIFF tag written by :func:`write_labels`, read back to recognise clc-dask label rasters.
LEVEL_TAG = "CLC_LEVEL"
RASTER_SUFFIXES = frozenset({".tif", ".tiff", ".vrt", ".img", ".jp2", ".nc"})
VECTOR_SUFFIXES = frozenset(
    {".gpkg", ".shp", ".gdb", ".geojson", ".json", ".fgb", ".gml", ".kml", ".sqlite", ".parquet"}
)
_GRID_CODE_VALUES = frozenset(range(1, 45)) | (frozenset(classes.GRID_CODE_NODATA) - {0})


def label_dtype(level: int) -> np.dtype:
    """The dtype of a code raster of ``level``: uint8 for Levels 1–2, uint16 for Level 3."""
    _check_level(level)
    return np.dtype(np.uint16 if level == 3 else np.uint8)


def make_labels(
    source: str | os.PathLike[str],
    grid: GeoBox | None = None,
    *,
    like: str | os.PathLike[str] | GeoBox | xr.DataArray | None = None,
    epsg: int | None = None,
    resolution: float | None = None,
    bounds: Sequence[float] | None = None,
    level: int = 2,
    field: str = DEFAULT_FIELD,
    chunk_size: int = DEFAULT_TILE_SIZE,
    layer: str | None = None,
    grid_code: bool | None = None,
    resampling: str = "auto",
) -> xr.DataArray:
    """CLC codes from a vector or raster ``source`` on a grid, as a lazy (y, x) DataArray.

    The labelling stage: rasterize CLC polygons chunk by chunk (``map_blocks``), or warp a
    CLC raster, onto the grid of the imagery, so that labels and mosaics share every pixel.
    Write the result with :func:`write_labels`.

    Args:
        source: CLC polygons (GeoPackage, Shapefile, FileGDB, …) or a CLC raster (GeoTIFF).
        grid: the target grid (CRS, pixel size in metres, bounds) as a GeoBox. Alternatively:
        like: take the whole grid from this raster file (e.g. the mosaic), DataArray or GeoBox —
            what you want when labelling for training, so labels and mosaic line up exactly.
        epsg: CRS of the grid (EPSG code), with ``bounds``.
        resolution: pixel size in metres with ``bounds`` (default 10, Sentinel-2's).
        bounds: (left, bottom, right, top) in ``epsg`` coordinates, snapped outwards to pixels.
        level: CLC level of the output: 2 (default, uint8 codes 11…52), 3 (uint16 111…523)
            or 1 (uint8 1…5). The source must hold codes at least that fine.
        field: vector field holding the codes (text or integer). Ignored for rasters.
            Change it for other CLC vintages (``CODE_12``) or national products.
        chunk_size: dask chunk edge in pixels; rounded down to a divisor of the 2048 px tile
            so chunks divide tiles. Smaller chunks mean smaller tasks, more of them.
        layer: vector layer name; needed only when several layers could hold ``field``.
        grid_code: raster only: ``True`` = values are EEA GRID_CODE 1…44, ``False`` = values are
            CLC codes, ``None`` = decide from the values (error if they fit both).
        resampling: raster only: ``"auto"`` (nearest, or mode when the grid is coarser than
            the source), ``"nearest"`` or ``"mode"``.

    Returns:
        (y, x) dask-backed DataArray of CLC codes, 0 = no data, georeferenced on the grid,
        with ``attrs["clc_level"] = level``.

    Raises:
        ConfigError: no grid, or contradictory grid descriptions.
        InputError: unreadable source, missing field or layer, unknown codes, no CRS, or no
            overlap with the grid. Raised while building the graph, before any write.
    """
    geobox = resolve_grid(grid=grid, like=like, epsg=epsg, resolution=resolution, bounds=bounds)
    _check_level(level)
    size = chunk_size_for(DEFAULT_TILE_SIZE, chunk_size)
    if size != chunk_size:
        log.info("chunk size %d px → %d px so that chunks divide %d px tiles", chunk_size, size,
                 DEFAULT_TILE_SIZE)
    path = _existing(source)
    if _is_raster(path):
        if layer is not None:
            raise ConfigError(f"{path} is a raster: `layer` applies to vector sources only.")
        data = _raster_labels(path, geobox, level=level, chunk_size=size, grid_code=grid_code,
                              resampling=resampling)
    else:
        if grid_code is not None:
            raise ConfigError(f"{path} is a vector: `grid_code` applies to raster sources only.")
        shapes = read_clc_vector(path, geobox, level=level, field=field, layer=layer)
        data = rasterize_chunked(shapes, geobox, dtype=label_dtype(level), chunk_size=size)
    labels = to_dataarray(data, geobox, name=f"clc_level{level}", nodata=classes.NODATA_CODE)
    labels.attrs["clc_level"] = level
    return labels


#: The name this stage had first (scripts use it).
label_raster = make_labels


def write_labels(
    labels: xr.DataArray, out: str | os.PathLike[str], *, level: int | None = None,
    overwrite: bool = True,
) -> Path:
    """Write a code raster as a COG with nodata 0 and the official CLC colour table.

    Args:
        labels: (y, x) codes, e.g. from :func:`label_raster` (numpy or dask).
        out: target GeoTIFF path (written atomically).
        level: CLC level of the codes; default ``labels.attrs["clc_level"]``, else 3 for
            uint16 and 2 for uint8 data.
        overwrite: replace an existing file.

    Returns:
        The written path.
    """
    if level is None:
        level = int(labels.attrs.get("clc_level", 3 if labels.dtype == np.uint16 else 2))
    _check_level(level)
    want = label_dtype(level)
    if labels.dtype != want:
        labels = labels.astype(want)
    return write_geotiff(labels, out, nodata=classes.NODATA_CODE, colormap=classes.colormap(level),
                         tags={LEVEL_TAG: str(level)}, overwrite=overwrite)


# --------------------------------------------------------------------------- vector input


def read_clc_vector(
    source: str | os.PathLike[str], geobox: GeoBox, *, level: int = 2, field: str = DEFAULT_FIELD,
    layer: str | None = None,
) -> gpd.GeoDataFrame:
    """The CLC polygons overlapping ``geobox``, in its CRS, with a ``code`` column at ``level``.

    Only features whose bounding boxes meet the grid are read. Codes are parsed (text or
    numbers), validated against the official legend (Levels 3 and 2; 990/995/999 → 0) and
    reduced to ``level``. Row order is kept: where polygons overlap, the later one wins.
    """
    path = _existing(source)
    layer = _pick_layer(path, layer, field)
    info = pyogrio.read_info(path, layer=layer)
    where = f"{path} (layer {layer!r})"
    fields = [str(f) for f in info["fields"]]
    field = _match_field(field, fields, where)
    if info["crs"] is None:
        raise InputError(
            f"{where} has no CRS, so its polygons cannot be placed on the grid ({crs_name(geobox.crs)}). "
            "Assign the CRS the coordinates are in, e.g. "
            "`ogr2ogr -a_srs EPSG:3035 fixed.gpkg input.gpkg`, and label from the fixed file."
        )
    src_crs = CRS(info["crs"])
    frame = pyogrio.read_dataframe(path, layer=layer, columns=[field], fid_as_index=True,
                                   bbox=_bbox_in(geobox, src_crs))
    frame = frame.sort_index()  # a spatial filter returns index order; overlaps need file order
    if frame.crs is None:  # pragma: no cover - read_info said it has one
        frame = frame.set_crs(info["crs"])
    frame = frame[~(frame.geometry.isna() | frame.geometry.is_empty)]
    kinds = set(frame.geom_type.unique()) - {"Polygon", "MultiPolygon"}
    if kinds:
        raise InputError(
            f"{where} holds {sorted(kinds)} geometries: CLC labels need polygons. "
            "Pick the polygon layer with `layer`."
        )
    if src_crs != geobox.crs:
        try:
            frame = frame.to_crs(geobox.crs.to_wkt())
        except Exception as exc:  # pyproj raises several types
            raise InputError(
                f"Cannot transform {where} from {crs_name(src_crs)} to the grid's "
                f"{crs_name(geobox.crs)}: {exc}. Reproject the file first (ogr2ogr -t_srs) or "
                "choose a grid CRS covering it."
            ) from exc
    extent = shapely.box(*geobox.boundingbox)
    frame = frame[frame.intersects(extent)]
    if frame.empty:
        raise InputError(_no_overlap_message(where, info.get("total_bounds"), src_crs, geobox))
    codes = _parse_codes(frame[field], field, where, fields)
    codes = np.asarray(classes.to_level(codes, level), dtype=label_dtype(level))
    invalid = ~frame.geometry.is_valid
    geoms = frame.geometry.values
    if invalid.any():
        log.warning("%s: repairing %d invalid polygon(s) with make_valid", where, int(invalid.sum()))
        geoms = gpd.GeoSeries(geoms).make_valid().values
    log.info("%s: %d polygon(s) overlap the grid", where, len(frame))
    return gpd.GeoDataFrame({"code": codes}, geometry=geoms, crs=geobox.crs.to_wkt(),
                            index=frame.index)


def rasterize_chunked(
    shapes: gpd.GeoDataFrame, geobox: GeoBox, *, dtype: np.dtype | type = np.uint8,
    chunk_size: int = DEFAULT_TILE_SIZE,
) -> da.Array:
    """Rasterize polygons (``code`` column, in ``geobox``'s CRS) as a dask array, one task per chunk.

    The geometries are partitioned while the graph is built: chunk (i, j) receives only the
    polygons meeting its box, clipped to the box plus one pixel, as its own small graph input;
    ``map_blocks`` then burns them with pixel-centre sampling. No task holds the whole layer.
    """
    tiles = GeoboxTiles(geobox, (chunk_size, chunk_size))
    geoms = np.asarray(shapes.geometry.values, dtype=object)
    codes = np.asarray(shapes["code"].to_numpy(), dtype=dtype)
    tree = shapely.STRtree(geoms)
    pad = max(abs(geobox.resolution.x), abs(geobox.resolution.y))
    name = f"clc-label-shapes-{uuid.uuid4().hex}"  # hashing a country's geometries costs more
    layer: dict[tuple[str, int, int], np.ndarray] = {}
    for iy, ix in np.ndindex(tiles.shape.yx):
        left, bottom, right, top = tiles[iy, ix].boundingbox
        hits = np.sort(tree.query(shapely.box(left, bottom, right, top), predicate="intersects"))
        clipped = shapely.clip_by_rect(geoms[hits], left - pad, bottom - pad, right + pad, top + pad)
        keep = ~shapely.is_empty(clipped)
        cell = np.empty((1, 1), dtype=object)
        cell[0, 0] = (clipped[keep], codes[hits][keep])
        layer[(name, iy, ix)] = cell
    nblocks = tiles.shape.yx
    parts = da.Array(HighLevelGraph.from_collections(name, layer, dependencies=()), name,
                     chunks=((1,) * nblocks[0], (1,) * nblocks[1]), dtype=object,
                     meta=np.empty((0, 0), dtype=object))
    log.info("rasterizing %d polygon(s) in %d×%d chunks of %d px", len(geoms), *nblocks, chunk_size)
    return da.map_blocks(_rasterize_block, parts, geobox=geobox, out_dtype=np.dtype(dtype),
                         chunks=tiles.chunks, dtype=dtype, meta=np.empty((0, 0), dtype=dtype),
                         name=name.replace("shapes", "rasterize"))


def _rasterize_block(part: np.ndarray, *, geobox: GeoBox, out_dtype: np.dtype,
                     block_info: dict | None = None) -> np.ndarray:
    """Burn one chunk's polygons into that chunk's window of ``geobox`` (pixel centres)."""
    (y0, y1), (x0, x1) = block_info[None]["array-location"]
    chunk = geobox[y0:y1, x0:x1]
    geoms, codes = part[0, 0]
    polys = _polygonal(geoms)
    if not len(polys[0]):
        return np.zeros(chunk.shape.yx, dtype=out_dtype)
    with warnings.catch_warnings():
        # rasterio 1.4 warns from its scratch in-memory dataset before the transform is set.
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        return rasterio.features.rasterize(
            zip(polys[0], codes[polys[1]], strict=True), out_shape=chunk.shape.yx,
            transform=chunk.affine, fill=classes.NODATA_CODE, all_touched=False, dtype=out_dtype,
        )


def _polygonal(geoms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Polygon parts of clipped geometries (clipping may leave stray lines on the clip box),
    with the index of the geometry each part came from."""
    parts, index = shapely.get_parts(geoms, return_index=True)
    keep = np.isin(shapely.get_type_id(parts), (3, 6))  # Polygon, MultiPolygon
    return parts[keep], index[keep]


def _pick_layer(path: Path, layer: str | None, field: str) -> str:
    try:
        listed = pyogrio.list_layers(path)
    except Exception as exc:
        raise InputError(f"Cannot read {path} as a vector (GeoPackage, Shapefile, …): {exc}.") from exc
    spatial = [str(name) for name, geom in listed if geom is not None]
    if layer is not None:
        if layer not in spatial:
            raise InputError(f"{path} has no layer {layer!r}: its layers are {spatial}. "
                             "Pass one of them as `layer`.")
        return layer
    if len(spatial) == 1:
        return spatial[0]
    if not spatial:
        raise InputError(f"{path} holds no geometry layer: give a CLC polygon file.")
    fields = {name: [str(f) for f in pyogrio.read_info(path, layer=name)["fields"]]
              for name in spatial}
    holding = [name for name in spatial if field.lower() in (f.lower() for f in fields[name])]
    if len(holding) == 1:
        log.info("%s: using layer %r, the only one with field %r", path, holding[0], field)
        return holding[0]
    listing = "; ".join(f"{name}: {fields[name]}" for name in spatial)
    raise InputError(
        f"{path} has {len(spatial)} layers and {'several' if holding else 'none'} of them hold "
        f"the field {field!r} (layers and their fields: {listing}): choose the layer with "
        "`layer` and the field holding CLC codes as `field`."
    )


def _match_field(field: str, fields: list[str], where: str) -> str:
    if field in fields:
        return field
    same = [f for f in fields if f.lower() == field.lower()]
    if len(same) == 1:  # the EEA FileGDB spells it Code_18
        log.info("%s: using field %r for %r", where, same[0], field)
        return same[0]
    raise InputError(
        f"{where} has no field {field!r}: its fields are {fields}. "
        "Pass the one holding CLC codes as `field` (e.g. CODE_12)."
    )


def _parse_codes(values: pd.Series, field: str, where: str, fields: list[str]) -> np.ndarray:
    """Text or numeric codes → int64; special codes → 0; anything else is an error."""
    nulls = int(values.isna().sum())
    if nulls:
        raise InputError(
            f"{nulls} polygon(s) of {where} have no value in field {field!r}: every CLC polygon "
            "needs a code. Fill them in (999 = no data) or choose another `field`."
        )
    allowed = set(classes.official_codes(3)) | set(classes.official_codes(2))
    mapping: dict[object, int] = {}
    unknown: list[str] = []
    for raw in pd.unique(values):
        code = _as_int(raw)
        if code in SPECIAL_NODATA_CODES:
            mapping[raw] = classes.NODATA_CODE
        elif code is not None and code in allowed:
            mapping[raw] = code
        else:
            unknown.append(str(raw))
    if unknown:
        raise InputError(
            f"Unknown CLC code(s) {sorted(unknown)[:10]} in field {field!r} of {where}: "
            "CLC codes are the official Level-3 codes 111…523 (or Level-2 11…52; "
            f"990/995/999 mean no data). Check `field` (fields: {fields})."
        )
    return values.map(mapping).to_numpy(dtype=np.int64)


def _as_int(raw: object) -> int | None:
    try:
        number = float(str(raw).strip())
    except ValueError:
        return None
    return int(number) if number.is_integer() else None


def _bbox_in(geobox: GeoBox, crs: CRS) -> tuple[float, float, float, float] | None:
    """The grid's bounding box in the source CRS (to read only nearby features), if computable."""
    try:
        box = geobox.extent.to_crs(crs).boundingbox
    except Exception:  # projection outside its domain: read everything, filter afterwards
        return None
    if not np.all(np.isfinite(tuple(box))):
        return None
    return tuple(box)


def _no_overlap_message(where: str, source_bounds: object, src_crs: CRS, geobox: GeoBox) -> str:
    grid = ", ".join(f"{v:.0f}" for v in geobox.boundingbox)
    have = "" if source_bounds is None else (
        " (source covers " + ", ".join(f"{v:.0f}" for v in source_bounds) + f" in {crs_name(src_crs)})"
    )
    return (
        f"No CLC data of {where} overlaps the grid {grid} in {crs_name(geobox.crs)}{have}: check the "
        "grid's `bounds` and `epsg` (bounds are in the grid's CRS), or use the CLC file "
        "covering this area."
    )


# --------------------------------------------------------------------------- raster input


def _raster_labels(path: Path, geobox: GeoBox, *, level: int, chunk_size: int,
                   grid_code: bool | None, resampling: str) -> da.Array:
    """A code/GRID_CODE raster reduced to ``level`` and warped onto ``geobox`` (chunked)."""
    if resampling not in ("auto", "nearest", "mode"):
        raise ConfigError(f"resampling must be auto, nearest or mode, not {resampling!r}.")
    src = open_raster(path, chunks=chunk_size)
    if src.sizes["band"] != 1:
        raise InputError(f"{path} has {src.sizes['band']} bands: a CLC raster has one band of codes.")
    src = src.isel(band=0, drop=True)
    src_gbox = src.odc.geobox
    if src_gbox is None or src_gbox.crs is None:
        raise InputError(
            f"{path} has no CRS, so it cannot be placed on the grid ({crs_name(geobox.crs)}). Assign the "
            "CRS its coordinates are in, e.g. `gdal_edit.py -a_srs EPSG:3035 FILE`."
        )
    roi = compute_reproject_roi(src_gbox, geobox, padding=2)
    if _empty(roi.roi_src) or _empty(roi.roi_dst):
        raise InputError(_no_overlap_message(str(path), tuple(src_gbox.boundingbox), src_gbox.crs,
                                             geobox))
    src = src.isel(y=roi.roi_src[0], x=roi.roi_src[1])
    nodata = src.rio.nodata
    values = _present_values(src.data, nodata)
    if not values:
        raise InputError(
            f"{path} holds only no data where it overlaps the grid "
            f"{', '.join(f'{v:.0f}' for v in geobox.boundingbox)} in {crs_name(geobox.crs)}: check the "
            "grid's bounds or use the CLC raster covering this area."
        )
    is_grid_code = _grid_code_or_codes(path, values, grid_code)
    if not is_grid_code:
        codes = np.array(sorted(values), dtype=np.int64)
        codes = np.where(np.isin(codes, SPECIAL_NODATA_CODES), 0, codes)
        classes.to_level(codes, level)  # raises if the raster is coarser than ``level``
    dtype = label_dtype(level)
    codes = da.map_blocks(_codes_block, src.data, nodata=nodata, grid_code=is_grid_code,
                          level=level, out_dtype=dtype, dtype=dtype)
    source_codes = to_dataarray(codes, geobox_of(src), nodata=classes.NODATA_CODE)
    method = resampling
    if method == "auto":
        method = "mode" if roi.scale > 1.01 else "nearest"
    log.info("%s: %s → Level-%d codes, %s resampling (grid pixel %.3g× the source's)", path,
             "GRID_CODE" if is_grid_code else "CLC codes", level, method, roi.scale)
    out = xr_reproject(source_codes, geobox, resampling=method, dst_nodata=classes.NODATA_CODE,
                       dtype=dtype, chunks=(chunk_size, chunk_size))
    return out.data


def _empty(roi: tuple[slice, ...]) -> bool:
    return any(s.stop <= s.start for s in roi)


def _present_values(data: da.Array, nodata: float | None) -> set[int]:
    """The distinct valid values of a source raster (one pass over the overlapping part)."""
    blocks = [dask.delayed(_block_values)(block, nodata) for block in data.to_delayed().ravel()]
    found = np.unique(np.concatenate(dask.compute(*blocks))) if blocks else np.empty(0)
    fractional = found[found != np.round(found)]
    if fractional.size:
        raise InputError("A CLC raster holds whole-number codes, but this one has fractions "
                         f"(e.g. {fractional[:3].tolist()}).")
    return {int(v) for v in found if v != classes.NODATA_CODE}


def _block_values(block: np.ndarray, nodata: float | None) -> np.ndarray:
    values = np.unique(block).astype(np.float64)
    values = values[~np.isnan(values)]
    if nodata is not None and not np.isnan(nodata):
        values = values[values != nodata]
    return values


def _grid_code_or_codes(path: Path, values: set[int], grid_code: bool | None) -> bool:
    """Decide whether the raster holds GRID_CODE 1…44 (True) or CLC codes (False)."""
    codes = set(classes.official_codes(3)) | set(classes.official_codes(2)) | set(SPECIAL_NODATA_CODES)
    fits_grid, fits_codes = values <= _GRID_CODE_VALUES, values <= codes
    shown = sorted(values)[:12]
    if grid_code is True and not fits_grid:
        raise InputError(f"{path} holds values {sorted(values - _GRID_CODE_VALUES)[:10]} outside "
                         "GRID_CODE 1…44 (48/49/50/255 = no data): set `grid_code` False if it holds "
                         "CLC codes.")
    if grid_code is False and not fits_codes:
        raise InputError(f"Unknown CLC code(s) {sorted(values - codes)[:10]} in {path}: valid "
                         "codes are Level-3 111…523 or Level-2 11…52 (990/995/999 = no data); "
                         "set `grid_code` True if it holds EEA GRID_CODE 1…44.")
    if grid_code is not None:
        return grid_code
    if fits_grid and fits_codes:
        with rasterio.open(path) as ds:
            if LEVEL_TAG in ds.tags():  # written by write_labels: CLC codes
                return False
        raise InputError(
            f"{path} holds values {shown} that are valid both as EEA GRID_CODE (1…44) and as "
            "Level-2 CLC codes: say which with `grid_code` (True: GRID_CODE, False: CLC codes)."
        )
    if fits_grid or fits_codes:
        return fits_grid
    raise InputError(
        f"{path} is neither a CLC code raster nor an EEA GRID_CODE raster: values "
        f"{sorted(values - codes)[:10]} are not CLC codes (111…523, 11…52) and "
        f"{sorted(values - _GRID_CODE_VALUES)[:10]} are not GRID_CODE (1…44). "
        "Check the file, or its nodata value (gdal_edit.py -a_nodata)."
    )


def _codes_block(block: np.ndarray, *, nodata: float | None, grid_code: bool, level: int,
                 out_dtype: np.dtype) -> np.ndarray:
    """Source values → CLC codes of ``level`` for one block; no data → 0."""
    valid = np.ones(block.shape, dtype=bool)
    if nodata is not None:
        valid &= ~np.isnan(block) if np.isnan(nodata) else block != nodata
    if block.dtype.kind == "f":
        valid &= ~np.isnan(block)
    values = np.where(valid, block, 0).astype(np.int64)
    if grid_code:
        codes = classes.grid_code_to_code(np.clip(values, 0, 255)).astype(np.int64)
    else:
        codes = np.where(np.isin(values, SPECIAL_NODATA_CODES), 0, values)
    return np.asarray(classes.to_level(codes, level)).astype(out_dtype)


# --------------------------------------------------------------------------- helpers


def crs_name(crs: CRS) -> str:
    """A short name for messages: ``EPSG:25830`` when the CRS has one, else its WKT name."""
    return f"EPSG:{crs.epsg}" if crs.epsg else str(crs.proj.name)


def _check_level(level: int) -> None:
    if level not in (1, 2, 3):
        raise ConfigError(f"CLC level must be 1, 2 or 3, not {level!r} (set `level` to 2 or 3).")


def _existing(source: str | os.PathLike[str]) -> Path:
    path = Path(source)
    if not path.exists():
        raise InputError(f"{path} does not exist: check `source`.")
    return path


def _is_raster(path: Path) -> bool:
    """Raster by suffix; otherwise whatever GDAL opens as a raster but not as a vector."""
    suffix = path.suffix.lower()
    if suffix in RASTER_SUFFIXES:
        return True
    if suffix in VECTOR_SUFFIXES or path.is_dir():
        return False
    try:
        pyogrio.list_layers(path)
        return False
    except Exception:
        pass
    try:
        with rasterio.open(path):
            return True
    except rasterio.errors.RasterioIOError as exc:
        raise InputError(
            f"Cannot read {path} as a CLC vector or raster: give a GeoPackage/Shapefile "
            "of polygons or a GeoTIFF of codes."
        ) from exc
