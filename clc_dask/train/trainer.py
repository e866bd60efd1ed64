"""The training loop: :class:`Trainer` (one run, step by step) and its entry points.

:func:`train` trains on a patch index; :func:`train_from_mosaics` builds the config's index
from mosaics and labels first. Both check everything (config, index, checkpoints, output
folder) before the first step and before anything is written.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from clc_dask.classes import ClassTable
from clc_dask.errors import ConfigError, OutputError
from clc_dask.model import (
    Checkpoint,
    build_model,
    check_decoder_channels,
    composite_name,
    load_checkpoint,
    save_checkpoint,
)
from clc_dask.patches import PatchIndex, Source, patch_loader
from clc_dask.rasters import check_writable
from clc_dask.train.augment import augment, epoch_generator
from clc_dask.train.config import TrainConfig, check_index, make_train_config
from clc_dask.train.data import index_for_config, training_datasets
from clc_dask.train.device import amp_dtype, deterministic, select_device
from clc_dask.train.losses import CLASS_WEIGHT_POWERS, SegmentationLoss, class_weights
from clc_dask.train.metrics import (
    METRICS_CSV,
    METRICS_JSON,
    validation_record,
    validation_scores,
    write_metrics,
)
from clc_dask.train.rng import restore_rng, rng_state, seed_everything

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.pt"
BEST_FILE = "best.pt"
#: Settings that may change when resuming (they do not change the numbers, or only extend the run).
RESUMABLE_CHANGES = frozenset({"epochs", "device", "num_workers", "prefetch", "data", "name"})


@dataclass
class TrainResult:
    """What :func:`train` produced."""

    out_dir: Path
    checkpoint: Path
    best_checkpoint: Path | None
    metrics_csv: Path
    metrics_json: Path
    history: list[dict[str, Any]]
    best_epoch: int | None
    best_val_miou: float | None
    classes: ClassTable
    bands: tuple[str, ...]
    epochs_run: int = 0
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def final(self) -> dict[str, Any]:
        """The last epoch's metrics."""
        return self.history[-1] if self.history else {}


def check_out_dir(out_dir: str | os.PathLike[str], *, resume: bool = False, overwrite: bool = False) -> Path:
    """Refuse to start over a run already in ``out_dir`` unless resuming or overwriting, and
    check that ``out_dir`` can be written (nothing is created here)."""
    out_dir = Path(out_dir)
    if (out_dir / CHECKPOINT_FILE).exists() and not (resume or overwrite):
        raise OutputError(
            f"{out_dir} already holds a training run ({CHECKPOINT_FILE}): pass `resume` to continue it, "
            "`overwrite` to replace it, or choose another `out_dir`."
        )
    existing = out_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        raise OutputError(f"Cannot write the run folder {out_dir} ({existing} is not a writable folder): "
                          "choose another `out_dir`.")
    return out_dir


def check_resume(saved: Mapping[str, Any], config: TrainConfig, fingerprint: str, path: Path) -> None:
    """Raise :class:`ConfigError` unless a run saved with ``saved`` settings can go on with ``config``."""
    old = {k: v for k, v in saved.items() if k != "patch_index"}
    new = config.model_dump(mode="json")
    changed = sorted(k for k in set(old) | set(new) if k not in RESUMABLE_CHANGES and old.get(k) != new.get(k))
    if changed:
        detail = ", ".join(f"{k}={old.get(k)!r} → {new.get(k)!r}" for k in changed)
        raise ConfigError(
            f"Cannot resume {path}: it was trained with other settings ({detail}). Resume with the "
            "same settings (only `epochs` may grow), or train into a new `out_dir`."
        )
    saved_fp = (saved.get("patch_index") or {}).get("fingerprint")
    if saved_fp and saved_fp != fingerprint:
        raise ConfigError(
            f"Cannot resume {path}: it was trained on another patch index (other samples, split or "
            "sources). Resume with the same index, or train into a new `out_dir`."
        )


def set_lr(optimizer: torch.optim.Optimizer, config: TrainConfig, step: int, total: int) -> None:
    """Learning rate of a global step: a pure function of the step, so resuming needs no scheduler state."""
    lr = config.lr
    if config.lr_schedule == "cosine":
        lr = 0.5 * config.lr * (1.0 + math.cos(math.pi * min(step, total) / max(1, total)))
    for group in optimizer.param_groups:
        group["lr"] = lr


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


