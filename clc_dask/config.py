"""Run configuration: one validated YAML file describes a production run.

Errors name the offending field (``grid.epsg: …``) and say what to change.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from clc_dask.errors import ConfigError
from clc_dask.redact import credential_advice, credential_options, is_signed_url

SEASONS = ("april", "july", "september")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AoiConfig(_Strict):
    """Area of interest: a lon/lat bbox or a vector file (country outline)."""

    bbox: tuple[float, float, float, float] | None = Field(
        None, description="west, south, east, north in degrees"
    )
    path: str | None = Field(None, description="GeoPackage/GeoJSON/Shapefile with the AOI polygon(s)")

    @model_validator(mode="after")
    def _one_of(self) -> AoiConfig:
        if (self.bbox is None) == (self.path is None):
            raise ValueError("give exactly one of aoi.bbox (west,south,east,north) or aoi.path")
        if self.bbox is not None:
            w, s, e, n = self.bbox
            if not (-180 <= w < e <= 180 and -90 <= s < n <= 90):
                raise ValueError(f"bbox {self.bbox} is not west<east, south<north in degrees")
        return self


class GridConfig(_Strict):
    """The run's single grid."""

    epsg: int = Field(..., description="CRS: a UTM zone (326xx/327xx) or 3035 for multi-zone countries")
    resolution: float = Field(10.0, gt=0, description="pixel size in metres")
    tile_size: int = Field(2048, gt=0, description="tile edge in pixels (paper: 2048)")
    chunk_size: int = Field(2048, gt=0, description="dask/zarr chunk edge in px; must divide tile_size")

    @model_validator(mode="after")
    def _chunks_divide_tiles(self) -> GridConfig:
        if self.tile_size % self.chunk_size:
            raise ValueError(
                f"chunk_size {self.chunk_size} must divide tile_size {self.tile_size} exactly "
                "(misaligned chunks can silently lose data in Zarr region writes)"
            )
        return self

    @field_validator("epsg")
    @classmethod
    def _known_epsg(cls, value: int) -> int:
        from pyproj import CRS

        try:
            crs = CRS.from_epsg(value)
        except Exception as exc:
            raise ValueError(f"EPSG:{value} is not a known CRS") from exc
        if not crs.is_projected:
            raise ValueError(f"EPSG:{value} is not a projected CRS in metres; use a UTM zone or 3035")
        return value


