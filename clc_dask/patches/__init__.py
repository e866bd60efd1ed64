"""Patch datasets: a patch index with a spatial train/validation split, streamed or cached.

From one or more seasonal mosaics and a label raster on the same grid, :func:`build_patch_index`
cuts the grid into non-overlapping square patches (128 or 256 px in the paper; any multiple of
32 px), rejects patches that are mostly no data, cloud or unlabelled, and splits the *locations*
into train and validation by blocks of ``split_block`` × ``split_block`` patches, so neighbouring
patches (which share texture and fields) never end up on both sides. Each season is a separate
sample of the same location (Table 1 of the paper: "September & April"), and both samples of a
location always fall in the same split.

The index is computed from the lazy (dask) arrays: one graph of per-chunk statistics (valid
pixels, cloud, class counts, band sums per patch) and one reduction; the mosaic is never held in
memory as a whole.

Patches then reach the trainer in one of two ways that give byte-identical samples and batches:

* :class:`DaskPatchStream` — a torch ``IterableDataset`` that computes patch windows on the Dask
  cluster (or the local threaded scheduler) and keeps a bounded number of them in flight ahead of
  the consumer.
* :func:`cache_patches` + :class:`ZarrPatchDataset` — patches written once to a Zarr store (one
  chunk per patch) and read from there.

The order of samples in an epoch depends only on ``(seed, epoch)`` (:func:`epoch_order`), which
makes training resumable with identical results.

Modules, in the order data flows: ``sources`` (opening the inputs), ``statistics`` (per-patch
statistics, normalisation), ``rejection`` (the sample table), ``split`` (blocks to train or
validation), ``index`` (:class:`PatchIndex`, build, save, load), ``stream`` (Dask stream),
``cache`` (Zarr cache), ``loader`` (epoch order, DataLoader), ``write`` (the
``clc-dask patches`` stage).
"""

from clc_dask.patches.cache import CACHE_FORMAT, CACHE_STORE, ZarrPatchDataset, cache_patches
from clc_dask.patches.index import (
    CLASS_STATS_CSV,
    CLASS_STATS_JSON,
    INDEX_FILE,
    INDEX_FORMAT,
    INDEX_VERSION,
    PATCHES_FILE,
    RARE_MIN_PATCHES,
    RARE_SHARE,
    SPLITS,
    PatchIndex,
    Sample,
    build_patch_index,
    load_patch_index,
)
from clc_dask.patches.loader import EpochSampler, epoch_order, patch_loader
from clc_dask.patches.sources import READ_CHUNK, Source, clear_counts_beside, find_clear_count
from clc_dask.patches.split import VAL_SIDES, guard_patches
from clc_dask.patches.stream import FETCH_GROUP, DaskPatchStream
from clc_dask.patches.write import write_patch_index

__all__ = [
    "CACHE_FORMAT",
    "CACHE_STORE",
    "CLASS_STATS_CSV",
    "CLASS_STATS_JSON",
    "FETCH_GROUP",
    "INDEX_FILE",
    "INDEX_FORMAT",
    "INDEX_VERSION",
    "PATCHES_FILE",
    "RARE_MIN_PATCHES",
    "RARE_SHARE",
    "READ_CHUNK",
    "SPLITS",
    "VAL_SIDES",
    "DaskPatchStream",
    "EpochSampler",
    "PatchIndex",
    "Sample",
    "Source",
    "ZarrPatchDataset",
    "build_patch_index",
    "cache_patches",
    "clear_counts_beside",
    "epoch_order",
    "find_clear_count",
    "guard_patches",
    "load_patch_index",
    "patch_loader",
    "write_patch_index",
]
