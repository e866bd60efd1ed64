"""The two-zone demo region: across the UTM zone border at 12° E, delivered in both zones.

Real Sentinel-2 granules near 12° E come in two CRSs: MGRS tiles of UTM zone 32 (EPSG:32632)
reach east past the meridian, tiles of zone 33 (EPSG:32633) reach west past it, and a
country there (Italy) is mapped on EPSG:3035. The two-zone region mimics that:

- the region itself (land cover, CLC reference, the surface and clouds every pass sees) lives
  on an EPSG:3035 grid centred on 12° E, 43.1° N;
- every pass is delivered as two granules, ``32TQN`` on a zone-32 grid covering the west of
  the region and ``33TTH`` on a zone-33 grid covering its east, each granule reaching a
  sixth of the region past the centre: they overlap in its middle third;
- a granule samples the region's surface and the pass's masks (nearest neighbour) onto its
  own 20 m / 10 m grid, so its SCL describes its bands exactly, as in a real tile; its
  atmosphere and noise are its own, and so are some cloud edges (sen2cor runs per tile):
  in the overlap the two copies of a pass differ a little and are sometimes masked
  differently.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from datetime import timedelta
from functools import cached_property

import numpy as np
from odc.geo.geobox import GeoBox
from pyproj import Transformer
from rasterio.transform import Affine
from rasterio.warp import transform_bounds
from scipy import ndimage

from clc_dask.demo.landcover import rng_for
from clc_dask.demo.scenes import SceneMasks, ScenePlan

#: CRS of the two-zone region's own grid (the European LAEA grid).
TWO_ZONE_EPSG = 3035
#: Centre of the two-zone region in EPSG:3035 metres: 12° E, 43.1° N (central Italy).
TWO_ZONE_CENTRE = (4484260.0, 2223560.0)
#: Granule grids are aligned to this many metres (their 10 m and 20 m pixels nest).
GRANULE_ALIGNMENT = 60.0
#: How far (share of the region's side) each granule reaches past the region's centre.
GRANULE_REACH = 1 / 6
#: Granules have data this far (metres) outside the region, repeating its edge pixels, so
#: that reading them back onto the region's grid leaves no gap along its edges.
EDGE_MARGIN = 40.0


@dataclass(frozen=True)
class GranuleSpec:
    """One zone's granules: MGRS tile, CRS, which side of the region it covers, and how much
    later than the pass's first granule its sensing starts."""

    mgrs_tile: str
    epsg: int
    side: str  # "west" | "east"
    delay_s: float


#: The two granules of every pass, west first.
TWO_ZONE_GRANULES: tuple[GranuleSpec, ...] = (
    GranuleSpec("32TQN", 32632, "west", 1.164),
    GranuleSpec("33TTH", 32633, "east", 0.0),
)


def two_zone_origin(size: int, resolution: float) -> tuple[float, float]:
    """Top-left corner (x, y) in EPSG:3035 metres of a ``size`` px region at ``resolution``."""
    half = size * resolution / 2
    return TWO_ZONE_CENTRE[0] - half, TWO_ZONE_CENTRE[1] + half


def granule_plan(plan: ScenePlan, spec: GranuleSpec) -> ScenePlan:
    """The plan of ``spec``'s granule of the pass ``plan``: its own item id and sensing time."""
    short = "S2A" if plan.platform == "sentinel-2a" else "S2B"
    return replace(plan, id=f"{short}_{spec.mgrs_tile}_{plan.datetime:%Y%m%d}_0_L2A",
                   datetime=plan.datetime + timedelta(seconds=spec.delay_s))


