"""Training: a U-Net/ResNet on a patch index, with exact resume after a kill.

:func:`train` runs Adam on the patches of a :class:`~clc_dask.patches.PatchIndex` (streamed from
the Dask cluster or read from a Zarr cache; both give the same batches), evaluates per-class IoU
on the validation split, and after every epoch writes ``metrics.csv``/``metrics.json``, the
``best.pt`` checkpoint (by validation mIoU) and ``checkpoint.pt`` (atomically, last).

Everything random depends only on ``(seed, epoch)``: the model initialisation on the seed, the
sample order on :func:`~clc_dask.patches.epoch_order`, the augmentations on a generator seeded
per epoch. The checkpoint also carries the optimizer state and the RNG states of torch, numpy and
Python, so ``train(..., resume=True)`` after a kill gives the same losses as an uninterrupted run
(to 1e-6 on CPU with the same thread count).
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import os
import random
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from torch import nn

from clc_dask.classes import IGNORE_INDEX, ClassTable
from clc_dask.config import SEASONS
from clc_dask.errors import ConfigError, OutputError
from clc_dask.items import composite_bands, composite_name
from clc_dask.model import (
    ENCODERS,
    Checkpoint,
    build_model,
    check_decoder_channels,
    load_checkpoint,
    save_checkpoint,
)
from clc_dask.patches import (
    CACHE_STORE,
    DaskPatchStream,
    PatchIndex,
    Source,
    ZarrPatchDataset,
    build_patch_index,
    cache_patches,
    patch_loader,
)
from clc_dask.rasters import atomic_path, check_writable

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.pt"
BEST_FILE = "best.pt"
METRICS_CSV = "metrics.csv"
METRICS_JSON = "metrics.json"
#: A Zarr patch cache up to this size (bytes, uncompressed) is read into memory once when
#: training with ``num_workers=0``, instead of once per sample and epoch.
PRELOAD_MAX_BYTES = 2 * 1024**3
#: Settings that may change when resuming (they do not change the numbers, or only extend the run).
RESUMABLE_CHANGES = frozenset({"epochs", "device", "num_workers", "prefetch", "data", "name"})


class TrainConfig(BaseModel):
    """How to train one model (the paper's Table 2 rows are presets of this; see ``clc_dask.presets``).

    Data settings (``seasons``, ``composite``, ``patch_size``, ``level``, split and rejection
    thresholds) are used when the patch index is built from mosaics, and checked against a
    given index.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str | None = Field(None, description="preset name this config came from (provenance only)")
    encoder: str = Field("resnet34", description="resnet18/34 (CPU) or resnet50/101 (paper)")
    decoder_channels: tuple[int, ...] | None = Field(
        None, description="U-Net decoder channels, deepest stage first (None: 256,128,64,32,16)")
    encoder_weights: Literal["imagenet"] | None = Field(
        None, description="'imagenet' to start from pretrained weights (falls back to None offline)")
    composite: str = Field("nrg", description="rgb, nrg, all, or a comma list of bands")
    seasons: tuple[str, ...] = Field(("september",), description="seasons giving separate samples")
    patch_size: int = Field(256, description="patch edge in px (multiple of 32; paper 128/256)")
    level: Literal[1, 2, 3] = Field(2, description="CLC level of the classes")
    val_fraction: float = Field(0.25, gt=0, lt=1, description="validation share (paper ≈ 0.25)")
    split_block: int = Field(4, ge=1, description="split block edge in patches")
    guard: int = Field(0, ge=0, description="training patches dropped around validation, in patches")
    max_nodata_fraction: float = Field(0.5, ge=0, le=1)
    max_cloud_fraction: float = Field(0.5, ge=0, le=1)
    max_unlabelled_fraction: float = Field(0.5, ge=0, le=1)
    epochs: int = Field(100, ge=1)
    patches_per_epoch: int | None = Field(
        None, ge=1, description="train on this many patches per epoch (a new seeded subset each "
        "epoch) instead of all; for time-boxed CPU runs")
    batch_size: int = Field(8, ge=1)
    lr: float = Field(1e-4, gt=0, description="Adam learning rate")
    lr_schedule: Literal["constant", "cosine"] = Field(
        "constant", description="constant (paper), or cosine decay to 0 over all steps (short runs)")
    weight_decay: float = Field(0.0, ge=0)
    loss: Literal["ce", "ce+dice"] = Field("ce", description="cross-entropy (ignore 255), optionally + Dice")
    class_weights: Literal["none", "inverse-frequency", "inverse-sqrt-frequency"] = Field(
        "none", description="cross-entropy weight per class from its training pixels: 1/n, or the "
        "milder 1/√n (lifts rare classes without drowning the common ones); mean 1 over classes")
    augment: bool = Field(True, description="random flips and 90° rotations, same for image and labels")
    seed: int = Field(0, ge=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: Literal["auto", "bf16", "fp16", "off"] = Field(
        "auto", description="mixed precision: auto = on CUDA only (bf16 where supported, else fp16); "
        "bf16 = bfloat16 autocast on CUDA or on CPUs with native bf16 (AVX512-BF16/AMX)")
    num_workers: int = Field(0, ge=0, description="DataLoader workers (Zarr cache only)")
    prefetch: int = Field(16, ge=1, description="patches computed ahead of the model (stream)")
    data: Literal["stream", "zarr"] = Field("stream", description="stream from Dask, or cache to Zarr first")
    val_every: int = Field(1, ge=1, description="validate every N epochs (and after the last)")

    @field_validator("encoder")
    @classmethod
    def _known_encoder(cls, value: str) -> str:
        if value not in ENCODERS:
            raise ValueError(f"unknown encoder {value!r}: choose one of {', '.join(ENCODERS)}")
        return value

    @field_validator("decoder_channels")
    @classmethod
    def _five_stages(cls, value: tuple[int, ...] | None) -> tuple[int, ...] | None:
        if value is None:
            return None
        try:
            return check_decoder_channels(value)
        except ConfigError as exc:
            raise ValueError(str(exc).rstrip(".")) from None

    @field_validator("patch_size")
    @classmethod
    def _multiple_of_32(cls, value: int) -> int:
        if value < 32 or value % 32:
            raise ValueError(f"patch_size {value} must be a positive multiple of 32 (paper: 128 or 256)")
        return value

    @field_validator("seasons")
    @classmethod
    def _known_seasons(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError("give at least one season")
        unknown = [s for s in value if s not in SEASONS]
        if unknown or len(set(value)) != len(value):
            raise ValueError(f"seasons {list(value)} must be distinct names from {list(SEASONS)}")
        return tuple(value)

    @field_validator("composite")
    @classmethod
    def _known_composite(cls, value: str) -> str:
        composite_bands(value)
        return value

    @property
    def bands(self) -> tuple[str, ...]:
        """Band order of :attr:`composite`."""
        return composite_bands(self.composite)


def make_train_config(base: TrainConfig | Mapping[str, Any] | None = None, **overrides: Any) -> TrainConfig:
    """A validated :class:`TrainConfig` from a base (config or dict) and overrides (None = keep).

    Raises:
        ConfigError: naming each invalid field.
    """
    values: dict[str, Any] = {}
    if isinstance(base, TrainConfig):
        values.update(base.model_dump())
    elif base is not None:
        values.update(base)
    values.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return TrainConfig.model_validate(values)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc']) or 'config'}: {err['msg']}"
                             for err in exc.errors())
        raise ConfigError(f"Invalid training settings — {problems}.") from None


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


# --------------------------------------------------------------------------- preparing data


def index_for_config(
    config: TrainConfig,
    mosaics: Mapping[str, Source],
    labels: Source,
    *,
    clear_counts: Mapping[str, Source] | None = None,
    client: Any | None = None,
) -> PatchIndex:
    """Build the patch index the config asks for (its seasons, bands, patch size, split, thresholds).

    Raises:
        ConfigError: a season of the config has no mosaic, or no patch is usable.
        GridMismatchError: the label raster is on another grid.
    """
    missing = [s for s in config.seasons if s not in mosaics or not mosaics[s]]
    if missing:
        raise ConfigError(
            f"Season(s) {missing} have no mosaic, but {config.name or 'this config'} trains on "
            f"{list(config.seasons)} (mosaics given: {sorted(mosaics) or 'none'}): pass "
            + " ".join(f"--mosaic {s}=PATH" for s in missing)
            + " or choose a preset for the seasons you have."
        )
    extra = sorted(set(mosaics) - set(config.seasons))
    if extra:
        log.info("not using mosaic(s) of %s: the config trains on %s", extra, list(config.seasons))
    return build_patch_index(
        {s: mosaics[s] for s in config.seasons}, labels, patch_size=config.patch_size, bands=config.bands,
        level=config.level, val_fraction=config.val_fraction, split_block=config.split_block,
        guard=config.guard, seed=config.seed, max_nodata_fraction=config.max_nodata_fraction,
        max_cloud_fraction=config.max_cloud_fraction, max_unlabelled_fraction=config.max_unlabelled_fraction,
        clear_counts={s: p for s, p in (clear_counts or {}).items() if s in config.seasons}, client=client,
    )


def config_for_index(index: PatchIndex, base: TrainConfig | None = None, **overrides: Any) -> TrainConfig:
    """A config whose data settings are those of ``index`` (for training on a saved index)."""
    data = {
        "seasons": tuple(index.seasons), "composite": composite_name(index.bands),
        "patch_size": index.patch_size, "level": index.classes.level,
    }
    data.update({k: index.settings[k] for k in ("val_fraction", "split_block", "guard",
                                                "max_nodata_fraction", "max_cloud_fraction",
                                                "max_unlabelled_fraction") if k in index.settings})
    return make_train_config(base, **data, **overrides)


def check_index(config: TrainConfig, index: PatchIndex) -> None:
    """Raise :class:`ConfigError` if the index was not made for this config's seasons, bands or size."""
    problems = []
    if set(index.seasons) != set(config.seasons):
        problems.append(f"seasons {list(index.seasons)} (config: {list(config.seasons)})")
    if tuple(index.bands) != config.bands:
        problems.append(f"bands {list(index.bands)} (config: {list(config.bands)})")
    if index.patch_size != config.patch_size:
        problems.append(f"patch size {index.patch_size} px (config: {config.patch_size} px)")
    if index.classes.level != config.level:
        problems.append(f"Level-{index.classes.level} classes (config: Level {config.level})")
    if problems:
        raise ConfigError(
            f"The patch index has {', '.join(problems)}: rebuild it with clc-dask patches for "
            f"{config.name or 'this config'}, or train on it without --preset."
        )


# --------------------------------------------------------------------------- helpers


def check_out_dir(out_dir: str | os.PathLike[str], *, resume: bool = False, overwrite: bool = False) -> Path:
    """Refuse to start over a run already in ``out_dir`` unless resuming or overwriting, and
    check that ``out_dir`` can be written (nothing is created here)."""
    out_dir = Path(out_dir)
    if (out_dir / CHECKPOINT_FILE).exists() and not (resume or overwrite):
        raise OutputError(
            f"{out_dir} already holds a training run ({CHECKPOINT_FILE}): pass --resume to continue it, "
            "--overwrite to replace it, or choose another --out."
        )
    existing = out_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        raise OutputError(f"Cannot write the run folder {out_dir} ({existing} is not a writable folder): "
                          "choose another --out.")
    return out_dir


def _device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' was asked for but no CUDA GPU is visible: use --device cpu or auto.")
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(choice)


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX); else bf16 is emulated (slow)."""
    cpu = getattr(torch, "cpu", None)
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(cpu, name, lambda: False)()) for name in checks)


def _amp_dtype(config: TrainConfig, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of training on ``device`` (None = float32)."""
    if config.amp == "off":
        return None
    if device.type == "cpu":
        if config.amp == "bf16" and cpu_has_bf16():
            return torch.bfloat16
        if config.amp == "bf16":
            log.warning("amp=bf16: this CPU has no native bfloat16 (AVX512-BF16/AMX), where it would be "
                        "slower than float32: training in float32.")
        elif config.amp == "fp16":
            log.warning("amp=fp16 is for CUDA devices: training on the CPU in float32.")
        return None
    if config.amp == "fp16" or (config.amp == "auto" and not torch.cuda.is_bf16_supported()):
        return torch.float16
    return torch.bfloat16


def _set_lr(optimizer: torch.optim.Optimizer, config: TrainConfig, step: int, total: int) -> None:
    """Learning rate of a global step: a pure function of the step, so resuming needs no scheduler state."""
    lr = config.lr
    if config.lr_schedule == "cosine":
        lr = 0.5 * config.lr * (1.0 + math.cos(math.pi * min(step, total) / max(1, total)))
    for group in optimizer.param_groups:
        group["lr"] = lr


def _epoch_seed(seed: int, epoch: int) -> int:
    return int(np.random.SeedSequence([int(seed), int(epoch), 0xA06]).generate_state(1, np.uint64)[0] >> 1)


def augment(x: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random 90° rotation and horizontal flip per sample, identical for image (N,C,H,W) and labels (N,H,W)."""
    ops = torch.randint(0, 8, (x.shape[0],), generator=generator)
    xs, ys = [], []
    for xi, yi, op in zip(x, y, ops.tolist(), strict=True):
        k, flip = op % 4, op >= 4
        xi, yi = torch.rot90(xi, k, dims=(1, 2)), torch.rot90(yi, k, dims=(0, 1))
        if flip:
            xi, yi = torch.flip(xi, dims=(2,)), torch.flip(yi, dims=(1,))
        xs.append(xi)
        ys.append(yi)
    return torch.stack(xs), torch.stack(ys)


def _class_weights(index: PatchIndex, power: float = 1.0) -> torch.Tensor:
    """Inverse pixel frequency (to ``power``) of each class in the training split, mean 1 over
    present classes; absent classes get 0."""
    stats = index.class_statistics()
    counts = stats["train_pixels"].to_numpy(dtype=np.float64)
    weights = np.where(counts > 0, (counts.sum() / np.maximum(counts, 1)) ** power, 0.0)
    present = weights > 0
    weights[present] /= weights[present].mean()
    return torch.tensor(weights, dtype=torch.float32)


class _Loss(nn.Module):
    def __init__(self, loss: str, weights: torch.Tensor | None) -> None:
        super().__init__()
        self.ce = nn.CrossEntropyLoss(weight=weights, ignore_index=IGNORE_INDEX)
        self.dice: nn.Module | None = None
        if loss == "ce+dice":
            import segmentation_models_pytorch as smp

            self.dice = smp.losses.DiceLoss("multiclass", ignore_index=IGNORE_INDEX)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = self.ce(logits, target)
        if self.dice is not None:
            loss = loss + self.dice(logits, target)
        return loss


def _rng_state(epoch: int) -> dict[str, Any]:
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": str(np_state[0]), "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "data_epoch": int(epoch),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _restore_rng(state: Mapping[str, Any] | None) -> None:
    if not state:
        return
    torch.set_rng_state(state["torch"].cpu())
    npst = state["numpy"]
    np.random.set_state((npst["kind"], npst["keys"].numpy().astype(np.uint32), npst["pos"],
                         npst["has_gauss"], npst["gauss"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@contextlib.contextmanager
def _deterministic(device: torch.device) -> Iterator[None]:
    """Deterministic kernels on CPU for the duration of training (restored afterwards).

    Filling fresh memory (a debugging aid of deterministic mode) is switched off: it costs
    10–15 % of a CPU step and no kernel used here reads uninitialised memory.
    """
    import torch.utils.deterministic as tud

    previous = torch.are_deterministic_algorithms_enabled()
    previous_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    previous_fill = tud.fill_uninitialized_memory
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)
        tud.fill_uninitialized_memory = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous, warn_only=previous_warn)
        tud.fill_uninitialized_memory = previous_fill


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _write_metrics(out_dir: Path, history: Sequence[Mapping[str, Any]], codes: Sequence[int],
                   summary: Mapping[str, Any]) -> None:
    columns = ["epoch", "train_loss", "val_loss", "val_miou", "val_overall_accuracy",
               *[f"iou_{c}" for c in codes], "lr", "train_patches", "train_batches", "seconds"]
    with atomic_path(out_dir / METRICS_CSV, suffix=".csv") as tmp:
        with open(tmp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
            writer.writeheader()
            for row in history:
                writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in columns})
    doc = dict(summary)
    doc["history"] = [{k: _clean(v) for k, v in row.items()} for row in history]
    with atomic_path(out_dir / METRICS_JSON, suffix=".json") as tmp:
        tmp.write_text(json.dumps(doc, indent=2))


def _validate(model: nn.Module, loader: Any, n_classes: int, device: torch.device,
              amp: torch.dtype | None) -> tuple[float | None, np.ndarray]:
    """Validation cross-entropy per labelled pixel and the (n, n) confusion matrix (rows = reference)."""
    model.eval()
    cm = torch.zeros(n_classes * n_classes, dtype=torch.int64)
    loss_sum, pixels = 0.0, 0
    with torch.no_grad():
        for xb, yb in loader:
            xb = xb.to(device, memory_format=torch.channels_last)
            yb = yb.to(device).long()
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                logits = model(xb)
            logits = logits.float()
            loss_sum += float(nn.functional.cross_entropy(logits, yb, ignore_index=IGNORE_INDEX,
                                                          reduction="sum"))
            valid = yb != IGNORE_INDEX
            pixels += int(valid.sum())
            pred = logits.argmax(dim=1)
            cm += torch.bincount((yb[valid] * n_classes + pred[valid]).cpu(),
                                 minlength=n_classes * n_classes)
    return (loss_sum / pixels if pixels else None), cm.reshape(n_classes, n_classes).numpy()


def _val_record(loss: float | None, cm: np.ndarray, codes: Sequence[int]) -> dict[str, Any]:
    from clc_dask.evaluate import metrics_from_confusion

    metrics = metrics_from_confusion(cm, codes)
    record: dict[str, Any] = {"val_loss": loss, "val_miou": metrics["mean_iou"],
                              "val_overall_accuracy": metrics["overall_accuracy"]}
    for code in codes:
        record[f"iou_{code}"] = metrics["iou"][str(code)]
    return record


def _check_resume(saved: Mapping[str, Any], config: TrainConfig, fingerprint: str, path: Path) -> None:
    old = {k: v for k, v in saved.items() if k != "patch_index"}
    new = config.model_dump(mode="json")
    changed = sorted(k for k in set(old) | set(new) if k not in RESUMABLE_CHANGES and old.get(k) != new.get(k))
    if changed:
        detail = ", ".join(f"{k}={old.get(k)!r} → {new.get(k)!r}" for k in changed)
        raise ConfigError(
            f"Cannot resume {path}: it was trained with other settings ({detail}). Resume with the "
            "same settings (only --epochs may grow), or train into a new --out."
        )
    saved_fp = (saved.get("patch_index") or {}).get("fingerprint")
    if saved_fp and saved_fp != fingerprint:
        raise ConfigError(
            f"Cannot resume {path}: it was trained on another patch index (other samples, split or "
            "sources). Resume with the same index, or train into a new --out."
        )


# --------------------------------------------------------------------------- training


def _datasets(config: TrainConfig, index: PatchIndex, out_dir: Path, client: Any | None,
              cache_store: Path | None) -> tuple[Any, Any]:
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


def train(
    config: TrainConfig,
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

    Every check (config, index, checkpoints, output folder) runs before the first step.

    Args:
        config: the settings (see :class:`TrainConfig` and ``clc_dask.presets``).
        index: the patch index (:func:`~clc_dask.patches.build_patch_index` or a saved one).
        out_dir: gets ``checkpoint.pt`` (every epoch), ``best.pt`` (best validation mIoU),
            ``metrics.csv`` and ``metrics.json``.
        resume: continue from ``out_dir/checkpoint.pt`` if it exists (same settings; ``epochs``
            may grow). The result equals an uninterrupted run.
        init_checkpoint: start from these weights (fine-tuning); bands, classes and encoder
            must match.
        client: a ``distributed.Client`` to stream patches from; None = local threads.
        progress: show a progress bar (default: when stderr is a terminal).
        overwrite: replace an existing run in ``out_dir`` instead of refusing.
        cache_store: Zarr store for ``config.data == "zarr"`` (default: beside the index).

    Raises:
        ConfigError, CheckpointError, OutputError: before training starts.
    """
    started = time.perf_counter()
    config = make_train_config(config)
    out_dir = Path(out_dir)
    check_index(config, index)
    checkpoint_path, best_path = out_dir / CHECKPOINT_FILE, out_dir / BEST_FILE
    fingerprint = index.fingerprint()
    state: Checkpoint | None = None
    if resume and checkpoint_path.exists():
        state = load_checkpoint(checkpoint_path)
        state.check_compatible(index.bands, index.classes)
        _check_resume(state.config, config, fingerprint, checkpoint_path)
    elif resume:
        log.info("no checkpoint in %s yet: starting from epoch 1", out_dir)
    check_out_dir(out_dir, resume=True if state is not None else resume, overwrite=overwrite)
    decoder_channels = check_decoder_channels(config.decoder_channels)
    init: Checkpoint | None = None
    if init_checkpoint is not None and state is None:
        init = load_checkpoint(init_checkpoint)
        init.check_compatible(index.bands, index.classes)
        if init.encoder != config.encoder:
            raise ConfigError(
                f"The checkpoint {init_checkpoint} has a {init.encoder} encoder but the config asks for "
                f"{config.encoder}: pass --encoder {init.encoder} to fine-tune it."
            )
        if init.decoder_channels != decoder_channels:
            raise ConfigError(
                f"The checkpoint {init_checkpoint} has decoder channels {list(init.decoder_channels)} but "
                f"the config asks for {list(decoder_channels)}: fine-tune it with the same decoder_channels."
            )
    check_writable(out_dir / METRICS_CSV)
    device = _device(config.device)
    amp = _amp_dtype(config, device)
    train_ds, val_ds = _datasets(config, index, out_dir, client,
                                 Path(cache_store) if cache_store else None)
    codes = list(index.classes.codes)
    n_classes = len(codes)
    show = sys.stderr.isatty() if progress is None else progress

    with _deterministic(device):
        torch.manual_seed(config.seed)
        np.random.seed(config.seed % 2**32)
        random.seed(config.seed)
        # weights come from a checkpoint when resuming or fine-tuning: no ImageNet download then
        model = build_model(config.encoder, len(index.bands), n_classes,
                            None if (state or init) else config.encoder_weights,
                            decoder_channels=decoder_channels)
        weights_used = getattr(model, "encoder_weights_used", config.encoder_weights)
        if init is not None:
            weights_used = init.encoder_weights
        if init is not None:
            model.load_state_dict(init.state_dict)
            log.info("starting from the weights of %s", init_checkpoint)
        model.to(device, memory_format=torch.channels_last)  # NHWC: faster convolutions (CPU and GPU)
        power = {"inverse-frequency": 1.0, "inverse-sqrt-frequency": 0.5}.get(config.class_weights)
        weights = _class_weights(index, power).to(device) if power else None
        criterion = _Loss(config.loss, weights).to(device)
        optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
        history: list[dict[str, Any]] = []
        start_epoch = 0
        if state is not None:
            model.load_state_dict(state.state_dict)
            opt_state = state.optimizer_state or {}
            optimizer.load_state_dict(opt_state["adam"])
            if opt_state.get("scaler"):
                scaler.load_state_dict(opt_state["scaler"])
            _restore_rng(state.rng_state)
            start_epoch = state.epoch
            history = [dict(h) for h in state.history[:start_epoch]]
            weights_used = state.encoder_weights
            log.info("resuming %s after epoch %d", checkpoint_path, start_epoch)
        validated = [h for h in history if h.get("val_miou") is not None]
        best = max(validated, key=lambda h: h["val_miou"]) if validated else None
        saved_config = {**config.model_dump(mode="json"),
                        "patch_index": {"fingerprint": fingerprint,
                                        "directory": str(index.directory) if index.directory else None,
                                        "counts": index.counts()}}

        def summary() -> dict[str, Any]:
            return {"config": saved_config, "bands": list(index.bands), "classes": index.classes.as_records(),
                    "level": index.classes.level, "encoder_weights": weights_used,
                    "best_epoch": best["epoch"] if best else None,
                    "best_val_miou": best["val_miou"] if best else None}

        def checkpoint(epoch: int, with_optimizer: bool = True) -> Checkpoint:
            return Checkpoint(
                encoder=config.encoder, bands=tuple(index.bands), classes=index.classes,
                normalization=index.normalization,
                state_dict={k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
                config=saved_config, epoch=epoch, history=[dict(h) for h in history],
                optimizer_state={"adam": optimizer.state_dict(),
                                 "scaler": scaler.state_dict() if scaler.is_enabled() else None}
                if with_optimizer else None,
                rng_state=_rng_state(epoch) if with_optimizer else None, encoder_weights=weights_used,
                decoder_channels=decoder_channels,
            )

        log.info("training %s U-Net/%s on %s: %d train / %d val patches, %d classes, epochs %d→%d, device %s",
                 config.name or "custom", config.encoder, composite_name(index.bands), len(train_ds),
                 len(val_ds), n_classes, start_epoch + 1, config.epochs, device)
        for epoch in range(start_epoch, config.epochs):
            t0 = time.perf_counter()
            generator = torch.Generator().manual_seed(_epoch_seed(config.seed, epoch))
            model.train()
            loss_sum, batches, patches = 0.0, 0, 0
            loader = patch_loader(train_ds, config.batch_size, epoch, config.num_workers)
            bar = _progress(loader, show, f"epoch {epoch + 1}/{config.epochs}")
            steps_per_epoch = math.ceil(len(train_ds) / config.batch_size)
            for step, (xb, yb) in enumerate(bar):
                if xb.shape[0] == 1 and len(train_ds) > 1:
                    continue  # a lone last sample breaks batch norm at the 1×1 bottleneck
                _set_lr(optimizer, config, epoch * steps_per_epoch + step, config.epochs * steps_per_epoch)
                if config.augment:
                    xb, yb = augment(xb, yb, generator)
                xb = xb.to(device, non_blocking=True, memory_format=torch.channels_last)
                yb = yb.to(device, non_blocking=True).long()
                optimizer.zero_grad(set_to_none=True)
                with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                    loss = criterion(model(xb), yb)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                loss_sum += float(loss.detach())
                batches += 1
                patches += int(xb.shape[0])
                if show:
                    bar.set_postfix(loss=f"{loss_sum / batches:.4f}")
            record: dict[str, Any] = {"epoch": epoch + 1, "train_loss": loss_sum / max(1, batches),
                                      "lr": optimizer.param_groups[0]["lr"], "train_patches": patches,
                                      "train_batches": batches}
            if (epoch + 1) % config.val_every == 0 or epoch + 1 == config.epochs:
                val_loss, cm = _validate(model, patch_loader(val_ds, config.batch_size, 0, config.num_workers),
                                         n_classes, device, amp)
                record.update(_val_record(val_loss, cm, codes))
            record["seconds"] = time.perf_counter() - t0
            history.append(record)
            improved = record.get("val_miou") is not None and (best is None or record["val_miou"] > best["val_miou"])
            if improved:
                best = record
            _write_metrics(out_dir, history, codes, summary())
            if improved:
                save_checkpoint(checkpoint(epoch + 1, with_optimizer=False), best_path)
            save_checkpoint(checkpoint(epoch + 1), checkpoint_path)
            log.info("epoch %d/%d: train loss %.4f, val loss %s, val mIoU %s (%.1f s)", epoch + 1,
                     config.epochs, record["train_loss"], _fmt(record.get("val_loss")),
                     _fmt(record.get("val_miou")), record["seconds"])
        if not checkpoint_path.exists():  # nothing to run (resumed a finished run without a file)
            save_checkpoint(checkpoint(start_epoch), checkpoint_path)
            _write_metrics(out_dir, history, codes, summary())

    return TrainResult(
        out_dir=out_dir, checkpoint=checkpoint_path, best_checkpoint=best_path if best_path.exists() else None,
        metrics_csv=out_dir / METRICS_CSV, metrics_json=out_dir / METRICS_JSON, history=history,
        best_epoch=best["epoch"] if best else None, best_val_miou=best["val_miou"] if best else None,
        classes=index.classes, bands=tuple(index.bands), epochs_run=max(0, config.epochs - start_epoch),
        seconds=time.perf_counter() - started,
    )


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _progress(loader: Any, show: bool, desc: str) -> Any:
    from tqdm.auto import tqdm

    return tqdm(loader, desc=desc, disable=not show, leave=False, unit="batch", file=sys.stderr)


def train_from_mosaics(
    config: TrainConfig,
    mosaics: Mapping[str, Source],
    labels: Source,
    out_dir: str | os.PathLike[str],
    *,
    clear_counts: Mapping[str, Source] | None = None,
    index_dir: str | os.PathLike[str] | None = None,
    client: Any | None = None,
    **kwargs: Any,
) -> TrainResult:
    """Build the config's patch index from mosaics (saved to ``index_dir``, default ``out_dir/patches``),
    then :func:`train` on it. ``kwargs`` go to :func:`train`."""
    config = make_train_config(config)
    index = index_for_config(config, mosaics, labels, clear_counts=clear_counts, client=client)
    if all(isinstance(p, (str, os.PathLike)) for p in (*mosaics.values(), labels)):
        index.save(Path(index_dir) if index_dir else Path(out_dir) / "patches")
    return train(config, index, out_dir, client=client, **kwargs)


def train_demo(
    mosaics: Mapping[str, Source],
    labels: Source,
    out_dir: str | os.PathLike[str],
    *,
    preset: str = "cpu-demo",
    client: Any | None = None,
    clear_counts: Mapping[str, Source] | None = None,
    progress: bool | None = None,
    epochs: int | None = None,
) -> TrainResult:
    """The demo's training stage: patch index in ``out_dir/patches``, model in ``out_dir/train``.

    Re-running on the same folder continues (or returns) the earlier run instead of starting over.

    Args:
        mosaics: season → mosaic COG (e.g. ``{"september": "mosaic_september.tif"}``).
        labels: the CLC label raster on the same grid.
        out_dir: working folder of the demo's training stage.
        preset: a preset name (``clc_dask.presets``); ``cpu-demo`` fits 2 CPU cores.
        client: a ``distributed.Client`` that computes the patch index and the patches; None =
            dask's threaded scheduler in this process. ``cpu-demo`` caches the patches to Zarr
            once (on the cluster) and trains from the cache, so a LocalCluster on the same cores
            never competes with the model step (streaming from it would: see
            ``benchmarks/bench_patch_stream.py``).
        clear_counts: optional season → clear-count raster.
        progress: progress bar (default: when stderr is a terminal).
        epochs: override the preset's number of epochs (e.g. a quick look).
    """
    from clc_dask.presets import get_preset

    config = get_preset(preset, epochs=epochs)
    out_dir = Path(out_dir)
    return train_from_mosaics(config, mosaics, labels, out_dir / "train", clear_counts=clear_counts,
                              index_dir=out_dir / "patches", client=client, resume=True, progress=progress)
