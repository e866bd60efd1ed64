"""A map stored as tiles, generalized globally and exactly, tile by tile, resumable.

A production run holds its class map as tiles (a dask array whose chunks are the tiles,
e.g. its Zarr store or one GeoTIFF per tile). :class:`TiledGeneralization` generalizes the
whole map with the chunk-exact algorithm of :func:`clc_dask.generalize.generalize`, with
chunks = tiles: the result equals ``generalize_array`` of the stitched map, whatever the
tile size. Each step of the rules (MMU, width, MMU) runs as independent per-tile tasks
(on the workers) and, for the MMU steps, one global decision:

1. **measure** (per tile): the patch table of the step's input tile
   (:func:`clc_dask.generalize.patchgraph.block_patches`), and the decisions that can be
   taken inside the tile (:func:`clc_dask.generalize.merge.reduce_tile`): about nine
   patches in ten on prediction-like maps; the rest of the table is kept;
2. **decide** (once, on the client): the kept tables are joined across tile edges and every
   remaining small patch gets its new class (:func:`clc_dask.generalize.merge.decide`); the
   decision is saved as one lookup table per tile (local patch label → new code);
3. **apply** (per tile): the tile relabelled with its lookup table.

The width step is per tile too: each tile with the halo the rule needs
(:attr:`~clc_dask.generalize.rules.Rules.halo`), read from the previous step's tiles.

Everything a step produces is saved under ``workdir`` (a folder the client and the workers
share, like a run's store), each file written atomically, so an interrupted generalization
resumes where it stopped: a tile's table, a decision and a step's tiles are computed once.
The last step is not saved: :meth:`TiledGeneralization.tile` computes a final tile from the
saved state (a tile's read plus one labelling), for the caller to write as it likes.

Files in ``workdir``::

    layout.json                 the map's grid, tiles and rules (checked on resume)
    step1_mmu/tables/R_C.npz    tile (R, C) (from 0): local decisions and reduced patch table
    step1_mmu/luts/R_C.npz      local label → new code (and the tile's digest)
    step1_mmu/decision.json     written last: the step's decision is complete
    step1_mmu/tiles/R_C.npy     the step's output tile (when a later step reads it)
    step2_width/tiles/R_C.npy   (with step3_mmu/tables/R_C.npz, measured in the same task)
    step3_mmu/...
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import numpy as np
import xarray as xr

from clc_dask.errors import ConfigError, InputError, OutputError
from clc_dask.generalize.core import as_class_map
from clc_dask.generalize.merge import TileReduction, decide, reduce_tile, tile_lut
from clc_dask.generalize.patchgraph import BlockPatches, block_patches, relabel_block
from clc_dask.generalize.rules import NODATA, Rules, check_codes_dtype, rules_for, width_step
from clc_dask.rasters import geobox_of, to_dataarray
from clc_dask.stores import atomic_path

log = logging.getLogger(__name__)

LAYOUT_FILE = "layout.json"
DECISION_FILE = "decision.json"
_TABLE_FIELDS = ("code", "area", "first", "pairs", "border", "top", "bottom", "left", "right")


@dataclass(frozen=True)
class Step:
    """One step of the rules: ``kind`` is ``"mmu"`` or ``"width"``; ``index`` counts from 1."""

    index: int
    kind: str

    @property
    def name(self) -> str:
        """The step's folder name in the work directory (``step1_mmu``)."""
        return f"step{self.index}_{self.kind}"


def steps_for(rules: Rules) -> list[Step]:
    """The steps :func:`~clc_dask.generalize.generalize_array` runs for ``rules``."""
    kinds = ["mmu"] if rules.mmu_px > 1 else []
    if rules.width_enabled:
        kinds = [*kinds, "width", *kinds]
    return [Step(i, kind) for i, kind in enumerate(kinds, start=1)]


# --------------------------------------------------------------------- tile tables


def tile_digest(tile: np.ndarray) -> str:
    """SHA-256 of a tile's codes (shape, dtype and bytes): ties saved state to its tile."""
    tile = np.ascontiguousarray(tile)
    head = f"{tile.dtype.str}{tile.shape}".encode()
    return hashlib.sha256(head + tile.tobytes()).hexdigest()


# what the global merge needs of a tile (the rest is read again to write its lookup table)
_MERGE_FIELDS = ("absorbed_into", "absorbed_area", "absorbed_key_area", "absorbed_first")
_REDUCTION_FIELDS = ("code", "decided", "decided_code", "kept", *_MERGE_FIELDS)


