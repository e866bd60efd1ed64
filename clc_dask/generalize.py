"""Generalization of a class map to CORINE rules, chunk by chunk, exactly as in memory.

A predicted class map is noisy at the pixel scale; CORINE maps have a minimum mapping unit
(MMU, 25 ha) and a minimum width (100 m). This module turns a (y, x) code raster into a map
that follows both rules. :func:`generalize_array` runs on a NumPy array in memory;
:func:`generalize` runs on a dask-backed DataArray chunk by chunk and returns exactly the
same array for any chunking: the in-memory path *is* the chunked path with one chunk.

Definition
----------
Input: a (y, x) array of non-negative integer codes, ``0`` = no data; pixels of
``py × px`` metres (from the grid). No-data pixels are never changed and never merged into:
every step only rewrites valid pixels, so the no-data mask and the valid-pixel count are
conserved. The map goes through three steps:

1. MMU merge (rule A) — removes specks, which would otherwise make every window impure;
2. minimum width (rule B) — removes the narrow parts of the remaining patches;
3. MMU merge again (rule A) — merges the fragments step 2 may cut off.

Steps 2–3 are skipped when the width rule is off (``min_width_m`` under 1.5 pixels); rule A
is a no-op when ``mmu_px ≤ 1``. The final map has no patch under the MMU (exceptions
below). The width rule is applied once: where a step-3 merge itself creates a narrow part,
it stays (rare; merges only add whole small patches to a neighbour).

**Rule A — minimum mapping unit (merge small patches, smallest first).**

* ``mmu_px = ceil(mmu_ha · 10 000 / (py · px))`` (25 ha at 10 m → 2 500 px). A *patch* is a
  connected set of valid pixels of one code: 4-connected by default (as CLC polygons and
  ``rasterio.features.shapes`` see a raster), 8-connected on request. A patch is *small* if
  it has fewer than ``mmu_px`` pixels.
* Two patches are *neighbours* if some of their pixels are adjacent under the chosen
  connectivity. Their *shared border* is the number of 4-adjacent pixel pairs between them
  (pixel edges; a diagonal contact counts 0 but still makes neighbours under 8-connectivity).
* Repeat while a small patch with a neighbour exists: take the small patch ``P`` with the
  fewest pixels (ties: the patch whose first pixel in row-major order comes first — a key
  that does not depend on chunking). For each class among ``P``'s neighbours, total the
  shared border with ``P`` and the pixels of those neighbouring patches. ``P`` takes the
  class with the longest total border; ties go to the class whose neighbouring patches are
  larger in total, then to the smaller code. ``P`` and its neighbours of that class become
  one patch, which is queued again if still small.
* Exceptions, left as they are: a small patch with no neighbour at all (enclosed by no data
  and/or the raster edge — e.g. an islet, or a raster holding a single patch).

**Rule B — minimum width (a per-class opening by a disk, then a fill).**

* ``w = (wy, wx)`` with ``wy = floor(min_width_m / py + 0.5)`` (likewise ``wx``): the width in
  pixels rounded half up, 100 m at 10 m → 10. The structuring element is the digital disk of
  :func:`footprint`: the pixels of a ``wy × wx`` box whose centres lie in the inscribed ellipse
  (a circle for square pixels; 80 of the 100 pixels at 10 × 10). A disk measures width in
  every direction alike (a square would demand √2·w across a diagonal river). The opening of
  a region is the union of the disk's placements that fit inside it; that needs no centre
  pixel, so even widths are exact.
* A valid pixel is *wide* if at least one placement of the disk on the pixel grid contains it
  and contains no valid pixel of another class; no-data pixels and the area beyond the raster
  edge are wildcards (only borders with other classes make a part narrow). Per class ``c``
  this is the opening of ``{code == c} ∪ no data ∪ outside``, restricted to ``code == c``.
  Every other valid pixel is *thin*: narrow parts, and the tips of sharp corners.
* Thin pixels are refilled by region growing from the wide pixels in ``R = max(wy, wx)``
  synchronous rounds: each not-yet-filled thin pixel with at least one filled 4-neighbour
  takes the class held by most of its filled 4-neighbours; on a tie it keeps its own class if
  that is among the tied ones, else it takes the smallest tied code. All pixels of a round
  decide from the previous round's state. Thin pixels still unfilled after ``R`` rounds (no
  class is ``w`` wide anywhere near them) keep their class, and step 3 handles them. The tie
  rule gives most corner pixels back to their own class; the outermost pixel of a right-angle
  corner, whose filled neighbours are both foreign, goes to its neighbour.
* An output pixel depends only on input pixels within ``wy - 1 + R`` rows and ``wx - 1 + R``
  columns, so ``map_overlap`` with that halo and a constant no-data boundary gives the
  in-memory result exactly (the in-memory path pads with the same halo of no data).

Chunked execution
-----------------
A merge decision needs only the patch adjacency graph (class, pixel count, first pixel,
shared borders), not the pixels. Each MMU step labels every block's patches, joins labels
across block faces (pairs of facing edge pixels of one code are one patch; components via
``scipy.sparse.csgraph``), sums areas and borders into the graph, decides all merges in
memory on that table, and relabels each block with a lookup table. No task holds more than
one block plus its halo; the table holds a few numbers per patch. ``dask_image``'s
``ndmeasure.label`` is not used: it labels foreground against background rather than regions
of equal code (one pass per class), and the border table needs the block pass anyway.

Properties (tested): chunked == in memory for any chunking; no patch under the MMU remains
except the exceptions above; no-data pixels and the valid-pixel count are unchanged; every
output patch contains at least one input pixel of its own class (classes only spread from
neighbours); a patch that is at least the MMU and a union of disk placements (wide
everywhere) keeps all its pixels; ties are broken as stated.

:func:`compare_to_sieve` reports how far a result is from GDAL's sieve filter
(``rasterio.features.sieve``), which merges small patches into their largest neighbour and
has no width rule.
"""

