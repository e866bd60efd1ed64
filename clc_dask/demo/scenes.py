"""Synthetic Sentinel-2 L2A scenes of the demo region: spectra, clouds, SCL, COG files.

Each land-cover class is a mix of surface types whose reflectance changes with the season
(arable land green in April and bare in September, forest NIR-bright, water NIR-dark,
urban bright and textured). Each scene adds an atmosphere gain, sensor noise, clouds (SCL
8/9), cirrus (SCL 10), cloud shadows (SCL 3), sometimes a no-data swath edge (0 in every
band and in SCL), and — for processing baseline 04.00 and later — the +1000 BOA offset in
its digital numbers, as real L2A products carry it.

Masks are drawn on the 20 m SCL grid and applied to the 2 × 2 block of 10 m pixels under
each SCL pixel, so the SCL describes the bands exactly.
"""

from __future__ import annotations

import calendar
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import rasterio
import rasterio.shutil
from rasterio.io import MemoryFile
from rasterio.transform import Affine
from scipy import ndimage

from clc_dask.demo.landcover import LandCover, fractal_noise, rng_for, smooth_noise
from clc_dask.seasons import SEASON_MONTHS

log = logging.getLogger(__name__)

#: The four 10 m bands of the demo, in file order, with their Earth Search v1 asset keys.
BANDS: tuple[str, ...] = ("B02", "B03", "B04", "B08")
ASSET_KEYS: dict[str, str] = {"B02": "blue", "B03": "green", "B04": "red", "B08": "nir", "SCL": "scl"}
#: BOA_ADD_OFFSET of processing baseline ≥ 04.00, in DN (reflectance × 10 000).
BOA_OFFSET = 1000
MAX_DN = 32767  # 15 significant bits, as in the real products
OLD_BASELINES = ("02.06", "02.07")
NEW_BASELINES = ("04.00", "05.00")
RELATIVE_ORBIT = 122

# SCL classes (sen2cor)
SCL_NODATA, SCL_SHADOW, SCL_VEGETATION, SCL_NOT_VEGETATED, SCL_WATER = 0, 3, 4, 5, 6
SCL_UNCLASSIFIED, SCL_CLOUD_MEDIUM, SCL_CLOUD_HIGH, SCL_CIRRUS = 7, 8, 9, 10

# --- surface types and their seasonal reflectance (× 10 000: B02, B03, B04, B08) ---------------
_SURFACES: dict[str, dict[str, tuple[int, int, int, int]]] = {
    "none": {"april": (0, 0, 0, 0), "july": (0, 0, 0, 0), "september": (0, 0, 0, 0)},
    # winter cereal: green in spring, ripe in July, ploughed soil in September
    "winter_cereal": {"april": (350, 650, 380, 3800), "july": (900, 1150, 1400, 2400),
                      "september": (1150, 1450, 1750, 2200)},
    # summer crop (maize, sunflower): seedbed in spring, green in July, senescent in September
    "summer_crop": {"april": (1100, 1400, 1700, 2100), "july": (300, 600, 330, 4200),
                    "september": (650, 900, 1000, 2600)},
    "fallow": {"april": (500, 800, 650, 3000), "july": (800, 1050, 1200, 2500),
               "september": (800, 1050, 1150, 2350)},
    "pasture": {"april": (400, 750, 480, 3400), "july": (700, 1000, 1050, 2600),
                "september": (650, 950, 950, 2700)},
    "natural_grass": {"april": (450, 750, 600, 2900), "july": (800, 1050, 1250, 2300),
                      "september": (780, 1020, 1200, 2250)},
    "broadleaf": {"april": (300, 600, 380, 3000), "july": (220, 520, 260, 3900),
                  "september": (260, 540, 320, 3400)},
    "conifer": {"april": (200, 400, 230, 2300), "july": (190, 390, 210, 2500),
                "september": (195, 395, 220, 2400)},
    "shrub": {"april": (330, 600, 420, 2700), "july": (300, 560, 380, 2900),
              "september": (310, 570, 400, 2750)},
    "vine": {"april": (600, 850, 900, 2300), "july": (300, 600, 350, 3600),
             "september": (330, 620, 420, 3200)},
    "interrow": {"april": (600, 900, 800, 2600), "july": (950, 1200, 1450, 2300),
                 "september": (1000, 1250, 1500, 2300)},
    "olive": {"april": (280, 520, 360, 2500), "july": (290, 530, 380, 2550),
              "september": (285, 525, 370, 2500)},
    "built": {"april": (1250, 1350, 1450, 1900), "july": (1300, 1400, 1500, 1950),
              "september": (1280, 1380, 1480, 1920)},
    "urban_green": {"april": (400, 700, 480, 3200), "july": (450, 750, 600, 2800),
                    "september": (450, 750, 600, 2800)},
    "roof": {"april": (1700, 1800, 1900, 2200), "july": (1750, 1850, 1950, 2250),
             "september": (1720, 1820, 1920, 2220)},
    "asphalt": {"april": (700, 750, 800, 950), "july": (720, 770, 820, 970),
                "september": (710, 760, 810, 960)},
    "rock": {"april": (2000, 2200, 2400, 2700), "july": (2100, 2300, 2500, 2800),
             "september": (2050, 2250, 2450, 2750)},
    "marsh": {"april": (350, 600, 450, 1800), "july": (300, 620, 380, 3000),
              "september": (330, 600, 450, 2300)},
    "water": {"april": (450, 520, 330, 180), "july": (420, 560, 320, 220),
              "september": (430, 540, 320, 200)},
}
SURFACE_NAMES: tuple[str, ...] = tuple(_SURFACES)
_S = {name: np.uint8(i) for i, name in enumerate(SURFACE_NAMES)}


