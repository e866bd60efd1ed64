"""Per-patch statistics of the inputs, in one dask reduction, and the band normalisation.

Each chunk (a whole number of patches) is reduced to per-patch counts: valid pixels, band
sums and sums of squares of the mosaics, pixels per class of the labels, never-clear pixels
of the clear counts. The mosaics are never held in memory as a whole.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import dask
import dask.array as da
import numpy as np
import pandas as pd
import xarray as xr

from clc_dask.classes import IGNORE_INDEX, ClassTable
from clc_dask.errors import ConfigError
from clc_dask.model import Normalization
from clc_dask.patches.sources import Sources, aligned_chunk

log = logging.getLogger(__name__)


@dataclass
class PatchStatistics:
    """Per-patch statistics of every input (arrays indexed by patch row and column).

    ``mosaics[season]`` is (1 + 2·band, rows, cols): valid pixels, band sums, sums of squares
    (DN); ``labels`` is (rows, cols, K + 1) pixels per class index of the full level table,
    the last bin unlabelled; ``clear[season]`` is (rows, cols) never-clear pixels.
    """

    mosaics: dict[str, np.ndarray]
    labels: np.ndarray
    clear: dict[str, np.ndarray]


def per_patch_sum(block: np.ndarray, size: int) -> np.ndarray:
    """Sum of each ``size``×``size`` patch over the last two axes (int64)."""
    *lead, h, w = block.shape
    return block.reshape(*lead, h // size, size, w // size, size).sum(axis=(-3, -1), dtype=np.int64)


def mosaic_block_stats(block: np.ndarray, size: int) -> np.ndarray:
    """(band, h, w) DN → (1 + 2·band, h/size, w/size): valid pixels, band sums, sums of squares."""
    valid = (block != 0).any(axis=0)
    out = [per_patch_sum(valid, size)]
    for band in block:
        out.append(per_patch_sum(band.astype(np.int64), size))
    for band in block:
        dn = band.astype(np.int64)
        out.append(per_patch_sum(dn * dn, size))
    return np.stack(out)


def label_block_counts(block: np.ndarray, size: int, table: ClassTable) -> np.ndarray:
    """(h, w) CLC codes → (h/size, w/size, K+1) pixel counts per class index; the last bin is unlabelled."""
    k = len(table)
    index = table.to_index(block).astype(np.int64)
    index[index == IGNORE_INDEX] = k
    h, w = block.shape
    nr, nc = h // size, w // size
    patch_id = (np.arange(h)[:, None] // size) * nc + (np.arange(w)[None, :] // size)
    counts = np.bincount((patch_id * (k + 1) + index).ravel(), minlength=nr * nc * (k + 1))
    return counts.reshape(nr, nc, k + 1)


def cloud_block_counts(block: np.ndarray, size: int) -> np.ndarray:
    """(h, w) clear-observation counts → (h/size, w/size) pixels never seen clear."""
    return per_patch_sum(block == 0, size)


def _patch_chunks(chunks: tuple[int, ...], size: int) -> tuple[int, ...]:
    return tuple(c // size for c in chunks)


def _crop(arr: xr.DataArray, nrows: int, ncols: int, size: int) -> da.Array:
    """The whole patches of ``arr``, chunks aligned to them."""
    data = arr.data[..., : nrows * size, : ncols * size]
    bad = [c for axis in (-2, -1) for c in data.chunks[axis] if c % size]
    if bad:  # in-memory inputs chunked elsewhere: realign once
        chunk = aligned_chunk(size)
        data = data.rechunk({data.ndim - 2: chunk, data.ndim - 1: chunk})
    return data


def patch_statistics(sources: Sources, size: int, nrows: int, ncols: int, level: int,
                     client: Any | None) -> PatchStatistics:
    """Per-patch statistics of every input, computed in one dask reduction.

    Args:
        sources: the opened inputs.
        size: patch edge (px).
        nrows: patch rows of the grid.
        ncols: patch columns of the grid.
        level: CLC level of the label classes.
        client: a ``distributed.Client``; None = dask's threaded scheduler.
    """
    full_table = ClassTable(level)
    graphs: dict[str, da.Array] = {}
    for season, arr in sources.mosaics.items():
        data = _crop(arr, nrows, ncols, size).rechunk({0: -1})
        nb = data.shape[0]
        graphs[f"mosaic/{season}"] = data.map_blocks(
            mosaic_block_stats, size=size, dtype=np.int64,
            chunks=((1 + 2 * nb,), _patch_chunks(data.chunks[1], size), _patch_chunks(data.chunks[2], size)),
        )
    labels = _crop(sources.labels, nrows, ncols, size)
    graphs["labels"] = labels.map_blocks(
        label_block_counts, size=size, table=full_table, dtype=np.int64, new_axis=2,
        chunks=(_patch_chunks(labels.chunks[0], size), _patch_chunks(labels.chunks[1], size),
                (len(full_table) + 1,)),
    )
    for season, arr in sources.clear.items():
        data = _crop(arr, nrows, ncols, size)
        graphs[f"clear/{season}"] = data.map_blocks(
            cloud_block_counts, size=size, dtype=np.int64,
            chunks=(_patch_chunks(data.chunks[0], size), _patch_chunks(data.chunks[1], size)),
        )
    keys = list(graphs)
    log.info("computing per-patch statistics of %d raster(s), %d×%d patches of %d px",
             len(keys), nrows, ncols, size)
    if client is not None:
        values = client.gather(client.compute([graphs[k] for k in keys]))
    else:
        values = dask.compute(*[graphs[k] for k in keys], scheduler="threads")
    results = dict(zip(keys, values, strict=True))
    return PatchStatistics(
        mosaics={s: results[f"mosaic/{s}"] for s in sources.mosaics},
        labels=results["labels"],
        clear={s: results[f"clear/{s}"] for s in sources.clear},
    )


def band_normalization(table: pd.DataFrame, mosaic_stats: Mapping[str, np.ndarray],
                       bands: tuple[str, ...]) -> Normalization:
    """Per-band mean/std (reflectance) over valid pixels of the usable training samples (exact sums).

    Args:
        table: the sample table (``season``, ``row``, ``col``, ``split``, ``usable``).
        mosaic_stats: season → per-patch mosaic statistics (:class:`PatchStatistics`).
        bands: the band order.
    """
    nb = len(bands)
    n = 0
    sums = [0] * nb
    sumsq = [0] * nb
    train = table[(table["split"] == "train") & table["usable"]]
    for season, stats in mosaic_stats.items():
        rows = train[train["season"] == season]
        r, c = rows["row"].to_numpy(), rows["col"].to_numpy()
        n += int(stats[0][r, c].sum())
        for b in range(nb):
            sums[b] += int(stats[1 + b][r, c].sum())
            sumsq[b] += int(stats[1 + nb + b][r, c].sum())
    if n == 0:
        raise ConfigError("The training patches hold no valid (non-zero) pixel to normalise the bands with.")
    scale = 1e-4
    means = tuple(s / n * scale for s in sums)
    stds = tuple(max(math.sqrt(max(q / n - (s / n) ** 2, 0.0)) * scale, 1e-6)
                 for s, q in zip(sums, sumsq, strict=True))
    return Normalization(means, stds, scale)