from __future__ import annotations

import heapq
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import numpy as np
import rasterio.features
import scipy.ndimage as ndi
import xarray as xr
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from clc_dask.classes import colormap, validate_codes
from clc_dask.errors import ConfigError, InputError, OutputError
from clc_dask.rasters import check_writable, geobox_of, open_raster, to_dataarray, write_geotiff

log = logging.getLogger(__name__)

NODATA = 0
_BIG = 1 << 30  # larger than any code, for window minima over valid pixels only


# --------------------------------------------------------------------------- rules


@dataclass(frozen=True)
class Rules:
    """The generalization rules in pixels (see the module docstring for the definition).

    Attributes:
        mmu_px: patches with fewer pixels than this are merged (≤ 1: no MMU step).
        width_px: ``(rows, cols)`` box of the minimum-width disk (both ≤ 1: no width step).
        connectivity: 4 or 8, how pixels of one code connect into a patch.
    """

    mmu_px: int
    width_px: tuple[int, int]
    connectivity: int = 4

    @property
    def width_enabled(self) -> bool:
        """Whether the minimum-width step runs."""
        return max(self.width_px) > 1

    @property
    def rounds(self) -> int:
        """Region-growing rounds that refill thin pixels (``max(wy, wx)``)."""
        return max(self.width_px) if self.width_enabled else 0

    @property
    def halo(self) -> tuple[int, int]:
        """Rows and columns of context the width step needs around each pixel."""
        if not self.width_enabled:
            return (0, 0)
        wy, wx = self.width_px
        return (wy - 1 + self.rounds, wx - 1 + self.rounds)


def rules_for(
    pixel_size: float | tuple[float, float],
    mmu_ha: float = 25.0,
    min_width_m: float = 100.0,
    connectivity: int = 4,
) -> Rules:
    """Turn the CORINE rules in hectares and metres into :class:`Rules` in pixels.

    Args:
        pixel_size: pixel edge in metres, or ``(y, x)`` edges for non-square pixels.
        mmu_ha: minimum mapping unit in hectares (CLC: 25). 0 disables the MMU step.
        min_width_m: minimum width in metres (CLC: 100). Below 1.5 pixels it is a no-op.
        connectivity: 4 (default, like CLC polygons) or 8.
    """
    py, px = (pixel_size, pixel_size) if np.isscalar(pixel_size) else tuple(pixel_size)
    py, px = abs(float(py)), abs(float(px))
    if not (math.isfinite(py) and math.isfinite(px) and py > 0 and px > 0):
        raise InputError(f"Pixel size must be positive metres, got {pixel_size!r}: is the raster georeferenced?")
    if not (math.isfinite(mmu_ha) and mmu_ha >= 0):
        raise ConfigError(f"The minimum mapping unit mmu_ha (--mmu-ha) must be ≥ 0 hectares (CLC uses 25), not {mmu_ha!r}.")
    if not (math.isfinite(min_width_m) and min_width_m >= 0):
        raise ConfigError(f"The minimum width min_width_m (--min-width-m) must be ≥ 0 metres (CLC uses 100), not {min_width_m!r}.")
    if connectivity not in (4, 8):
        raise ConfigError(f"connectivity (--connectivity) must be 4 (edges) or 8 (edges and corners), not {connectivity!r}.")
    mmu_px = max(0, math.ceil(mmu_ha * 10_000 / (py * px) - 1e-9))
    width = (math.floor(min_width_m / py + 0.5), math.floor(min_width_m / px + 0.5))
    return Rules(mmu_px=mmu_px, width_px=(max(1, width[0]), max(1, width[1])), connectivity=connectivity)


def _check_codes_dtype(dtype: np.dtype) -> None:
    if np.dtype(dtype).kind not in "iu":
        raise InputError(
            f"A class map must hold integer CLC codes (uint8/uint16), not {np.dtype(dtype).name}: "
            "is this a class map (not a probability or reflectance raster)?"
        )


# ---------------------------------------------------------------- rule B: minimum width


def footprint(width_px: tuple[int, int]) -> np.ndarray:
    """The width rule's structuring element: a digital disk (ellipse) of ``wy × wx`` pixels.

    Pixel ``(i, j)`` of the ``wy × wx`` box belongs to it if its centre lies in the ellipse
    inscribed in the box: ``((i + ½ − wy/2) / (wy/2))² + ((j + ½ − wx/2) / (wx/2))² ≤ 1``.
    Every row is one contiguous run (or empty, for very elongated ellipses); the shape is
    symmetric under a half turn about the box centre. Widths 1–3 give the full box;
    10 × 10 gives 80 pixels (rows of 4, 8, 8, 10, 10, 10, 10, 8, 8, 4).
    """
    wy, wx = width_px
    i = (np.arange(wy) + 0.5 - wy / 2) / (wy / 2)
    j = (np.arange(wx) + 0.5 - wx / 2) / (wx / 2)
    return i[:, None] ** 2 + j[None, :] ** 2 <= 1 + 1e-9