def surface_lut(season: str) -> np.ndarray:
    """(4, n_surface_types) float32 reflectance × 10 000 of every surface type in ``season``."""
    return np.array([_SURFACES[n][season] for n in SURFACE_NAMES], dtype=np.float32).T


# Cloud, cirrus haze and shadow appearance per band (B02, B03, B04, B08).
_CLOUD_DN = np.array([7200, 6900, 6800, 7100], dtype=np.float32)
_CIRRUS_DN = np.array([1300, 1100, 1000, 900], dtype=np.float32)
_SHADOW_FACTOR = np.array([0.45, 0.42, 0.40, 0.33], dtype=np.float32)


def repeat2(a: np.ndarray) -> np.ndarray:
    """Repeat a 20 m array onto the 10 m grid (each cell → 2 × 2 pixels)."""
    return np.repeat(np.repeat(a, 2, axis=0), 2, axis=1)


def block_mean2(a: np.ndarray) -> np.ndarray:
    """Mean of each 2 × 2 block of a 10 m array (→ 20 m)."""
    h, w = a.shape
    return a.reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3))


# --- surfaces ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class SurfaceModel:
    """What each 10 m pixel is made of: two surface types, their mix and a brightness gain."""

    primary: np.ndarray  # (y, x) uint8 surface type
    secondary: np.ndarray  # (y, x) uint8 surface type
    mix: np.ndarray  # (y, x) float32 fraction of ``secondary``
    gain: np.ndarray  # (y, x) float32 parcel × illumination factor
    water: np.ndarray  # (y, x) bool (20 m) open water, for SCL

    def reflectance(self, season: str) -> np.ndarray:
        """(4, y, x) float32 clear-sky surface reflectance × 10 000 in ``season``."""
        lut = surface_lut(season)
        out = np.empty((len(BANDS), *self.primary.shape), dtype=np.float32)
        for b in range(len(BANDS)):
            first = lut[b][self.primary]
            second = lut[b][self.secondary]
            out[b] = (first + (second - first) * self.mix) * self.gain
        return out


def _choice(rng: np.random.Generator, names: Sequence[str], p: Sequence[float], n: int) -> np.ndarray:
    ids = np.array([_S[name] for name in names], dtype=np.uint8)
    return ids[rng.choice(len(ids), size=n, p=np.asarray(p) / np.sum(p))]


