"""The data a training run reads: the config's patch index, and its train/validation datasets."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from clc_dask.errors import ConfigError
from clc_dask.patches import (
    CACHE_STORE,
    DaskPatchStream,
    PatchIndex,
    Source,
    ZarrPatchDataset,
    build_patch_index,
    cache_patches,
)
from clc_dask.train.config import TrainConfig

log = logging.getLogger(__name__)

#: A Zarr patch cache up to this size (bytes, uncompressed) is read into memory once when
#: training with ``num_workers=0``, instead of once per sample and epoch.
PRELOAD_MAX_BYTES = 2 * 1024**3


def index_for_config(
    config: TrainConfig,
    mosaics: Mapping[str, Source],
    labels: Source,
    *,
    clear_counts: Mapping[str, Source] | None = None,
    client: Any | None = None,
) -> PatchIndex:
    """Build the patch index the config asks for (its seasons, bands, patch size, split, thresholds).

    Args:
        config: the training settings; its data settings shape the index.
        mosaics: season → mosaic; seasons the config does not train on are ignored.
        labels: the CLC code raster on the mosaics' grid.
        clear_counts: season → clear-count raster (optional).
        client: a ``distributed.Client`` to compute on; None = threads in this process.

    Raises:
        ConfigError: a season of the config has no mosaic, or no patch is usable.
        GridMismatchError: the label raster is on another grid.
    """
    missing = [s for s in config.seasons if s not in mosaics or not mosaics[s]]
    if missing:
        raise ConfigError(
            f"Season(s) {missing} have no mosaic, but {config.name or 'this config'} trains on "
            f"{list(config.seasons)} (mosaics given: {sorted(mosaics) or 'none'}): add "
            f"{' and '.join(missing)} to `mosaics`, or choose a config for the seasons you have."
        )
    extra = sorted(set(mosaics) - set(config.seasons))
    if extra:
        log.info("not using mosaic(s) of %s: the config trains on %s", extra, list(config.seasons))
    return build_patch_index(
        {s: mosaics[s] for s in config.seasons}, labels, patch_size=config.patch_size, bands=config.bands,
        level=config.level, val_fraction=config.val_fraction, split_block=config.split_block,
        guard=config.guard_patches, seed=config.seed, val_side=config.split_side,
        max_nodata_fraction=config.max_nodata_fraction, max_cloud_fraction=config.max_cloud_fraction, max_unlabelled_fraction=config.max_unlabelled_fraction,
        clear_counts={s: p for s, p in (clear_counts or {}).items() if s in config.seasons}, client=client,
    )


def training_datasets(config: TrainConfig, index: PatchIndex, out_dir: Path, client: Any | None,
                      cache_store: Path | None) -> tuple[DaskPatchStream | ZarrPatchDataset,
                                                          DaskPatchStream | ZarrPatchDataset]:
    """The train and validation datasets of ``config.data``: Dask streams, or a Zarr cache.

    With ``data="zarr"`` the patches are cached first (to ``cache_store``, else beside the
    saved index, else in ``out_dir``), and a cache that fits :data:`PRELOAD_MAX_BYTES` is read
    into memory once when ``num_workers`` is 0.
    """
    if config.data == "zarr":
        store = cache_store or (index.directory / CACHE_STORE if index.directory else out_dir / CACHE_STORE)
        cache_patches(index, store, client=client, prefetch=config.prefetch)
        splits = [ZarrPatchDataset(store, "train", index=index, seed=config.seed, limit=config.patches_per_epoch),
                  ZarrPatchDataset(store, "val", index=index, seed=config.seed)]
        if config.num_workers == 0 and sum(ds.nbytes for ds in splits) <= PRELOAD_MAX_BYTES:
            for ds in splits:  # one bulk read instead of one per sample and epoch
                ds.preload = True
        return splits[0], splits[1]
    return (DaskPatchStream(index, "train", seed=config.seed, client=client, prefetch=config.prefetch,
                            limit=config.patches_per_epoch),
            DaskPatchStream(index, "val", seed=config.seed, client=client, prefetch=config.prefetch))