def _forward(arr: np.ndarray, fp: np.ndarray, func: Any, combine: Any, neutral: int) -> np.ndarray:
    """``out[a] = func over arr[a + (i, j)]`` for ``(i, j)`` in ``fp`` (windows anchored
    top-left; beyond the array counts as ``neutral``, the identity of ``combine``)."""
    if fp.all():  # a full box is separable
        out = arr
        for axis, n in enumerate(fp.shape):
            if n > 1:
                out = func(out, n, axis=axis, mode="constant", cval=neutral, origin=-(n // 2))
        return out
    height, width = arr.shape
    out = np.full(arr.shape, neutral, dtype=arr.dtype)
    runs = [(i, int(np.argmax(row)), int(row.sum())) for i, row in enumerate(fp) if row.any()]
    for n in sorted({n for _, _, n in runs}):
        along = func(arr, n, axis=1, mode="constant", cval=neutral, origin=-(n // 2)) if n > 1 else arr
        for i, j0, _ in (r for r in runs if r[2] == n):
            target = out[: height - i, : width - j0]
            combine(target, along[i:, j0:], out=target)
    return out


def width_step(block: np.ndarray, rules: Rules) -> np.ndarray:
    """Apply the minimum-width rule to a block that already includes its halo.

    The result is exact for pixels at least ``rules.halo`` away from the block's edges
    (the rest is context and must be trimmed). Pixels beyond the block count as no data.
    """
    if not rules.width_enabled:
        return block.copy()
    wy, wx = rules.width_px
    fp = footprint(rules.width_px)
    h, w = block.shape
    valid = block != NODATA
    codes = block.astype(np.int32)
    lo = _forward(np.where(valid, codes, _BIG), fp, ndi.minimum_filter1d, np.minimum, _BIG)
    hi = _forward(np.where(valid, codes, 0), fp, ndi.maximum_filter1d, np.maximum, 0)
    pure = (hi <= lo).astype(np.uint8)  # placement holds at most one class (no data = wildcard)
    # wide[p] = any pure[p − (i, j)], (i, j) in fp; fp is half-turn symmetric, so this is
    # the forward reduction shifted by (wy − 1, wx − 1)
    cover = _forward(pure, fp, ndi.maximum_filter1d, np.maximum, 0)
    wide = np.zeros_like(valid)
    wide[wy - 1 :, wx - 1 :] = cover[: h - wy + 1, : w - wx + 1].astype(bool)
    wide &= valid
    thin = valid & ~wide
    if not thin.any():
        return block.copy()
    return _grow_into(block, wide, thin, rules.rounds)


def _grow_into(block: np.ndarray, wide: np.ndarray, thin: np.ndarray, rounds: int) -> np.ndarray:
    """Refill thin pixels from filled 4-neighbours, ``rounds`` synchronous rounds."""
    stride = block.shape[1] + 2
    state = np.pad(np.where(wide, block, NODATA), 1)  # zero ring = no data beyond the block
    own = np.pad(block, 1)
    todo = np.flatnonzero(np.pad(thin, 1))
    flat = state.reshape(-1)
    for _ in range(rounds):
        if todo.size == 0:
            break
        nb = np.stack([flat[todo - 1], flat[todo + 1], flat[todo - stride], flat[todo + stride]])
        votes = (nb[:, None, :] == nb[None, :, :]).sum(axis=1)
        votes[nb == NODATA] = 0
        best = votes.max(axis=0)
        tied = np.where((votes == best) & (best > 0), nb, np.iinfo(nb.dtype).max)
        mine = own.reshape(-1)[todo]
        choice = np.where((tied == mine).any(axis=0), mine, tied.min(axis=0))
        filled = best > 0
        flat[todo[filled]] = choice[filled]
        todo = todo[~filled]
    flat[todo] = own.reshape(-1)[todo]
    return state[1:-1, 1:-1]


def _width_in_memory(codes: np.ndarray, rules: Rules) -> np.ndarray:
    if not rules.width_enabled:
        return codes.copy()
    hy, hx = rules.halo
    return width_step(np.pad(codes, ((hy, hy), (hx, hx))), rules)[hy:-hy, hx:-hx]


# ------------------------------------------------------------- patches and their graph


def label_equal(codes: np.ndarray, connectivity: int = 4) -> tuple[np.ndarray, int]:
    """Label connected regions of equal non-zero code: (int32 labels 1…n, 0 = no data; n)."""
    structure = ndi.generate_binary_structure(2, 1 if connectivity == 4 else 2)
    labels = np.zeros(codes.shape, dtype=np.int32)
    if codes.size and codes.min() < 0:
        raise InputError(f"Class codes must be ≥ 0 (0 = no data), found {int(codes.min())}.")
    present = np.flatnonzero(np.bincount(codes.ravel().astype(np.int64, copy=False)))
    n = 0
    for code in present:
        if code == NODATA:
            continue
        mask = codes == code
        lab, k = ndi.label(mask, structure=structure, output=np.int32)
        np.add(labels, lab, out=labels)
        np.add(labels, n, out=labels, where=mask)
        n += k
    return labels, n


@dataclass
class BlockPatches:
    """The patches of one block: per local label (1…n, stored at index label-1) and faces.

    ``first`` is the row-major index of the label's first pixel in the whole raster.
    ``pairs``/``border`` list local label pairs that touch inside the block and their
    shared border (4-adjacent pixel pairs; 0 for diagonal-only contact).
    ``top``/``bottom``/``left``/``right`` are the block's edge rows/columns of labels.
    """

    n: int
    code: np.ndarray
    area: np.ndarray
    first: np.ndarray
    pairs: np.ndarray
    border: np.ndarray
    top: np.ndarray
    bottom: np.ndarray
    left: np.ndarray
    right: np.ndarray


def _touching(a_list: Sequence[np.ndarray], b_list: Sequence[np.ndarray], weights: Sequence[int],
              lowest: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Id pairs (a, b) that differ, both ≥ ``lowest`` (lower ids mean no data), with weights."""
    out_a, out_b, out_w = [], [], []
    for a, b, weight in zip(a_list, b_list, weights, strict=True):
        a, b = a.ravel(), b.ravel()
        keep = (a != b) & (a >= lowest) & (b >= lowest)
        out_a.append(a[keep])
        out_b.append(b[keep])
        out_w.append(np.full(int(keep.sum()), weight, dtype=np.int64))
    return np.concatenate(out_a), np.concatenate(out_b), np.concatenate(out_w)


def _neighbour_views(labels: np.ndarray, connectivity: int) -> tuple[list[np.ndarray], list[np.ndarray], list[int]]:
    a = [labels[:, :-1], labels[:-1, :]]
    b = [labels[:, 1:], labels[1:, :]]
    w = [1, 1]
    if connectivity == 8:
        a += [labels[:-1, :-1], labels[:-1, 1:]]
        b += [labels[1:, 1:], labels[1:, :-1]]
        w += [0, 0]
    return a, b, w


def _sum_pairs(a: np.ndarray, b: np.ndarray, w: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Unordered pairs (lo, hi) of ids < n, deduplicated, with summed weights."""
    if a.size == 0:
        return np.zeros((0, 2), dtype=np.int64), np.zeros(0, dtype=np.int64)
    lo, hi = np.minimum(a, b).astype(np.int64), np.maximum(a, b).astype(np.int64)
    keys, inverse = np.unique(lo * n + hi, return_inverse=True)
    sums = np.bincount(inverse, weights=w, minlength=keys.size).astype(np.int64)
    return np.stack([keys // n, keys % n], axis=1), sums


def block_patches(codes: np.ndarray, origin: tuple[int, int], raster_width: int,
                  connectivity: int = 4) -> tuple[BlockPatches, np.ndarray]:
    """Label one block's patches and measure them (area, code, first pixel, borders).

    Args:
        codes: the block's codes (no halo).
        origin: ``(row, col)`` of the block's first pixel in the whole raster.
        raster_width: columns of the whole raster (for row-major pixel indices).
        connectivity: 4 or 8.

    Returns:
        The block's patch table and its local label array.
    """
    labels, n = label_equal(codes, connectivity)
    flat = labels.ravel()
    area = np.bincount(flat, minlength=n + 1)[1:].astype(np.int64)
    first_local = np.full(n + 1, flat.size, dtype=np.int64)
    where = np.flatnonzero(flat)
    np.minimum.at(first_local, flat[where], where)
    first_local = first_local[1:]
    rows, cols = np.divmod(first_local, codes.shape[1])
    first = (rows + origin[0]) * raster_width + (cols + origin[1])
    code = codes.ravel()[first_local]
    a, b, w = _touching(*_neighbour_views(labels, connectivity), lowest=1)
    pairs, border = _sum_pairs(a, b, w, n + 1)
    table = BlockPatches(
        n=n, code=code, area=area, first=first, pairs=pairs.astype(np.int32), border=border,
        top=labels[0].copy(), bottom=labels[-1].copy(), left=labels[:, 0].copy(), right=labels[:, -1].copy(),
    )
    return table, labels


@dataclass
class PatchGraph:
    """Patches of a whole raster assembled from its blocks.

    ``offsets[iy][ix]`` turns a block's local label ``k`` into the provisional id
    ``offsets + k - 1``; ``patch_of[prov]`` is the patch a provisional id belongs to.
    Per patch: ``code``, ``area`` (pixels), ``first`` (row-major index of its first pixel).
    ``pairs``/``border``: neighbouring patch pairs and their shared border (4-adjacent
    pixel pairs).
    """

    offsets: list[list[int]]
    counts: list[list[int]]
    patch_of: np.ndarray
    code: np.ndarray
    area: np.ndarray
    first: np.ndarray
    pairs: np.ndarray
    border: np.ndarray


def assemble(tables: Sequence[Sequence[BlockPatches]], connectivity: int = 4) -> PatchGraph:
    """Join block-wise patch tables (a 2-D grid of blocks) into the raster's patch graph."""
    counts = [[t.n for t in row] for row in tables]
    flat_counts = np.array([c for row in counts for c in row], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(flat_counts)[:-1]])
    nx = len(tables[0])
    offsets = [[int(starts[iy * nx + ix]) for ix in range(nx)] for iy in range(len(tables))]
    n_prov = int(flat_counts.sum())
    code = np.concatenate([t.code for row in tables for t in row]) if n_prov else np.zeros(0, np.int64)
    area = np.concatenate([t.area for row in tables for t in row]) if n_prov else np.zeros(0, np.int64)
    first = np.concatenate([t.first for row in tables for t in row]) if n_prov else np.zeros(0, np.int64)

    def prov(labels: np.ndarray, iy: int, ix: int) -> np.ndarray:
        return np.where(labels > 0, labels.astype(np.int64) - 1 + offsets[iy][ix], -1)

    inner_a, inner_b, inner_w = [], [], []
    for iy, row in enumerate(tables):
        for ix, t in enumerate(row):
            inner_a.append(t.pairs[:, 0].astype(np.int64) - 1 + offsets[iy][ix])
            inner_b.append(t.pairs[:, 1].astype(np.int64) - 1 + offsets[iy][ix])
            inner_w.append(t.border)
    faces_a, faces_b, faces_w = [], [], []
    diagonal = connectivity == 8
    for iy in range(len(tables) - 1):  # horizontal faces between block rows
        up = np.concatenate([prov(t.bottom, iy, ix) for ix, t in enumerate(tables[iy])])
        down = np.concatenate([prov(t.top, iy + 1, ix) for ix, t in enumerate(tables[iy + 1])])
        faces_a.append(up), faces_b.append(down), faces_w.append(1)
        if diagonal:
            faces_a += [up[:-1], up[1:]]
            faces_b += [down[1:], down[:-1]]
            faces_w += [0, 0]
    for ix in range(nx - 1):  # vertical faces between block columns
        left = np.concatenate([prov(row[ix].right, iy, ix) for iy, row in enumerate(tables)])
        right = np.concatenate([prov(row[ix + 1].left, iy, ix + 1) for iy, row in enumerate(tables)])
        faces_a.append(left), faces_b.append(right), faces_w.append(1)
        if diagonal:
            faces_a += [left[:-1], left[1:]]
            faces_b += [right[1:], right[:-1]]
            faces_w += [0, 0]
    if faces_a:
        fa, fb, fw = _touching(faces_a, faces_b, faces_w, lowest=0)
    else:
        fa = fb = fw = np.zeros(0, dtype=np.int64)
    # pixels of one code touching across a face are one patch
    same = code[fa] == code[fb]
    graph = coo_matrix((np.ones(int(same.sum()), dtype=np.int8), (fa[same], fb[same])), shape=(n_prov, n_prov))
    if n_prov:
        n_patches, patch_of = connected_components(graph, directed=False)
        patch_of = patch_of.astype(np.int64)
    else:
        n_patches, patch_of = 0, np.zeros(0, dtype=np.int64)

    p_area = np.bincount(patch_of, weights=area, minlength=n_patches).astype(np.int64)
    p_first = np.full(n_patches, np.iinfo(np.int64).max, dtype=np.int64)
    np.minimum.at(p_first, patch_of, first)
    p_code = np.zeros(n_patches, dtype=code.dtype)
    p_code[patch_of] = code
    ea = np.concatenate(inner_a + [fa[~same]])
    eb = np.concatenate(inner_b + [fb[~same]])
    ew = np.concatenate(inner_w + [fw[~same]])
    pairs, border = _sum_pairs(patch_of[ea], patch_of[eb], ew, max(n_patches, 1))
    return PatchGraph(offsets=offsets, counts=counts, patch_of=patch_of, code=p_code, area=p_area,
                      first=p_first, pairs=pairs, border=border)


# ---------------------------------------------------------- rule A: minimum mapping unit


def merge_small(graph: PatchGraph, mmu_px: int) -> np.ndarray:
    """Decide the final code of every patch by the MMU rule (rule A in the module docstring).

    Patches are taken smallest first from a heap keyed ``area · S + first`` (``S`` = one
    more than the largest first-pixel index), so the order is the documented one. Each merge
    moves the adjacency of the smaller-degree members into the largest one (union by
    degree), so a large patch that swallows many specks costs only the specks' degrees.
    """
    small = graph.area < mmu_px
    if not small.any():
        return graph.code.copy()
    code = graph.code.astype(np.int64).tolist()
    area = graph.area.tolist()
    first = graph.first.tolist()
    scale = int(graph.first.max()) + 1
    # Edges between two patches that are both ≥ MMU never influence a decision: drop them.
    keep = small[graph.pairs[:, 0]] | small[graph.pairs[:, 1]]
    adj: dict[int, dict[int, int]] = {}
    for a, b, w in zip(graph.pairs[keep, 0].tolist(), graph.pairs[keep, 1].tolist(),
                       graph.border[keep].tolist(), strict=True):
        adj.setdefault(a, {})[b] = w
        adj.setdefault(b, {})[a] = w
    parent: dict[int, int] = {}
    small_ids = np.flatnonzero(small)
    by_first = dict(zip(graph.first[small_ids].tolist(), small_ids.tolist(), strict=True))
    heap = (graph.area[small_ids] * scale + graph.first[small_ids]).tolist()
    heapq.heapify(heap)
    merges = 0
    while heap:
        size, head = divmod(heapq.heappop(heap), scale)
        p = by_first.get(head)
        if p is None or p in parent or area[p] != size:
            continue  # stale entry: merged away, or re-queued with its new size
        nbrs = adj.get(p)
        if not nbrs:
            continue  # enclosed by no data / the raster edge: stays
        border: dict[int, int] = {}
        nb_area: dict[int, int] = {}
        for q, w in nbrs.items():
            c = code[q]
            if c in border:
                border[c] += w
                nb_area[c] += area[q]
            else:
                border[c] = w
                nb_area[c] = area[q]
        target = -1
        for c, w in border.items():  # longest border, then larger neighbours, then smaller code
            if target < 0 or (w, nb_area[c], -c) > (border[target], nb_area[target], -target):
                target = c
        group = [p]
        root, root_degree = p, len(nbrs)
        for q in nbrs:
            if code[q] == target:
                group.append(q)
                degree = len(adj.get(q, ()))
                if degree > root_degree:
                    root, root_degree = q, degree
        root_adj = adj.setdefault(root, {})
        for g in group:
            root_adj.pop(g, None)
        members = set(group)
        for g in group:
            if g == root:
                continue
            for nb, w in adj.pop(g, {}).items():
                if nb in members:
                    continue
                nb_adj = adj[nb]
                del nb_adj[g]
                nb_adj[root] = nb_adj.get(root, 0) + w
                root_adj[nb] = root_adj.get(nb, 0) + w
            parent[g] = root
            area[root] += area[g]
            if first[g] < first[root]:
                first[root] = first[g]
        code[root] = target
        merges += 1
        if area[root] < mmu_px:
            by_first[first[root]] = root
            heapq.heappush(heap, area[root] * scale + first[root])
    out = np.array(code, dtype=graph.code.dtype)
    for p in parent:
        root = p
        while root in parent:
            root = parent[root]
        out[p] = code[root]
    log.debug("MMU step: %d small patches, %d merges", int(small.sum()), merges)
    return out


def _lookup(graph: PatchGraph, final: np.ndarray, iy: int, ix: int, dtype: np.dtype) -> np.ndarray:
    """Local label → final code for block (iy, ix); index 0 (no data) → 0."""
    start, n = graph.offsets[iy][ix], graph.counts[iy][ix]
    lut = np.zeros(n + 1, dtype=dtype)
    lut[1:] = final[graph.patch_of[start : start + n]]
    return lut


# ---------------------------------------------------------------------- public API


def generalize_array(
    codes: np.ndarray,
    pixel_size: float | tuple[float, float],
    mmu_ha: float = 25.0,
    min_width_m: float = 100.0,
    connectivity: int = 4,
) -> np.ndarray:
    """Generalize a class map in memory (the reference: one chunk, same algorithm).

    Args:
        codes: (y, x) integer codes, 0 = no data.
        pixel_size: pixel edge in metres, or ``(y, x)`` edges.
        mmu_ha: minimum mapping unit in hectares (CLC: 25).
        min_width_m: minimum width in metres (CLC: 100).
        connectivity: 4 (default) or 8: how pixels connect into patches.

    Returns:
        The generalized codes, same shape and dtype.
    """
    codes = np.asarray(codes)
    if codes.ndim != 2:
        raise InputError(f"A class map must be 2-D (y, x), got shape {codes.shape}.")
    _check_codes_dtype(codes.dtype)
    rules = rules_for(pixel_size, mmu_ha, min_width_m, connectivity)
    out = _mmu_in_memory(codes, rules)
    if rules.width_enabled:
        out = _mmu_in_memory(_width_in_memory(out, rules), rules)
    return out


def _mmu_in_memory(codes: np.ndarray, rules: Rules) -> np.ndarray:
    if rules.mmu_px <= 1 or codes.size == 0:
        return codes.copy()
    table, labels = block_patches(codes, (0, 0), codes.shape[1], rules.connectivity)
    graph = assemble([[table]], rules.connectivity)
    final = merge_small(graph, rules.mmu_px)
    return _lookup(graph, final, 0, 0, codes.dtype)[labels]


def generalize(
    codes: xr.DataArray,
    *,
    mmu_ha: float = 25.0,
    min_width_m: float = 100.0,
    connectivity: int = 4,
    persist: bool = True,
) -> xr.DataArray:
    """Generalize a class map chunk by chunk: identical to :func:`generalize_array`.

    Each MMU step computes one pass over the blocks (labels, areas, borders), decides the
    merges in memory on the patch table, and relabels the blocks lazily; the width step is
    a ``map_overlap``. No task ever holds more than one block plus its halo.

    Args:
        codes: (y, x) or single-band (band, y, x) DataArray of CLC codes, 0 = no data,
            georeferenced (the pixel size in metres comes from its grid). NumPy-backed
            arrays are generalized in memory.
        mmu_ha: minimum mapping unit in hectares. Change it for other nomenclatures (e.g.
            5 ha for change layers); 0 disables merging.
        min_width_m: minimum width of any part in metres; 0 disables the width step.
        connectivity: 4 (CLC-like polygons) or 8 (diagonal pixels join a patch).
        persist: keep the intermediate code rasters (1–2 bytes per pixel, spread over the
            workers) between steps instead of recomputing them; turn off when the area is
            larger than the cluster's memory.

    Returns:
        A (y, x) DataArray on the same grid, same dtype, nodata 0, lazy when the input is;
        ``attrs`` record the rules (``mmu_px``, ``min_width_px``, ``connectivity``).
    """
    arr = as_class_map(codes)
    _check_codes_dtype(arr.dtype)
    gbox = geobox_of(arr)
    res = gbox.resolution
    rules = rules_for((res.y, res.x), mmu_ha, min_width_m, connectivity)
    if not isinstance(arr.data, da.Array):
        out = generalize_array(np.asarray(arr.data), (res.y, res.x), mmu_ha, min_width_m, connectivity)
    else:
        out = generalize_dask(arr.data, rules, persist=persist)
    result = to_dataarray(out, gbox, name=arr.name or "generalized", nodata=NODATA)
    result.attrs.update({
        "mmu_ha": float(mmu_ha), "mmu_px": rules.mmu_px, "min_width_m": float(min_width_m),
        "min_width_px": list(rules.width_px), "connectivity": connectivity,
    })
    return result


def as_class_map(codes: xr.DataArray) -> xr.DataArray:
    """The (y, x) view of a class map given as (y, x) or single-band (band, y, x)."""
    if codes.ndim == 3 and codes.shape[0] == 1:
        codes = codes.isel({codes.dims[0]: 0}, drop=True)
    if codes.ndim != 2:
        raise InputError(
            f"A class map must be one band (y, x), got dims {codes.dims} with shape {codes.shape}: "
            "select the band first."
        )
    return codes


def generalize_dask(codes: da.Array, rules: Rules, persist: bool = True) -> da.Array:
    """The chunked algorithm on a dask array (see :func:`generalize`); same chunks out."""
    _check_codes_dtype(codes.dtype)
    out = _mmu_dask(codes, rules, persist)
    if rules.width_enabled:
        out = da.map_overlap(width_step, out, depth=rules.halo, boundary=NODATA, dtype=codes.dtype,
                             rules=rules, meta=np.array((), dtype=codes.dtype))
        out = _mmu_dask(out.persist() if persist else out, rules, persist)
    return out.rechunk(codes.chunks)


def _mmu_dask(codes: da.Array, rules: Rules, persist: bool) -> da.Array:
    """One MMU step: gather the patch table block by block, decide, relabel lazily."""
    if rules.mmu_px <= 1:
        return codes
    blocks = codes.to_delayed(optimize_graph=False)
    row0 = np.concatenate([[0], np.cumsum(codes.chunks[0])[:-1]])
    col0 = np.concatenate([[0], np.cumsum(codes.chunks[1])[:-1]])
    measure = dask.delayed(_table_only, pure=True)
    tasks = [measure(blocks[iy, ix], (int(row0[iy]), int(col0[ix])), codes.shape[1], rules.connectivity)
             for iy in range(blocks.shape[0]) for ix in range(blocks.shape[1])]
    flat = dask.compute(*tasks)
    nx = blocks.shape[1]
    tables = [list(flat[iy * nx : (iy + 1) * nx]) for iy in range(blocks.shape[0])]
    graph = assemble(tables, rules.connectivity)
    final = merge_small(graph, rules.mmu_px)
    log.info("MMU step: %d patches, %d under %d px, %d block(s)",
             graph.code.size, int((graph.area < rules.mmu_px).sum()), rules.mmu_px, blocks.size)
    relabel = dask.delayed(_relabel_block, pure=True)
    rows = [
        [da.from_delayed(relabel(blocks[iy, ix], _lookup(graph, final, iy, ix, codes.dtype), rules.connectivity),
                         shape=(ny, nxx), dtype=codes.dtype, meta=np.array((), dtype=codes.dtype))
         for ix, nxx in enumerate(codes.chunks[1])]
        for iy, ny in enumerate(codes.chunks[0])
    ]
    out = da.block(rows)
    return out.persist() if persist else out


def _table_only(block: np.ndarray, origin: tuple[int, int], width: int, connectivity: int) -> BlockPatches:
    return block_patches(block, origin, width, connectivity)[0]


def _relabel_block(block: np.ndarray, lut: np.ndarray, connectivity: int) -> np.ndarray:
    labels, n = label_equal(block, connectivity)
    if n + 1 != lut.size:
        raise RuntimeError(f"block relabelled to {n} patches but the table holds {lut.size - 1}")
    return lut[labels]


# --------------------------------------------------------------- comparison with GDAL


def count_patches(codes: np.ndarray, connectivity: int = 4, below: int | None = None) -> int:
    """Number of patches (connected regions of one non-zero code); only those < ``below`` px if given."""
    labels, n = label_equal(np.asarray(codes), connectivity)
    if below is None:
        return n
    return int((np.bincount(labels.ravel(), minlength=n + 1)[1:] < below).sum())


def compare_to_sieve(
    codes: np.ndarray,
    generalized: np.ndarray,
    mmu_px: int,
    connectivity: int = 4,
) -> dict[str, float | int]:
    """How far a generalized map is from GDAL's sieve of the same input (in memory).

    GDAL's sieve (``rasterio.features.sieve``, no data masked out) merges every patch under
    ``mmu_px`` pixels into its largest neighbour and has no width rule.

    Args:
        codes: the input class map (y, x), 0 = no data.
        generalized: our result for ``codes``.
        mmu_px: the MMU in pixels (``rules_for(...).mmu_px``).
        connectivity: 4 or 8, used for the sieve and for counting patches.

    Returns:
        ``valid_pixels``; fractions of valid pixels ``changed_by_generalize``,
        ``changed_by_sieve`` and ``differ_from_sieve``; patch counts ``patches_input``,
        ``patches_generalized``, ``patches_sieve`` and those still under the MMU
        (``small_patches_generalized``, ``small_patches_sieve``).
    """
    codes = np.asarray(codes)
    generalized = np.asarray(generalized)
    if codes.shape != generalized.shape:
        raise InputError(f"Cannot compare maps of shapes {codes.shape} and {generalized.shape}: use the same grid.")
    valid = codes != NODATA
    sieve_dtype = np.int32 if codes.dtype.itemsize > 2 or codes.dtype.kind == "i" else codes.dtype
    sieved = rasterio.features.sieve(codes.astype(sieve_dtype), size=max(int(mmu_px), 1),
                                     mask=valid, connectivity=connectivity).astype(codes.dtype)
    n = int(valid.sum())

    def frac(a: np.ndarray, b: np.ndarray) -> float:
        return float(((a != b) & valid).sum() / n) if n else 0.0

    return {
        "mmu_px": int(mmu_px),
        "connectivity": int(connectivity),
        "valid_pixels": n,
        "changed_by_generalize": frac(codes, generalized),
        "changed_by_sieve": frac(codes, sieved),
        "differ_from_sieve": frac(generalized, sieved),
        "patches_input": count_patches(codes, connectivity),
        "patches_generalized": count_patches(generalized, connectivity),
        "patches_sieve": count_patches(sieved, connectivity),
        "small_patches_generalized": count_patches(generalized, connectivity, below=mmu_px),
        "small_patches_sieve": count_patches(sieved, connectivity, below=mmu_px),
    }


# ------------------------------------------------------------------------ file to file


def infer_level(codes: np.ndarray) -> int:
    """The CLC level of the codes present (1: 1–9, 2: 10–99, 3: 100–999); 0 is ignored."""
    valid = np.asarray(codes)[np.asarray(codes) != NODATA]
    if valid.size == 0:
        raise InputError("The class map holds no data at all (every pixel is 0): nothing to generalize.")
    levels = {1 if c < 10 else 2 if c < 100 else 3 for c in np.unique(valid).tolist()}
    if len(levels) != 1 or max(levels) > 3 or valid.min() < 0 or valid.max() > 999:
        raise InputError(
            f"The class map mixes codes of different CLC levels ({sorted(np.unique(valid).tolist())[:12]}): "
            "reduce it to one level first (clc_dask.classes.to_level) or pass --level."
        )
    return levels.pop()


def generalize_file(
    input_path: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    mmu_ha: float = 25.0,
    min_width_m: float = 100.0,
    connectivity: int = 4,
    vector: str | os.PathLike[str] | None = None,
    level: int | None = None,
    chunk_size: int = 2048,
    compare_sieve: bool = False,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Generalize a class-map GeoTIFF into a COG (and optionally GeoPackage polygons).

    Everything is checked (options, output paths, input band count, dtype and codes)
    before any output is written; outputs are written atomically.

    Args:
        input_path: single-band class map (CLC codes, 0 = no data).
        out: generalized COG to write (official colour table embedded).
        mmu_ha: minimum mapping unit in hectares.
        min_width_m: minimum width in metres.
        connectivity: 4 or 8 (patches for the MMU rule).
        vector: also write polygons to this ``.gpkg`` (with ``.qml``/``.sld`` beside it).
        level: CLC level of the codes (default: inferred from the codes present).
        chunk_size: dask chunk edge in pixels (memory per task grows with its square).
        compare_sieve: also compare with GDAL's sieve (loads both maps into memory).
        overwrite: replace existing outputs.

    Returns:
        A summary: paths, rules in pixels, level, and the sieve comparison if asked for.
    """
    rules = rules_for(1.0, mmu_ha, min_width_m, connectivity)  # validate options first
    if chunk_size <= 0:
        raise ConfigError(f"--chunk-size must be a positive number of pixels, not {chunk_size}.")
    input_path, out = Path(input_path), Path(out)
    if input_path.exists() and out.exists() and out.resolve() == input_path.resolve():
        raise ConfigError(f"--out {out} is the input itself: write the generalized map to another file.")
    check_writable(out, overwrite)
    if vector is not None:
        vector = Path(vector)
        if vector.suffix.lower() != ".gpkg":
            raise OutputError(f"{vector}: vector output must be a GeoPackage named *.gpkg.")
        for path in (vector, vector.with_suffix(".qml"), vector.with_suffix(".sld")):
            check_writable(path, overwrite)
    arr = open_raster(input_path, chunks=chunk_size)
    if arr.sizes["band"] != 1:
        raise InputError(f"{input_path} has {arr.sizes['band']} bands: a class map has one band of CLC codes.")
    arr = arr.isel(band=0, drop=True)
    _check_codes_dtype(arr.dtype)
    nodata = arr.rio.nodata
    if nodata is not None and nodata != NODATA:
        log.warning("%s marks no data with %s; clc-dask class maps use 0, so those pixels become 0", input_path, nodata)
        arr = xr.where(arr == nodata, NODATA, arr).astype(arr.dtype)
    present = da.unique(arr.data).compute() if isinstance(arr.data, da.Array) else np.unique(arr.values)
    level = level or infer_level(present)
    validate_codes(present, level)
    result = generalize(arr, mmu_ha=mmu_ha, min_width_m=min_width_m, connectivity=connectivity)
    res = geobox_of(result).resolution
    rules = rules_for((res.y, res.x), mmu_ha, min_width_m, connectivity)
    tags = {"GENERALIZE_MMU_HA": mmu_ha, "GENERALIZE_MIN_WIDTH_M": min_width_m,
            "GENERALIZE_CONNECTIVITY": connectivity, "CLC_LEVEL": level}
    write_geotiff(result, out, nodata=NODATA, colormap=colormap(level), tags=tags, overwrite=overwrite)
    summary: dict[str, Any] = {
        "input": str(input_path), "out": str(out), "level": level, "mmu_px": rules.mmu_px,
        "min_width_px": list(rules.width_px), "connectivity": connectivity,
    }
    if vector is not None:
        from clc_dask.vectorize import vectorize  # vectorize builds on this module

        written = open_raster(out, chunks=chunk_size).isel(band=0, drop=True)
        summary["vector"] = str(vectorize(written, vector, level=level, overwrite=overwrite))
    if compare_sieve:
        generalized = open_raster(out, chunks=None).isel(band=0).values
        summary["sieve"] = compare_to_sieve(arr.values, generalized, rules.mmu_px, connectivity)
    return summary