def save_reduction(reduction: TileReduction, path: str | os.PathLike[str], digest: str = "") -> Path:
    """Write a tile's :class:`~clc_dask.generalize.merge.TileReduction` (and the
    :func:`tile_digest` of its tile) as ``.npz``, atomically."""
    table = reduction.table
    arrays = {f: getattr(reduction, f) for f in _REDUCTION_FIELDS}
    arrays.update({f"table_{f}": getattr(table, f) for f in _TABLE_FIELDS})
    with atomic_path(path, suffix=".npz") as tmp, open(tmp, "wb") as fh:
        np.savez(fh, table_n=np.int64(table.n), digest=np.str_(digest), **arrays)
    return Path(path)


def load_reduction(path: str | os.PathLike[str], merge_only: bool = False) -> tuple[TileReduction, str]:
    """Read a reduction written by :func:`save_reduction`, and its tile's digest.

    With ``merge_only``, only what the global merge needs is read (the per-patch codes and
    local decisions are left empty), so the client holds the reduced tables alone.
    """
    empty = np.zeros(0, dtype=np.int64)
    with np.load(path) as data:
        table = BlockPatches(n=int(data["table_n"]), **{f: data[f"table_{f}"] for f in _TABLE_FIELDS})
        fields = {f: data[f] if not merge_only or f in _MERGE_FIELDS else empty for f in _REDUCTION_FIELDS}
        return TileReduction(table=table, **fields), str(data["digest"])


def _save_array(array: np.ndarray, path: Path) -> None:
    with atomic_path(path, suffix=".npy") as tmp, open(tmp, "wb") as fh:
        np.save(fh, array)


def _save_lut(lut: np.ndarray, digest: str, path: Path) -> None:
    with atomic_path(path, suffix=".npz") as tmp, open(tmp, "wb") as fh:
        np.savez(fh, lut=lut, digest=np.str_(digest))


def _measure_task(block: np.ndarray, origin: tuple[int, int], width: int, rules: Rules, path: Path) -> int:
    block = np.asarray(block)
    table, _ = block_patches(block, origin, width, rules.connectivity)
    save_reduction(reduce_tile(table, rules.mmu_px), path, tile_digest(block))
    return table.n


def _apply_task(block: np.ndarray, lut_path: Path, connectivity: int, out: Path | None) -> np.ndarray | None:
    block = np.asarray(block)
    with np.load(lut_path) as saved:
        lut, digest = saved["lut"], str(saved["digest"])
    if tile_digest(block) != digest:
        raise InputError(
            f"Tile {lut_path.stem} does not match its saved patch table: the map changed after its "
            f"generalization started in {lut_path.parents[2]}. Remove that folder to start over."
        )
    tile = relabel_block(block, lut, connectivity)
    if out is None:
        return tile
    _save_array(tile, out)
    return None


def _width_task(window: np.ndarray, pad: tuple[tuple[int, int], tuple[int, int]], rules: Rules,
                crop: tuple[slice, slice], measure: tuple[tuple[int, int], int, Path] | None,
                out: Path | None) -> np.ndarray | None:
    tile = width_step(np.pad(np.asarray(window), pad, constant_values=NODATA), rules)[crop]
    if measure is not None:
        origin, width, path = measure
        table = block_patches(tile, origin, width, rules.connectivity)[0]
        save_reduction(reduce_tile(table, rules.mmu_px), path, tile_digest(tile))
    if out is None:
        return tile
    _save_array(tile, out)
    return None


# --------------------------------------------------------------------------- driver