@dataclass(frozen=True)
class Granule:
    """One granule grid over the region, and how its pixels sample the region's grids.

    Attributes:
        spec: the zone's MGRS tile and CRS.
        region: the region's 10 m grid (EPSG:3035).
        transform20: the granule's 20 m grid (SCL); the 10 m grid shares its origin.
        shape20: rows and columns of the 20 m grid.
    """

    spec: GranuleSpec
    region: GeoBox
    transform20: Affine
    shape20: tuple[int, int]

    @property
    def crs(self) -> str:
        return f"EPSG:{self.spec.epsg}"

    @property
    def shape10(self) -> tuple[int, int]:
        return self.shape20[0] * 2, self.shape20[1] * 2

    @property
    def transform10(self) -> Affine:
        return self.transform20 * Affine.scale(0.5)

    @cached_property
    def _index10(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return _nearest_indices(self.transform10, self.shape10, self.crs, self.region, 1)

    @cached_property
    def _index20(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return _nearest_indices(self.transform20, self.shape20, self.crs, self.region, 2)

    @property
    def inside20(self) -> np.ndarray:
        """(y, x) bool at 20 m: the granule pixel's centre lies inside the region (or within
        :data:`EDGE_MARGIN` of it)."""
        return self._index20[2]

    def sample10(self, array: np.ndarray) -> np.ndarray:
        """A ``(…, y, x)`` array on the region's 10 m grid, sampled onto the granule's 10 m
        grid (nearest neighbour; 0 outside the region and its margin)."""
        return _take(array, *self._index10)

    def sample20(self, array: np.ndarray) -> np.ndarray:
        """Like :meth:`sample10`, from the region's 20 m grid to the granule's 20 m grid."""
        return _take(array, *self._index20)


def granule_grids(region: GeoBox) -> list[Granule]:
    """The granule grids of :data:`TWO_ZONE_GRANULES` over the region's 10 m grid.

    Each granule is the region's bounding box in its zone's CRS, cut at a line of constant
    easting :data:`GRANULE_REACH` × the region's side past the region's centre, snapped
    outwards to :data:`GRANULE_ALIGNMENT` metres.
    """
    left, bottom, right, top = region.boundingbox
    centre = ((left + right) / 2, (bottom + top) / 2)
    reach = (right - left) * GRANULE_REACH
    grids = []
    for spec in TWO_ZONE_GRANULES:
        x0, y0, x1, y1 = transform_bounds(str(region.crs), f"EPSG:{spec.epsg}", left, bottom, right, top,
                                          densify_pts=21)
        cx, _ = Transformer.from_crs(str(region.crs), f"EPSG:{spec.epsg}", always_xy=True).transform(*centre)
        if spec.side == "west":
            x1 = cx + reach
        else:
            x0 = cx - reach
        step = GRANULE_ALIGNMENT
        x0, y0 = math.floor(x0 / step) * step, math.floor(y0 / step) * step
        x1, y1 = math.ceil(x1 / step) * step, math.ceil(y1 / step) * step
        shape20 = (round((y1 - y0) / 20), round((x1 - x0) / 20))
        grids.append(Granule(spec, region, Affine(20.0, 0.0, x0, 0.0, -20.0, y1), shape20))
    return grids


def tile_cloud_edges(masks: SceneMasks, seed: int, plan: ScenePlan) -> SceneMasks:
    """A copy of a pass's masks (on the region's 20 m grid) with the cloud edges that one
    granule's own cloud detection adds: sen2cor runs per tile, and flags about half of the
    clear pixels along cloud edges as medium-probability cloud, differently per granule.
    The season's clearest pass is left as it is."""
    cloud, cirrus, shadow = masks.cloud.copy(), masks.cirrus.copy(), masks.shadow.copy()
    cirrus_strength, unclassified = masks.cirrus_strength.copy(), masks.unclassified.copy()
    if not plan.clearest:
        rng = rng_for(seed, f"tile-cloud-edges-{plan.id}")
        edge = ndimage.binary_dilation(cloud) & ~cloud & masks.valid
        flagged = edge & (rng.random(edge.shape) < 0.5)
        cloud |= flagged
        cirrus &= ~flagged
        cirrus_strength[flagged] = 0
        shadow &= ~flagged
        unclassified &= ~flagged
    return SceneMasks(masks.valid.copy(), cloud, masks.opacity.copy(), cirrus, cirrus_strength, shadow,
                      unclassified)


def granule_masks(masks: SceneMasks, granule: Granule) -> SceneMasks:
    """A pass's masks on the region's 20 m grid, sampled onto ``granule``'s 20 m grid
    (no data outside the region)."""
    valid = granule.sample20(masks.valid) & granule.inside20
    cloud = granule.sample20(masks.cloud) & valid
    cirrus = granule.sample20(masks.cirrus) & valid
    return SceneMasks(
        valid=valid, cloud=cloud,
        opacity=np.where(cloud, granule.sample20(masks.opacity), 0).astype(np.float32),
        cirrus=cirrus,
        cirrus_strength=np.where(cirrus, granule.sample20(masks.cirrus_strength), 0).astype(np.float32),
        shadow=granule.sample20(masks.shadow) & valid,
        unclassified=granule.sample20(masks.unclassified) & valid,
    )


def _nearest_indices(transform: Affine, shape: tuple[int, int], crs: str, region: GeoBox,
                     factor: int, strip: int = 256) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row and column of the region's pixel (``factor`` × its 10 m pixels) under the centre
    of every pixel of a grid (the nearest edge pixel within :data:`EDGE_MARGIN` outside),
    and whether there is one (``strip`` rows at a time)."""
    to_region = Transformer.from_crs(crs, str(region.crs), always_xy=True)
    left, _, _, top = region.boundingbox
    size = abs(region.resolution.x) * factor
    height, width = region.shape.y // factor, region.shape.x // factor
    margin = EDGE_MARGIN / size
    rows = np.zeros(shape, dtype=np.int32)
    cols = np.zeros(shape, dtype=np.int32)
    inside = np.zeros(shape, dtype=bool)
    xs = transform.c + (np.arange(shape[1]) + 0.5) * transform.a
    for start in range(0, shape[0], strip):
        ys = transform.f + (np.arange(start, min(start + strip, shape[0])) + 0.5) * transform.e
        rx, ry = to_region.transform(*np.meshgrid(xs, ys))
        col = (rx - left) / size
        row = (top - ry) / size
        ok = (row >= -margin) & (row < height + margin) & (col >= -margin) & (col < width + margin)
        rows[start:start + len(ys)] = np.where(ok, np.clip(np.floor(row), 0, height - 1), 0)
        cols[start:start + len(ys)] = np.where(ok, np.clip(np.floor(col), 0, width - 1), 0)
        inside[start:start + len(ys)] = ok
    return rows, cols, inside


def _take(array: np.ndarray, rows: np.ndarray, cols: np.ndarray, inside: np.ndarray) -> np.ndarray:
    out = array[..., rows, cols]
    out[..., ~inside] = 0
    return out
