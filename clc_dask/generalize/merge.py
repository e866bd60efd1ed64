"""The global MMU decision of a map stored as tiles, with most patches decided in their tile.

Rule A (:func:`~clc_dask.generalize.patchgraph.merge_small`) is sequential — smallest patch
first, over the whole map — but most of its decisions are local. A small patch ``P`` that
lies inside its tile (touches no tile edge) and whose neighbours are all large (≥ the MMU:
large patches never change class) is decided by its borders alone when one class has the
longest border and one neighbour of that class: ``P`` merges into that neighbour, whatever
happens elsewhere. Its only effect on the rest of the map is the area it adds to that
neighbour, which matters only when another decision is a border tie broken by neighbour
areas (the rule's second key) — so it is recorded as an *absorption* (target, ``P``'s
queue key, ``P``'s area). A patch inside its tile with no neighbour at all stays as it is.

:func:`reduce_tile` does this on the worker that measured the tile, and keeps for the
global merge only the rest: the undecided small patches, every patch touching a tile edge
(its size and neighbours are only known globally), and the large patches next to those.
:func:`decide` joins the reduced tables across tile edges and runs the same rule on them,
counting the absorptions into a neighbour's area exactly at the point of the queue where
the whole-map run would have made them. The result equals ``merge_small`` on the whole
map's graph; the client holds only the reduced tables (on prediction-like maps about a
tenth of all patches: see ``benchmarks/bench_generalize_merge.py``).
"""

from __future__ import annotations

import heapq
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from clc_dask.generalize.patchgraph import BlockPatches, PatchGraph, assemble

log = logging.getLogger(__name__)


@dataclass
class TileReduction:
    """A tile's patches after the local decisions (all arrays indexed by local label − 1
    unless said otherwise).

    Attributes:
        code: the code of every patch of the tile (the lookup table before any merge).
        decided: local labels decided in the tile, and ``decided_code`` their new codes.
        kept: local label of each patch of ``table`` (reduced label − 1 → local label).
        table: the reduced patch table (labels 1…len(kept)) for the global merge.
        absorbed_into: reduced label of each absorption's target (a large kept patch);
            ``absorbed_area`` the absorbed patch's pixels (also the first part of its queue
            key) and ``absorbed_first`` its first pixel (the second part).
    """

    code: np.ndarray
    decided: np.ndarray
    decided_code: np.ndarray
    kept: np.ndarray
    table: BlockPatches
    absorbed_into: np.ndarray
    absorbed_area: np.ndarray
    absorbed_first: np.ndarray


def _directed(table: BlockPatches) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Neighbour pairs both ways as 0-based indices: (patch, neighbour, border)."""
    a = table.pairs[:, 0].astype(np.int64) - 1
    b = table.pairs[:, 1].astype(np.int64) - 1
    return np.concatenate([a, b]), np.concatenate([b, a]), np.concatenate([table.border, table.border])


def _local_decisions(table: BlockPatches, mmu_px: int, on_edge: np.ndarray
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Patches decided in the tile: (islets, merged patches, their targets, their new codes)."""
    n = table.n
    small = table.area < mmu_px
    src, dst, weight = _directed(table)
    has_small_neighbour = np.zeros(n, dtype=bool)
    has_small_neighbour[src[small[dst]]] = True
    candidate = small & ~on_edge & ~has_small_neighbour
    has_neighbour = np.zeros(n, dtype=bool)
    has_neighbour[src] = True
    islets = np.flatnonzero(candidate & ~has_neighbour)
    keep = candidate[src]
    src, dst, weight = src[keep], dst[keep], weight[keep]
    if src.size == 0:
        empty = np.zeros(0, dtype=np.int64)
        return islets, empty, empty, empty
    cls = table.code[dst].astype(np.int64)
    span = int(cls.max()) + 1
    groups, inverse = np.unique(src * span + cls, return_inverse=True)
    total = np.bincount(inverse, weights=weight, minlength=groups.size)
    count = np.bincount(inverse, minlength=groups.size)
    owner = groups // span
    starts = np.flatnonzero(np.diff(owner, prepend=-1))
    best = np.repeat(np.maximum.reduceat(total, starts), np.diff(np.append(starts, owner.size)))
    at_best = total == best
    ties = np.add.reduceat(at_best.astype(np.int64), starts)
    unique_best = np.repeat(ties == 1, np.diff(np.append(starts, owner.size)))
    chosen = at_best & unique_best & (count == 1)  # one class wins, and it is one patch
    merged = owner[chosen]  # sorted, each once
    target_code = groups[chosen] % span
    # the one neighbour of the winning class, in the order of ``merged``
    at = np.searchsorted(merged, src).clip(max=max(merged.size - 1, 0))
    pick = (merged[at] == src) & (cls == target_code[at]) if merged.size else np.zeros(src.size, dtype=bool)
    targets = dst[pick][np.argsort(src[pick], kind="stable")]
    return islets, merged, targets, target_code


