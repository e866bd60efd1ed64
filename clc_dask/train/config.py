"""How to train one model: :class:`TrainConfig`, validated, and its agreement with a patch index."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from clc_dask.errors import ConfigError
from clc_dask.items import composite_bands, composite_name
from clc_dask.model import ENCODERS, check_decoder_channels, receptive_field
from clc_dask.patches import PatchIndex, guard_patches
from clc_dask.seasons import SEASONS

log = logging.getLogger(__name__)


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
    guard: int | Literal["auto"] = Field(
        "auto", description="training patches dropped around validation, in patches; auto = the "
        "encoder's receptive field (no validation pixel within reach of a training patch)")
    val_side: Literal["north", "south", "east", "west", "blocks"] = Field(
        "south", description="validation as a strip along this side of the area (one guard band), "
        "or blocks: seeded split blocks (a guard band around each)")
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

    @field_validator("guard")
    @classmethod
    def _guard_width(cls, value: int | str) -> int | str:
        if value != "auto" and (not isinstance(value, int) or value < 0):
            raise ValueError(f"guard {value!r} must be ≥ 0 patches or auto (the encoder's receptive field)")
        return value

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

    @property
    def guard_patches(self) -> int:
        """The guard band in patches: :attr:`guard`, or for ``auto`` the encoder's receptive
        field (:func:`clc_dask.model.receptive_field`) in whole patches."""
        if self.guard == "auto":
            return guard_patches(receptive_field(self.encoder), self.patch_size)
        return int(self.guard)

    @property
    def split_side(self) -> str | None:
        """:attr:`val_side` as :func:`~clc_dask.patches.build_patch_index` takes it (None = blocks)."""
        return None if self.val_side == "blocks" else self.val_side


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
        problems = "; ".join(_field_problem(err["loc"], err["msg"]) for err in exc.errors())
        raise ConfigError(f"Invalid training settings — {problems}.") from None


def _field_problem(loc: tuple[Any, ...], message: str) -> str:
    """``"`lr`: Input should be greater than 0"``: the field (a parameter name) in backticks."""
    name = str(loc[0]) if loc else "config"
    where = ".".join(str(p) for p in loc[1:])
    return f"`{name}`{f'[{where}]' if where else ''}: {message}"


def config_for_index(index: PatchIndex, base: TrainConfig | None = None, **overrides: Any) -> TrainConfig:
    """A config whose data settings are those of ``index`` (for training on a saved index)."""
    data = {
        "seasons": tuple(index.seasons), "composite": composite_name(index.bands),
        "patch_size": index.patch_size, "level": index.classes.level,
    }
    data.update({k: index.settings[k] for k in ("val_fraction", "split_block", "guard",
                                                "max_nodata_fraction", "max_cloud_fraction",
                                                "max_unlabelled_fraction") if k in index.settings})
    data["val_side"] = index.settings.get("val_side") or "blocks"
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
    guard_px = int(index.settings.get("guard", 0)) * index.patch_size
    reach = receptive_field(config.encoder)
    # a given split (an experiment's) brings its own guard bands, checked where it was made
    block_split = index.settings.get("split", "blocks") == "blocks"
    if not problems and block_split and guard_px < reach:
        log.warning("the patch index's guard band (%d px) is narrower than the receptive field of %s (%d px): "
                    "validation pixels can see training patches, so validation scores are optimistic; "
                    "rebuild the index with guard %d (patches of %d px) for an honest validation",
                    guard_px, config.encoder, reach, guard_patches(reach, index.patch_size), index.patch_size)
    if problems:
        raise ConfigError(
            f"The patch index has {', '.join(problems)}: rebuild it with the data settings of "
            f"{config.name or 'this config'} (index_for_config), or train on it with a config made "
            "from the index (config_for_index)."
        )
