"""The one grid of a run: CRS, 10 m pixels, bounds snapped to the pixel, 2048 px tiles.

Geometry is done with odc-geo (:class:`~odc.geo.geobox.GeoBox`,
:class:`~odc.geo.geobox.GeoboxTiles`), never with hand-written affine arithmetic.
Tiles are named ``"row_col"`` counted from 1 (``"4_3"`` as in the paper); dask chunks
divide tiles exactly, so Zarr chunks can equal dask chunks.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import rasterio
from odc.geo import CRS
from odc.geo.geobox import GeoBox, GeoboxTiles
from odc.geo.geom import Geometry, box

from clc_dask.errors import ConfigError, GridMismatchError, InputError

log = logging.getLogger(__name__)

DEFAULT_RESOLUTION = 10.0  # metres
DEFAULT_TILE_SIZE = 2048  # pixels
_TILE_NAME = re.compile(r"^(\d+)_(\d+)$")


def snapped_geobox(
    bounds: tuple[float, float, float, float], crs: str | int | CRS, resolution: float
) -> GeoBox:
    """A north-up GeoBox covering ``bounds`` (in ``crs``) with pixel edges on multiples of
    ``resolution`` metres, so that grids of neighbouring runs line up."""
    if resolution <= 0:
        raise ConfigError(f"resolution must be positive metres, not {resolution}.")
    left, bottom, right, top = bounds
    if not (right > left and top > bottom):
        raise ConfigError(
            f"bounds {bounds} are empty: give (left, bottom, right, top) with left < right "
            "and bottom < top."
        )
    return GeoBox.from_bbox(bounds, crs=_crs(crs), resolution=resolution, anchor=0)


def geobox_for_aoi(aoi: Geometry, crs: str | int | CRS, resolution: float) -> GeoBox:
    """The snapped GeoBox covering an AOI geometry (any CRS) on ``crs`` at ``resolution``."""
    projected = aoi.to_crs(_crs(crs))
    return snapped_geobox(projected.boundingbox, crs, resolution)


def lonlat_box(bbox: tuple[float, float, float, float]) -> Geometry:
    """A lon/lat bbox ``(west, south, east, north)`` as a geometry, checked for sanity."""
    west, south, east, north = bbox
    if not (-180 <= west < east <= 180 and -90 <= south < north <= 90):
        raise ConfigError(
            f"bbox {bbox} is not a lon/lat box: give west,south,east,north in degrees with "
            "west < east and south < north."
        )
    return box(west, south, east, north, "EPSG:4326")


def _crs(crs: str | int | CRS) -> CRS:
    try:
        return CRS(f"EPSG:{crs}" if isinstance(crs, int) else crs)
    except Exception as exc:  # pyproj raises several types
        raise ConfigError(f"Unknown CRS {crs!r}: give an EPSG code such as 32633 or 3035.") from exc


def grid_of_raster(path: str | os.PathLike[str]) -> GeoBox:
    """The grid (CRS, transform, shape) of an existing raster file, e.g. a mosaic.

    Raises:
        InputError: the file cannot be opened as a raster, or has no CRS.
    """
    text = str(path)
    if not text.startswith(("http://", "https://", "/vsi")) and not Path(text).exists():
        raise InputError(f"Raster {text} does not exist: check the path given as `like`.")
    try:
        with rasterio.open(text) as src:
            crs, transform, shape = src.crs, src.transform, (src.height, src.width)
    except rasterio.errors.RasterioIOError as exc:
        raise InputError(f"Cannot open {text} as a raster to take its grid from: {exc}.") from exc
    if crs is None:
        raise InputError(
            f"{text} has no CRS, so its grid cannot be used: give `epsg`/`resolution`/`bounds` "
            "instead, or assign a CRS (gdal_edit.py -a_srs EPSG:XXXX FILE)."
        )
    return GeoBox(shape, transform, CRS(crs.to_wkt()))


def resolve_grid(
    *,
    grid: GeoBox | None = None,
    like: str | os.PathLike[str] | GeoBox | Any | None = None,
    epsg: int | None = None,
    resolution: float | None = None,
    bounds: Sequence[float] | None = None,
    area: Geometry | None = None,
) -> GeoBox:
    """The grid a stage works on, from whichever description the caller has.

    Exactly one of: ``grid`` (used as is); ``like`` (the grid of a raster file, a
    georeferenced DataArray or a GeoBox — CRS, resolution and bounds all from it); ``bounds``
    in ``epsg`` coordinates; or ``area`` (a geometry in any CRS) covered in ``epsg`` — by
    default the UTM zone of the area's centre. Bounds are snapped outwards to multiples of
    ``resolution`` metres (default 10), so grids of neighbouring areas line up.

    Raises:
        ConfigError: no description, or contradictory ones (e.g. ``like`` and ``epsg``).
        InputError: ``like`` is not a readable raster with a CRS.
    """
    explicit = [n for n, v in (("epsg", epsg), ("resolution", resolution), ("bounds", bounds)) if v is not None]
    given = [n for n, v in (("grid", grid), ("like", like)) if v is not None]
    if given:
        if len(given) > 1 or explicit:
            others = "/".join(f"`{n}`" for n in (given[1:] + explicit))
            raise ConfigError(
                f"Give either `{given[0]}` or {others}, not both: `{given[0]}` fixes the whole grid "
                "(CRS, resolution, bounds)."
            )
        return grid if grid is not None else _grid_like(like)
    res = DEFAULT_RESOLUTION if resolution is None else float(resolution)
    if bounds is not None:
        if epsg is None:
            raise ConfigError("`bounds` are in the grid's CRS: give `epsg` too (e.g. 32633 or 3035).")
        if len(bounds) != 4:
            raise ConfigError(f"`bounds` {list(bounds)} must be left, bottom, right, top in the `epsg` CRS.")
        return snapped_geobox(tuple(float(v) for v in bounds), epsg, res)  # type: ignore[arg-type]
    if area is not None:
        lon, lat = area.to_crs("EPSG:4326").centroid.points[0]
        return geobox_for_aoi(area, epsg or utm_epsg(lon, lat), res)
    raise ConfigError(
        "No target grid: give `like` (a raster such as a mosaic), or `epsg` and `bounds` (left, bottom, "
        "right, top in that CRS) with `resolution` metres, or an area to cover."
    )


def _grid_like(like: Any) -> GeoBox:
    if isinstance(like, GeoBox):
        return like
    if isinstance(like, str | os.PathLike):
        return grid_of_raster(like)
    gbox = getattr(getattr(like, "odc", None), "geobox", None)
    if gbox is None:
        raise InputError("`like` has no georeference (CRS and x/y coordinates): give a raster file, "
                         "a georeferenced DataArray or a GeoBox.")
    return gbox


def utm_epsg(lon: float, lat: float) -> int:
    """EPSG code of the WGS 84 / UTM zone holding a lon/lat point."""
    zone = int(math.floor((lon + 180) / 6)) + 1
    return (32600 if lat >= 0 else 32700) + min(max(zone, 1), 60)


@dataclass(frozen=True)
class Tile:
    """One tile of a run grid: its ``row_col`` name (from 1) and its GeoBox."""

    row: int
    col: int
    geobox: GeoBox
    #: (y, x) pixel slices of this tile inside the run grid.
    pixel_slices: tuple[slice, slice]

    @property
    def name(self) -> str:
        return f"{self.row}_{self.col}"


class TileGrid:
    """A run grid cut into square tiles of ``tile_size`` px (the last row/column may be smaller).

    Args:
        geobox: the run's grid.
        tile_size: tile edge in pixels (paper: 2048 px = 20.48 km at 10 m).
    """

    def __init__(self, geobox: GeoBox, tile_size: int = DEFAULT_TILE_SIZE) -> None:
        if tile_size <= 0:
            raise ConfigError(f"tile_size must be a positive number of pixels, not {tile_size}.")
        self.geobox = geobox
        self.tile_size = tile_size
        self._tiles = GeoboxTiles(geobox, (tile_size, tile_size))

    @property
    def shape(self) -> tuple[int, int]:
        """(rows, cols) of tiles."""
        return (int(self._tiles.shape[0]), int(self._tiles.shape[1]))

    def __len__(self) -> int:
        rows, cols = self.shape
        return rows * cols

    def tile(self, name: str) -> Tile:
        """The tile called ``name`` (``"row_col"``, from 1)."""
        match = _TILE_NAME.match(name.strip())
        rows, cols = self.shape
        if not match:
            raise InputError(f"Tile name {name!r} is not 'row_col' (e.g. '4_3', counted from 1).")
        row, col = int(match[1]), int(match[2])
        if not (1 <= row <= rows and 1 <= col <= cols):
            raise InputError(
                f"Tile {name!r} is outside this grid of {rows} rows × {cols} columns "
                f"(valid: 1_1 … {rows}_{cols})."
            )
        return self._make(row, col)

    def _make(self, row: int, col: int) -> Tile:
        ys = slice((row - 1) * self.tile_size, min(row * self.tile_size, self.geobox.shape[0]))
        xs = slice((col - 1) * self.tile_size, min(col * self.tile_size, self.geobox.shape[1]))
        return Tile(row, col, self._tiles[row - 1, col - 1], (ys, xs))

    def __iter__(self) -> Iterator[Tile]:
        rows, cols = self.shape
        for row in range(1, rows + 1):
            for col in range(1, cols + 1):
                yield self._make(row, col)

    def select(self, names: list[str] | None) -> list[Tile]:
        """The named tiles (all when ``names`` is None), in grid order, each checked."""
        if not names:
            return list(self)
        return [self.tile(n) for n in names]

    def intersecting(self, geom: Geometry) -> list[Tile]:
        """Tiles whose footprint intersects ``geom`` (e.g. a country outline)."""
        target = geom.to_crs(self.geobox.crs)
        return [t for t in self if t.geobox.extent.intersects(target)]


def chunk_size_for(tile_size: int, requested: int) -> int:
    """The largest chunk edge ≤ ``requested`` that divides ``tile_size`` exactly."""
    requested = max(1, min(requested, tile_size))
    for size in range(requested, 0, -1):
        if tile_size % size == 0:
            return size
    return tile_size


def assert_same_grid(a: GeoBox, b: GeoBox, what_a: str = "first", what_b: str = "second") -> None:
    """Raise :class:`GridMismatchError` unless two GeoBoxes are the same grid (CRS, shape, transform)."""
    if a.crs != b.crs:
        raise GridMismatchError(
            f"The {what_a} raster is on {a.crs} but the {what_b} is on {b.crs}: "
            f"resample one onto the other's grid (e.g. labels with `like` set to the mosaic)."
        )
    if a.shape != b.shape or not a.affine.almost_equals(b.affine, precision=1e-6):
        raise GridMismatchError(
            f"The {what_a} raster ({a.shape.y}×{a.shape.x} px, origin {a.affine.c:.2f},"
            f"{a.affine.f:.2f}, {a.resolution.x:g} m) and the {what_b} ({b.shape.y}×{b.shape.x} px, "
            f"origin {b.affine.c:.2f},{b.affine.f:.2f}, {b.resolution.x:g} m) are on different "
            "grids: put both on one grid (labels made with `like` set to the mosaic, or the same `bounds`)."
        )
