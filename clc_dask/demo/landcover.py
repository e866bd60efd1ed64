"""Synthetic CORINE-like land cover for the demo region.

A smooth random partition of the region (warped Voronoi cells on a 20 m grid) gets
Level-3 classes along a terrain gradient (arable plains → olive/vine hills → forest and
grassland uplands), with towns, industrial zones, a quarry, lakes and marshes painted on as
compact patches. The result is cleaned to the CORINE rules — every patch of one class is
at least 25 ha (4-connected) and every part of it is at least 100 m wide — so that its
polygons look like the real CLC 2018 product.
"""

from __future__ import annotations

import logging
import math
import zlib
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

log = logging.getLogger(__name__)

#: Land-cover grid: 20 m pixels (the 10 m rasters repeat each cell 2 × 2).
LANDCOVER_RESOLUTION = 20.0  # metres
MIN_AREA_HA = 25.0  # CORINE minimum mapping unit, hectares
MIN_WIDTH_M = 100.0  # CORINE minimum width, metres

#: Level-3 classes of the partition, ordered from plains to uplands, with their share of
#: the partition's area (central Italy: arable and forest dominate).
BASE_CLASSES: tuple[tuple[int, float], ...] = (
    (211, 0.30),  # non-irrigated arable land
    (242, 0.09),  # complex cultivation patterns
    (221, 0.03),  # vineyards
    (223, 0.05),  # olive groves
    (243, 0.07),  # agriculture with significant natural vegetation
    (231, 0.07),  # pastures
    (324, 0.06),  # transitional woodland-shrub
    (311, 0.20),  # broad-leaved forest
    (313, 0.05),  # mixed forest
    (321, 0.04),  # natural grasslands
    (312, 0.04),  # coniferous forest
)

#: Compact patches painted over the partition: share of the region, minimum area (ha),
#: terrain range (rank 0 = lowest plain, 1 = highest upland).
@dataclass(frozen=True)
class _Overlay:
    code: int
    share: float
    min_ha: float
    terrain: tuple[float, float]
    ha_per_patch: float  # one patch per this many hectares of region (at least one)


TOWN = _Overlay(112, 0.045, 60.0, (0.0, 0.55), 12000.0)  # discontinuous urban fabric
INDUSTRY = _Overlay(121, 0.015, 35.0, (0.0, 1.0), 12000.0)  # industrial or commercial units
QUARRY = _Overlay(131, 0.004, 35.0, (0.55, 1.0), 40000.0)  # mineral extraction sites
LAKE = _Overlay(512, 0.02, 45.0, (0.0, 0.3), 60000.0)  # water bodies
MARSH = _Overlay(411, 0.006, 35.0, (0.0, 1.0), 60000.0)  # inland marshes (rare, Level 2: 41)

#: Every Level-3 code the synthesis uses.
DEMO_CODES: tuple[int, ...] = tuple(sorted([c for c, _ in BASE_CLASSES] + [112, 121, 131, 411, 512]))

_CODE_SPAN = 1024  # CLC codes are < 1000: (owner, code) pairs pack into one integer
_MEAN_CELL_HA = 45.0  # mean area of a partition cell, hectares
_PARCEL_HA = 2.5  # mean area of an agricultural parcel (spectral variability), hectares


def rng_for(seed: int, purpose: str) -> np.random.Generator:
    """An independent, reproducible random stream for one purpose of one seed."""
    return np.random.default_rng([int(seed), zlib.crc32(purpose.encode())])


def smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma_px: float) -> np.ndarray:
    """Gaussian-smoothed white noise (float32, mean 0, std 1) with features of ~``sigma_px`` px.

    Large scales are filtered on a coarser grid and interpolated, so the cost does not grow
    with ``sigma_px``.
    """
    factor = max(1, int(sigma_px // 3))
    small = (math.ceil(shape[0] / factor) + 3, math.ceil(shape[1] / factor) + 3)
    field = rng.standard_normal(small, dtype=np.float32)
    field = ndimage.gaussian_filter(field, sigma=sigma_px / factor, mode="wrap")
    if factor > 1:
        field = ndimage.zoom(field, factor, order=1, grid_mode=True, mode="nearest")
    field = field[1 : shape[0] + 1, 1 : shape[1] + 1] if factor > 1 else field[: shape[0], : shape[1]]
    field = field - field.mean()
    std = field.std()
    return (field / std if std > 0 else field).astype(np.float32, copy=False)


def fractal_noise(rng: np.random.Generator, shape: tuple[int, int],
                  scales: tuple[tuple[float, float], ...]) -> np.ndarray:
    """A weighted sum of :func:`smooth_noise` fields, ``scales`` = ((sigma_px, weight), …)."""
    total = np.zeros(shape, dtype=np.float32)
    for sigma, weight in scales:
        total += np.float32(weight) * smooth_noise(rng, shape, sigma)
    total -= total.mean()
    return total / total.std()


def voronoi(rng: np.random.Generator, shape: tuple[int, int], n_seeds: int,
            warp: float = 0.0) -> np.ndarray:
    """Label each pixel with its nearest of ``n_seeds`` random seed pixels (int32, 0…n-1).

    ``warp`` displaces the sampling positions by smooth noise of that many cell spacings,
    which makes the cell borders irregular like natural boundaries.
    """
    height, width = shape
    ys = rng.integers(0, height, n_seeds)
    xs = rng.integers(0, width, n_seeds)
    ids = np.zeros(shape, dtype=np.int32)
    ids[ys, xs] = np.arange(n_seeds, dtype=np.int32)
    background = np.ones(shape, dtype=bool)
    background[ys, xs] = False
    iy, ix = ndimage.distance_transform_edt(background, return_distances=False, return_indices=True)
    labels = ids[iy, ix]
    del iy, ix
    if warp > 0:
        spacing = math.sqrt(height * width / n_seeds)
        amp = np.float32(warp * spacing)
        yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
        yy += amp * smooth_noise(rng, shape, spacing / 2)
        xx += amp * smooth_noise(rng, shape, spacing / 2)
        sy = np.clip(np.rint(yy), 0, height - 1).astype(np.int32)
        sx = np.clip(np.rint(xx), 0, width - 1).astype(np.int32)
        labels = labels[sy, sx]
    return labels


@dataclass(frozen=True)
class LandCover:
    """The synthetic land cover on the 20 m grid.

    Attributes:
        codes: (y, x) uint16 Level-3 CLC codes at 20 m.
        terrain: (y, x) float32 terrain field (0 plain … 1 upland) at 20 m.
        parcels: (y, x) int32 parcel ids at 20 m (fields and stands with their own spectra).
        n_parcels: number of parcels.
    """

    codes: np.ndarray
    terrain: np.ndarray
    parcels: np.ndarray
    n_parcels: int


def synthesize_landcover(seed: int, shape: tuple[int, int]) -> LandCover:
    """Draw the land cover of a region of ``shape`` 20 m pixels, deterministically from ``seed``."""
    rng = rng_for(seed, "landcover")
    px_ha = LANDCOVER_RESOLUTION**2 / 1e4
    area_ha = shape[0] * shape[1] * px_ha

    terrain_raw = fractal_noise(rng, shape, ((400.0, 1.0), (150.0, 0.6), (50.0, 0.25)))
    terrain = _to_rank(terrain_raw)

    n_cells = max(24, round(area_ha / _MEAN_CELL_HA))
    cells = voronoi(rng, shape, n_cells, warp=0.35)
    codes = _assign_base_classes(rng, cells, n_cells, terrain)

    painted = np.zeros(shape, dtype=bool)
    towns = _paint(rng, codes, painted, terrain, TOWN, area_ha)
    for centre, radius in towns:
        _paint_next_to(rng, codes, painted, INDUSTRY, centre, radius,
                       _patch_px(INDUSTRY, area_ha, len(towns)))
    _paint(rng, codes, painted, terrain, QUARRY, area_ha)
    lakes = _paint(rng, codes, painted, terrain, LAKE, area_ha)
    for centre, radius in lakes:
        _paint_next_to(rng, codes, painted, MARSH, centre, radius,
                       _patch_px(MARSH, area_ha, len(lakes)), allow_over_painted=False)

    min_px = math.ceil(MIN_AREA_HA / px_ha)
    width_px = math.ceil(MIN_WIDTH_M / LANDCOVER_RESOLUTION)
    codes = enforce_clc_rules(codes, min_px, width_px)
    # A class whose patches were all too small or thin is put back as one compact patch
    # of twice the minimum area, where the terrain suits it.
    for _ in range(3):
        missing = sorted(set(DEMO_CODES) - set(np.unique(codes).tolist()))
        if not missing:
            break
        log.debug("re-placing classes %s removed by the CLC rules", missing)
        painted = np.zeros(shape, dtype=bool)
        for code in missing:
            lo, hi = _terrain_slot(code)
            patch = _Overlay(code, 0.0, 2.0 * MIN_AREA_HA, (lo, hi), area_ha * 10)
            _paint(rng, codes, painted, terrain, patch, area_ha)
        codes = enforce_clc_rules(codes, min_px, width_px)
    missing = sorted(set(DEMO_CODES) - set(np.unique(codes).tolist()))
    if missing:
        log.warning("demo land cover: classes %s do not fit the 25 ha / 100 m rules at this "
                    "size (%d×%d px at 20 m)", missing, shape[0], shape[1])

    n_parcels = max(64, round(area_ha / _PARCEL_HA))
    parcels = voronoi(rng, shape, n_parcels, warp=0.0)
    return LandCover(codes=codes, terrain=terrain, parcels=parcels, n_parcels=n_parcels)


def _terrain_slot(code: int) -> tuple[float, float]:
    """The terrain-rank range where a class belongs (its band of the plains → uplands order)."""
    for overlay in (TOWN, INDUSTRY, QUARRY, LAKE, MARSH):
        if overlay.code == code:
            return overlay.terrain
    shares = np.array([s for _, s in BASE_CLASSES])
    edges = np.r_[0.0, np.cumsum(shares) / shares.sum()]
    k = [c for c, _ in BASE_CLASSES].index(code)
    return float(edges[k]), float(edges[k + 1])


def _to_rank(field: np.ndarray) -> np.ndarray:
    """Map a field to its rank in [0, 1] (uniform distribution, same ordering)."""
    flat = field.ravel()
    order = np.argsort(flat, kind="stable")
    rank = np.empty(flat.size, dtype=np.float32)
    rank[order] = np.linspace(0.0, 1.0, flat.size, dtype=np.float32)
    return rank.reshape(field.shape)


def _assign_base_classes(rng: np.random.Generator, cells: np.ndarray, n_cells: int,
                         terrain: np.ndarray) -> np.ndarray:
    """Give each partition cell a base class: cells sorted by (noisy) mean terrain fill the
    classes' area shares in plains → uplands order; every class gets at least one cell."""
    areas = np.bincount(cells.ravel(), minlength=n_cells).astype(np.float64)
    mean_terrain = np.bincount(cells.ravel(), weights=terrain.ravel(), minlength=n_cells)
    mean_terrain = mean_terrain / np.maximum(areas, 1)
    score = mean_terrain + 0.15 * rng.standard_normal(n_cells)
    order = np.argsort(score, kind="stable")
    shares = np.array([s for _, s in BASE_CLASSES])
    bounds = np.cumsum(shares) / shares.sum() * areas.sum()
    midpoints = np.cumsum(areas[order]) - areas[order] / 2
    klass = np.minimum(np.searchsorted(bounds, midpoints), len(BASE_CLASSES) - 1)
    # Every class at least once: take the cell nearest to the class's slot from a class
    # that has cells to spare.
    for k in range(len(BASE_CLASSES)):
        if (klass == k).any():
            continue
        counts = np.bincount(klass, minlength=len(BASE_CLASSES))
        target = (bounds[k] - shares[k] / shares.sum() * areas.sum() / 2)
        candidates = [i for i in np.argsort(np.abs(midpoints - target)) if counts[klass[i]] > 1]
        klass[candidates[0]] = k
    lut = np.zeros(n_cells, dtype=np.uint16)
    lut[order] = np.array([c for c, _ in BASE_CLASSES], dtype=np.uint16)[klass]
    return lut[cells]


def _patch_px(overlay: _Overlay, area_ha: float, n_patches: int) -> float:
    px_ha = LANDCOVER_RESOLUTION**2 / 1e4
    per_patch = max(overlay.min_ha, overlay.share * area_ha / max(n_patches, 1))
    return per_patch / px_ha


def _blob(rng: np.random.Generator, radius: float) -> tuple[np.ndarray, int]:
    """A compact patch with a wavy outline inside a square window; returns (mask, half-size)."""
    half = int(math.ceil(radius * 1.4)) + 2
    yy, xx = np.mgrid[-half : half + 1, -half : half + 1].astype(np.float32)
    dist = np.hypot(yy, xx) / radius
    wobble = smooth_noise(rng, dist.shape, max(radius / 3, 2.0))
    return (dist + 0.18 * wobble) < 1.0, half


def _stamp(codes: np.ndarray, painted: np.ndarray, mask: np.ndarray, centre: tuple[int, int],
           half: int, code: int, allow_over_painted: bool = True) -> int:
    """Paint ``mask`` (centred on ``centre``) with ``code``, clipped to the region."""
    height, width = codes.shape
    cy, cx = centre
    y0, x0 = cy - half, cx - half
    ys = slice(max(y0, 0), min(y0 + mask.shape[0], height))
    xs = slice(max(x0, 0), min(x0 + mask.shape[1], width))
    sub = mask[ys.start - y0 : ys.stop - y0, xs.start - x0 : xs.stop - x0]
    if not allow_over_painted:
        sub = sub & ~painted[ys, xs]
    codes[ys, xs][sub] = code
    painted[ys, xs] |= sub
    return int(sub.sum())


def _paint(rng: np.random.Generator, codes: np.ndarray, painted: np.ndarray,
           terrain: np.ndarray, overlay: _Overlay, area_ha: float) -> list[tuple[tuple[int, int], float]]:
    """Paint the overlay's patches at free places of suitable terrain; returns (centre, radius)."""
    n = max(1, round(area_ha / overlay.ha_per_patch))
    radius = math.sqrt(_patch_px(overlay, area_ha, n) / math.pi)
    height, width = codes.shape
    placed: list[tuple[tuple[int, int], float]] = []
    margin = int(radius * 1.2)
    lo, hi = overlay.terrain
    for _ in range(n):
        best = None
        for attempt in range(400):
            relax = attempt >= 200  # give up the terrain preference after many tries
            cy = int(rng.integers(min(margin, height // 2), max(height - margin, height // 2 + 1)))
            cx = int(rng.integers(min(margin, width // 2), max(width - margin, width // 2 + 1)))
            if not relax and not (lo <= terrain[cy, cx] <= hi):
                continue
            r = int(radius * 1.5)
            if painted[max(cy - r, 0) : cy + r + 1, max(cx - r, 0) : cx + r + 1].any():
                continue
            best = (cy, cx)
            break
        if best is None:
            log.debug("no free place for a %d patch", overlay.code)
            continue
        mask, half = _blob(rng, radius)
        _stamp(codes, painted, mask, best, half, overlay.code)
        placed.append((best, radius))
    return placed


def _paint_next_to(rng: np.random.Generator, codes: np.ndarray, painted: np.ndarray,
                   overlay: _Overlay, centre: tuple[int, int], radius: float, size_px: float,
                   allow_over_painted: bool = False) -> None:
    """Paint one patch of ``overlay`` touching the patch at ``centre`` (e.g. a marsh on a
    lake shore, an industrial zone at the edge of a town)."""
    r = math.sqrt(size_px / math.pi)
    height, width = codes.shape
    angles = rng.permutation(8) * (math.pi / 4) + rng.random() * math.pi / 4
    for angle in angles:
        dist = radius + 0.7 * r
        cy = int(round(centre[0] + dist * math.sin(angle)))
        cx = int(round(centre[1] + dist * math.cos(angle)))
        if r <= cy < height - r and r <= cx < width - r:
            break
    mask, half = _blob(rng, r * 1.15)  # a little larger: the shared side is left to the neighbour
    _stamp(codes, painted, mask, (cy, cx), half, overlay.code, allow_over_painted=allow_over_painted)


def width_ok(codes: np.ndarray, width_px: int) -> np.ndarray:
    """True where a pixel lies in a ``width_px`` × ``width_px`` window of its own class
    entirely inside the raster (i.e. the patch is at least that wide there)."""
    high = ndimage.maximum_filter(codes, size=width_px, mode="constant", cval=0)
    low = ndimage.minimum_filter(codes, size=width_px, mode="constant", cval=0)
    uniform = ((high == low) & (low > 0)).astype(np.uint8)
    # Odd sizes are centred; for even sizes the reflected window covers the same pixels.
    origin = 0 if width_px % 2 else -1
    return ndimage.maximum_filter(uniform, size=width_px, mode="constant", cval=0,
                                  origin=origin).astype(bool)


def component_labels(codes: np.ndarray, classes: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Label 4-connected patches of one class (ids unique over all classes; 0 = not labelled,
    i.e. a class outside ``classes``); returns (labels int32, size in pixels of each id)."""
    labels = np.zeros(codes.shape, dtype=np.int32)
    next_id = 1
    for code in np.unique(codes) if classes is None else classes:
        lab, n = ndimage.label(codes == code)
        inside = lab > 0
        labels[inside] = lab[inside] + (next_id - 1)
        next_id += n
    return labels, np.bincount(labels.ravel(), minlength=next_id)


def small_patches(codes: np.ndarray, min_px: int) -> np.ndarray:
    """True on 4-connected patches of one class smaller than ``min_px`` pixels."""
    labels, sizes = component_labels(codes)
    too_small = sizes < min_px
    too_small[0] = False
    return too_small[labels]


def _reassign_thin(codes: np.ndarray, thin: np.ndarray, width_px: int) -> np.ndarray:
    """Give each thin pixel the most frequent *other* class in the ``2 * width_px - 1``
    window around it (every window holding a thin pixel holds another class)."""
    window = 2 * width_px - 1
    ys, xs = np.nonzero(thin)
    half = window // 2
    padded = np.pad(codes, half, mode="constant", constant_values=0)
    dy, dx = np.mgrid[0:window, 0:window]
    hood = padded[ys[:, None] + dy.ravel()[None, :], xs[:, None] + dx.ravel()[None, :]]
    own = codes[ys, xs]
    row = np.broadcast_to(np.arange(ys.size, dtype=np.int64)[:, None], hood.shape)
    keep = (hood != own[:, None]) & (hood > 0)
    out = codes.copy()
    if not keep.any():
        return out
    pixel, code = _best_pairs(row[keep], hood[keep])
    out[ys[pixel], xs[pixel]] = code
    return out


def _best_pairs(owner: np.ndarray, code: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each owner, the code it is paired with most often (ties: the lowest code)."""
    keys = owner.astype(np.int64) * _CODE_SPAN + code.astype(np.int64)
    keys, counts = np.unique(keys, return_counts=True)
    owners, codes = keys // _CODE_SPAN, keys % _CODE_SPAN
    order = np.lexsort((codes, -counts, owners))
    owners, codes = owners[order], codes[order]
    first = np.r_[True, owners[1:] != owners[:-1]]
    return owners[first], codes[first]


def _merge_small(codes: np.ndarray, min_px: int,
                 classes: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Merge patches smaller than ``min_px`` into the neighbouring class they share the
    longest border with (the CORINE generalization rule). Patches that only touch other
    small patches wait for a later round, so two small neighbours never swap classes.
    Only ``classes`` are examined (default: all). Returns the new codes and the classes
    that had small patches (empty when every patch is large enough)."""
    labels, sizes = component_labels(codes, classes)
    small = sizes < min_px
    small[0] = False
    if not small.any():
        return codes, np.zeros(0, dtype=codes.dtype)
    had_small = np.unique(codes[small[labels]])
    pairs = []
    for a, b in ((np.s_[:, :-1], np.s_[:, 1:]), (np.s_[:-1, :], np.s_[1:, :])):
        for here, there in ((a, b), (b, a)):
            la, lb = labels[here], labels[there]
            sel = small[la] & ~small[lb] & (codes[here] != codes[there])
            pairs.append((la[sel], codes[there][sel]))
    owner = np.concatenate([p[0] for p in pairs])
    neighbour = np.concatenate([p[1] for p in pairs])
    if owner.size == 0:
        # only small patches left next to each other: merge the smallest into its neighbour
        smallest = int(np.argmin(np.where(small, sizes, np.iinfo(sizes.dtype).max)))
        region = labels == smallest
        ring = ndimage.binary_dilation(region) & ~region
        out = codes.copy()
        out[region] = np.bincount(codes[ring]).argmax()
        return out, had_small
    # for each small patch, the neighbour class with the longest shared border
    label, code = _best_pairs(owner, neighbour)
    lut = np.zeros(sizes.size, dtype=codes.dtype)
    has = np.zeros(sizes.size, dtype=bool)
    lut[label] = code
    has[label] = True
    out = codes.copy()
    sel = has[labels]
    out[sel] = lut[labels[sel]]
    return out, had_small


def _paint_best_windows(codes: np.ndarray, thin: np.ndarray, width_px: int) -> np.ndarray:
    """Fix the thin pixels one by one: paint the ``width_px`` window around each that is
    most uniform with its majority class (for the few junction pixels where neighbour
    majorities keep flipping)."""
    out = codes.copy()
    height, width = codes.shape
    w = width_px
    for y, x in zip(*np.nonzero(thin), strict=True):
        best = (-1, 0, 0, 0)
        for ty in range(max(y - w + 1, 0), min(y, height - w) + 1):
            for tx in range(max(x - w + 1, 0), min(x, width - w) + 1):
                counts = np.bincount(out[ty : ty + w, tx : tx + w].ravel())
                k = int(np.argmax(counts))
                if counts[k] > best[0]:
                    best = (int(counts[k]), k, ty, tx)
        count, code, ty, tx = best
        if count == w * w and code == out[y, x]:
            continue  # already inside a uniform window (an earlier one fixed it)
        out[ty : ty + w, tx : tx + w] = code
    return out


def enforce_clc_rules(codes: np.ndarray, min_px: int, width_px: int, max_rounds: int = 100) -> np.ndarray:
    """Remove parts narrower than ``width_px`` and patches smaller than ``min_px`` by giving
    them their neighbours' classes, until every patch passes both rules."""
    history: list[int] = []
    pending: np.ndarray | None = None  # classes that may hold small patches (None: all)
    for round_ in range(max_rounds):
        before = codes
        thin = ~width_ok(codes, width_px)
        n_thin = int(thin.sum())
        stalled = bool(history) and n_thin > 0.8 * history[-1]
        if n_thin:
            fix = _paint_best_windows if stalled else _reassign_thin
            codes = fix(codes, thin, width_px)
        history.append(n_thin)
        # A patch can only become small by losing pixels to the width rule (merging whole
        # small patches never shrinks another one), so only those classes are re-examined.
        lost = np.unique(before[codes != before])
        check = None if pending is None else np.union1d(pending, lost)
        codes, pending = _merge_small(codes, min_px, check)
        log.debug("CLC rules round %d: %d thin px%s, small patches in classes %s", round_, n_thin,
                  " (stalled)" if n_thin and stalled else "", pending.tolist())
        if not n_thin and not pending.size:
            return codes
    raise RuntimeError(
        f"demo land cover did not converge to the 25 ha / 100 m rules in {max_rounds} rounds"
    )
