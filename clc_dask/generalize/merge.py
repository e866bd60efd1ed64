"""The global MMU decision of a map stored as tiles, with most patches decided in their tile.

Rule A (:func:`~clc_dask.generalize.patchgraph.merge_small`) is sequential — smallest patch
first, over the whole map — but most of its decisions are local. Small patches only ever
merge with patches they touch, and large patches (≥ the MMU) never change class, so the
small patches of a tile fall into *components* (small patches that touch each other) that
meet the rest of the map only through their large neighbours. A component that touches
no tile edge can be run through the rule inside its tile; its decisions hold for the whole
map unless they depended on the world outside, which reaches them only through large
neighbours: their areas (when a border tie is broken by neighbour areas, the rule's second
key) and their identity (when a merge joins two large patches into one). A component that
needed neither is decided for good; its only effect on the rest of the map is the area its
merges add to large neighbours, recorded as *absorptions* (target, queue key, pixels).

:func:`reduce_tile` does this on the worker that measured the tile and keeps for the
global merge only the rest: components touching a tile edge (their sizes and neighbours
are only known globally), those whose decisions depended on the outside, and the large
patches next to them. :func:`decide` joins the reduced tables across tile edges and runs
the same rule on them (:func:`merge_with_absorptions`), counting absorbed pixels in a
neighbour's area exactly from the turn of the queue at which the whole-map run would have
added them. The result equals ``merge_small`` on the whole map's graph; the client holds
about a tenth of the patches (``benchmarks/bench_generalize_merge.py``).
"""

from __future__ import annotations

import heapq
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

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
            ``absorbed_area`` the pixels it absorbed, at the turn of the queue keyed
            (``absorbed_key_area``, ``absorbed_first``): the area and first pixel of the
            small patch whose merge it was.
    """

    code: np.ndarray
    decided: np.ndarray
    decided_code: np.ndarray
    kept: np.ndarray
    table: BlockPatches
    absorbed_into: np.ndarray
    absorbed_area: np.ndarray
    absorbed_key_area: np.ndarray
    absorbed_first: np.ndarray


def _directed(table: BlockPatches) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Neighbour pairs both ways as 0-based indices: (patch, neighbour, border)."""
    a = table.pairs[:, 0].astype(np.int64) - 1
    b = table.pairs[:, 1].astype(np.int64) - 1
    return np.concatenate([a, b]), np.concatenate([b, a]), np.concatenate([table.border, table.border])


def _small_components(table: BlockPatches, small: np.ndarray) -> np.ndarray:
    """Component of every patch through small–small adjacency (a large patch is alone)."""
    a = table.pairs[:, 0].astype(np.int64) - 1
    b = table.pairs[:, 1].astype(np.int64) - 1
    both = small[a] & small[b]
    links = coo_matrix((np.ones(int(both.sum()), dtype=np.int8), (a[both], b[both])), shape=(table.n, table.n))
    return connected_components(links, directed=False)[1]


def _local_run(table: BlockPatches, mmu_px: int, on_edge: np.ndarray) -> tuple[np.ndarray, np.ndarray, _Watch]:
    """Rule A inside one tile, on the small patches whose component touches no tile edge:
    (final code of each patch, mask of the patches decided for good, the watch)."""
    n = table.n
    small = table.area < mmu_px
    component = _small_components(table, small)
    touches_edge = np.zeros(int(component.max(initial=-1)) + 1, dtype=bool)
    touches_edge[component[small & on_edge]] = True
    candidate = small & ~touches_edge[component]
    graph = PatchGraph(offsets=[[0]], counts=[[n]], patch_of=np.arange(n), code=table.code, area=table.area,
                       first=table.first, pairs=table.pairs.astype(np.int64) - 1, border=table.border)
    watch = _Watch(component, ~small)
    empty = np.zeros(0, dtype=np.int64)
    scale = int(table.first.max(initial=0)) + 1
    final = merge_with_absorptions(graph, mmu_px, empty, empty, empty, empty, scale, queued=candidate, watch=watch)
    tainted = np.fromiter(watch.tainted, dtype=np.int64, count=len(watch.tainted))
    return final, candidate & ~np.isin(component, tainted), watch


