"""The patches stage as one call: build a patch index, save it, and optionally cache its patches."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from clc_dask.errors import OutputError
from clc_dask.patches.cache import CACHE_STORE, cache_patches
from clc_dask.patches.index import INDEX_FILE, PatchIndex, build_patch_index
from clc_dask.patches.sources import Source

log = logging.getLogger(__name__)


def write_patch_index(
    mosaics: Mapping[str, Source],
    labels: Source,
    out_dir: str | os.PathLike[str],
    *,
    patch_size: int = 256,
    bands: str | Sequence[str] | None = None,
    level: int = 2,
    codes: Sequence[int] | None = None,
    val_fraction: float = 0.25,
    split_block: int = 4,
    guard: int = 0,
    seed: int = 0,
    val_side: str | None = None,
    max_nodata_fraction: float = 0.5,
    max_cloud_fraction: float = 0.5,
    max_unlabelled_fraction: float = 0.5,
    clear_counts: Mapping[str, Source] | None = None,
    cache_zarr: bool = False,
    overwrite: bool = False,
    client: Any | None = None,
) -> PatchIndex:
    """Build a patch index (:func:`~clc_dask.patches.build_patch_index`) and save it to ``out_dir``.

    ``out_dir`` gets ``patch_index.json``, ``patches.csv`` and ``class_stats.{json,csv}``
    (and ``patches.zarr`` with ``cache_zarr``); :func:`~clc_dask.patches.load_patch_index`
    reads it back. The arguments shared with :func:`~clc_dask.patches.build_patch_index`
    (``patch_size`` … ``clear_counts``) mean the same there: patch edge in px (a multiple of
    32), composite or band list, CLC level, classes, validation share, split block and guard
    in patches, split seed, and the rejection thresholds (fractions 0…1).

    Args:
        mosaics: season → mosaic COG or Zarr store (files: the saved index refers to them).
        labels: single-band CLC code raster on the mosaics' grid.
        out_dir: folder of the index.
        patch_size: patch edge in px (paper: 128 or 256).
        bands: ``rgb``, ``nrg``, ``all``, a band list, or None for every band of the mosaic.
        level: CLC level of the classes.
        codes: the classes to learn (default: those present).
        val_fraction: share of usable samples aimed at for validation (paper ≈ 0.25).
        split_block: whole blocks of N × N patches go to one split.
        guard: drop training patches within N patches of validation.
        seed: seeds the block split.
        val_side: validation as a strip along this side (``north``, ``south``, ``east``,
            ``west``) instead of seeded blocks.
        max_nodata_fraction: reject samples with more no data than this.
        max_cloud_fraction: reject samples with more never-clear pixels than this.
        max_unlabelled_fraction: reject locations with more unlabelled pixels than this.
        clear_counts: season → clear-count raster (see
            :func:`~clc_dask.patches.clear_counts_beside` to find those written by the mosaic stage).
        cache_zarr: also write every usable patch to ``out_dir/patches.zarr`` (read by training
            with ``data="zarr"``); worth it when the model trains on the cores that would
            compute the patches.
        overwrite: replace an index already in ``out_dir`` (default: refuse, before computing).
        client: a ``distributed.Client`` to compute on; None = threads in this process.

    Raises:
        OutputError: ``out_dir`` already holds an index and ``overwrite`` is False.
        ConfigError, InputError, GridMismatchError: as :func:`~clc_dask.patches.build_patch_index`.
    """
    out_dir = Path(out_dir)
    if (out_dir / INDEX_FILE).exists() and not overwrite:
        raise OutputError(f"{out_dir} already holds a patch index: pass `overwrite` or choose another `out_dir`.")
    index = build_patch_index(
        mosaics, labels, patch_size=patch_size, bands=bands, level=level, codes=codes,
        val_fraction=val_fraction, split_block=split_block, guard=guard, seed=seed, val_side=val_side,
        max_nodata_fraction=max_nodata_fraction, max_cloud_fraction=max_cloud_fraction,
        max_unlabelled_fraction=max_unlabelled_fraction, clear_counts=clear_counts, client=client,
    )
    index.save(out_dir)
    if cache_zarr:
        cache_patches(index, out_dir / CACHE_STORE, client=client, overwrite=overwrite)
    return index