class ImageryConfig(_Strict):
    """Where the Sentinel-2 scenes come from and how mosaics are made."""

    source: str = Field("earth-search", description="preset name, STAC API URL, or catalog/item-collection path")
    collection: str | None = Field(None, description="STAC collection (default: the preset's)")
    year: int = Field(2018, ge=2015, le=2100)
    seasons: list[str] = Field(default_factory=lambda: ["september"])
    max_cloud: float = Field(30.0, ge=0, le=100, description="maximum eo:cloud_cover in %")
    composite: Literal["rgb", "nrg", "all"] = "nrg"
    predict_season: str | None = Field(
        None, description="season whose mosaic the model maps in a run (default: the first of seasons)"
    )
    gdal: dict[str, str] = Field(
        default_factory=dict, description="GDAL options for reading scenes, e.g. GDAL_HTTP_MAX_RETRY: "
        "'10'; never credentials (AWS_SECRET_ACCESS_KEY, GDAL_HTTP_HEADERS …): set those as "
        "environment variables"
    )

    @field_validator("seasons")
    @classmethod
    def _known_seasons(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("give at least one season")
        for season in value:
            _check_season(season)
        return value

    @field_validator("predict_season")
    @classmethod
    def _known_predict_season(cls, value: str | None) -> str | None:
        if value is not None:
            _check_season(value)
        return value

    @field_validator("gdal")
    @classmethod
    def _gdal_keys(cls, value: dict[str, str]) -> dict[str, str]:
        for key in value:
            if not key.isupper() or not key.replace("_", "").isalnum():
                raise ValueError(f"GDAL option {key!r} is not an upper-case GDAL config key")
        refused = credential_options(value)
        if refused:
            raise ValueError(credential_advice(refused))
        return value

    @property
    def prediction_season(self) -> str:
        """The season mapped by a run: ``predict_season``, else the first of ``seasons``."""
        return self.predict_season or self.seasons[0]


def _check_season(season: str) -> None:
    if season not in SEASONS and "/" not in season:
        raise ValueError(f"season {season!r} is not one of {SEASONS} or START/END (MM-DD/MM-DD)")


class ModelConfig(_Strict):
    """The trained model used for inference."""

    checkpoint: str = Field(..., description="path to a clc-dask checkpoint (.pt)")
    batch_size: int = Field(8, gt=0, description="windows per forward pass")
    window: int = Field(512, gt=0, description="inference window edge in px (multiple of 32)")
    halo: int = Field(64, ge=0, description="overlap in px on each side of a chunk")
    device: Literal["auto", "cpu", "cuda"] = "auto"

    @field_validator("window")
    @classmethod
    def _multiple_of_32(cls, value: int) -> int:
        if value % 32:
            raise ValueError(f"window {value} must be a multiple of 32 (U-Net downsamples 5 times)")
        return value


class ClassesConfig(_Strict):
    level: Literal[2, 3] = 2


class GeneralizeConfig(_Strict):
    """CORINE rules applied to the whole run's class map (phase 2 of a run)."""

    enabled: bool = True
    mmu_ha: float = Field(25.0, ge=0, description="minimum mapping unit in hectares")
    min_width_m: float = Field(100.0, ge=0, description="minimum width in metres")
    tile_margin_px: int | None = Field(
        None, ge=0, description="deprecated and ignored: a run generalizes its whole map at once, so "
        "tile edges leave no trace", exclude=True,
    )

    @field_validator("tile_margin_px")
    @classmethod
    def _deprecated_margin(cls, value: int | None) -> int | None:
        if value is not None:
            warnings.warn(
                "generalize.tile_margin_px is deprecated and ignored: a run now generalizes its whole "
                "class map at once (patches crossing tile edges are judged whole). Remove it from the config.",
                DeprecationWarning, stacklevel=2,
            )
        return value


class OutputConfig(_Strict):
    store: str = Field(..., description="output folder (local path)")
    formats: list[Literal["cog", "zarr"]] = Field(default_factory=lambda: ["cog"])
    vectorize: bool = True
    performance_report: bool = False


class ClusterConfig(_Strict):
    kind: Literal["local", "address", "cuda", "threads"] = Field(
        "local", description="local/cuda: start a cluster; address: connect; threads: no cluster, "
        "dask's threaded scheduler in the calling process (small runs, debugging)"
    )
    address: str | None = Field(None, description="scheduler address (kind: address)")
    n_workers: int | None = Field(None, gt=0)
    threads_per_worker: int | None = Field(None, gt=0)
    memory_limit: str | None = Field(None, description="per worker, e.g. '4GiB'")
    inference_slots: int | None = Field(
        None, gt=0, description="inference tasks a started CPU worker runs at once; its other threads read, "
        "composite and write the next tiles meanwhile (e.g. threads_per_worker 2, inference_slots 1). "
        "Default: no limit. GPU workers run one per GPU")
    tiles_in_flight: int | None = Field(
        None, gt=0, description="tiles on the cluster at once; the next is submitted as one finishes "
        "(default: twice the workers' threads, at least 2)")
    tiles_per_batch: int | None = Field(
        None, gt=0, description="former name of tiles_in_flight (still accepted)", exclude=True)

    @model_validator(mode="after")
    def _address_given(self) -> ClusterConfig:
        if self.kind == "address" and not (self.address or os.environ.get("DASK_SCHEDULER_ADDRESS")):
            raise ValueError("cluster.kind 'address' needs cluster.address or DASK_SCHEDULER_ADDRESS")
        return self


class RunConfig(_Strict):
    """A whole production run (``clc-dask run --config run.yaml``)."""

    name: str = Field(..., pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="run id used in outputs")
    aoi: AoiConfig
    grid: GridConfig
    imagery: ImageryConfig = Field(default_factory=ImageryConfig)
    model: ModelConfig
    classes: ClassesConfig = Field(default_factory=ClassesConfig)
    generalize: GeneralizeConfig = Field(default_factory=GeneralizeConfig)
    output: OutputConfig
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)

    @model_validator(mode="after")
    def _no_credentials_in_urls(self) -> RunConfig:
        # the config is written to run.yaml and STAC provenance: no signed URL may be in it
        for field, text in _strings(self.model_dump(mode="json")):
            if "://" in text and is_signed_url(text):
                raise ValueError(
                    f"{field}: the URL carries a credential (a password or a signed query string "
                    "such as sig=, token=, X-Amz-Signature=), and the config is recorded in "
                    "run.yaml and STAC provenance: give the URL without it (catalog presets sign "
                    "their own asset URLs), or download the file and give its local path; put "
                    "credentials in environment variables"
                )
        return self