def reduce_tile(table: BlockPatches, mmu_px: int) -> TileReduction:
    """Decide what can be decided inside one tile, and reduce its table to the rest.

    Small patches are grouped into components (small patches that touch); a component
    that touches no tile edge runs through the rule inside the tile, and is kept for the
    global merge only if a decision depended on a large neighbour's area (a border tie) or
    joined two large patches. Its merges into large patches become absorptions.

    Args:
        table: the tile's full patch table (from :func:`~clc_dask.generalize.patchgraph.block_patches`).
        mmu_px: the minimum mapping unit in pixels.
    """
    n = table.n
    on_edge = np.zeros(n + 1, dtype=bool)
    on_edge[np.concatenate([table.top, table.bottom, table.left, table.right]).astype(np.int64)] = True
    on_edge = on_edge[1:]
    final, decided, watch = _local_run(table, mmu_px, on_edge)
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
    events = np.array([(t, k, a) for c, t, k, a in watch.absorbed if c not in watch.tainted and kept_mask[t]],
                      dtype=np.int64).reshape(-1, 3)
    scale = int(table.first.max(initial=0)) + 1
    decided_ids = np.flatnonzero(decided)
    return TileReduction(
        code=table.code.copy(),
        decided=decided_ids.astype(np.int64) + 1,
        decided_code=final[decided_ids].astype(table.code.dtype),
        kept=kept.astype(np.int64) + 1,
        table=reduced,
        absorbed_into=new_label[events[:, 0] + 1].astype(np.int64),
        absorbed_key_area=events[:, 1] // scale,
        absorbed_first=events[:, 1] % scale,
        absorbed_area=events[:, 2],
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


class _Watch:
    """What a local run of the rule must know to tell whether its decisions hold globally.

    A decision depends on the world outside its tile only through large patches (whose
    class never changes): their areas, when a border tie is broken by neighbour areas, and
    their identity, when a merge joins two of them. A component of small patches in which
    neither happens is decided for good; its merges into large patches are absorptions.
    """

    def __init__(self, component: np.ndarray, large: np.ndarray) -> None:
        self.component = component
        self.large = large  # original patches that are large
        self.tainted: set[int] = set()
        self.absorbed: list[tuple[int, int, int, int]] = []  # (component, large patch, key, area)


def merge_with_absorptions(graph: PatchGraph, mmu_px: int, absorbed_patch: np.ndarray,
                           absorbed_area: np.ndarray, absorbed_key_area: np.ndarray,
                           absorbed_first: np.ndarray, scale: int,
                           queued: np.ndarray | None = None, watch: _Watch | None = None) -> np.ndarray:
    """Rule A on a reduced graph whose large patches absorb decided patches along the way.

    Same as :func:`~clc_dask.generalize.patchgraph.merge_small` on the whole graph: the
    queue is keyed ``area · scale + first`` (``scale`` above every first-pixel index of the
    map), and when a border tie is broken by neighbour areas, a large neighbour's area
    includes what it absorbed from decided patches whose key came first.

    Args:
        graph: the (reduced) patch graph.
        mmu_px: the minimum mapping unit in pixels.
        absorbed_patch: patches (graph ids) that absorb decided patches, each absorbing
            ``absorbed_area`` pixels at the queue key (``absorbed_key_area``, ``absorbed_first``).
        absorbed_area: see ``absorbed_patch``.
        absorbed_key_area: see ``absorbed_patch``.
        absorbed_first: see ``absorbed_patch``.
        scale: larger than every first-pixel index of the map.
        queued: mask of the small patches to decide (default: all).
        watch: record what makes a decision depend on the world outside (local runs).
    """
    small = graph.area < mmu_px
    queued = small if queued is None else queued & small
    if not queued.any():
        return graph.code.copy()
    absorptions = _Absorptions(absorbed_patch.astype(np.int64),
                               absorbed_key_area.astype(np.int64) * scale + absorbed_first.astype(np.int64),
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
    large_in: dict[int, list[int]] = {}  # group root → the large original patches in it (watched runs)
    if watch is not None:
        large_in = {q: [q] for q in np.flatnonzero(watch.large).tolist()}
    parent: dict[int, int] = {}
    queued_ids = np.flatnonzero(queued)
    by_first = dict(zip(graph.first[queued_ids].tolist(), queued_ids.tolist(), strict=True))
    heap = (graph.area[queued_ids] * scale + graph.first[queued_ids]).tolist()
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
                    if large_in.get(q):
                        watch.tainted.add(int(watch.component[p]))
            target = max(tied, key=lambda c: (totals[c], -c))
        group = [p]
        root, root_degree = p, len(nbrs)
        for q in nbrs:
            if code[q] == target:
                group.append(q)
                degree = len(adj.get(q, ()))
                if degree > root_degree:
                    root, root_degree = q, degree
        if watch is not None:
            _watch_join(watch, group, large_in, area, key, p)
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
            if g in large_in:
                large_in.setdefault(root, []).extend(large_in.pop(g))
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


def _watch_join(watch: _Watch, group: list[int], large_in: dict[int, list[int]], area: list[int], key: int,
                p: int) -> None:
    """Record a merge of a watched run: two large patches joined taint the component; one
    large patch joined by small groups absorbs their area at this key."""
    large = [g for g in group if large_in.get(g)]
    if not large:
        return
    component = int(watch.component[p])
    if len(large) > 1 or len(large_in[large[0]]) > 1:
        watch.tainted.add(component)
        return
    small_area = sum(area[g] for g in group if g != large[0])
    watch.absorbed.append((component, large_in[large[0]][0], key, small_area))


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
    fields: dict[str, list[np.ndarray]] = {"patch": [], "area": [], "key_area": [], "first": []}
    for iy, row in enumerate(reductions):
        for ix, r in enumerate(row):
            fields["patch"].append(graph.patch_of[graph.offsets[iy][ix] + r.absorbed_into - 1])
            fields["area"].append(r.absorbed_area)
            fields["key_area"].append(r.absorbed_key_area)
            fields["first"].append(r.absorbed_first)
    patch, area, key_area, first = (np.concatenate(fields[k]).astype(np.int64) for k in fields)
    final = merge_with_absorptions(graph, mmu_px, patch, area, key_area, first, scale)
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
