"""The one grid of a run: CRS, 10 m pixels, bounds snapped to the pixel, 2048 px tiles.

Geometry is done with odc-geo (:class:`~odc.geo.geobox.GeoBox`,
:class:`~odc.geo.geobox.GeoboxTiles`), never with hand-written affine arithmetic.
Tiles are named ``"row_col"`` counted from 1 (``"4_3"`` as in the paper); dask chunks
divide tiles exactly, so Zarr chunks can equal dask chunks.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass

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
            f"resample one onto the other's grid (e.g. clc-dask labels --like)."
        )
    if a.shape != b.shape or not a.affine.almost_equals(b.affine, precision=1e-6):
        raise GridMismatchError(
            f"The {what_a} raster ({a.shape.y}×{a.shape.x} px, origin {a.affine.c:.2f},"
            f"{a.affine.f:.2f}, {a.resolution.x:g} m) and the {what_b} ({b.shape.y}×{b.shape.x} px, "
            f"origin {b.affine.c:.2f},{b.affine.f:.2f}, {b.resolution.x:g} m) are on different "
            "grids: put both on one grid (clc-dask labels --like, or the same --bounds)."
        )
