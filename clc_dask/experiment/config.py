"""The experiment file: regions, spatial split, configurations, evaluation and statistics.

One YAML file describes an experiment (``clc-dask experiment --config experiment.yaml``)::

    name: demo-grid
    output: experiment-out             # relative paths resolve against the file's folder
    regions:
      italy:                           # mosaics per season + labels on the same grid …
        mosaics: {september: mosaics/september.tif, april: mosaics/april.tif}
        labels: labels/clc_level2.tif
      canakkale:                       # … or an area whose mosaics and labels are built
        aoi: {bbox: [26.05, 39.68, 27.2, 40.37]}
        grid: {epsg: 32635}
        imagery: {source: earth-search, seasons: [april, september], composite: all}
        clc: {source: clc/U2018_CLC2018_V2020_20u1.gpkg, field: CODE_18}
    split: {block_size: 512, test_side: south, test_fraction: 0.25, val_fraction: 0.15}
    grid: paper                        # the paper's Table 2, and/or:
    configurations:
      - {name: sept-nrg, preset: cpu-demo}
      - {name: sept-rgb, preset: cpu-demo, overrides: {composite: rgb}}
    transfer: [{region: canakkale, seasons: [april, september], tiles: ["4_3", "3_2"]}]

Everything here is checked without reading a pixel: presets and overrides, names, levels and
the explicit split areas (:func:`resolve_configurations`, :func:`check_split_areas`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from clc_dask.config import (
    SEASONS,
    AoiConfig,
    ClusterConfig,
    GridConfig,
    ImageryConfig,
    format_validation_error,
)
from clc_dask.errors import ConfigError
from clc_dask.presets import get_preset
from clc_dask.train import TrainConfig, make_train_config

#: ``grid: paper`` — the paper's Table 2, in its order.
PAPER_GRID = ("sept-rgb-r50-256", "sept-rgb-r101-256", "sept-nrg-r101-256", "septapr-nrg-r101-256",
              "septapr-nrg-r101-128")
GRIDS = {"paper": PAPER_GRID}
#: Experiment and configuration names become folder names.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
#: (left, bottom, right, top) in the region's CRS units (metres).
Bounds = tuple[float, float, float, float]
Side = Literal["south", "north", "east", "west"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ClcSource(_Strict):
    """Where the labels of an AOI region come from: CLC polygons or a CLC raster."""

    source: str = Field(..., description="CLC GeoPackage/Shapefile, or GeoTIFF of codes / GRID_CODE")
    field: str = Field("CODE_18", description="vector field holding the codes")
    layer: str | None = Field(None, description="vector layer, when several hold the field")


class RegionConfig(_Strict):
    """A region: seasonal mosaics and a CLC label raster on one grid, or an area to build them for."""

    mosaics: dict[str, str] | None = Field(None, description="season → mosaic COG or Zarr store")
    labels: str | None = Field(None, description="CLC code raster on the mosaics' grid")
    clear_counts: dict[str, str] | None = Field(
        None, description="season → clear-observation count (default: the one beside each mosaic)")
    aoi: AoiConfig | None = Field(None, description="area to build the mosaics and labels for")
    grid: GridConfig | None = Field(None, description="grid of a built region (epsg, resolution)")
    imagery: ImageryConfig | None = Field(None, description="scenes and composite of a built region")
    clc: ClcSource | None = Field(None, description="CLC source of a built region's labels")

    @model_validator(mode="after")
    def _files_or_area(self) -> RegionConfig:
        files = self.mosaics is not None or self.labels is not None
        area = any(v is not None for v in (self.aoi, self.grid, self.imagery, self.clc))
        if files == area:
            raise ValueError("give either mosaics + labels (files), or aoi + grid + imagery + clc "
                             "(an area whose mosaics and labels are built)")
        if files and (not self.mosaics or not self.labels):
            raise ValueError("give both mosaics (season: path) and labels")
        if area and None in (self.aoi, self.grid, self.imagery, self.clc):
            missing = [k for k in ("aoi", "grid", "imagery", "clc") if getattr(self, k) is None]
            raise ValueError(f"a built region needs aoi, grid, imagery and clc (missing {missing})")
        for season in self.seasons:
            if season not in SEASONS:
                raise ValueError(f"season {season!r} is not one of {list(SEASONS)}")
        return self

    @property
    def seasons(self) -> tuple[str, ...]:
        """Seasons with a mosaic (given or to be built)."""
        if self.mosaics is not None:
            return tuple(self.mosaics)
        return tuple(self.imagery.seasons) if self.imagery is not None else ()

    @property
    def built(self) -> bool:
        """True for a region whose mosaics and labels the experiment makes."""
        return self.aoi is not None


class SplitConfig(_Strict):
    """How the training region is split into train, validation and test areas."""

    block_size: int = Field(512, description="block edge in px: areas are whole blocks, and test "
                            "blocks are the units the bootstrap resamples")
    guard_px: int | Literal["auto"] = Field(
        "auto", description="px between test and train/validation pixels and between validation and "
        "train pixels; auto = the largest receptive field of the configurations' networks")
    test_side: Side = Field("south", description="side of the region holding the test strip")
    test_fraction: float = Field(0.25, gt=0, lt=1, description="labelled share aimed at for test")
    val_fraction: float = Field(0.15, gt=0, lt=1, description="labelled share aimed at for "
                                "validation (the blocks farthest from the test area)")
    test_bounds: list[Bounds] | None = Field(None, description="explicit test areas instead of the "
                                             "strip (CRS units; snapped outwards to blocks)")
    val_bounds: list[Bounds] | None = Field(None, description="explicit validation areas")
    train_bounds: list[Bounds] | None = Field(None, description="restrict training to these areas")
    seed: int = Field(0, ge=0, description="breaks ties when choosing validation blocks")

    @field_validator("block_size")
    @classmethod
    def _multiple_of_32(cls, value: int) -> int:
        if value < 32 or value % 32:
            raise ValueError(f"block_size {value} must be a positive multiple of 32 px")
        return value

    @field_validator("guard_px")
    @classmethod
    def _not_negative(cls, value: int | str) -> int | str:
        if isinstance(value, int) and value < 0:
            raise ValueError(f"guard_px {value} must be ≥ 0 px (or auto)")
        return value

    @field_validator("test_bounds", "val_bounds", "train_bounds")
    @classmethod
    def _boxes(cls, value: list[Bounds] | None) -> list[Bounds] | None:
        for box in value or []:
            left, bottom, right, top = box
            if not (left < right and bottom < top):
                raise ValueError(f"bounds {list(box)} are not left<right, bottom<top")
        return value

    @model_validator(mode="after")
    def _val_with_test(self) -> SplitConfig:
        if self.test_bounds is None and (self.val_bounds is not None or self.train_bounds is not None):
            raise ValueError("val_bounds and train_bounds need test_bounds (explicit areas)")
        return self


class ConfigurationEntry(_Strict):
    """One configuration: a training preset with overrides."""

    name: str | None = Field(None, pattern=NAME_PATTERN, description="folder name (default: the preset)")
    preset: str = Field(..., description="a clc_dask.presets name")
    overrides: dict[str, Any] = Field(default_factory=dict, description="TrainConfig fields to change")


class EvaluationConfig(_Strict):
    """How each trained model is applied to the test area."""

    seasons: list[str] | None = Field(None, description="test images of the training region "
                                      "(default: the first season of the first configuration)")
    checkpoint: Literal["best", "last"] = Field("best", description="best validation mIoU, or the last epoch")
    window: int = Field(512, gt=0, description="inference window edge in px (multiple of 32)")
    halo: int = Field(64, ge=0, description="context px around each window")
    batch_size: int = Field(8, gt=0, description="windows per forward pass")
    device: Literal["auto", "cpu", "cuda"] = "auto"

    @field_validator("seasons")
    @classmethod
    def _known(cls, value: list[str] | None) -> list[str] | None:
        for season in value or []:
            if season not in SEASONS:
                raise ValueError(f"season {season!r} is not one of {list(SEASONS)}")
        return value


class TransferConfig(_Strict):
    """A region the models are tested on without training there (the paper's Çanakkale)."""

    region: str
    seasons: list[str] | None = Field(None, description="test images (default: all of the region's)")
    tiles: list[str] | None = Field(None, description="test only these row_col tiles (paper: 4_3, 3_2)")
    tile_size: int = Field(2048, gt=0, description="tile edge in px for tiles")


class StatisticsConfig(_Strict):
    """The spatial block bootstrap."""

    replicates: int = Field(2000, ge=1, description="bootstrap resamples of the test blocks")
    confidence: float = Field(0.95, gt=0, lt=1, description="two-sided interval level")
    seed: int = Field(0, ge=0)


class ExperimentConfig(_Strict):
    """A whole experiment (``clc-dask experiment --config experiment.yaml``)."""

    name: str = Field(..., pattern=NAME_PATTERN)
    output: str | None = Field(None, description="experiment folder (default: <name> beside the file)")
    level: Literal[1, 2, 3] = Field(2, description="CLC level of classes, labels and scores")
    regions: dict[str, RegionConfig]
    train_region: str | None = Field(None, description="region trained and tested on (default: the first)")
    split: SplitConfig = Field(default_factory=SplitConfig)
    grid: Literal["paper"] | None = Field(None, description="paper: the five configurations of Table 2")
    overrides: dict[str, Any] = Field(default_factory=dict, description="applied to every configuration")
    configurations: list[ConfigurationEntry] = Field(default_factory=list)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    transfer: list[TransferConfig] = Field(default_factory=list)
    statistics: StatisticsConfig = Field(default_factory=StatisticsConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)

    @field_validator("regions")
    @classmethod
    def _region_names(cls, value: dict[str, RegionConfig]) -> dict[str, RegionConfig]:
        if not value:
            raise ValueError("give at least one region")
        for name in value:
            if not re.match(NAME_PATTERN, name):
                raise ValueError(f"region name {name!r} must be letters, digits, '_', '.' or '-'")
        return value

    @model_validator(mode="after")
    def _references(self) -> ExperimentConfig:
        if self.train_region is not None and self.train_region not in self.regions:
            raise ValueError(f"train_region {self.train_region!r} is not one of the regions {list(self.regions)}")
        if self.grid is None and not self.configurations:
            raise ValueError("give configurations, or grid: paper")
        for transfer in self.transfer:
            if transfer.region not in self.regions:
                raise ValueError(f"transfer region {transfer.region!r} is not one of the regions {list(self.regions)}")
            if transfer.region == self.training_region:
                raise ValueError(f"transfer region {transfer.region!r} is the training region: the split "
                                 "already tests there")
        return self

    @property
    def training_region(self) -> str:
        """Name of the region trained and tested on."""
        return self.train_region or next(iter(self.regions))


# --------------------------------------------------------------------------- configurations


@dataclass(frozen=True)
class Configuration:
    """A named, validated training configuration of the experiment."""

    name: str
    preset: str
    train: TrainConfig

    def fingerprint(self) -> str:
        """SHA-256 of the training settings (what makes two runs the same)."""
        return _sha(self.train.model_dump(mode="json"))


def resolve_configurations(config: ExperimentConfig) -> list[Configuration]:
    """The experiment's configurations: ``grid`` expanded, presets and overrides validated.

    Raises:
        ConfigError: an unknown preset or grid, an invalid override, a configuration of another
            CLC level than the experiment, or two configurations with one name.
    """

    entries: list[tuple[str, ConfigurationEntry]] = []
    if config.grid is not None:
        entries += [(f"grid {config.grid}", ConfigurationEntry(preset=p)) for p in GRIDS[config.grid]]
    entries += [(f"configurations[{i}]", e) for i, e in enumerate(config.configurations)]
    resolved: list[Configuration] = []
    for where, entry in entries:
        try:
            train = get_preset(entry.preset, **config.overrides)
            train = _override(train, entry.overrides)
        except ConfigError as exc:
            raise ConfigError(f"{where} ({entry.name or entry.preset}): {exc}") from None
        name = entry.name or entry.preset
        if train.level != config.level:
            raise ConfigError(f"{where} ({name}) trains Level-{train.level} classes but the experiment "
                              f"scores Level {config.level}: set `level` the same in both.")
        resolved.append(Configuration(name, entry.preset, train.model_copy(update={"name": name})))
    names = [c.name for c in resolved]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ConfigError(f"Configurations {repeated} appear twice: give each a distinct `name`.")
    return resolved


def _override(train: TrainConfig, overrides: dict[str, Any]) -> TrainConfig:

    unknown = sorted(set(overrides) - set(TrainConfig.model_fields))
    if unknown:
        raise ConfigError(f"unknown override(s) {unknown}: use fields of TrainConfig such as epochs, "
                          "composite, encoder, patch_size, seasons.")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}
    return make_train_config(train, **values)


