"""The global MMU decision of a map stored as tiles: tile tables in, one lookup table per tile out.

:func:`decide_tables` joins the tiles' patch tables across tile edges into the map's patch
graph and decides every patch's final code by rule A (:func:`merge_small`); the result is
one lookup table per tile (local patch label → final code), which is all a tile needs to be
relabelled on its own.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from clc_dask.generalize.patchgraph import BlockPatches, assemble, block_lut, merge_small

log = logging.getLogger(__name__)


def decide_tables(tables: Sequence[Sequence[BlockPatches]], mmu_px: int, connectivity: int,
                  dtype: np.dtype) -> tuple[list[np.ndarray], dict[str, int]]:
    """Decide the MMU step for a grid of tile tables.

    Args:
        tables: the tiles' patch tables, ``tables[row][col]``.
        mmu_px: the minimum mapping unit in pixels.
        connectivity: 4 or 8 (as the tables were measured).
        dtype: dtype of the codes (of the lookup tables).

    Returns:
        The lookup tables in row-major tile order (index 0, no data, maps to 0) and a
        summary: ``patches``, ``small`` (under the MMU), ``changed`` (patches whose code changed).
    """
    graph = assemble(tables, connectivity)
    final = merge_small(graph, mmu_px)
    luts = [block_lut(graph, final, iy, ix, np.dtype(dtype))
            for iy in range(len(tables)) for ix in range(len(tables[0]))]
    summary = {"patches": int(graph.code.size), "small": int((graph.area < mmu_px).sum()),
               "changed": int((final != graph.code).sum())}
    return luts, summary
