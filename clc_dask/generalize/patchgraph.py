"""Patches and their adjacency graph, block by block, and rule A (minimum mapping unit).

A block's patches are labelled and measured on their own (:func:`block_patches`); the
tables of a grid of blocks are joined across block faces into the raster's patch graph
(:func:`assemble`), on which :func:`merge_small` decides every patch's final code by the
MMU rule defined in :mod:`clc_dask.generalize`. :func:`block_lut` and
:func:`relabel_block` carry the decision back to a block's pixels.
"""

from __future__ import annotations

import heapq
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import scipy.ndimage as ndi
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from clc_dask.errors import InputError
from clc_dask.generalize.rules import NODATA

log = logging.getLogger(__name__)


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


# ------------------------------------------------------------ decisions → pixels


def block_lut(graph: PatchGraph, final: np.ndarray, iy: int, ix: int, dtype: np.dtype) -> np.ndarray:
    """Local label → final code for block (iy, ix); index 0 (no data) → 0."""
    start, n = graph.offsets[iy][ix], graph.counts[iy][ix]
    lut = np.zeros(n + 1, dtype=dtype)
    lut[1:] = final[graph.patch_of[start : start + n]]
    return lut


def block_table(block: np.ndarray, origin: tuple[int, int], width: int, connectivity: int) -> BlockPatches:
    """The patch table of one block (:func:`block_patches` without the labels)."""
    return block_patches(block, origin, width, connectivity)[0]


def relabel_block(block: np.ndarray, lut: np.ndarray, connectivity: int) -> np.ndarray:
    """Replace each patch of ``block`` by its code in ``lut`` (local label → code, from
    :func:`block_lut`); the block is labelled exactly as :func:`block_patches` labelled it."""
    labels, n = label_equal(block, connectivity)
    if n + 1 != lut.size:
        raise RuntimeError(f"block relabelled to {n} patches but the table holds {lut.size - 1}")
    return lut[labels]
