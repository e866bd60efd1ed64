"""Training: a U-Net/ResNet on a patch index, with exact resume after a kill.

:func:`train` runs Adam on the patches of a :class:`~clc_dask.patches.PatchIndex` (streamed from
the Dask cluster or read from a Zarr cache; both give the same batches), evaluates per-class IoU
on the validation split, and after every epoch writes ``metrics.csv``/``metrics.json``, the
``best.pt`` checkpoint (by validation mIoU) and ``checkpoint.pt`` (atomically, last).
:func:`train_from_mosaics` builds the config's patch index from mosaics and labels first.

Everything random depends only on ``(seed, epoch)``: the model initialisation on the seed, the
sample order on :func:`~clc_dask.patches.epoch_order`, the augmentations on a generator seeded
per epoch. The checkpoint also carries the optimizer state and the RNG states of torch, numpy and
Python, so ``train(..., resume=True)`` after a kill gives the same losses as an uninterrupted run
(to 1e-6 on CPU with the same thread count).

Modules: ``config`` (:class:`TrainConfig`), ``data`` (the index and datasets of a config),
``device`` (device, mixed precision, deterministic kernels), ``augment``, ``losses``, ``rng``
(generator states in checkpoints), ``metrics`` (validation and metrics files), ``trainer``
(:class:`Trainer`, :func:`train`, :func:`train_from_mosaics`). Named configurations are in
``clc_dask.presets``.
"""

from clc_dask.train.augment import augment
from clc_dask.train.config import TrainConfig, check_index, config_for_index, make_train_config
from clc_dask.train.data import PRELOAD_MAX_BYTES, index_for_config
from clc_dask.train.device import cpu_has_bf16
from clc_dask.train.metrics import METRICS_CSV, METRICS_JSON
from clc_dask.train.trainer import (
    BEST_FILE,
    CHECKPOINT_FILE,
    RESUMABLE_CHANGES,
    Trainer,
    TrainResult,
    check_out_dir,
    train,
    train_from_mosaics,
)

__all__ = [
    "BEST_FILE",
    "CHECKPOINT_FILE",
    "METRICS_CSV",
    "METRICS_JSON",
    "PRELOAD_MAX_BYTES",
    "RESUMABLE_CHANGES",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "augment",
    "check_index",
    "check_out_dir",
    "config_for_index",
    "cpu_has_bf16",
    "index_for_config",
    "make_train_config",
    "train",
    "train_from_mosaics",
]