class Trainer:
    """One training run of ``config`` on ``index`` into ``out_dir`` (arguments as :func:`train`).

    The steps, in order: :meth:`prepare` (checks, resume state, data), :meth:`build` (model,
    optimiser, loss; a resumed run's state), then per epoch :meth:`train_epoch`,
    :meth:`validate` when due and :meth:`save`. :meth:`fit` runs them all; use :func:`train`
    unless you need a single step.
    """

    def __init__(
        self,
        config: TrainConfig | Mapping[str, Any],
        index: PatchIndex,
        out_dir: str | os.PathLike[str],
        *,
        resume: bool = False,
        init_checkpoint: str | os.PathLike[str] | None = None,
        client: Any | None = None,
        progress: bool | None = None,
        overwrite: bool = False,
        cache_store: str | os.PathLike[str] | None = None,
    ) -> None:
        self.config = make_train_config(config)
        self.index = index
        self.out_dir = Path(out_dir)
        self.resume = resume
        self.init_checkpoint = init_checkpoint
        self.client = client
        self.progress = sys.stderr.isatty() if progress is None else progress
        self.overwrite = overwrite
        self.cache_store = Path(cache_store) if cache_store else None
        self.checkpoint_path = self.out_dir / CHECKPOINT_FILE
        self.best_path = self.out_dir / BEST_FILE
        self.codes = list(index.classes.codes)
        self.fingerprint = index.fingerprint()
        # what the run starts from, set by prepare()
        self.resumed: Checkpoint | None = None
        self.init: Checkpoint | None = None
        self.recorded_config: dict[str, Any] = {}
        # run state, set by build() and each epoch
        self.history: list[dict[str, Any]] = []
        self.best: dict[str, Any] | None = None
        self.start_epoch = 0

    # ---- prepare: checks, the state the run starts from, data

    def prepare(self) -> None:
        """Check config, index, checkpoints and ``out_dir``, then open the data (a Zarr cache is
        written here, after every check)."""
        check_index(self.config, self.index)
        self.recorded_config = self.saved_config()
        self.resumed = self._resumed_checkpoint()
        check_out_dir(self.out_dir, resume=self.resumed is not None or self.resume, overwrite=self.overwrite)
        self.decoder_channels = check_decoder_channels(self.config.decoder_channels)
        self.init = self._init_checkpoint() if self.resumed is None else None
        check_writable(self.out_dir / METRICS_CSV)
        self.device = select_device(self.config.device)
        self.amp = amp_dtype(self.config, self.device)
        self.train_data, self.val_data = training_datasets(self.config, self.index, self.out_dir, self.client,
                                                           self.cache_store)

    def _resumed_checkpoint(self) -> Checkpoint | None:
        """The run in ``out_dir`` to continue (None: start from epoch 1)."""
        if not self.resume:
            return None
        if not self.checkpoint_path.exists():
            log.info("no checkpoint in %s yet: starting from epoch 1", self.out_dir)
            return None
        state = load_checkpoint(self.checkpoint_path)
        state.check_compatible(self.index.bands, self.index.classes)
        check_resume(state.config, self.config, self.fingerprint, self.checkpoint_path)
        return state

    def _init_checkpoint(self) -> Checkpoint | None:
        """The weights to fine-tune from (None: train from the config's encoder weights)."""
        if self.init_checkpoint is None:
            return None
        init = load_checkpoint(self.init_checkpoint)
        init.check_compatible(self.index.bands, self.index.classes)
        if init.encoder != self.config.encoder:
            raise ConfigError(
                f"The checkpoint {self.init_checkpoint} has a {init.encoder} encoder but the config asks "
                f"for {self.config.encoder}: set `encoder` to {init.encoder} to fine-tune it."
            )
        if init.decoder_channels != self.decoder_channels:
            raise ConfigError(
                f"The checkpoint {self.init_checkpoint} has decoder channels {list(init.decoder_channels)} "
                f"but the config asks for {list(self.decoder_channels)}: fine-tune it with the same "
                "`decoder_channels`."
            )
        return init

    # ---- build: model, optimiser, loss

    def build(self) -> None:
        """Seed the generators, build model, loss, optimiser and gradient scaler, and restore a
        resumed run (weights, optimiser, generators, history)."""
        config, index = self.config, self.index
        seed_everything(config.seed)
        start_from = self.resumed or self.init
        # weights come from a checkpoint when resuming or fine-tuning: no ImageNet download then
        self.model = build_model(config.encoder, len(index.bands), len(self.codes),
                                 None if start_from else config.encoder_weights,
                                 decoder_channels=self.decoder_channels)
        self.weights_used = getattr(self.model, "encoder_weights_used", config.encoder_weights)
        if self.init is not None:
            self.weights_used = self.init.encoder_weights
            self.model.load_state_dict(self.init.state_dict)
            log.info("starting from the weights of %s", self.init_checkpoint)
        self.model.to(self.device, memory_format=torch.channels_last)  # NHWC: faster convolutions
        self.criterion = self._loss().to(self.device)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp == torch.float16)
        if self.resumed is not None:
            self._restore(self.resumed)
        validated = [h for h in self.history if h.get("val_miou") is not None]
        self.best = max(validated, key=lambda h: h["val_miou"]) if validated else None

    def _loss(self) -> nn.Module:
        power = CLASS_WEIGHT_POWERS.get(self.config.class_weights)
        weights = class_weights(self.index, power).to(self.device) if power else None
        return SegmentationLoss(self.config.loss, weights)

    def _restore(self, state: Checkpoint) -> None:
        """Continue a saved run: weights, optimiser and scaler, generators, epoch and history."""
        self.model.load_state_dict(state.state_dict)
        opt_state = state.optimizer_state or {}
        self.optimizer.load_state_dict(opt_state["adam"])
        if opt_state.get("scaler"):
            self.scaler.load_state_dict(opt_state["scaler"])
        restore_rng(state.rng_state)
        self.start_epoch = state.epoch
        self.history = [dict(h) for h in state.history[:self.start_epoch]]
        self.weights_used = state.encoder_weights
        log.info("resuming %s after epoch %d", self.checkpoint_path, self.start_epoch)

    # ---- one epoch

    def train_epoch(self, epoch: int) -> dict[str, Any]:
        """One pass over the epoch's training batches (0-based ``epoch``); returns its record."""
        config = self.config
        generator = epoch_generator(config.seed, epoch)
        self.model.train()
        loss_sum, batches, patches = 0.0, 0, 0
        loader = patch_loader(self.train_data, config.batch_size, epoch, config.num_workers)
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{config.epochs}", disable=not self.progress, leave=False,
                   unit="batch", file=sys.stderr)
        steps_per_epoch = math.ceil(len(self.train_data) / config.batch_size)
        for step, (xb, yb) in enumerate(bar):
            if xb.shape[0] == 1 and len(self.train_data) > 1:
                continue  # a lone last sample breaks batch norm at the 1×1 bottleneck
            set_lr(self.optimizer, config, epoch * steps_per_epoch + step, config.epochs * steps_per_epoch)
            if config.augment:
                xb, yb = augment(xb, yb, generator)
            loss_sum += self._step(xb, yb)
            batches += 1
            patches += int(xb.shape[0])
            if self.progress:
                bar.set_postfix(loss=f"{loss_sum / batches:.4f}")
        return {"epoch": epoch + 1, "train_loss": loss_sum / max(1, batches),
                "lr": self.optimizer.param_groups[0]["lr"], "train_patches": patches, "train_batches": batches}

    def _step(self, xb: torch.Tensor, yb: torch.Tensor) -> float:
        """One optimiser step on a batch; returns its loss."""
        xb = xb.to(self.device, non_blocking=True, memory_format=torch.channels_last)
        yb = yb.to(self.device, non_blocking=True).long()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
            loss = self.criterion(self.model(xb), yb)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return float(loss.detach())

    def validates_after(self, epoch: int) -> bool:
        """Whether to validate after (0-based) ``epoch``: every ``val_every`` epochs and after the last."""
        return (epoch + 1) % self.config.val_every == 0 or epoch + 1 == self.config.epochs

    def validate(self) -> dict[str, Any]:
        """Validation loss, mIoU, overall accuracy and per-class IoU of the current weights."""
        loader = patch_loader(self.val_data, self.config.batch_size, 0, self.config.num_workers)
        loss, cm = validation_scores(self.model, loader, len(self.codes), self.device, self.amp)
        return validation_record(loss, cm, self.codes)

    # ---- save

    def save(self, record: dict[str, Any]) -> None:
        """Add an epoch's record; write the metrics, ``best.pt`` when validation improved, and
        ``checkpoint.pt`` (last, so a checkpoint always has its metrics)."""
        self.history.append(record)
        improved = record.get("val_miou") is not None and (self.best is None
                                                           or record["val_miou"] > self.best["val_miou"])
        if improved:
            self.best = record
        write_metrics(self.out_dir, self.history, self.codes, self.summary())
        if improved:
            save_checkpoint(self.checkpoint(record["epoch"], with_optimizer=False), self.best_path)
        save_checkpoint(self.checkpoint(record["epoch"]), self.checkpoint_path)

    def saved_config(self) -> dict[str, Any]:
        """The config as recorded in checkpoints and ``metrics.json``, with the index it trained on."""
        return {**self.config.model_dump(mode="json"),
                "patch_index": {"fingerprint": self.fingerprint,
                                "directory": str(self.index.directory) if self.index.directory else None,
                                "counts": self.index.counts()}}

    def summary(self) -> dict[str, Any]:
        """The run's description in ``metrics.json`` (besides the history)."""
        index, best = self.index, self.best
        return {"config": self.recorded_config, "bands": list(index.bands), "classes": index.classes.as_records(),
                "level": index.classes.level, "encoder_weights": self.weights_used,
                "best_epoch": best["epoch"] if best else None,
                "best_val_miou": best["val_miou"] if best else None}

    def checkpoint(self, epoch: int, with_optimizer: bool = True) -> Checkpoint:
        """The model after ``epoch`` epochs; with the optimiser and generator states to resume from."""
        index = self.index
        return Checkpoint(
            encoder=self.config.encoder, bands=tuple(index.bands), classes=index.classes,
            normalization=index.normalization,
            state_dict={k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()},
            config=self.recorded_config, epoch=epoch, history=[dict(h) for h in self.history],
            optimizer_state={"adam": self.optimizer.state_dict(),
                             "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None}
            if with_optimizer else None,
            rng_state=rng_state(epoch) if with_optimizer else None, encoder_weights=self.weights_used,
            decoder_channels=self.decoder_channels,
        )

    # ---- the whole run

    def run_epoch(self, epoch: int) -> dict[str, Any]:
        """Train one epoch, validate when due, save; returns the epoch's record."""
        t0 = time.perf_counter()
        record = self.train_epoch(epoch)
        if self.validates_after(epoch):
            record.update(self.validate())
        record["seconds"] = time.perf_counter() - t0
        self.save(record)
        log.info("epoch %d/%d: train loss %.4f, val loss %s, val mIoU %s (%.1f s)", epoch + 1,
                 self.config.epochs, record["train_loss"], _fmt(record.get("val_loss")),
                 _fmt(record.get("val_miou")), record["seconds"])
        return record

    def fit(self) -> TrainResult:
        """Prepare, build and train every remaining epoch; the result of the whole run."""
        started = time.perf_counter()
        self.prepare()
        config = self.config
        with deterministic(self.device):
            self.build()
            log.info("training %s U-Net/%s on %s: %d train / %d val patches, %d classes, epochs %d→%d, "
                     "device %s", config.name or "custom", config.encoder, composite_name(self.index.bands),
                     len(self.train_data), len(self.val_data), len(self.codes), self.start_epoch + 1,
                     config.epochs, self.device)
            for epoch in range(self.start_epoch, config.epochs):
                self.run_epoch(epoch)
            if not self.checkpoint_path.exists():  # nothing to run (resumed a finished run without a file)
                save_checkpoint(self.checkpoint(self.start_epoch), self.checkpoint_path)
                write_metrics(self.out_dir, self.history, self.codes, self.summary())
        return self.result(time.perf_counter() - started)

    def result(self, seconds: float) -> TrainResult:
        """What the run produced, after :meth:`fit`."""
        best = self.best
        return TrainResult(
            out_dir=self.out_dir, checkpoint=self.checkpoint_path,
            best_checkpoint=self.best_path if self.best_path.exists() else None,
            metrics_csv=self.out_dir / METRICS_CSV, metrics_json=self.out_dir / METRICS_JSON,
            history=self.history, best_epoch=best["epoch"] if best else None,
            best_val_miou=best["val_miou"] if best else None, classes=self.index.classes,
            bands=tuple(self.index.bands), epochs_run=max(0, self.config.epochs - self.start_epoch),
            seconds=seconds,
        )


def train(
    config: TrainConfig | Mapping[str, Any],
    index: PatchIndex,
    out_dir: str | os.PathLike[str],
    *,
    resume: bool = False,
    init_checkpoint: str | os.PathLike[str] | None = None,
    client: Any | None = None,
    progress: bool | None = None,
    overwrite: bool = False,
    cache_store: str | os.PathLike[str] | None = None,
) -> TrainResult:
    """Train a U-Net on ``index`` and write checkpoints and metrics to ``out_dir``.

    Every check (config, index, checkpoints, output folder) runs before the first step and
    before anything is written. Training is deterministic: the same config, index and thread
    count give the same weights, and a resumed run the same as an uninterrupted one.

    Args:
        config: the settings, a :class:`TrainConfig` (or a dict of its fields): model, optimiser,
            epochs, data path. Start from a preset (``clc_dask.presets.get_preset``) or from
            :func:`config_for_index` for a saved index; its data settings must match ``index``.
        index: the patch index (:func:`~clc_dask.patches.build_patch_index`, or
            :func:`~clc_dask.patches.load_patch_index` for a saved one).
        out_dir: the run folder; gets ``checkpoint.pt`` (after every epoch, to resume from),
            ``best.pt`` (the epoch of best validation mIoU, for inference), ``metrics.csv`` and
            ``metrics.json``. Created if missing.
        resume: continue the run in ``out_dir`` from its ``checkpoint.pt`` (default False). Set
            it after a kill or to add epochs: only ``epochs`` (and ``device``, ``num_workers``,
            ``prefetch``, ``data``) may differ, and the result equals an uninterrupted run.
            Without a checkpoint there, training starts from epoch 1.
        init_checkpoint: start from these weights instead of ``config.encoder_weights``
            (fine-tuning; default None). Bands, classes, encoder and decoder must match.
        client: a ``distributed.Client`` that computes the patches (default None: dask's threads
            in this process). Give one when the mosaics are large or remote.
        progress: a progress bar per epoch on stderr (default None: when stderr is a terminal).
        overwrite: replace a run already in ``out_dir`` (default False: refuse, so a finished run
            is never lost by accident).
        cache_store: the Zarr store of ``config.data == "zarr"`` (default None: ``patches.zarr``
            beside the saved index, else in ``out_dir``). Set it to keep the cache elsewhere,
            e.g. on a fast local disk.

    Returns:
        The files written, the per-epoch history and the best epoch.

    Raises:
        ConfigError: invalid settings, an index made for other settings, a resume with other
            settings.
        CheckpointError: a checkpoint for other bands or classes, or an unsafe one.
        OutputError: ``out_dir`` holds a run (without ``resume``/``overwrite``) or cannot be written.
    """
    trainer = Trainer(config, index, out_dir, resume=resume, init_checkpoint=init_checkpoint, client=client,
                      progress=progress, overwrite=overwrite, cache_store=cache_store)
    return trainer.fit()


def train_from_mosaics(
    config: TrainConfig | Mapping[str, Any],
    mosaics: Mapping[str, Source],
    labels: Source,
    out_dir: str | os.PathLike[str],
    *,
    clear_counts: Mapping[str, Source] | None = None,
    index_dir: str | os.PathLike[str] | None = None,
    client: Any | None = None,
    resume: bool = False,
    init_checkpoint: str | os.PathLike[str] | None = None,
    progress: bool | None = None,
    overwrite: bool = False,
    cache_store: str | os.PathLike[str] | None = None,
) -> TrainResult:
    """Build the config's patch index from mosaics and labels, save it, then :func:`train` on it.

    Args:
        config: the settings (see :func:`train`); its data settings (seasons, composite,
            patch size, level, split, thresholds) shape the index.
        mosaics: season → mosaic COG or Zarr store (or lazy DataArray); every season of
            ``config.seasons`` needs one, others are ignored.
        labels: the CLC code raster on the mosaics' grid.
        out_dir: the run folder (see :func:`train`).
        clear_counts: season → clear-count raster, to reject cloudy patches (default None:
            none; :func:`~clc_dask.patches.clear_counts_beside` finds the mosaic stage's).
        index_dir: where the index is saved (default None: ``out_dir/patches``); only when the
            inputs are files.
        client: a ``distributed.Client`` that computes the index and the patches (default None:
            threads in this process).
        resume: continue the run in ``out_dir`` (see :func:`train`).
        init_checkpoint: fine-tune from these weights (see :func:`train`).
        progress: progress bar (default None: when stderr is a terminal).
        overwrite: replace a run already in ``out_dir`` (default False).
        cache_store: Zarr store for ``config.data == "zarr"`` (default None: beside the index).

    Raises:
        ConfigError: a season without a mosaic, no usable patch, or as :func:`train`.
        GridMismatchError: labels on another grid than the mosaics.
        OutputError: as :func:`train`, before the index is computed.
    """
    config = make_train_config(config)
    check_out_dir(out_dir, resume=resume, overwrite=overwrite)
    index = index_for_config(config, mosaics, labels, clear_counts=clear_counts, client=client)
    if index.from_files:
        index.save(Path(index_dir) if index_dir else Path(out_dir) / "patches")
    return train(config, index, out_dir, resume=resume, init_checkpoint=init_checkpoint, client=client,
                 progress=progress, overwrite=overwrite, cache_store=cache_store)