def _strings(data: object, path: str = "") -> list[tuple[str, str]]:
    """Every string in a nested config mapping, with its dotted field path."""
    if isinstance(data, str):
        return [(path, data)]
    if isinstance(data, dict):
        return [s for k, v in data.items() for s in _strings(v, f"{path}.{k}" if path else str(k))]
    if isinstance(data, (list, tuple)):
        return [s for i, v in enumerate(data) for s in _strings(v, f"{path}.{i}")]
    return []


def format_validation_error(error: ValidationError, source: str) -> str:
    """One readable line per problem, each naming the field path."""
    lines = []
    for problem in error.errors():
        message = problem["msg"].removeprefix("Value error, ")
        if problem["loc"]:
            message = ".".join(str(p) for p in problem["loc"]) + f": {message}"
        lines.append(message)
    return f"Invalid config {source}: " + "; ".join(lines)


def load_run_config(path: str | os.PathLike[str], base_dir: str | os.PathLike[str] | None = None) -> RunConfig:
    """Read and validate a run YAML; relative paths in it resolve against its folder."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"Config file {path} does not exist: check `config`.")
    try:
        raw = yaml.safe_load(path.read_text("utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"Config {path} is not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"Config {path} must be a YAML mapping with keys name, aoi, grid, model, output.")
    return parse_run_config(raw, source=str(path), base_dir=base_dir or path.parent)


def parse_run_config(raw: dict[str, Any], source: str = "<dict>",
                     base_dir: str | os.PathLike[str] | None = None) -> RunConfig:
    """Validate a config mapping; raises :class:`ConfigError` naming each bad field."""
    try:
        config = RunConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source)) from None
    if base_dir is not None:
        config = _resolve_paths(config, Path(base_dir))
    return config


def _resolve_paths(config: RunConfig, base: Path) -> RunConfig:
    def resolve(p: str | None) -> str | None:
        if p is None or "://" in p or Path(p).is_absolute():
            return p
        return str((base / p).resolve())

    updates: dict[str, Any] = {
        "model": config.model.model_copy(update={"checkpoint": resolve(config.model.checkpoint)}),
        "output": config.output.model_copy(update={"store": resolve(config.output.store)}),
    }
    if config.aoi.path:
        updates["aoi"] = config.aoi.model_copy(update={"path": resolve(config.aoi.path)})
    src = config.imagery.source
    if src.endswith(".json") and "://" not in src:
        updates["imagery"] = config.imagery.model_copy(update={"source": resolve(src)})
    return config.model_copy(update=updates)


def dump_run_config(config: RunConfig) -> str:
    """The resolved config as YAML (stored in outputs as provenance)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