class TiledGeneralization:
    """Generalize a class map stored as tiles, globally and exactly, resumable in ``workdir``.

    Args:
        codes: (y, x) DataArray of CLC codes (0 = no data), georeferenced and dask-backed,
            with one chunk per tile (any tile size; edge tiles may be smaller).
        workdir: folder for the saved state (shared by client and workers); created if
            missing, reused on resume when it holds the same grid, tiles and rules.
        mmu_ha: minimum mapping unit in hectares (CLC: 25); 0 disables merging.
        min_width_m: minimum width in metres (CLC: 100); 0 disables the width step.
        connectivity: 4 (CLC-like polygons) or 8.
        batch_size: tiles computed per ``dask.compute`` call (bounds the scheduler's graph;
            default: all tiles of a phase at once).

    Example:
        >>> tiled = TiledGeneralization(classes, "store/generalize")  # doctest: +SKIP
        >>> tiled.run()  # tables, decisions, intermediate tiles (skips what is saved)
        >>> tile = tiled.tile(0, 3)  # the generalized tile (row 0, column 3), as NumPy
    """

    def __init__(self, codes: xr.DataArray, workdir: str | os.PathLike[str], *, mmu_ha: float = 25.0,
                 min_width_m: float = 100.0, connectivity: int = 4, batch_size: int | None = None) -> None:
        arr = as_class_map(codes)
        check_codes_dtype(arr.dtype)
        if not isinstance(arr.data, da.Array):
            raise InputError("`codes` must be dask-backed with one chunk per tile: call .chunk() with the tile size.")
        if batch_size is not None and batch_size < 1:
            raise ConfigError(f"`batch_size` must be a positive number of tiles, not {batch_size}.")
        self.geobox = geobox_of(arr)
        res = self.geobox.resolution
        self.rules = rules_for((res.y, res.x), mmu_ha, min_width_m, connectivity)
        self.mmu_ha, self.min_width_m = float(mmu_ha), float(min_width_m)
        self.codes = arr.data
        self.chunks: tuple[tuple[int, ...], tuple[int, ...]] = (tuple(arr.chunks[0]), tuple(arr.chunks[1]))
        self.workdir = Path(workdir)
        self.batch_size = batch_size
        self.steps = steps_for(self.rules)
        self._row0 = np.concatenate([[0], np.cumsum(self.chunks[0])]).astype(int)
        self._col0 = np.concatenate([[0], np.cumsum(self.chunks[1])]).astype(int)
        self._inputs: dict[int, da.Array] = {}
        self._check_layout()

    # ------------------------------------------------------------------ layout
    @property
    def grid_shape(self) -> tuple[int, int]:
        """(rows, columns) of tiles."""
        return (len(self.chunks[0]), len(self.chunks[1]))

    def tile_slices(self, iy: int, ix: int) -> tuple[slice, slice]:
        """The pixel window of tile (``iy``, ``ix``) (from 0) in the whole map."""
        return (slice(int(self._row0[iy]), int(self._row0[iy + 1])), slice(int(self._col0[ix]), int(self._col0[ix + 1])))

    def _layout(self) -> dict[str, Any]:
        return {
            "shape": list(self.codes.shape), "dtype": np.dtype(self.codes.dtype).name,
            "chunks": [list(c) for c in self.chunks], "crs": self.geobox.crs.to_wkt(),
            "transform": list(self.geobox.affine)[:6], "mmu_ha": self.mmu_ha, "min_width_m": self.min_width_m,
            "rules": {**asdict(self.rules), "width_px": list(self.rules.width_px)},
        }

    def _check_layout(self) -> None:
        path = self.workdir / LAYOUT_FILE
        layout = self._layout()
        if path.exists():
            saved = json.loads(path.read_text(encoding="utf-8"))
            different = sorted(k for k in layout if saved.get(k) != layout[k])
            if different:
                raise OutputError(
                    f"The work directory {self.workdir} holds the generalization of another map "
                    f"(its {', '.join(different)} differ): pass another `workdir`, or remove it to start over."
                )
            return
        with atomic_path(path, suffix=".json") as tmp:
            tmp.write_text(json.dumps(layout, indent=1), encoding="utf-8")

    def _tiles(self) -> list[tuple[int, int]]:
        rows, cols = self.grid_shape
        return [(iy, ix) for iy in range(rows) for ix in range(cols)]

    def _file(self, step: Step, what: str, iy: int, ix: int, suffix: str) -> Path:
        return self.workdir / step.name / what / f"{iy}_{ix}{suffix}"

    # ------------------------------------------------------------- step inputs
    def _input(self, position: int) -> da.Array:
        """The input of step number ``position`` (0-based) as a dask array with chunks = tiles."""
        if position == 0:
            return self.codes
        if position in self._inputs:
            return self._inputs[position]
        step = self.steps[position - 1]
        dtype = self.codes.dtype
        load = dask.delayed(np.load, pure=True)
        rows = [[da.from_delayed(load(self._file(step, "tiles", iy, ix, ".npy")), shape=(ny, nx), dtype=dtype,
                                 meta=np.array((), dtype=dtype))
                 for ix, nx in enumerate(self.chunks[1])] for iy, ny in enumerate(self.chunks[0])]
        self._inputs[position] = da.block(rows)
        return self._inputs[position]

    def _window(self, source: da.Array, iy: int, ix: int) -> tuple[da.Array, tuple, tuple[slice, slice]]:
        """Tile (iy, ix) of ``source`` with the width rule's halo (clipped to the map), the
        no-data padding that completes the halo beyond the map, and the tile's crop."""
        hy, hx = self.rules.halo
        ys, xs = self.tile_slices(iy, ix)
        height, width = source.shape
        y0, y1 = max(ys.start - hy, 0), min(ys.stop + hy, height)
        x0, x1 = max(xs.start - hx, 0), min(xs.stop + hx, width)
        pad = ((hy - (ys.start - y0), hy - (y1 - ys.stop)), (hx - (xs.start - x0), hx - (x1 - xs.stop)))
        crop = (slice(hy, hy + ys.stop - ys.start), slice(hx, hx + xs.stop - xs.start))
        return source[y0:y1, x0:x1], pad, crop

    # ------------------------------------------------------------------ phases
    def run(self) -> None:
        """Compute and save everything up to the last step (skipping what is saved already)."""
        for position, step in enumerate(self.steps):
            last = position == len(self.steps) - 1
            if step.kind == "mmu":
                self.measure(position)
                self.decide(position)
                if not last:
                    self._compute([self._apply(position, iy, ix, save=True) for iy, ix in self._tiles()
                                   if not self._file(step, "tiles", iy, ix, ".npy").exists()], f"{step.name}: apply")
            elif not last:
                self._compute([self._width(position, iy, ix, save=True) for iy, ix in self._tiles()
                               if not self._file(step, "tiles", iy, ix, ".npy").exists()], f"{step.name}: tiles")

    def measure(self, position: int) -> None:
        """Phase 1 of an MMU step: save the patch table of every tile that has none yet."""
        step = self.steps[position]
        if (self.workdir / step.name / DECISION_FILE).exists():
            return
        source = self._input(position)
        previous = self.steps[position - 1] if position else None
        tasks = []
        for iy, ix in self._tiles():
            path = self._file(step, "tables", iy, ix, ".npz")
            if path.exists():
                continue
            if previous is not None and previous.kind == "width":  # measured with the width tiles
                tasks.append(self._width(position - 1, iy, ix, save=True))
                continue
            ys, xs = self.tile_slices(iy, ix)
            tasks.append(dask.delayed(_measure_task, pure=True)(
                source.blocks[iy, ix], (ys.start, xs.start), self.codes.shape[1], self.rules, path))
        self._compute(tasks, f"{step.name}: tables")

    def decide(self, position: int) -> dict[str, int]:
        """Phase 2 of an MMU step: the global merge of the tile tables, saved as lookup tables."""
        step = self.steps[position]
        marker = self.workdir / step.name / DECISION_FILE
        if marker.exists():
            return json.loads(marker.read_text(encoding="utf-8"))
        rows, cols = self.grid_shape
        paths = [[self._file(step, "tables", iy, ix, ".npz") for ix in range(cols)] for iy in range(rows)]
        reduced = [[load_reduction(path, merge_only=True)[0] for path in row] for row in paths]
        graph, final = decide(reduced, self.rules.mmu_px, self.rules.connectivity,
                              scale=int(np.prod(self.codes.shape)) + 1)
        summary = {"tile_patches": 0, "decided_in_tiles": 0, "global_patches": int(graph.code.size),
                   "global_small": int((graph.area < self.rules.mmu_px).sum()),
                   "global_changed": int((final != graph.code).sum())}
        del reduced
        for iy, ix in self._tiles():
            reduction, digest = load_reduction(paths[iy][ix])
            summary["tile_patches"] += int(reduction.code.size)
            summary["decided_in_tiles"] += int(reduction.decided.size)
            lut = tile_lut(reduction, graph, final, iy, ix, np.dtype(self.codes.dtype))
            _save_lut(lut, digest, self._file(step, "luts", iy, ix, ".npz"))
        with atomic_path(marker, suffix=".json") as tmp:
            tmp.write_text(json.dumps(summary), encoding="utf-8")
        log.info("%s: %d patches, %d decided in their tile; global merge of %d (%d under %d px)", step.name,
                 summary["tile_patches"], summary["decided_in_tiles"], summary["global_patches"],
                 summary["global_small"], self.rules.mmu_px)
        return summary

    def _apply(self, position: int, iy: int, ix: int, save: bool) -> Any:
        step = self.steps[position]
        out = self._file(step, "tiles", iy, ix, ".npy") if save else None
        return dask.delayed(_apply_task, pure=True)(
            self._input(position).blocks[iy, ix], self._file(step, "luts", iy, ix, ".npz"), self.rules.connectivity, out)

    def _width(self, position: int, iy: int, ix: int, save: bool) -> Any:
        step = self.steps[position]
        window, pad, crop = self._window(self._input(position), iy, ix)
        measure = None
        if save and position + 1 < len(self.steps):
            ys, xs = self.tile_slices(iy, ix)
            measure = ((ys.start, xs.start), self.codes.shape[1],
                       self._file(self.steps[position + 1], "tables", iy, ix, ".npz"))
        out = self._file(step, "tiles", iy, ix, ".npy") if save else None
        return dask.delayed(_width_task, pure=True)(window, pad, self.rules, crop, measure, out)

    def _compute(self, tasks: Sequence[Any], what: str) -> None:
        if not tasks:
            return
        size = self.batch_size or len(tasks)
        for start in range(0, len(tasks), size):
            dask.compute(*tasks[start : start + size])
        log.info("%s: %d tile(s) computed", what, len(tasks))

    # ------------------------------------------------------------------ output
    def finished(self) -> bool:
        """True when every decision and every saved tile that the last step reads exists."""
        for position, step in enumerate(self.steps):
            if step.kind == "mmu" and not (self.workdir / step.name / DECISION_FILE).exists():
                return False
            if position < len(self.steps) - 1 and not all(
                    self._file(step, "tiles", iy, ix, ".npy").exists() for iy, ix in self._tiles()):
                return False
        return True

    def tile(self, iy: int, ix: int) -> np.ndarray:
        """The generalized tile (``iy``, ``ix``) (from 0), computed from the saved state.

        Call :meth:`run` first. Computing a tile writes nothing: write it as the run does.
        """
        return np.asarray(self.tile_task(iy, ix).compute())

    def tile_task(self, iy: int, ix: int, check: bool = True) -> Any:
        """The generalized tile (``iy``, ``ix``) as a ``dask.delayed`` task (for batches)."""
        if not self.steps:
            return self.codes.blocks[iy, ix].to_delayed().ravel()[0]
        if check and not self.finished():
            raise OutputError(f"The generalization in {self.workdir} is not finished: call run() first.")
        position = len(self.steps) - 1
        if self.steps[-1].kind == "mmu":
            return self._apply(position, iy, ix, save=False)
        return self._width(position, iy, ix, save=False)

    def result(self) -> xr.DataArray:
        """The whole generalized map, lazy, with chunks = tiles (call :meth:`run` first)."""
        if not self.finished():
            raise OutputError(f"The generalization in {self.workdir} is not finished: call run() first.")
        dtype = self.codes.dtype
        rows = [[da.from_delayed(self.tile_task(iy, ix, check=False), shape=(ny, nx), dtype=dtype, meta=np.array((), dtype=dtype))
                 for ix, nx in enumerate(self.chunks[1])] for iy, ny in enumerate(self.chunks[0])]
        out = to_dataarray(da.block(rows), self.geobox, name="generalized", nodata=NODATA)
        out.attrs.update({"mmu_ha": self.mmu_ha, "mmu_px": self.rules.mmu_px, "min_width_m": self.min_width_m,
                          "min_width_px": list(self.rules.width_px), "connectivity": self.rules.connectivity})
        return out


def generalize_tiled(codes: xr.DataArray, workdir: str | os.PathLike[str], *, mmu_ha: float = 25.0,
                     min_width_m: float = 100.0, connectivity: int = 4,
                     batch_size: int | None = None) -> xr.DataArray:
    """Generalize a map stored as tiles (chunks = tiles), resumable in ``workdir``.

    Equal to :func:`clc_dask.generalize.generalize` of the same map (and to
    ``generalize_array`` of the stitched map), for any tile size. See
    :class:`TiledGeneralization` for the arguments and the saved state.

    Returns:
        The generalized map, lazy, chunks = tiles; each tile is computed from the saved state.
    """
    tiled = TiledGeneralization(codes, workdir, mmu_ha=mmu_ha, min_width_m=min_width_m,
                                connectivity=connectivity, batch_size=batch_size)
    tiled.run()
    return tiled.result()