# --------------------------------------------------------------------------- split areas


def check_split_areas(split: SplitConfig) -> None:
    """Refuse explicit train, validation and test areas that overlap (before any pixel is read).

    Raises:
        ConfigError: naming the two overlapping boxes.
    """
    named = {"test_bounds": split.test_bounds, "val_bounds": split.val_bounds,
             "train_bounds": split.train_bounds}
    pairs = (("train_bounds", "test_bounds"), ("val_bounds", "test_bounds"), ("train_bounds", "val_bounds"))
    for a, b in pairs:
        for box_a in named[a] or []:
            for box_b in named[b] or []:
                if _overlap(box_a, box_b):
                    raise ConfigError(
                        f"The split's `{a}` {list(box_a)} overlaps `{b}` {list(box_b)}: an area is "
                        "either training, validation or test. Make the boxes disjoint (the guard band "
                        "between them is added automatically)."
                    )


def _overlap(a: Bounds, b: Bounds) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


# --------------------------------------------------------------------------- files


def load_experiment_config(path: str | os.PathLike[str]) -> ExperimentConfig:
    """Read and validate an experiment YAML; relative paths in it resolve against its folder.

    Raises:
        ConfigError: missing file, bad YAML, or invalid fields (each named).
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Experiment file {path} does not exist: check `config`.")
    try:
        raw = yaml.safe_load(path.read_text("utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"Experiment file {path} is not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"Experiment file {path} must be a mapping with name, regions, split and "
                          "configurations.")
    return parse_experiment_config(raw, source=str(path), base_dir=path.parent)


def parse_experiment_config(raw: dict[str, Any], source: str = "<dict>",
                            base_dir: str | os.PathLike[str] | None = None) -> ExperimentConfig:
    """Validate an experiment mapping (paths resolved against ``base_dir`` when given).

    Raises:
        ConfigError: one clause per invalid field, naming it.
    """
    try:
        config = ExperimentConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source)) from None
    if base_dir is not None:
        config = _resolve_paths(config, Path(base_dir))
    return config


def _resolve_paths(config: ExperimentConfig, base: Path) -> ExperimentConfig:
    def resolve(p: str) -> str:
        return p if "://" in p or Path(p).is_absolute() else str((base / p).resolve())

    regions = {}
    for name, region in config.regions.items():
        update: dict[str, Any] = {}
        if region.mosaics:
            update["mosaics"] = {s: resolve(p) for s, p in region.mosaics.items()}
        if region.labels:
            update["labels"] = resolve(region.labels)
        if region.clear_counts:
            update["clear_counts"] = {s: resolve(p) for s, p in region.clear_counts.items()}
        if region.clc is not None:
            update["clc"] = region.clc.model_copy(update={"source": resolve(region.clc.source)})
        if region.aoi is not None and region.aoi.path:
            update["aoi"] = region.aoi.model_copy(update={"path": resolve(region.aoi.path)})
        if region.imagery is not None and region.imagery.source.endswith(".json"):
            update["imagery"] = region.imagery.model_copy(update={"source": resolve(region.imagery.source)})
        regions[name] = region.model_copy(update=update)
    output = resolve(config.output) if config.output else str((base / config.name).resolve())
    return config.model_copy(update={"regions": regions, "output": output})


def dump_experiment_config(config: ExperimentConfig) -> str:
    """The resolved experiment as YAML (kept in the experiment folder as provenance)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


def _sha(doc: Any) -> str:
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()