def reduce_tile(table: BlockPatches, mmu_px: int) -> TileReduction:
    """Decide what can be decided inside one tile, and reduce its table to the rest.

    Args:
        table: the tile's full patch table (from :func:`~clc_dask.generalize.patchgraph.block_patches`).
        mmu_px: the minimum mapping unit in pixels.
    """
    n = table.n
    on_edge = np.zeros(n + 1, dtype=bool)
    on_edge[np.concatenate([table.top, table.bottom, table.left, table.right]).astype(np.int64)] = True
    on_edge = on_edge[1:]
    islets, merged, targets, target_code = _local_decisions(table, mmu_px, on_edge)
    decided = np.zeros(n, dtype=bool)
    decided[islets] = decided[merged] = True
    small = table.area < mmu_px
    active = ~decided & (small | on_edge)
    src, dst, _ = _directed(table)
    near_active = np.zeros(n, dtype=bool)
    near_active[dst[active[src]]] = True
    kept_mask = active | (near_active & ~decided)
    kept = np.flatnonzero(kept_mask)
    new_label = np.zeros(n + 1, dtype=np.int32)
    new_label[kept + 1] = np.arange(1, kept.size + 1, dtype=np.int32)
    pairs = table.pairs
    both = kept_mask[pairs[:, 0] - 1] & kept_mask[pairs[:, 1] - 1] if pairs.size else np.zeros(0, dtype=bool)
    reduced = BlockPatches(
        n=int(kept.size), code=table.code[kept], area=table.area[kept], first=table.first[kept],
        pairs=new_label[pairs[both]], border=table.border[both],
        top=new_label[table.top], bottom=new_label[table.bottom], left=new_label[table.left],
        right=new_label[table.right],
    )
    into_kept = kept_mask[targets]
    return TileReduction(
        code=table.code.copy(),
        decided=np.concatenate([islets, merged]).astype(np.int64) + 1,
        decided_code=np.concatenate([table.code[islets], target_code.astype(table.code.dtype)]),
        kept=kept.astype(np.int64) + 1,
        table=reduced,
        absorbed_into=new_label[targets[into_kept] + 1].astype(np.int64),
        absorbed_area=table.area[merged[into_kept]],
        absorbed_first=table.first[merged[into_kept]],
    )


# ------------------------------------------------------------------- global merge


class _Absorptions:
    """Areas absorbed by large patches, as a function of the queue key (compact arrays)."""

    def __init__(self, patch: np.ndarray, keys: np.ndarray, area: np.ndarray) -> None:
        order = np.lexsort((keys, patch))
        patch = patch[order]
        self.sorted_keys = keys[order]
        self.cumulative = np.cumsum(area[order])
        self.span: dict[int, tuple[int, int]] = {}
        if patch.size:
            starts = np.flatnonzero(np.diff(patch, prepend=patch[0] - 1))
            stops = np.append(starts[1:], patch.size)
            self.span = dict(zip(patch[starts].tolist(), zip(starts.tolist(), stops.tolist(), strict=True),
                                 strict=True))

    def before(self, patch: int, key: int) -> int:
        """Pixels absorbed by ``patch`` from patches whose turn came before ``key``."""
        span = self.span.get(patch)
        if span is None:
            return 0
        start, stop = span
        index = start + int(np.searchsorted(self.sorted_keys[start:stop], key))
        if index == start:
            return 0
        return int(self.cumulative[index - 1] - (self.cumulative[start - 1] if start else 0))