def build_surfaces(seed: int, land: LandCover) -> SurfaceModel:
    """Turn the 20 m land cover into 10 m surface types with parcels and textures."""
    rng = rng_for(seed, "surfaces")
    codes = repeat2(land.codes)
    parcels = repeat2(land.parcels)
    n_par = land.n_parcels
    shape = codes.shape
    primary = np.zeros(shape, dtype=np.uint8)
    secondary = np.zeros(shape, dtype=np.uint8)
    mix = np.zeros(shape, dtype=np.float32)

    fine = rng.random(shape, dtype=np.float32)  # pixel-scale randomness
    patchy = smooth_noise(rng, shape, 1.5)  # gardens, tree clumps (tens of metres)
    stands = np.clip(0.5 + 0.25 * smooth_noise(rng, shape, 8.0), 0, 1)  # forest stands (~100 m)
    blocks = np.repeat(np.repeat(rng.random((shape[0] // 4 + 1, shape[1] // 4 + 1), dtype=np.float32),
                                 4, 0), 4, 1)[: shape[0], : shape[1]]  # 40 m buildings / yards

    crops = {
        211: _choice(rng, ["winter_cereal", "summer_crop", "fallow"], [0.55, 0.3, 0.15], n_par),
        242: _choice(rng, ["winter_cereal", "summer_crop", "pasture", "fallow", "olive"],
                     [0.3, 0.25, 0.25, 0.1, 0.1], n_par),
        243: _choice(rng, ["winter_cereal", "pasture", "shrub", "broadleaf"],
                     [0.2, 0.25, 0.3, 0.25], n_par),
    }
    parcel_mix = rng.uniform(0.3, 0.55, n_par).astype(np.float32)

    for code in np.unique(land.codes):
        m = codes == code
        if code in crops:
            primary[m] = crops[code][parcels[m]]
            secondary[m] = primary[m]
        elif code == 221:  # vineyards: canopy rows over soil/grass
            primary[m], secondary[m] = _S["vine"], _S["interrow"]
            mix[m] = parcel_mix[parcels[m]] + 0.1 * (fine[m] - 0.5)
        elif code == 223:  # olive groves: scattered crowns over dry grass
            primary[m], secondary[m] = _S["olive"], _S["natural_grass"]
            mix[m] = 0.35 + 0.3 * fine[m]
        elif code == 231:
            primary[m], secondary[m] = _S["pasture"], _S["pasture"]
        elif code == 311:
            primary[m], secondary[m] = _S["broadleaf"], _S["conifer"]
            mix[m] = 0.15 * stands[m]
        elif code == 312:
            primary[m], secondary[m] = _S["conifer"], _S["broadleaf"]
            mix[m] = 0.15 * stands[m]
        elif code == 313:
            primary[m], secondary[m] = _S["broadleaf"], _S["conifer"]
            mix[m] = 0.2 + 0.6 * stands[m]
        elif code == 321:
            primary[m], secondary[m] = _S["natural_grass"], _S["shrub"]
            mix[m] = 0.3 * stands[m]
        elif code == 324:
            primary[m], secondary[m] = _S["shrub"], _S["natural_grass"]
            mix[m] = 0.2 + 0.4 * stands[m]
        elif code == 112:  # built-up with gardens and street trees: bright and textured
            primary[m], secondary[m] = _S["built"], _S["urban_green"]
            mix[m] = np.clip((patchy[m] - 0.3) / 0.8, 0, 1)
        elif code == 121:  # roofs, yards and parking
            primary[m], secondary[m] = _S["roof"], _S["asphalt"]
            mix[m] = (blocks[m] < 0.4).astype(np.float32) * (0.7 + 0.3 * fine[m])
        elif code == 131:
            primary[m], secondary[m] = _S["rock"], _S["natural_grass"]
            mix[m] = 0.15 * fine[m]
        elif code == 411:
            primary[m], secondary[m] = _S["marsh"], _S["water"]
            mix[m] = 0.3 * stands[m]
        elif code == 512:
            primary[m], secondary[m] = _S["water"], _S["water"]
        else:  # pragma: no cover - guarded by landcover.DEMO_CODES
            raise ValueError(f"no surface model for CLC code {code}")

    parcel_gain = np.clip(1 + 0.07 * rng.standard_normal(n_par), 0.85, 1.15).astype(np.float32)
    # Illumination: slopes facing the sun are brighter (from the terrain's east-west gradient).
    slope = np.gradient(land.terrain, axis=1)
    slope = np.clip(slope / (slope.std() + 1e-12), -2.5, 2.5).astype(np.float32)
    shade = repeat2(1 + 0.04 * slope)
    gain = parcel_gain[parcels] * shade
    water20 = land.codes == 512
    gain[repeat2(water20)] = 1.0
    return SurfaceModel(primary=primary, secondary=secondary, mix=np.clip(mix, 0, 1).astype(np.float32),
                        gain=gain.astype(np.float32), water=water20)


def clear_scl(surface: np.ndarray, water20: np.ndarray) -> np.ndarray:
    """Scene classification of the clear surface at 20 m: water 6, vegetation 4, else 5."""
    red = block_mean2(surface[2])
    nir = block_mean2(surface[3])
    ndvi = (nir - red) / np.maximum(nir + red, 1)
    scl = np.where(ndvi > 0.4, SCL_VEGETATION, SCL_NOT_VEGETATED).astype(np.uint8)
    scl[water20 | ((nir < 800) & (nir < block_mean2(surface[1])))] = SCL_WATER
    return scl


# --- scene plan ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class ScenePlan:
    """What one scene will look like (drawn before any pixel)."""

    id: str
    season: str
    datetime: datetime
    platform: str  # "sentinel-2a" / "sentinel-2b"
    processing_baseline: str
    carries_boa_offset: bool  # DN carry the +1000 BOA offset (baseline ≥ 04.00)
    cloud_fraction: float  # target share of valid pixels under cloud (0…1)
    cirrus_fraction: float  # target share of valid pixels under thin cirrus (0…1)
    swath: tuple[str, float, float] | None  # (side "west"/"east", no-data share, tilt degrees)
    clearest: bool  # the season's clearest scene: never swath-cut, keeps a clear view everywhere
    sun_azimuth: float  # degrees from north, clockwise
    sun_elevation: float  # degrees
    cloud_height: float  # metres (sets the shadow offset)

    @property
    def offset(self) -> int:
        """DN added to every valid pixel (1000 for baseline ≥ 04.00, else 0)."""
        return BOA_OFFSET if self.carries_boa_offset else 0


def sun_position(when: datetime, lon: float, lat: float) -> tuple[float, float]:
    """Approximate solar (azimuth, elevation) in degrees (NOAA formulae, ±0.5°)."""
    doy = when.timetuple().tm_yday
    hour = when.hour + when.minute / 60 + when.second / 3600
    g = 2 * math.pi / 365 * (doy - 1 + (hour - 12) / 24)
    eqtime = 229.18 * (0.000075 + 0.001868 * math.cos(g) - 0.032077 * math.sin(g)
                       - 0.014615 * math.cos(2 * g) - 0.040849 * math.sin(2 * g))
    decl = (0.006918 - 0.399912 * math.cos(g) + 0.070257 * math.sin(g) - 0.006758 * math.cos(2 * g)
            + 0.000907 * math.sin(2 * g) - 0.002697 * math.cos(3 * g) + 0.00148 * math.sin(3 * g))
    true_solar_min = hour * 60 + eqtime + 4 * lon
    ha = math.radians(true_solar_min / 4 - 180)
    phi = math.radians(lat)
    cos_zen = math.sin(phi) * math.sin(decl) + math.cos(phi) * math.cos(decl) * math.cos(ha)
    elevation = 90 - math.degrees(math.acos(max(-1.0, min(1.0, cos_zen))))
    azimuth = math.degrees(math.atan2(math.sin(ha), math.cos(ha) * math.sin(phi) - math.tan(decl) * math.cos(phi))) + 180
    return azimuth % 360, elevation


def plan_scenes(seed: int, year: int, dates_per_season: int, mgrs_tile: str,
                centre_lonlat: tuple[float, float]) -> list[ScenePlan]:
    """Draw dates, platforms, baselines, cloud and swath settings of every scene.

    Per season: one scene ~60–80 % cloudy, (with ≥ 4 dates) one ~12–30 %, the rest 0–10 %;
    at least one scene with and one without the BOA offset; one swath-cut scene; the
    clearest scene is never swath-cut.
    """
    rng = rng_for(seed, "scene-plan")
    plans: list[ScenePlan] = []
    for season, month in SEASON_MONTHS.items():
        days = calendar.monthrange(year, month)[1]
        first = int(rng.integers(1, 6))
        slots = list(range(first, days + 1, 5))  # Sentinel-2A/B: one pass every 5 days
        picks = sorted(rng.choice(len(slots), size=dates_per_season, replace=False).tolist())
        n = dates_per_season
        fractions = [rng.uniform(0.6, 0.8)]
        if n >= 4:
            fractions.append(rng.uniform(0.12, 0.3))
        fractions += [rng.uniform(0.0, 0.1) for _ in range(n - len(fractions))]
        fractions = [fractions[i] for i in rng.permutation(n)]
        clearest = int(np.argmin(fractions))
        n_offset = int(rng.integers(1, n))  # at least one of each kind
        offset_flags = [bool(f) for f in rng.permutation([True] * n_offset + [False] * (n - n_offset))]
        swath_candidates = [i for i in range(n) if i != clearest]
        swath_at = int(rng.choice(swath_candidates))
        phase = int(rng.integers(0, 2))
        for i, slot in enumerate(picks):
            day = slots[slot]
            when = datetime(year, month, day, 10, 0, 0, tzinfo=UTC) + timedelta(
                seconds=float(rng.uniform(60, 420)))
            when = when.replace(microsecond=(when.microsecond // 1000) * 1000)
            platform = "sentinel-2a" if (slot + phase) % 2 == 0 else "sentinel-2b"
            az, el = sun_position(when, *centre_lonlat)
            offset = offset_flags[i]
            baseline = str(rng.choice(NEW_BASELINES if offset else OLD_BASELINES))
            cirrus = float(rng.uniform(0.02, 0.08)) if (i != clearest and rng.random() < 0.5) else 0.0
            swath = None
            if i == swath_at:
                swath = (str(rng.choice(["west", "east"])), float(rng.uniform(0.1, 0.35)),
                         float(rng.uniform(10, 20)))
            short = "S2A" if platform == "sentinel-2a" else "S2B"
            plans.append(ScenePlan(
                id=f"{short}_{mgrs_tile}_{when:%Y%m%d}_0_L2A", season=season, datetime=when,
                platform=platform, processing_baseline=baseline, carries_boa_offset=offset,
                cloud_fraction=float(fractions[i]), cirrus_fraction=cirrus, swath=swath,
                clearest=i == clearest, sun_azimuth=az, sun_elevation=el,
                cloud_height=float(rng.uniform(1500, 3000)),
            ))
    return plans


# --- masks ---------------------------------------------------------------------------------------

@dataclass
class SceneMasks:
    """The 20 m masks of one scene (all (y, x) at the SCL resolution)."""

    valid: np.ndarray  # bool: inside the swath
    cloud: np.ndarray  # bool: medium or high probability cloud (SCL 8/9)
    opacity: np.ndarray  # float32 0…1 cloud thickness (0 outside clouds)
    cirrus: np.ndarray  # bool: thin cirrus (SCL 10)
    cirrus_strength: np.ndarray  # float32 0…1
    shadow: np.ndarray  # bool: cloud shadow (SCL 3)
    unclassified: np.ndarray  # bool: clear ground that sen2cor left unclassified (SCL 7)

    @property
    def thick(self) -> np.ndarray:
        """High-probability cloud (SCL 9)."""
        return self.cloud & (self.opacity > 0.35)

    @property
    def obscured(self) -> np.ndarray:
        """No clear view of the ground: no data, cloud, cirrus or shadow."""
        return ~self.valid | self.cloud | self.cirrus | self.shadow

    def clear_view(self, where: np.ndarray) -> None:
        """Remove clouds, cirrus and shadows at ``where`` (keeps a clear observation there)."""
        self.cloud &= ~where
        self.opacity[where] = 0
        self.cirrus &= ~where
        self.cirrus_strength[where] = 0
        self.shadow &= ~where


def _threshold_mask(values: np.ndarray, valid: np.ndarray, fraction: float) -> tuple[np.ndarray, float]:
    """Mask of the ``fraction`` highest values among valid pixels, and the threshold."""
    if fraction <= 0 or not valid.any():
        return np.zeros(values.shape, dtype=bool), float("inf")
    thr = float(np.quantile(values[valid], 1 - fraction))
    return (values > thr) & valid, thr


def _shift(mask: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """Shift a mask by (dy, dx) pixels, filling with False."""
    out = np.zeros_like(mask)
    h, w = mask.shape
    if abs(dy) >= h or abs(dx) >= w:
        return out
    out[max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = \
        mask[max(-dy, 0) : h + min(-dy, 0), max(-dx, 0) : w + min(-dx, 0)]
    return out


def swath_valid(shape: tuple[int, int], swath: tuple[str, float, float] | None) -> np.ndarray:
    """Inside-the-swath mask: a straight edge tilted ``tilt`` degrees from north cuts off
    ``share`` of the region on ``side``."""
    if swath is None:
        return np.ones(shape, dtype=bool)
    side, share, tilt = swath
    rows, cols = np.mgrid[0 : shape[0], 0 : shape[1]]
    across = (cols + math.tan(math.radians(tilt)) * rows).astype(np.float32)
    if side == "west":
        return across >= np.quantile(across, share)
    return across <= np.quantile(across, 1 - share)


def draw_masks(seed: int, plan: ScenePlan, shape: tuple[int, int], scl_resolution: float) -> SceneMasks:
    """Draw swath, clouds, cirrus and shadows of one scene on the 20 m grid."""
    rng = rng_for(seed, f"clouds-{plan.id}")
    valid = swath_valid(shape, plan.swath)
    field_ = fractal_noise(rng, shape, ((3.0, 0.35), (10.0, 0.6), (30.0, 1.0), (80.0, 0.9)))
    cloud, thr = _threshold_mask(field_, valid, plan.cloud_fraction)
    spread = float(field_.std()) * 0.8
    opacity = np.where(cloud, np.clip((field_ - thr) / spread, 0, 1), 0).astype(np.float32)

    cirrus_field = fractal_noise(rng, shape, ((20.0, 0.5), (120.0, 1.0)))
    cirrus, cthr = _threshold_mask(cirrus_field, valid & ~cloud, plan.cirrus_fraction)
    cirrus_strength = np.where(cirrus, np.clip(0.4 + (cirrus_field - cthr), 0.4, 1), 0).astype(np.float32)

    # Shadows fall away from the sun: cloud height / tan(elevation), towards azimuth + 180°.
    dist_px = plan.cloud_height / math.tan(math.radians(plan.sun_elevation)) / scl_resolution
    az = math.radians(plan.sun_azimuth)
    dy, dx = int(round(math.cos(az) * dist_px)), int(round(-math.sin(az) * dist_px))
    shadow = _shift(cloud, dy, dx) & valid & ~cloud & ~cirrus

    # sen2cor leaves some cloud-edge and random pixels unclassified (SCL 7): clear ground.
    ring = ndimage.binary_dilation(cloud) & ~cloud & ~shadow & ~cirrus & valid
    unclassified = ((ring & (rng.random(shape) < 0.3)) | (rng.random(shape) < 0.002)) \
        & valid & ~cloud & ~shadow & ~cirrus
    return SceneMasks(valid, cloud, opacity, cirrus, cirrus_strength, shadow, unclassified)


def keep_clear_views(plans: Sequence[ScenePlan], masks: Sequence[SceneMasks]) -> int:
    """Where every scene of a season is obscured, clear the season's clearest scene, so that
    a cloud-free observation exists at every pixel of every season. Returns pixels cleared."""
    cleared = 0
    for season in SEASON_MONTHS:
        idx = [i for i, p in enumerate(plans) if p.season == season]
        if not idx:
            continue
        everywhere = np.logical_and.reduce([masks[i].obscured for i in idx])
        best = next(i for i in idx if plans[i].clearest)
        masks[best].clear_view(everywhere)
        masks[best].unclassified &= ~everywhere
        cleared += int(everywhere.sum())
    return cleared


def scene_scl(masks: SceneMasks, clear: np.ndarray) -> np.ndarray:
    """The SCL raster (uint8, 20 m) of a scene."""
    scl = clear.copy()
    scl[masks.unclassified] = SCL_UNCLASSIFIED
    scl[masks.shadow] = SCL_SHADOW
    scl[masks.cirrus] = SCL_CIRRUS
    scl[masks.cloud] = SCL_CLOUD_MEDIUM
    scl[masks.thick] = SCL_CLOUD_HIGH
    scl[~masks.valid] = SCL_NODATA
    return scl


def scl_statistics(scl: np.ndarray) -> dict[str, float]:
    """Earth Search ``eo:cloud_cover`` and ``s2:*_percentage`` properties from the SCL.

    Percentages of valid pixels, except ``s2:nodata_pixel_percentage`` (of all pixels);
    cloud cover = medium + high probability cloud + thin cirrus.
    """
    total = scl.size
    valid = int((scl != SCL_NODATA).sum())
    counts = np.bincount(scl.ravel(), minlength=12)

    def pct(*classes: int) -> float:
        return round(100.0 * float(sum(counts[c] for c in classes)) / max(valid, 1), 6)

    return {
        "eo:cloud_cover": pct(8, 9, 10),
        "s2:nodata_pixel_percentage": round(100.0 * (total - valid) / total, 6),
        "s2:saturated_defective_pixel_percentage": pct(1),
        "s2:dark_features_percentage": pct(2),
        "s2:cloud_shadow_percentage": pct(3),
        "s2:vegetation_percentage": pct(4),
        "s2:not_vegetated_percentage": pct(5),
        "s2:water_percentage": pct(6),
        "s2:unclassified_percentage": pct(7),
        "s2:medium_proba_clouds_percentage": pct(8),
        "s2:high_proba_clouds_percentage": pct(9),
        "s2:thin_cirrus_percentage": pct(10),
        "s2:snow_ice_percentage": pct(11),
    }


# --- rendering -----------------------------------------------------------------------------------

def render_band(seed: int, plan: ScenePlan, band: int, surface: np.ndarray, masks: SceneMasks) -> np.ndarray:
    """One band of one scene as uint16 DN (surface × atmosphere, shadows, haze, clouds, noise,
    BOA offset; 0 outside the swath)."""
    rng = rng_for(seed, f"band-{plan.id}-{BANDS[band]}")
    h, w = masks.valid.shape

    def blocks(a: np.ndarray) -> np.ndarray:  # 10 m array viewed as (y20, 2, x20, 2)
        return a.reshape(h, 2, w, 2)

    def per20(a: np.ndarray) -> np.ndarray:  # 20 m array broadcast over its 2 × 2 block
        return a[:, None, :, None]

    # atmosphere left over by the correction: ±1.5 % gain, ±8 DN path (blue a little hazier)
    gain = np.float32(1 + 0.015 * rng.standard_normal())
    path = np.float32(8 * rng.standard_normal() + (15 if band == 0 else 0))
    x = surface * gain + path
    xb = blocks(x)
    xb *= per20(np.where(masks.shadow, _SHADOW_FACTOR[band], np.float32(1)))
    xb += per20(masks.cirrus_strength * _CIRRUS_DN[band])
    alpha = per20(np.where(masks.cloud, 0.45 + 0.55 * masks.opacity, 0).astype(np.float32))
    cloud_dn = per20((_CLOUD_DN[band] * (0.85 + 0.2 * masks.opacity)).astype(np.float32))
    xb += alpha * (cloud_dn - xb)
    noise = rng.standard_normal(x.shape, dtype=np.float32)
    x += noise * (np.float32(10) + np.float32(0.012) * x)
    x += np.float32(plan.offset)
    np.rint(x, out=x)
    np.clip(x, 1, MAX_DN, out=x)
    dn = x.astype(np.uint16)
    dn[repeat2(~masks.valid)] = 0
    return dn


# --- writing -------------------------------------------------------------------------------------

def cog_layout(side: int) -> tuple[int, int]:
    """(internal tile size, overview count) for a raster of ``side`` pixels: 512 px tiles
    from 2048 px up (256 below), overviews down to ~128 px (at least one)."""
    block = 512 if side >= 2048 else 256
    return block, max(1, int(math.log2(max(side, 128) / 128)))


def write_cog(array: np.ndarray, path: Path, transform: Affine, crs: str, *, resampling: str,
              description: str | None = None,
              colormap: dict[int, tuple[int, int, int, int]] | None = None) -> Path:
    """Write a single-band array as a tiled, DEFLATE-compressed COG with overviews, nodata 0.

    The array goes into an in-memory GeoTIFF and is copied once by GDAL's COG driver, so
    each band is encoded only once. No timestamps are written (the bytes depend only on
    the pixels and metadata).
    """
    height, width = array.shape
    block, n_overviews = cog_layout(min(height, width))
    profile = {"driver": "GTiff", "width": width, "height": height, "count": 1,
               "dtype": array.dtype.name, "crs": crs, "transform": transform, "nodata": 0}
    threads = str(min(4, os.cpu_count() or 1))
    with MemoryFile() as mem:
        with mem.open(**profile) as tmp:
            tmp.write(array, 1)
            if description:
                tmp.set_band_description(1, description)
            if colormap is not None:
                tmp.write_colormap(1, colormap)
        with mem.open() as src:
            rasterio.shutil.copy(src, path, driver="COG", COMPRESS="DEFLATE", LEVEL="1", PREDICTOR="2",
                                 BLOCKSIZE=str(block), OVERVIEW_COUNT=str(n_overviews),
                                 RESAMPLING=resampling, NUM_THREADS=threads, BIGTIFF="IF_SAFER")
    return path
