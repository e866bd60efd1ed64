"""U-Net models with ResNet encoders, and safe, self-describing checkpoints.

One factory (:func:`build_model`) wraps ``segmentation_models_pytorch``. A checkpoint holds
the weights *and* what is needed to use them correctly: band order, input normalisation,
the class table, and the config that trained it. Checkpoints are written atomically and
loaded with ``torch.load(weights_only=True)``: a file carrying pickled Python objects is
refused (CVE-2025-32434).
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from clc_dask.classes import ClassTable
from clc_dask.errors import CheckpointError, ConfigError
from clc_dask.items import composite_name
from clc_dask.stores import atomic_path

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "clc-dask-checkpoint"
CHECKPOINT_VERSION = 1
#: Encoders offered: small ones for CPUs, the paper's ResNet50/101 for GPUs.
ENCODERS = ("resnet18", "resnet34", "resnet50", "resnet101")
#: Channels of the U-Net decoder stages (deepest first) unless a model says otherwise.
DEFAULT_DECODER_CHANNELS = (256, 128, 64, 32, 16)
#: Sentinel-2 L2A reflectance = DN × 1e-4 (after harmonisation).
REFLECTANCE_SCALE = 1e-4


def build_model(encoder: str, in_channels: int, n_classes: int, encoder_weights: str | None = None,
                decoder_channels: Sequence[int] | None = None) -> nn.Module:
    """A U-Net with a ResNet encoder.

    Args:
        encoder: one of :data:`ENCODERS` (paper: resnet50, resnet101).
        in_channels: number of input bands (3 for RGB/NRG, 4 for all bands).
        n_classes: number of output classes (the class table's length).
        encoder_weights: ``"imagenet"`` to start from pretrained weights (needs internet the
            first time, then the Hugging Face cache), or None for random initialisation.
            When ImageNet weights cannot be reached the model falls back to None and says so.
        decoder_channels: channels of the five decoder stages, deepest first; None = the
            U-Net's usual :data:`DEFAULT_DECODER_CHANNELS`. Halving them (128…8) makes a
            ResNet18 U-Net about 1.6× faster on CPUs.
    """
    import segmentation_models_pytorch as smp

    if encoder not in ENCODERS:
        raise ConfigError(f"Unknown encoder {encoder!r}: choose one of {', '.join(ENCODERS)}.")
    if encoder_weights not in (None, "imagenet"):
        raise ConfigError(f"encoder_weights must be 'imagenet' or None, not {encoder_weights!r}.")
    decoder = check_decoder_channels(decoder_channels)
    try:
        model = smp.create_model("unet", encoder_name=encoder, encoder_weights=encoder_weights,
                                 in_channels=in_channels, classes=n_classes, decoder_channels=decoder)
    except Exception as exc:  # no network / no cache: huggingface_hub and urllib raise many types
        if encoder_weights is None:
            raise
        log.warning("ImageNet weights for %s could not be loaded (%s); using random initialisation "
                    "(encoder_weights=None).", encoder, type(exc).__name__)
        model = smp.create_model("unet", encoder_name=encoder, encoder_weights=None,
                                 in_channels=in_channels, classes=n_classes, decoder_channels=decoder)
        model.encoder_weights_used = None  # type: ignore[attr-defined]
        return model
    log.info("built U-Net/%s with encoder_weights=%s, %d input band(s), %d classes",
             encoder, encoder_weights, in_channels, n_classes)
    model.encoder_weights_used = encoder_weights  # type: ignore[attr-defined]
    return model


def check_decoder_channels(channels: Sequence[int] | None) -> tuple[int, ...]:
    """Decoder channels as a tuple of five positive integers (None → the default)."""
    if channels is None:
        return DEFAULT_DECODER_CHANNELS
    values = tuple(channels)
    if len(values) != len(DEFAULT_DECODER_CHANNELS) or not all(isinstance(c, int) and c > 0 for c in values):
        raise ConfigError(
            f"decoder_channels={list(values)} must be {len(DEFAULT_DECODER_CHANNELS)} positive integers, "
            f"deepest stage first (default {list(DEFAULT_DECODER_CHANNELS)})."
        )
    return values


#: Receptive fields are rounded up to a multiple of this (px): the U-Net's total stride.
RECEPTIVE_FIELD_MULTIPLE = 32


@functools.cache
def receptive_field(encoder: str) -> int:
    """Receptive field (px) of a U-Net with this ResNet encoder, rounded up to 32 px.

    The width of the input square that one output pixel can depend on: the encoder's convolutions
    and max-pooling along its main path (ResNet shortcuts are 1×1 and lie inside it), then the
    five decoder stages (two 3×3 convolutions each after a ×2 upsampling) and the 3×3 head,
    each adding ``(kernel - 1) × dilation × stride so far``. Rounding up covers the few pixels
    that the ×2 nearest upsampling shifts with the pixel's position modulo 32 (gradients measure
    563 px for ResNet18 against 561 px from the sum). The decoder's widths do not change it.

    Values: resnet18 576, resnet34 1056, resnet50 576, resnet101 1120 px (5.8, 10.6, 5.8 and
    11.2 km at 10 m). A test pixel whose nearest training pixel is farther than this shares no
    input with any training patch, whichever pixels of both the network looks at.

    Raises:
        ConfigError: unknown encoder.
    """
    from torch.nn import Conv2d, MaxPool2d

    model = build_model(encoder, 3, 2, encoder_weights=None, decoder_channels=(8, 8, 8, 8, 8))
    size, stride = 1, 1

    def add(layer: Conv2d | MaxPool2d) -> None:
        nonlocal size, stride
        kernel, step, dilation = (_first(getattr(layer, k)) for k in ("kernel_size", "stride", "dilation"))
        size += (kernel - 1) * dilation * stride
        stride *= step

    for name, layer in model.encoder.named_modules():
        if isinstance(layer, (Conv2d, MaxPool2d)) and "downsample" not in name:
            add(layer)
    for block in model.decoder.blocks:
        stride //= 2  # each decoder stage starts with a ×2 upsampling
        for layer in block.modules():
            if isinstance(layer, Conv2d):
                add(layer)
    for layer in model.segmentation_head.modules():
        if isinstance(layer, Conv2d):
            add(layer)
    return -(-size // RECEPTIVE_FIELD_MULTIPLE) * RECEPTIVE_FIELD_MULTIPLE


def _first(value: int | tuple[int, ...]) -> int:
    return int(value[0] if isinstance(value, tuple) else value)


@dataclass(frozen=True)
class Normalization:
    """Per-band input normalisation in reflectance units: ``(DN*scale - mean) / std``."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    scale: float = REFLECTANCE_SCALE

    def apply(self, dn: torch.Tensor) -> torch.Tensor:
        """uint16 DN (N, C, H, W) → float32 model input; no-data (0) stays 0 after scaling."""
        x = dn.to(torch.float32) * self.scale
        mean = torch.tensor(self.mean, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
        valid = (dn > 0).any(dim=1, keepdim=True)
        return torch.where(valid, (x - mean) / std, torch.zeros_like(x))

    def as_dict(self) -> dict[str, Any]:
        return {"mean": list(self.mean), "std": list(self.std), "scale": self.scale}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Normalization:
        return cls(tuple(float(v) for v in data["mean"]), tuple(float(v) for v in data["std"]),
                   float(data.get("scale", REFLECTANCE_SCALE)))


@dataclass
class Checkpoint:
    """Everything needed to use (or resume training of) a trained model."""

    encoder: str
    bands: tuple[str, ...]
    classes: ClassTable
    normalization: Normalization
    state_dict: dict[str, torch.Tensor]
    config: dict[str, Any] = field(default_factory=dict)
    epoch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    optimizer_state: dict[str, Any] | None = None
    rng_state: dict[str, Any] | None = None
    encoder_weights: str | None = None
    package_version: str = ""
    decoder_channels: tuple[int, ...] = DEFAULT_DECODER_CHANNELS

    @property
    def in_channels(self) -> int:
        return len(self.bands)

    def build_model(self, device: str | torch.device = "cpu") -> nn.Module:
        """The model with these weights, in eval mode on ``device``.

        Kept in the default (NCHW) layout: its outputs then do not depend on which windows share a
        batch, which the seamless, chunking-independent maps of ``predict`` rely on (channels-last
        kernels are faster for training but not batch-invariant on CPUs).
        """
        model = build_model(self.encoder, self.in_channels, len(self.classes), encoder_weights=None,
                            decoder_channels=self.decoder_channels)
        model.load_state_dict(self.state_dict)
        return model.to(device).eval()

    def check_compatible(self, bands: Sequence[str] | None = None, classes: ClassTable | None = None) -> None:
        """Raise :class:`CheckpointError` naming the mismatch if data and model disagree."""
        if bands is not None and tuple(bands) != self.bands:
            raise CheckpointError(
                f"The checkpoint was trained on bands {list(self.bands)} but the input has "
                f"{list(bands)}: make a mosaic with the same composite (e.g. `composite` "
                f"{composite_name(self.bands)}) or use a checkpoint trained on these bands."
            )
        if classes is not None and classes != self.classes:
            raise CheckpointError(
                f"The checkpoint predicts Level-{self.classes.level} classes {list(self.classes.codes)} "
                f"but Level-{classes.level} classes {list(classes.codes)} were asked for: "
                "use a checkpoint trained on these classes or change the class level/codes."
            )

    def to_payload(self) -> dict[str, Any]:
        from clc_dask import __version__

        return {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "package_version": self.package_version or __version__,
            "model": {"arch": "unet", "encoder": self.encoder, "in_channels": self.in_channels,
                      "n_classes": len(self.classes), "encoder_weights": self.encoder_weights,
                      "decoder_channels": list(self.decoder_channels)},
            "bands": list(self.bands),
            "classes": {"level": self.classes.level, "records": self.classes.as_records()},
            "normalization": self.normalization.as_dict(),
            "config": self.config,
            "epoch": self.epoch,
            "history": self.history,
            "state_dict": self.state_dict,
            "optimizer": self.optimizer_state,
            "rng": self.rng_state,
        }




def save_checkpoint(checkpoint: Checkpoint, path: str | os.PathLike[str]) -> Path:
    """Write a checkpoint atomically (temp file, fsync, rename): a kill never corrupts it."""
    path = Path(path)
    with atomic_path(path, suffix=".pt") as tmp:
        torch.save(checkpoint.to_payload(), tmp)
    log.info("saved checkpoint %s (epoch %d)", path, checkpoint.epoch)
    return path


def load_checkpoint(path: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> Checkpoint:
    """Read a checkpoint safely (``weights_only=True``); pickled payloads are refused."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"Checkpoint {path} does not exist: check `checkpoint`.")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        if "weights_only" in str(exc) or "Unsupported global" in str(exc) or "pickle" in str(exc).lower():
            raise CheckpointError(
                f"Refusing checkpoint {path}: it contains pickled Python objects, which could run "
                "arbitrary code when loaded. Re-save it with clc-dask (tensors and plain values only)."
            ) from None
        raise CheckpointError(f"Cannot read checkpoint {path}: {exc}. Is it a clc-dask .pt file?") from exc
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a clc-dask checkpoint (no '{CHECKPOINT_FORMAT}' header).")
    if payload.get("version", 0) > CHECKPOINT_VERSION:
        raise CheckpointError(f"{path} has checkpoint version {payload['version']}; upgrade clc-dask to read it.")
    cls = payload["classes"]
    return Checkpoint(
        encoder=payload["model"]["encoder"],
        bands=tuple(payload["bands"]),
        classes=ClassTable.from_records(int(cls["level"]), cls["records"]),
        normalization=Normalization.from_dict(payload["normalization"]),
        state_dict=payload["state_dict"],
        config=payload.get("config") or {},
        epoch=int(payload.get("epoch", 0)),
        history=list(payload.get("history") or []),
        optimizer_state=payload.get("optimizer"),
        rng_state=payload.get("rng"),
        encoder_weights=payload["model"].get("encoder_weights"),
        package_version=str(payload.get("package_version", "")),
        decoder_channels=tuple(int(c) for c in payload["model"].get("decoder_channels")
                               or DEFAULT_DECODER_CHANNELS),
    )


def band_statistics(samples: np.ndarray, scale: float = REFLECTANCE_SCALE) -> Normalization:
    """Per-band mean/std (reflectance) of valid (non-zero) pixels of a (N, C, H, W) or (C, H, W) array."""
    arr = np.asarray(samples)
    if arr.ndim == 3:
        arr = arr[None]
    valid = (arr > 0).any(axis=1)
    means, stds = [], []
    for band in range(arr.shape[1]):
        values = arr[:, band][valid].astype(np.float64) * scale
        if values.size == 0:
            raise ConfigError("No valid (non-zero) pixels to compute band statistics from.")
        means.append(float(values.mean()))
        stds.append(float(max(values.std(), 1e-6)))
    return Normalization(tuple(means), tuple(stds), scale)
