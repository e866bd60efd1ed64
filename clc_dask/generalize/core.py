"""The generalization entry points: a class map in memory, as a DataArray, or as a dask array.

:func:`generalize` is the one to call: it generalizes a (dask-backed) DataArray chunk by
chunk and returns exactly what :func:`generalize_array` returns for the whole array in
memory (the rules are defined in :mod:`clc_dask.generalize`).
"""

from __future__ import annotations

import logging

import dask
import dask.array as da
import numpy as np
import xarray as xr

from clc_dask.errors import InputError
from clc_dask.generalize.patchgraph import (
    assemble,
    block_lut,
    block_patches,
    block_table,
    merge_small,
    relabel_block,
)
from clc_dask.generalize.rules import (
    NODATA,
    Rules,
    check_codes_dtype,
    rules_for,
    width_in_memory,
    width_step,
)
from clc_dask.rasters import geobox_of, to_dataarray

log = logging.getLogger(__name__)


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
        raise InputError(f"A class map `codes` must be 2-D (y, x), got shape {codes.shape}: select the band first.")
    check_codes_dtype(codes.dtype)
    rules = rules_for(pixel_size, mmu_ha, min_width_m, connectivity)
    out = _mmu_in_memory(codes, rules)
    if rules.width_enabled:
        out = _mmu_in_memory(width_in_memory(out, rules), rules)
    return out


def _mmu_in_memory(codes: np.ndarray, rules: Rules) -> np.ndarray:
    if rules.mmu_px <= 1 or codes.size == 0:
        return codes.copy()
    table, labels = block_patches(codes, (0, 0), codes.shape[1], rules.connectivity)
    graph = assemble([[table]], rules.connectivity)
    final = merge_small(graph, rules.mmu_px)
    return block_lut(graph, final, 0, 0, codes.dtype)[labels]


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
    check_codes_dtype(arr.dtype)
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
            f"A class map `codes` must be one band (y, x), got dims {codes.dims} with shape {codes.shape}: "
            "select the band first."
        )
    return codes


def generalize_dask(codes: da.Array, rules: Rules, persist: bool = True) -> da.Array:
    """The chunked algorithm on a dask array (see :func:`generalize`); same chunks out."""
    check_codes_dtype(codes.dtype)
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
    measure = dask.delayed(block_table, pure=True)
    tasks = [measure(blocks[iy, ix], (int(row0[iy]), int(col0[ix])), codes.shape[1], rules.connectivity)
             for iy in range(blocks.shape[0]) for ix in range(blocks.shape[1])]
    flat = dask.compute(*tasks)
    nx = blocks.shape[1]
    tables = [list(flat[iy * nx : (iy + 1) * nx]) for iy in range(blocks.shape[0])]
    graph = assemble(tables, rules.connectivity)
    final = merge_small(graph, rules.mmu_px)
    log.info("MMU step: %d patches, %d under %d px, %d block(s)",
             graph.code.size, int((graph.area < rules.mmu_px).sum()), rules.mmu_px, blocks.size)
    relabel = dask.delayed(relabel_block, pure=True)
    rows = [
        [da.from_delayed(relabel(blocks[iy, ix], block_lut(graph, final, iy, ix, codes.dtype), rules.connectivity),
                         shape=(ny, nxx), dtype=codes.dtype, meta=np.array((), dtype=codes.dtype))
         for ix, nxx in enumerate(codes.chunks[1])]
        for iy, ny in enumerate(codes.chunks[0])
    ]
    out = da.block(rows)
    return out.persist() if persist else out
