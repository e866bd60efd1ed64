"""Seasonal cloud-free mosaics: SCL-masked, harmonised, per-pixel median over satellite passes.

Overlapping granules of one satellite pass (neighbouring MGRS tiles, tiles of two UTM
zones) are one observation, not several: they are first merged per pass (see
:func:`satellite_passes`): per pixel and band the pass shows its first granule that is
clear there and has data, in a fixed order (granules in the grid's CRS first, then by item
id), never in the catalog's order.

For each pixel and band the mosaic is then the median of the *clear* observations of the
season: passes whose SCL class is not no-data (0), saturated/defective (1), cloud shadow
(3), medium/high-probability cloud (8, 9), thin cirrus (10) — and snow (11) if asked —
and whose DN is not 0. Each granule's harmonisation offset (``boa_offset``, 1000 DN for
baseline ≥ 04.00 scenes still holding it) is subtracted first, so every scene means
reflectance = DN / 10000. Values stay uint16 throughout (never float64): the median is
computed by sorting DN within each block. An even number of clear passes gives the mean of
the two middle values, rounded half up. Pixels without any clear pass are 0 (no data).

Everything is lazy until :func:`write_mosaic` (COG or Zarr, written atomically).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import dask.array as da
import numpy as np
import pystac
import xarray as xr
from odc.geo.geobox import GeoBox
from odc.geo.geom import Geometry
from scipy.sparse import coo_array
from scipy.sparse.csgraph import connected_components

from clc_dask.errors import ConfigError, InputError, OutputError
from clc_dask.grid import resolve_grid
from clc_dask.items import SCL_BAND, composite_bands, normalize_items
from clc_dask.load import DEFAULT_CHUNK_SIZE, load_scenes
from clc_dask.rasters import check_writable, geobox_of, to_dataarray, write_geotiff
from clc_dask.search import area_geometry, save_item_collection, search_items
from clc_dask.stores import move_into_place, staging_directory, write_zarr

log = logging.getLogger(__name__)

Composite = Literal["rgb", "nrg", "all"]
#: ``Dataset.attrs`` key of the scenes a :func:`make_mosaic` result was made from
#: (a ``pystac.ItemCollection``; :func:`write_mosaic` saves it beside the mosaic).
ITEMS_ATTR = "items"
#: SCL classes that never count as a clear observation.
MASKED_SCL_CLASSES: tuple[int, ...] = (0, 1, 3, 8, 9, 10)
SNOW_SCL_CLASS = 11
NODATA = 0
_INVALID = np.iinfo(np.uint16).max  # sorts after every valid DN
_SECONDS_PER_DAY = 86_400
_SECONDS_PER_DEGREE = 240  # local mean solar time: 24 h per 360° of longitude
#: Sentinel-2 datatake ids, e.g. ``GS2B_20230810T100609_033589_N05.09``: platform letter,
#: datatake start and absolute orbit.
_DATATAKE = re.compile(r"^GS2([A-Z])_\d{8}T\d{6}_(\d{6})(_|$)")
#: One satellite pass: time indices of its granules, in merge order (the first wins).
Pass = tuple[int, ...]


def masked_classes(mask_snow: bool = False) -> tuple[int, ...]:
    """SCL classes treated as not clear (snow/ice added when ``mask_snow``)."""
    return MASKED_SCL_CLASSES + ((SNOW_SCL_CLASS,) if mask_snow else ())


def make_mosaic(
    source: str | os.PathLike[str] | None = None,
    *,
    items: Sequence[pystac.Item] | str | os.PathLike[str] | None = None,
    bbox: Sequence[float] | None = None,
    aoi: object | None = None,
    season: str | None = None,
    years: Sequence[int] = (),
    datetime: str | None = None,
    max_cloud: float | None = None,
    collection: str | None = None,
    composite: Composite | str | Sequence[str] = "nrg",
    grid: GeoBox | None = None,
    like: str | os.PathLike[str] | GeoBox | xr.DataArray | None = None,
    epsg: int | None = None,
    resolution: float | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    mask_snow: bool = False,
    gdal: Mapping[str, object] | None = None,
) -> xr.Dataset:
    """A seasonal cloud-free mosaic of an area, lazily: search → grid → load → median.

    The mosaic stage in one call. Nothing is read until the result is computed or written
    (:func:`write_mosaic`); the scenes used travel with it in ``attrs["items"]``.

    Args:
        source: where to search: a catalog preset (``earth-search``, ``planetary-computer``),
            a STAC API URL, a static catalog or an item-collection JSON (see
            :func:`clc_dask.search.search_items`). Exclusive with ``items``.
        items: the scenes to use as they are (no search, no filters): STAC items or a saved
            item-collection JSON — e.g. to repeat a mosaic offline.
        bbox: the area as ``(west, south, east, north)`` in degrees.
        aoi: the area as a geometry (any CRS), GeoJSON mapping or vector file. Give an area
            (``bbox``/``aoi``) or a grid (``grid``/``like``); the area's grid is snapped to
            ``resolution`` in ``epsg``.
        season: ``april``, ``july``, ``september``, ``MM-DD/MM-DD`` (with ``years``) or a
            ``START/END`` range. Exclusive with ``datetime``.
        years: calendar years of ``season`` (a composite over several years is possible).
        datetime: ``START/END`` (ISO 8601) instead of a season.
        max_cloud: maximum scene cloud cover in percent (SCL masks what remains; raise it
            for cloudy regions and seasons, lower it to read fewer scenes).
        collection: STAC collection id; default: the preset's.
        composite: ``rgb`` (B04, B03, B02), ``nrg`` (B08, B04, B03), ``all``, or a band list.
        grid: the output grid as a GeoBox (CRS, resolution, bounds).
        like: take the whole grid from this raster (file, DataArray or GeoBox), e.g. to
            mosaic another season exactly onto an existing mosaic's pixels.
        epsg: CRS of the grid for an area (default: the UTM zone of the area's centre; use
            3035 for areas across UTM zones).
        resolution: pixel size in metres for an area (default 10, Sentinel-2's).
        chunk_size: spatial chunk edge in pixels. Each task holds all dates of one band of a
            chunk (dates × chunk_size² × 2 bytes): lower it for long seasons or small workers.
        mask_snow: also treat SCL snow/ice (11) as not clear (off: snow is a land-cover
            signal in April).
        gdal: GDAL options for reading (see :mod:`clc_dask.gdalenv`), e.g.
            ``{"GDAL_DISABLE_READDIR_ON_OPEN": "NO"}`` for catalogs with ``.aux.xml`` sidecars.

    Returns:
        The lazy mosaic of :func:`seasonal_mosaic` (``reflectance``, ``clear_count``) on the
        grid, with ``attrs["items"]`` = the scenes (``pystac.ItemCollection``).

    Raises:
        ConfigError: contradictory or missing options (named), before anything is read.
        SearchError: the search found no usable scene.
        InputError: the scenes cannot be put on the grid.
    """
    bands = composite_bands(composite)
    name = composite if isinstance(composite, str) else ",".join(bands)
    area = _area(bbox, aoi, grid, like)
    geobox = resolve_grid(grid=grid, like=like, epsg=epsg, resolution=resolution, area=area)
    scenes_used = _scenes(source, items, geobox, area, bbox, aoi, season=season, years=years,
                          datetime=datetime, max_cloud=max_cloud, collection=collection)
    scenes = load_scenes(normalize_items(scenes_used, bands), geobox, bands=bands, chunk_size=chunk_size,
                         gdal=gdal)
    mosaic = seasonal_mosaic(scenes, composite=name, mask_snow=mask_snow)  # type: ignore[arg-type]
    mosaic.attrs[ITEMS_ATTR] = scenes_used
    log.info("mosaic graph: %d tasks", len(mosaic.__dask_graph__()))
    return mosaic


def _area(bbox: Sequence[float] | None, aoi: object | None, grid: GeoBox | None, like: object | None) -> Geometry | None:
    lonlat = area_geometry(bbox, aoi)
    if lonlat is not None and (grid is not None or like is not None):
        raise ConfigError("Give either an area (`bbox`/`aoi`) or a grid (`grid`/`like`), not both: "
                          "the grid's extent is the area searched.")
    return None if lonlat is None else Geometry(lonlat, "EPSG:4326")


def _scenes(source: str | os.PathLike[str] | None, items: Sequence[pystac.Item] | str | os.PathLike[str] | None,
            geobox: GeoBox, area: Geometry | None, bbox: Sequence[float] | None, aoi: object | None,
            **filters: Any) -> pystac.ItemCollection:
    """The scenes of a mosaic: ``items`` as given, or a search of ``source`` over the area."""
    if (source is None) == (items is None):
        raise ConfigError("Give either `source` (to search) or `items` (scenes to use as they are), "
                          "not both or neither.")
    if source is not None and not (filters.get("season") or filters.get("datetime")):
        raise ConfigError("A mosaic needs a time window: give `season` (with `years`) or `datetime` "
                          "START/END.")
    if items is not None:
        used = [k for k, v in filters.items() if v]
        if used:
            raise ConfigError(f"`items` are used as given; drop {', '.join(f'`{k}`' for k in used)} "
                              "(or search again with `source`).")
        if isinstance(items, str | os.PathLike):
            return search_items(items)
        return items if isinstance(items, pystac.ItemCollection) else pystac.ItemCollection(items)
    if area is None:
        extent = geobox.extent.to_crs("EPSG:4326", resolution=geobox.extent.boundingbox.span_x / 16)
        return search_items(source, aoi=extent.geom, **filters)  # type: ignore[arg-type]
    return search_items(source, bbox=bbox, aoi=aoi, **filters)  # type: ignore[arg-type]


def seasonal_mosaic(
    scenes: xr.DataArray, composite: Composite = "nrg", mask_snow: bool = False
) -> xr.Dataset:
    """The median of clear, harmonised observations per pixel, one per satellite pass, lazily.

    Args:
        scenes: ``(time, band, y, x)`` uint16 from :func:`clc_dask.load.load_scenes` (one
            time step per granule), with the composite's bands and ``SCL``, a
            ``boa_offset`` coordinate (DN per granule) and the pass coordinates that
            :func:`satellite_passes` reads (without them every granule is its own pass).
        composite: ``rgb`` (B04, B03, B02), ``nrg`` (B08, B04, B03) or ``all`` (B02…B08).
        mask_snow: also treat SCL snow/ice (11) as not clear (off by default: snow is
            a land-cover signal in April mosaics).

    Returns:
        Dataset on the scenes' grid with ``reflectance`` ``(band, y, x)`` uint16 (DN =
        reflectance × 10000, 0 = no clear observation) and ``clear_count`` ``(y, x)``
        (uint8, or uint16 beyond 255 passes): the number of passes with a clear SCL class
        in at least one of their granules. The result does not depend on the chunking or
        on the order of the items.
    """
    bands = composite_bands(composite)
    _check_scenes(scenes, bands)
    gbox = geobox_of(scenes)
    data = scenes.data if isinstance(scenes.data, da.Array) else da.from_array(scenes.data)
    if data.numblocks[0] != 1:
        log.warning("scenes are chunked along time: rechunking to one time chunk for the median")
        data = data.rechunk({0: -1})
    band_index = {str(b): i for i, b in enumerate(scenes["band"].values)}
    refl = da.concatenate([data[:, band_index[b]:band_index[b] + 1] for b in bands], axis=1)
    scl = data[:, band_index[SCL_BAND]:band_index[SCL_BAND] + 1]
    offsets = np.asarray(scenes["boa_offset"].values, dtype=np.uint16).reshape(-1)
    classes = np.asarray(masked_classes(mask_snow), dtype=np.uint16)
    passes = satellite_passes(scenes)
    n_passes = len(passes)
    count_dtype = np.dtype(np.uint8 if n_passes <= np.iinfo(np.uint8).max else np.uint16)
    if n_passes < scenes.sizes["time"]:
        log.info("mosaic: %d granule(s) in %d satellite pass(es)", scenes.sizes["time"], n_passes)

    median = da.blockwise(
        _median_block, "byx",
        refl, "tbyx",
        scl, "tcyx",
        offsets, None,
        classes, None,
        passes, None,
        dtype=np.uint16,
        concatenate=True,
        token="clear-median",
    )
    count = da.blockwise(
        _clear_count_block, "yx",
        scl, "tcyx",
        classes, None,
        count_dtype, None,
        passes, None,
        dtype=count_dtype,
        concatenate=True,
        token="clear-count",
    )
    reflectance = to_dataarray(median, gbox, band_names=list(bands), name="reflectance", nodata=NODATA)
    reflectance.attrs.update(units="DN (surface reflectance × 10000)", composite=composite)
    clear_count = to_dataarray(count, gbox, name="clear_count", nodata=None)
    clear_count.attrs.update(units="passes", masked_scl_classes=list(map(int, classes)))
    dataset = xr.Dataset({"reflectance": reflectance, "clear_count": clear_count})
    dataset.attrs.update(composite=composite, n_dates=n_passes, n_granules=scenes.sizes["time"],
                         masked_scl_classes=list(map(int, classes)))
    return dataset


# --------------------------------------------------------------------------- passes
def solar_day(time: np.ndarray, lon: np.ndarray) -> np.ndarray:
    """The local mean solar date of acquisitions, as days since 1970-01-01.

    Sentinel-2 passes at about 10:30 local solar time everywhere, far from solar midnight,
    so all granules of one pass share this date, also across UTM zones, where their UTC
    date may differ (e.g. east of 150° E). Only at the antimeridian does it jump.

    Args:
        time: acquisition times (UTC, ``datetime64``).
        lon: longitudes, degrees east (NaN: unknown).

    Returns:
        int64 days, −1 where the longitude is unknown.
    """
    seconds = np.asarray(time, dtype="datetime64[s]").astype(np.int64)
    lon = np.asarray(lon, dtype=np.float64)
    known = np.isfinite(lon)
    local = seconds + np.round(np.where(known, lon, 0.0) * _SECONDS_PER_DEGREE).astype(np.int64)
    return np.where(known, local // _SECONDS_PER_DAY, -1)


def satellite_passes(scenes: xr.DataArray) -> tuple[Pass, ...]:
    """Group the time steps (granules) of ``scenes`` into satellite passes.

    Two granules belong to one pass when they share the platform and either the local mean
    solar date at their centres (:func:`solar_day`) or the absolute orbit
    (``sat:absolute_orbit``, or the one in the ``s2:datatake_id``, robust at the
    antimeridian). A satellite sees a place at most once per solar day, so this merges
    exactly the copies of one observation: neighbouring MGRS tiles, tiles of two UTM zones,
    or one item listed twice. Granules without a known platform are passes of their own.

    Args:
        scenes: scenes with the coordinates of :data:`clc_dask.load.PASS_COORDS` along time
            (missing coordinates count as unknown).

    Returns:
        One tuple of time indices per pass, each in merge order: granules in the grid's CRS
        first (their pixels need no resampling), then by item id. The passes are ordered by
        their earliest granule. Neither depends on the order of the time steps.
    """
    n = scenes.sizes["time"]
    times = np.asarray(scenes["time"].values, dtype="datetime64[ns]")
    ids = _coord(scenes, "id", "", str)
    platforms = _platforms(_coord(scenes, "platform", "", str), _coord(scenes, "datatake_id", "", str))
    orbits = _orbits(_coord(scenes, "absolute_orbit", -1, np.int64), _coord(scenes, "datatake_id", "", str))
    days = solar_day(times, _coord(scenes, "centre_lon", np.nan, np.float64))
    memberships: list[tuple[tuple[object, ...], int]] = []  # (shared key, time index)
    for i in range(n):
        if platforms[i]:
            if days[i] >= 0:
                memberships.append((("solar day", platforms[i], int(days[i])), i))
            if orbits[i] >= 0:
                memberships.append((("orbit", platforms[i], int(orbits[i])), i))
    unknown = sum(1 for p in platforms if not p)
    if unknown and "platform" in scenes.coords:
        log.warning("%d granule(s) name no platform: each counts as a satellite pass of its own", unknown)
    elif unknown:
        log.debug("scenes carry no pass coordinates: each time step is a satellite pass of its own")
    labels = _linked(n, memberships)
    grid_epsg = geobox_of(scenes).crs.epsg
    epsgs = _coord(scenes, "granule_epsg", 0, np.int64)
    order = sorted(range(n), key=lambda i: (epsgs[i] != grid_epsg, ids[i], times[i], i))
    groups: dict[int, list[int]] = {}
    for i in order:
        groups.setdefault(int(labels[i]), []).append(i)
    return tuple(sorted((tuple(g) for g in groups.values()),
                        key=lambda g: min((times[i], ids[i]) for i in g)))


def _coord(scenes: xr.DataArray, name: str, fill: object, dtype: type) -> np.ndarray:
    """Coordinate ``name`` along time, or ``fill`` for every step when absent."""
    if name not in scenes.coords:
        return np.full(scenes.sizes["time"], fill, dtype=object if dtype is str else dtype)
    values = np.broadcast_to(np.asarray(scenes[name].values), (scenes.sizes["time"],))
    return values.astype(object) if dtype is str else values.astype(dtype)


def _platforms(platforms: np.ndarray, datatakes: np.ndarray) -> list[str]:
    """Lower-case platform names (``sentinel-2a``), from the datatake id where missing."""
    out = []
    for platform, datatake in zip(platforms, datatakes, strict=True):
        name = str(platform or "").strip().lower()
        match = _DATATAKE.match(str(datatake or ""))
        if not name and match:
            name = f"sentinel-2{match[1].lower()}"
        out.append(name)
    return out


def _orbits(orbits: np.ndarray, datatakes: np.ndarray) -> np.ndarray:
    """Absolute orbit numbers, from the datatake id where missing; −1 where unknown."""
    out = np.asarray(orbits, dtype=np.int64).copy()
    for i, datatake in enumerate(datatakes):
        match = _DATATAKE.match(str(datatake or ""))
        if out[i] < 0 and match:
            out[i] = int(match[2])
    return out


def _linked(n: int, memberships: Sequence[tuple[tuple[object, ...], int]]) -> np.ndarray:
    """Component label of each of ``n`` nodes, where nodes sharing a key are linked."""
    first: dict[tuple[object, ...], int] = {}
    rows, cols = [], []
    for key, node in memberships:
        rows.append(first.setdefault(key, node))
        cols.append(node)
    graph = coo_array((np.ones(len(rows), dtype=np.int8), (rows, cols)), shape=(n, n))
    return connected_components(graph, directed=False)[1]


def _check_scenes(scenes: xr.DataArray, bands: Sequence[str]) -> None:
    if tuple(scenes.dims) != ("time", "band", "y", "x"):
        raise InputError(f"Scenes must have dims (time, band, y, x), not {scenes.dims}: use load_scenes.")
    if scenes.dtype != np.uint16:
        raise InputError(f"Scenes must be uint16 DN, not {scenes.dtype}: load with load_scenes.")
    names = [str(b) for b in scenes["band"].values]
    missing = [b for b in (*bands, SCL_BAND) if b not in names]
    if missing:
        raise InputError(f"Scenes lack band(s) {missing} (have {names}): load them with load_scenes(bands=...).")
    if "boa_offset" not in scenes.coords:
        raise InputError("Scenes have no 'boa_offset' coordinate: load them with load_scenes.")
    if scenes.sizes["time"] == 0:
        raise InputError("Scenes have no dates: nothing to mosaic.")


def clear_mask(scl: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """True where an SCL value is a clear observation (not in ``classes``)."""
    clear = np.ones(max(int(scl.max(initial=0)), int(np.max(classes, initial=0))) + 1, dtype=bool)
    clear[np.asarray(classes, dtype=np.intp)] = False
    return clear[scl]  # a lookup table: several times faster than np.isin


def median_of_clear(refl: np.ndarray, clear: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Per-pixel median over axis 0 of harmonised DN where ``clear`` (and DN > 0).

    Args:
        refl: ``(time, y, x)`` uint16 DN.
        clear: ``(time, y, x)`` bool, True for clear observations.
        offsets: ``(time,)`` DN to subtract per date (results below 1 become 1, so that
            0 keeps meaning no data).

    Returns:
        ``(y, x)`` uint16; 0 where no date is clear.
    """
    off = offsets.astype(np.uint16).reshape(-1, 1, 1)
    valid = clear & (refl != NODATA)
    work = np.where(refl > off, refl - off, np.uint16(1)).astype(np.uint16, copy=False)
    work[~valid] = _INVALID
    sort_along_time(work)
    n = valid.sum(axis=0, dtype=np.intp)
    lo = np.maximum((n - 1) // 2, 0)[None]  # the two middle ranks (equal for odd n)
    hi = (n // 2)[None]
    a = np.take_along_axis(work, lo, axis=0)[0].astype(np.uint32)
    b = np.take_along_axis(work, hi, axis=0)[0].astype(np.uint32)
    out = ((a + b + 1) // 2).astype(np.uint16)
    out[n == 0] = NODATA
    return out


def sort_along_time(values: np.ndarray) -> None:
    """Sort ``values`` in place along axis 0 (time).

    A few dates (the usual season) are sorted by an odd-even transposition network of
    element-wise minimum/maximum over whole images, several times faster than numpy's
    per-pixel sort along a strided axis; the result is the same.
    """
    steps = values.shape[0]
    if steps > _NETWORK_SORT_MAX:
        values.sort(axis=0)
        return
    low = np.empty(values.shape[1:], dtype=values.dtype)
    for step in range(steps):
        for k in range(step % 2, steps - 1, 2):
            np.minimum(values[k], values[k + 1], out=low)
            np.maximum(values[k], values[k + 1], out=values[k + 1])
            values[k] = low


#: Most dates sorted by the network of :func:`sort_along_time` (its cost grows with the square).
_NETWORK_SORT_MAX = 16


def merge_passes(
    refl: np.ndarray, clear: np.ndarray, offsets: np.ndarray, passes: Sequence[Pass]
) -> tuple[np.ndarray, np.ndarray]:
    """One observation per pass: the harmonised DN of its first granule that is clear with data.

    Args:
        refl: ``(time, y, x)`` uint16 DN of one band, one time step per granule.
        clear: ``(time, y, x)`` bool, True where the granule's SCL class is clear.
        offsets: ``(time,)`` DN to subtract per granule (results below 1 become 1).
        passes: time indices of each pass in merge order (:func:`satellite_passes`).

    Returns:
        ``(pass, y, x)`` uint16 harmonised DN (0 where the pass has no clear observation)
        and the ``(pass, y, x)`` bool mask of clear observations.
    """
    shape = (len(passes), *refl.shape[1:])
    merged = np.zeros(shape, dtype=np.uint16)
    valid = np.zeros(shape, dtype=bool)
    off = np.asarray(offsets, dtype=np.uint16)
    for p, members in enumerate(passes):
        for t in reversed(members):  # the first granule is written last and wins
            usable = clear[t] & (refl[t] != NODATA)
            harmonised = np.where(refl[t] > off[t], refl[t] - off[t], np.uint16(1)).astype(np.uint16, copy=False)
            np.copyto(merged[p], harmonised, where=usable)
            valid[p] |= usable
    return merged, valid


def _median_block(refl: np.ndarray, scl: np.ndarray, offsets: np.ndarray, classes: np.ndarray,
                  passes: Sequence[Pass]) -> np.ndarray:
    clear = clear_mask(scl[:, 0], classes)
    single = all(len(members) == 1 for members in passes)  # nothing to merge (the median ignores order)
    no_offset = np.zeros(len(passes), dtype=np.uint16)
    out = np.empty(refl.shape[1:], dtype=np.uint16)
    for j in range(refl.shape[1]):
        if single:
            out[j] = median_of_clear(refl[:, j], clear, offsets)
        else:
            merged, valid = merge_passes(refl[:, j], clear, offsets, passes)
            out[j] = median_of_clear(merged, valid, no_offset)
    return out


def _clear_count_block(scl: np.ndarray, classes: np.ndarray, dtype: np.dtype,
                       passes: Sequence[Pass]) -> np.ndarray:
    clear = clear_mask(scl[:, 0], classes)
    if all(len(members) == 1 for members in passes):
        return clear.sum(axis=0, dtype=dtype)
    count = np.zeros(clear.shape[1:], dtype=dtype)
    for members in passes:
        count += clear[list(members)].any(axis=0)
    return count


# --------------------------------------------------------------------------- writing
def mosaic_paths(out: str | os.PathLike[str]) -> tuple[Path, Path]:
    """Where :func:`write_mosaic` puts a COG mosaic and its clear-count raster."""
    out = Path(out)
    return out, out.with_name(f"{out.stem}_clear_count{out.suffix or '.tif'}")


def items_path(out: str | os.PathLike[str]) -> Path:
    """Where :func:`write_mosaic` saves the scenes of a mosaic: ``<out stem>.items.json``."""
    out = Path(out)
    return out.with_name(f"{out.name.removesuffix(out.suffix) or out.name}.items.json")


def write_mosaic(
    mosaic: xr.Dataset,
    out: str | os.PathLike[str],
    format: Literal["cog", "zarr"] = "cog",
    clear_count: bool = True,
    overwrite: bool = True,
) -> list[Path]:
    """Compute and write a mosaic; nothing appears at ``out`` unless everything succeeded.

    Args:
        mosaic: from :func:`make_mosaic` or :func:`seasonal_mosaic`.
        out: ``.tif`` path (COG) or Zarr store directory. The scenes of a
            :func:`make_mosaic` result are saved beside it as ``<stem>.items.json``.
        format: ``cog``: ``(band, y, x)`` uint16 COG with band descriptions and nodata 0,
            plus ``<stem>_clear_count.tif``; ``zarr``: one store holding both variables,
            Zarr chunks = dask chunks, CRS in ``spatial_ref``.
        clear_count: also write the per-pixel count of clear dates.
        overwrite: replace existing outputs (else raise :class:`OutputError`).

    Returns:
        The paths written (mosaic, clear count, scenes).
    """
    if format not in ("cog", "zarr"):
        raise ConfigError(f"Unknown mosaic format {format!r}: use cog or zarr.")
    out = check_writable(out, overwrite)
    scenes = mosaic.attrs.get(ITEMS_ATTR)
    if scenes is not None:
        check_writable(items_path(out), overwrite)
    if format == "cog":
        written = _write_cogs(mosaic, out, clear_count, overwrite)
    else:
        written = [_write_zarr(mosaic, out, clear_count, overwrite)]
    if scenes is not None:
        written.append(save_item_collection(scenes, items_path(out)))
    return written


def _write_cogs(mosaic: xr.Dataset, out: Path, clear_count: bool, overwrite: bool) -> list[Path]:
    targets = [p for p in mosaic_paths(out)[: 2 if clear_count else 1]]
    if not overwrite:
        for target in targets:
            check_writable(target, overwrite=False)
    # both rasters are written, then renamed together: a kill never leaves one without the other
    with staging_directory(out) as staging:
        refl = mosaic["reflectance"]
        write_geotiff(refl, staging / targets[0].name, nodata=NODATA,
                      band_names=[str(b) for b in refl["band"].values],
                      tags={"composite": str(mosaic.attrs.get("composite", "")),
                            "units": "DN (surface reflectance x 10000)",
                            "n_dates": str(mosaic.attrs.get("n_dates", ""))})
        if clear_count:
            write_geotiff(mosaic["clear_count"], staging / targets[1].name, nodata=None,
                          band_names=["clear_count"], tags={"units": "clear dates"})
        move_into_place({staging / target.name: target for target in targets})
    return targets


def _write_zarr(mosaic: xr.Dataset, out: Path, clear_count: bool, overwrite: bool) -> Path:
    if out.exists() and not overwrite:
        raise OutputError(f"{out} exists: pass `overwrite` or choose another `out`.")
    names = ["reflectance"] + (["clear_count"] if clear_count else [])
    ds = mosaic[names]
    ds.attrs.pop(ITEMS_ATTR, None)
    encoding = {}
    for name in names:
        chunks = ds[name].data.chunksize if isinstance(ds[name].data, da.Array) else ds[name].shape
        encoding[name] = {"chunks": tuple(int(c) for c in chunks), "_FillValue": None}
        ds[name].attrs.pop("_FillValue", None)
        ds[name].encoding.pop("_FillValue", None)
    ds["reflectance"].attrs["nodata"] = NODATA
    ds["reflectance"].attrs["band_names"] = [str(b) for b in ds["band"].values]
    # variable-length strings: fixed-width unicode has no stable Zarr v3 data type yet
    ds = ds.assign_coords(band=np.asarray([str(b) for b in ds["band"].values], dtype=object))
    write_zarr(ds, out, encoding)
    log.info("wrote %s (Zarr: %s)", out, ", ".join(names))
    return out