def merge_with_absorptions(graph: PatchGraph, mmu_px: int, absorbed_patch: np.ndarray,
                           absorbed_area: np.ndarray, absorbed_first: np.ndarray, scale: int) -> np.ndarray:
    """Rule A on a reduced graph whose large patches absorb decided patches along the way.

    Same as :func:`~clc_dask.generalize.patchgraph.merge_small` on the whole graph: the
    queue is keyed ``area · scale + first`` (``scale`` above every first-pixel index of the
    map), and when a border tie is broken by neighbour areas, a large neighbour's area
    includes what it absorbed from decided patches whose key came first.
    """
    small = graph.area < mmu_px
    if not small.any():
        return graph.code.copy()
    absorptions = _Absorptions(absorbed_patch.astype(np.int64),
                               absorbed_area.astype(np.int64) * scale + absorbed_first.astype(np.int64),
                               absorbed_area.astype(np.int64))
    code = graph.code.astype(np.int64).tolist()
    area = graph.area.tolist()
    first = graph.first.tolist()
    keep = small[graph.pairs[:, 0]] | small[graph.pairs[:, 1]]
    adj: dict[int, dict[int, int]] = {}
    for a, b, w in zip(graph.pairs[keep, 0].tolist(), graph.pairs[keep, 1].tolist(),
                       graph.border[keep].tolist(), strict=True):
        adj.setdefault(a, {})[b] = w
        adj.setdefault(b, {})[a] = w
    members: dict[int, list[int]] = {p: [p] for p in absorptions.span}  # absorbing patches in each group
    parent: dict[int, int] = {}
    small_ids = np.flatnonzero(small)
    by_first = dict(zip(graph.first[small_ids].tolist(), small_ids.tolist(), strict=True))
    heap = (graph.area[small_ids] * scale + graph.first[small_ids]).tolist()
    heapq.heapify(heap)
    while heap:
        key = heapq.heappop(heap)
        size, head = divmod(key, scale)
        p = by_first.get(head)
        if p is None or p in parent or area[p] != size:
            continue
        nbrs = adj.get(p)
        if not nbrs:
            continue
        border: dict[int, int] = {}
        for q, w in nbrs.items():
            border[code[q]] = border.get(code[q], 0) + w
        longest = max(border.values())
        tied = [c for c, w in border.items() if w == longest]
        if len(tied) == 1:
            target = tied[0]
        else:
            totals = dict.fromkeys(tied, 0)
            for q in nbrs:
                if code[q] in totals:
                    totals[code[q]] += area[q] + sum(absorptions.before(m, key) for m in members.get(q, ()))
            target = max(tied, key=lambda c: (totals[c], -c))
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
        group_set = set(group)
        for g in group:
            if g == root:
                continue
            for nb, w in adj.pop(g, {}).items():
                if nb in group_set:
                    continue
                nb_adj = adj[nb]
                del nb_adj[g]
                nb_adj[root] = nb_adj.get(root, 0) + w
                root_adj[nb] = root_adj.get(nb, 0) + w
            parent[g] = root
            area[root] += area[g]
            first[root] = min(first[root], first[g])
            if g in members:
                members.setdefault(root, []).extend(members.pop(g))
        code[root] = target
        if area[root] < mmu_px:
            by_first[first[root]] = root
            heapq.heappush(heap, area[root] * scale + first[root])
    out = np.array(code, dtype=graph.code.dtype)
    for p in parent:
        root = p
        while root in parent:
            root = parent[root]
        out[p] = code[root]
    return out


def decide(reductions: Sequence[Sequence[TileReduction]], mmu_px: int, connectivity: int, scale: int
           ) -> tuple[PatchGraph, np.ndarray]:
    """The global merge of reduced tiles: the reduced graph and each of its patches' final code.

    Args:
        reductions: :func:`reduce_tile` of every tile, ``reductions[row][col]``.
        mmu_px: the minimum mapping unit in pixels.
        connectivity: 4 or 8 (as the tiles were measured).
        scale: larger than every first-pixel index of the map (its pixel count).
    """
    graph = assemble([[r.table for r in row] for row in reductions], connectivity)
    patch, area, first = [], [], []
    for iy, row in enumerate(reductions):
        for ix, r in enumerate(row):
            patch.append(graph.patch_of[graph.offsets[iy][ix] + r.absorbed_into - 1])
            area.append(r.absorbed_area)
            first.append(r.absorbed_first)
    final = merge_with_absorptions(graph, mmu_px, np.concatenate(patch), np.concatenate(area),
                                   np.concatenate(first), scale)
    return graph, final


def tile_lut(reduction: TileReduction, graph: PatchGraph, final: np.ndarray, iy: int, ix: int,
             dtype: np.dtype) -> np.ndarray:
    """Local label → final code of tile (``iy``, ``ix``); index 0 (no data) → 0."""
    lut = np.zeros(reduction.code.size + 1, dtype=dtype)
    lut[1:] = reduction.code
    lut[reduction.decided] = reduction.decided_code
    start = graph.offsets[iy][ix]
    lut[reduction.kept] = final[graph.patch_of[start : start + reduction.kept.size]]
    return lut


def decide_tables(tables: Sequence[Sequence[BlockPatches]], mmu_px: int, connectivity: int,
                  dtype: np.dtype) -> tuple[list[np.ndarray], dict[str, int]]:
    """Decide the MMU step for a grid of full tile tables (reduced here, then merged).

    Returns:
        The lookup tables in row-major tile order (index 0, no data, maps to 0) and a
        summary (see :func:`summarize`).
    """
    reductions = [[reduce_tile(t, mmu_px) for t in row] for row in tables]
    scale = int(max((int(t.first.max(initial=0)) for row in tables for t in row), default=0)) + 1
    graph, final = decide(reductions, mmu_px, connectivity, scale)
    luts = [tile_lut(r, graph, final, iy, ix, np.dtype(dtype))
            for iy, row in enumerate(reductions) for ix, r in enumerate(row)]
    return luts, summarize(reductions, graph, final, mmu_px)


def summarize(reductions: Sequence[Sequence[TileReduction]], graph: PatchGraph, final: np.ndarray,
              mmu_px: int) -> dict[str, int]:
    """Counts of a decision: ``tile_patches`` (patches counted per tile), ``decided_in_tiles``,
    ``global_patches`` (in the global graph), ``global_small`` and ``global_changed``."""
    return {
        "tile_patches": int(sum(r.code.size for row in reductions for r in row)),
        "decided_in_tiles": int(sum(r.decided.size for row in reductions for r in row)),
        "global_patches": int(graph.code.size),
        "global_small": int((graph.area < mmu_px).sum()),
        "global_changed": int((final != graph.code).sum()),
    }
