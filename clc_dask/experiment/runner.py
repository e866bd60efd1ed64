"""Running an experiment: checks, split, one training task per configuration, scoring, results.

:func:`run_experiment` does, in order:

1. **checks** that read no pixel and write nothing (:func:`check_experiment`): presets and
   overrides, explicit split areas, that every configuration finds a mosaic with its bands for
   every season it trains or is tested on, the guard band;
2. **preparation**: regions given as an area are built; the training region's labels are
   counted per block and split (:mod:`~clc_dask.experiment.split`) — a test area without labels
   fails here —; each configuration's patch index is built on the cluster with the split's
   map (any configuration without usable patches fails here, before any training);
3. **training**: each configuration is one task (:func:`train_configuration`): on a GPU cluster
   with ``resources={"GPU": 1}`` (N GPUs train N configurations at once), on a CPU cluster
   pinned to one worker each (a worker per configuration, its threads for torch); without a
   cluster one after the other in this process. Training resumes from its checkpoint, so a
   killed experiment run again continues where it stopped;
4. **scoring**, as soon as a configuration is trained: its test areas are predicted and scored
   per block (:mod:`~clc_dask.experiment.scoring`); the report is cached with the checkpoint's
   SHA-256 and reused when nothing changed;
5. **results** (:mod:`~clc_dask.experiment.report`): a report per configuration and test area
   with bootstrap intervals, tables, paired comparisons and figures.

Layout of the experiment folder::

    experiment.yaml, experiment.json, split.json     the resolved file, the record, the split
    regions/<region>/                                mosaics and labels of built regions
    configurations/<name>/patches/                   patch index (and Zarr cache)
    configurations/<name>/train/                     checkpoints, metrics.csv/json
    configurations/<name>/<area>/                    test_map.tif, evaluation.json, report.json
    results/                                         tables, comparisons, figures
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from clc_dask.cluster import GPU_RESOURCE, connect, has_gpu_workers
from clc_dask.errors import ConfigError, InputError, OutputError
from clc_dask.evaluate import read_report, write_report
from clc_dask.experiment.config import (
    Configuration,
    ExperimentConfig,
    check_split_areas,
    dump_experiment_config,
    load_experiment_config,
    resolve_configurations,
)
from clc_dask.experiment.regions import (
    Region,
    build_region,
    check_inputs,
    open_region,
    planned_bands,
)
from clc_dask.experiment.report import write_results
from clc_dask.experiment.scoring import TestArea, computing_with, predict_test_area, score_test_area
from clc_dask.experiment.split import Split, block_label_counts, make_split
from clc_dask.grid import TileGrid
from clc_dask.model import load_checkpoint, receptive_field
from clc_dask.patches import CACHE_STORE, build_patch_index, cache_patches, load_patch_index
from clc_dask.stores import atomic_path, file_sha256, remove_leftovers
from clc_dask.train import CHECKPOINT_FILE, RESUMABLE_CHANGES, make_train_config, train

log = logging.getLogger(__name__)

EXPERIMENT_FORMAT = "clc-dask-experiment"
EXPERIMENT_VERSION = 1
#: A configuration's scores on a test area (cached with its checkpoint's SHA-256).
EVALUATION_FILE = "evaluation.json"
TEST_MAP_FILE = "test_map.tif"
INDEX_REQUEST_FILE = "index_request.json"


# --------------------------------------------------------------------------- layout


@dataclass(frozen=True)
class ExperimentLayout:
    """Where an experiment's files go."""

    root: Path

    @property
    def config(self) -> Path:
        return self.root / "experiment.yaml"

    @property
    def record(self) -> Path:
        return self.root / "experiment.json"

    @property
    def split(self) -> Path:
        return self.root / "split.json"

    @property
    def results(self) -> Path:
        return self.root / "results"

    def region(self, name: str) -> Path:
        return self.root / "regions" / name

    def configuration(self, name: str) -> Path:
        return self.root / "configurations" / name

    def patches(self, name: str) -> Path:
        return self.configuration(name) / "patches"

    def train(self, name: str) -> Path:
        return self.configuration(name) / "train"

    def area(self, name: str, area: str) -> Path:
        return self.configuration(name) / area


# --------------------------------------------------------------------------- checks


@dataclass
class CheckedExperiment:
    """An experiment whose settings passed every check that reads no pixel."""

    config: ExperimentConfig
    configurations: list[Configuration]
    guard_px: int
    test_seasons: tuple[str, ...]
    #: Region → configuration → seasons it trains or is tested on there.
    needs: dict[str, dict[str, list[str]]] = field(default_factory=dict)
    #: Regions given as files, opened (metadata only).
    regions: dict[str, Region] = field(default_factory=dict)


def check_experiment(config: ExperimentConfig) -> CheckedExperiment:
    """Every check that needs no pixel: configurations, split areas, mosaics and bands, guard band.

    Raises:
        ConfigError: unknown preset or override, overlapping split areas, a configuration whose
            seasons or bands have no mosaic, transfer tiles not made of whole blocks.
        InputError, GridMismatchError: missing or misaligned region files.
    """
    configurations = resolve_configurations(config)
    check_split_areas(config.split)
    test_seasons = tuple(config.evaluation.seasons or (configurations[0].train.seasons[0],))
    needs: dict[str, dict[str, list[str]]] = {name: {} for name in config.regions}
    for c in configurations:
        needs[config.training_region][c.name] = sorted({*c.train.seasons, *test_seasons})
        for transfer in config.transfer:
            seasons = transfer.seasons or list(config.regions[transfer.region].seasons)
            needs[transfer.region][c.name] = sorted(set(seasons))
    regions: dict[str, Region] = {}
    for name, region_config in config.regions.items():
        if region_config.built:
            bands = planned_bands(region_config)
        else:
            regions[name] = open_region(name, region_config)
            bands = regions[name].bands
        check_inputs(name, bands, configurations, needs[name])
    for transfer in config.transfer:
        if transfer.tiles and transfer.tile_size % config.split.block_size:
            raise ConfigError(
                f"Transfer region {transfer.region!r}: `tile_size` {transfer.tile_size} px is not a multiple "
                f"of the split's `block_size` {config.split.block_size} px, so its tiles are not whole test "
                "blocks: choose a block_size dividing the tile size."
            )
    largest = max(receptive_field(c.train.encoder) for c in configurations)
    guard = largest if config.split.guard_px == "auto" else int(config.split.guard_px)
    if guard < largest:
        log.warning("guard_px %d is below the largest receptive field of the configurations (%d px): test "
                    "predictions can see pixels of training patches", guard, largest)
    return CheckedExperiment(config, configurations, guard, test_seasons, needs, regions)


# --------------------------------------------------------------------------- preparation


@dataclass
class PreparedExperiment:
    """An experiment ready to train: regions, split, test areas and classes fixed."""

    checked: CheckedExperiment
    layout: ExperimentLayout
    regions: dict[str, Region]
    split: Split
    areas: list[TestArea]
    codes: tuple[int, ...]

    @property
    def config(self) -> ExperimentConfig:
        return self.checked.config

    @property
    def configurations(self) -> list[Configuration]:
        return self.checked.configurations

    def record(self) -> dict[str, Any]:
        """The experiment record (``experiment.json``): what training and scores depend on."""
        return {
            "format": EXPERIMENT_FORMAT, "version": EXPERIMENT_VERSION, "name": self.config.name,
            "level": self.config.level, "training_region": self.config.training_region,
            "split_fingerprint": self.split.fingerprint(), "guard_px": self.split.guard_px,
            "codes": list(self.codes), "regions": {n: r.record() for n, r in self.regions.items()},
            "configurations": [c.name for c in self.configurations],
            "test_areas": [a.record() for a in self.areas],
        }


def prepare_experiment(checked: CheckedExperiment, layout: ExperimentLayout, client: Any | None = None) -> PreparedExperiment:
    """Build regions given as areas, split the training region, fix the classes and test areas.

    Nothing is written for regions given as files; built regions go to ``regions/<name>/``.

    Raises:
        InputError: the test area (or a transfer region's) holds no labelled pixel.
        ConfigError: no training or validation area left outside the guard bands.
    """
    config = checked.config
    regions = dict(checked.regions)
    for name, region_config in config.regions.items():
        if name not in regions:
            with computing_with(client):
                regions[name] = build_region(name, region_config, layout.region(name), level=config.level)
            check_inputs(name, regions[name].bands, checked.configurations, checked.needs[name])
    train_region = regions[config.training_region]
    counts = block_label_counts(train_region.open_labels(config.split.block_size), config.split.block_size,
                                config.level, client)
    split = make_split(config.split, train_region.geobox, counts, level=config.level, guard_px=checked.guard_px,
                       region=f"region {train_region.name!r}")
    codes = split.codes()
    absent = sorted(set(split.codes(("test",))) - set(codes))
    if absent:
        log.warning("classes %s occur in the test area only: no configuration can learn them; their test "
                    "pixels are left out of the scores", absent)
    areas = [TestArea(f"{train_region.name}-{season}", train_region.name, season, train_region.geobox,
                      config.split.block_size, tuple(split.test_blocks())) for season in checked.test_seasons]
    for transfer in config.transfer:
        region = regions[transfer.region]
        groups = _transfer_blocks(region, transfer.tiles, transfer.tile_size, config.split.block_size,
                                  config.level, client)
        for tile, blocks in groups.items():
            for season in transfer.seasons or list(region.mosaics):
                name = f"{region.name}-{tile}-{season}" if tile else f"{region.name}-{season}"
                areas.append(TestArea(name, region.name, season, region.geobox, config.split.block_size, blocks))
    log.info("split of %s (pixels per role): %s; guard band %d px; %d classes %s", train_region.name,
             {r: v["area_pixels"] for r, v in split.summary().items()}, split.guard_px, len(codes), list(codes))
    return PreparedExperiment(checked, layout, regions, split, areas, codes)


def _transfer_blocks(region: Region, tiles: Sequence[str] | None, tile_size: int, block_size: int, level: int,
                     client: Any | None) -> dict[str, tuple[str, ...]]:
    """Labelled blocks of a transfer region: per tile when ``tiles`` are given (one test area each,
    as the paper's Tables 4 and 5), else of the whole region (key ``""``).

    Raises:
        InputError: a tile (or the region) holds no labelled pixel.
    """
    counts = block_label_counts(region.open_labels(block_size), block_size, level, client)
    labelled = counts[..., :-1].sum(axis=-1) > 0
    windows = {"": (slice(0, labelled.shape[0]), slice(0, labelled.shape[1]))}
    if tiles:
        windows = {}
        for tile in TileGrid(region.geobox, tile_size).select(list(tiles)):
            ys, xs = tile.pixel_slices
            windows[tile.name] = (slice(ys.start // block_size, -(-ys.stop // block_size)),
                                  slice(xs.start // block_size, -(-xs.stop // block_size)))
    groups = {}
    for name, (rows, cols) in windows.items():
        inside = np.zeros_like(labelled)
        inside[rows, cols] = labelled[rows, cols]
        if not inside.any():
            where = f"tile {name}" if name else "the whole region"
            raise InputError(f"The test area of transfer region {region.name!r} ({where}) holds no labelled "
                             "pixel: check its label raster, `level` and `tiles`.")
        groups[name] = tuple(Split.block_name(int(r), int(c)) for r, c in zip(*inside.nonzero(), strict=True))
    return groups


def write_record(prepared: PreparedExperiment) -> None:
    """Write (or check against) ``experiment.json``, then ``experiment.yaml`` and ``split.json``.

    Raises:
        OutputError: the folder holds an experiment with another split, classes or regions.
    """
    layout = prepared.layout
    record = prepared.record()
    if layout.record.is_file():
        old = json.loads(layout.record.read_text("utf-8"))
        keys = ("split_fingerprint", "codes", "level", "training_region")
        changed = [k for k in keys if old.get(k) != record[k]]
        train = prepared.config.training_region
        if old.get("regions", {}).get(train) != record["regions"][train]:
            changed.append(f"regions.{train}")
        if changed:
            raise OutputError(
                f"{layout.root} holds the experiment {old.get('name')!r} with another {', '.join(changed)}: "
                "its trained models do not fit this split. Choose another `output` folder, or delete it."
            )
    layout.root.mkdir(parents=True, exist_ok=True)
    for path, text in ((layout.config, dump_experiment_config(prepared.config)),
                       (layout.split, json.dumps(prepared.split.to_dict())),
                       (layout.record, json.dumps(record, indent=2))):
        with atomic_path(path, suffix=path.suffix) as tmp:
            tmp.write_text(text, encoding="utf-8")


# --------------------------------------------------------------------------- patch indices


def patch_index_for(prepared: PreparedExperiment, configuration: Configuration, client: Any | None = None) -> Path:
    """Build (or reuse) a configuration's patch index with the split's map, and its Zarr cache.

    Returns:
        The index folder (``configurations/<name>/patches``).

    Raises:
        ConfigError: no usable training or validation patch for this configuration.
    """
    train = configuration.train
    folder = prepared.layout.patches(configuration.name)
    region = prepared.regions[prepared.config.training_region]
    request = {"split": prepared.split.fingerprint(), "codes": list(prepared.codes),
               "region": region.record(), "seasons": list(train.seasons), "bands": list(train.bands),
               "patch_size": train.patch_size, "level": train.level,
               "thresholds": [train.max_nodata_fraction, train.max_cloud_fraction, train.max_unlabelled_fraction]}
    request_file = folder / INDEX_REQUEST_FILE
    if request_file.is_file() and json.loads(request_file.read_text("utf-8")) == request:
        index = load_patch_index(folder)
    else:
        try:
            index = build_patch_index(
                {s: region.mosaics[s] for s in train.seasons}, region.labels, patch_size=train.patch_size,
                bands=train.bands, level=train.level, codes=prepared.codes, seed=train.seed,
                max_nodata_fraction=train.max_nodata_fraction, max_cloud_fraction=train.max_cloud_fraction,
                max_unlabelled_fraction=train.max_unlabelled_fraction,
                clear_counts={s: p for s, p in region.clear_counts.items() if s in train.seasons},
                client=client, split_map=prepared.split.split_map(train.patch_size))
        except ConfigError as exc:
            raise ConfigError(f"Configuration {configuration.name!r}: {exc}") from None
        index.save(folder)
        with atomic_path(request_file, suffix=".json") as tmp:
            tmp.write_text(json.dumps(request), encoding="utf-8")
    if train.data == "zarr":
        cache_patches(index, folder / CACHE_STORE, client=client, prefetch=train.prefetch)
    return folder


# --------------------------------------------------------------------------- training


def check_resumable(prepared: PreparedExperiment, configuration: Configuration, index_dir: Path) -> None:
    """Refuse, before any training starts, a configuration whose folder holds a training run with
    other settings or on another patch index (only ``epochs`` and run-time settings may change).

    Raises:
        ConfigError: naming the configuration and what changed.
    """
    checkpoint = prepared.layout.train(configuration.name) / CHECKPOINT_FILE
    if not checkpoint.is_file():
        return
    saved = dict(load_checkpoint(checkpoint).config)
    index = saved.pop("patch_index", {}) or {}
    new = configuration.train.model_dump(mode="json")
    changed = sorted(k for k in set(saved) | set(new)
                     if k not in RESUMABLE_CHANGES and saved.get(k) != new.get(k))
    if index.get("fingerprint") not in (None, load_patch_index(index_dir).fingerprint()):
        changed.append("patch index")
    if changed:
        raise ConfigError(
            f"Configuration {configuration.name!r} was trained in {checkpoint.parent} with other settings "
            f"({', '.join(changed)}): give the changed configuration another `name`, or delete its folder "
            f"{prepared.layout.configuration(configuration.name)} to train it again."
        )


def train_configuration(name: str, settings: Mapping[str, Any], index_dir: str, out_dir: str) -> dict[str, Any]:
    """Train one configuration (resuming from its checkpoint): the task a worker runs.

    On a distributed worker torch uses the worker's threads. A file lock on ``out_dir`` makes
    a second task for the same configuration (e.g. resubmitted while an orphaned one still runs)
    wait for the first, then resume from its checkpoint.

    Returns:
        ``name``, ``resumed_from_epoch``, ``epochs_run``, ``best_epoch``, ``best_val_miou``,
        ``checkpoint``, ``best_checkpoint``, ``seconds``.
    """
    started = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with _exclusive(out / ".train.lock"), _worker_torch_threads():
        checkpoint = out / CHECKPOINT_FILE
        resumed = load_checkpoint(checkpoint).epoch if checkpoint.is_file() else 0
        result = train(make_train_config(dict(settings)), load_patch_index(index_dir), out, resume=True,
                       progress=False)
    return {"name": name, "resumed_from_epoch": resumed, "epochs_run": result.epochs_run,
            "best_epoch": result.best_epoch, "best_val_miou": result.best_val_miou,
            "checkpoint": str(result.checkpoint),
            "best_checkpoint": str(result.best_checkpoint) if result.best_checkpoint else None,
            "seconds": time.perf_counter() - started}


@contextlib.contextmanager
def _exclusive(path: Path) -> Iterator[None]:
    with open(path, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            log.warning("%s is held by another training of this configuration: waiting for it", path)
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@contextlib.contextmanager
def _worker_torch_threads() -> Iterator[None]:
    """On a distributed worker, let torch use the worker's threads (one training per worker)."""
    import torch

    try:
        from distributed import get_worker

        threads = int(get_worker().state.nthreads)
    except (ImportError, ValueError, AttributeError):
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(max(1, threads))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@contextlib.contextmanager
def _folder_lock(root: Path) -> Iterator[None]:
    """One experiment process per folder (released by the OS even on SIGKILL)."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise OutputError(f"Another process is running the experiment in {root}: wait for it to finish "
                              "(or stop it), then run it again to resume.") from None
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _run_trainings(prepared: PreparedExperiment, indices: Mapping[str, Path], client: Any | None,
                   on_trained: Callable[[Configuration, dict[str, Any]], None]) -> None:
    """Train every configuration (in parallel on a cluster) and call ``on_trained`` as each ends."""
    jobs = [(c, (c.name, c.train.model_dump(mode="json"), str(indices[c.name]),
                 str(prepared.layout.train(c.name)))) for c in prepared.configurations]
    if client is None:
        for configuration, args in jobs:
            on_trained(configuration, train_configuration(*args))
        return
    from distributed import as_completed


    by_key = {}
    if has_gpu_workers(client):
        futures = []
        for configuration, args in jobs:
            future = client.submit(train_configuration, *args, key=_task_key(configuration),
                                   resources={GPU_RESOURCE: 1}, pure=False)
            by_key[future.key] = (configuration, None)
            futures.append(future)
        for future in as_completed(futures):
            on_trained(by_key[future.key][0], future.result())
        return
    free = list(client.scheduler_info()["workers"])
    pending = list(jobs)
    running = as_completed()
    log.info("training %d configuration(s) on %d CPU worker(s), one per worker", len(jobs), len(free))

    def start() -> None:
        while pending and free:
            configuration, args = pending.pop(0)
            worker = free.pop(0)
            future = client.submit(train_configuration, *args, key=_task_key(configuration), workers=[worker],
                                   allow_other_workers=False, pure=False)
            by_key[future.key] = (configuration, worker)
            running.add(future)

    start()
    for future in running:
        configuration, worker = by_key[future.key]
        outcome = future.result()
        on_trained(configuration, outcome)
        free.append(worker)
        start()


def _task_key(configuration: Configuration) -> str:
    return f"clc-train-{configuration.name}-{configuration.fingerprint()[:12]}"


# --------------------------------------------------------------------------- scoring


def score_configuration(prepared: PreparedExperiment, configuration: Configuration, checkpoint: str | os.PathLike[str],
                        client: Any | None = None) -> dict[str, Path]:
    """Predict and score every test area with ``checkpoint`` (reusing up-to-date evaluations).

    Returns:
        Test area name → its ``evaluation.json``.
    """
    sha = file_sha256(checkpoint)
    settings = prepared.config.evaluation.model_dump(mode="json", exclude={"seasons"})
    written = {}
    for area in prepared.areas:
        folder = prepared.layout.area(configuration.name, area.name)
        path = folder / EVALUATION_FILE
        key = {"checkpoint_sha256": sha, "area": area.record(), "codes": list(prepared.codes),
               "region": prepared.regions[area.region].record(), "settings": settings}
        if path.is_file() and read_report(path).get("experiment", {}).get("key") == key:
            log.info("%s on %s: up to date", configuration.name, area.name)
            written[area.name] = path
            continue
        region = prepared.regions[area.region]
        test_map = predict_test_area(area, region, checkpoint, folder / TEST_MAP_FILE, prepared.config.evaluation,
                                     client)
        report = score_test_area(area, region, test_map, level=prepared.config.level, codes=prepared.codes,
                                 client=client)
        report["experiment"] = {"name": prepared.config.name, "configuration": configuration.name,
                                "preset": configuration.preset, "area": area.name, "region": area.region,
                                "season": area.season, "checkpoint": str(checkpoint), "test_map": str(test_map),
                                "key": key}
        written[area.name] = write_report(report, path)
        log.info("%s on %s: mIoU %s over %d test block(s)", configuration.name, area.name,
                 "n/a" if report["mean_iou"] is None else f"{report['mean_iou']:.3f}", len(area.blocks))
    return written


def chosen_checkpoint(training: Mapping[str, Any], choice: str) -> str:
    """The checkpoint scored: ``best`` (validation mIoU) when there is one, else the last."""
    if choice == "best" and training.get("best_checkpoint"):
        return str(training["best_checkpoint"])
    return str(training["checkpoint"])


# --------------------------------------------------------------------------- the cluster


@contextlib.contextmanager
def experiment_client(config: ExperimentConfig, scheduler: str | None = None, *, n_workers: int | None = None,
                      threads_per_worker: int | None = None) -> Iterator[Any]:
    """The experiment's Dask client, from its ``cluster`` section (or ``scheduler``); closed after.

    A local CPU cluster gets one worker per configuration (at most one per core) sharing the
    cores; ``cuda`` one worker per GPU; ``address`` (or ``scheduler``, or
    ``DASK_SCHEDULER_ADDRESS``) connects to a running scheduler; ``threads`` yields None (the
    configurations train one after the other in this process).
    """
    cluster = config.cluster
    address = scheduler or cluster.address
    kind = {"local": "local", "cuda": "cuda", "threads": "threads", "address": "threads"}[cluster.kind]
    workers = n_workers or cluster.n_workers
    threads = threads_per_worker or cluster.threads_per_worker
    if kind == "local" and workers is None:
        cores = os.cpu_count() or 1
        workers = max(1, min(len(resolve_configurations(config)), cores))
        threads = threads or max(1, cores // workers)
    with connect(address, kind=kind, n_workers=workers, threads_per_worker=threads,  # type: ignore[arg-type]
                 memory_limit=cluster.memory_limit) as client:
        yield client


# --------------------------------------------------------------------------- the experiment


@dataclass
class ExperimentResult:
    """What :func:`run_experiment` did and wrote."""

    root: Path
    configurations: list[str]
    training: dict[str, dict[str, Any]]
    evaluations: dict[str, dict[str, Path]]
    reports: dict[str, dict[str, Path]]
    results: dict[str, Any]
    split: Split
    seconds: float = 0.0


def run_experiment(
    config: ExperimentConfig | str | os.PathLike[str],
    output: str | os.PathLike[str] | None = None,
    *,
    client: Any | None = None,
) -> ExperimentResult:
    """Run (or resume) an experiment: split, train every configuration, score, compare.

    Args:
        config: an :class:`ExperimentConfig` or the path of its YAML file.
        output: the experiment folder (default: the config's ``output``). Running again on the
            same folder resumes: finished configurations are not trained again, interrupted ones
            continue from their checkpoint, scores are reused when their checkpoint is unchanged.
        client: a ``distributed.Client`` (training tasks and every computation run on its
            cluster); None trains the configurations one after the other in this process.

    Raises:
        ConfigError, InputError, GridMismatchError: bad settings or inputs, before any training.
        OutputError: the folder holds another experiment or another process runs it.
    """
    started = time.perf_counter()
    if not isinstance(config, ExperimentConfig):
        config = load_experiment_config(config)
    root = Path(output or config.output or config.name).resolve()
    checked = check_experiment(config)
    layout = ExperimentLayout(root)
    prepared = prepare_experiment(checked, layout, client)  # writes only regions it builds
    with _folder_lock(root):
        for leftover in remove_leftovers(root):  # of a killed experiment: no one else writes here now
            log.info("removed %s, left by an interrupted experiment", leftover)
        write_record(prepared)
        indices = {c.name: patch_index_for(prepared, c, client) for c in prepared.configurations}
        for configuration in prepared.configurations:
            check_resumable(prepared, configuration, indices[configuration.name])
        training: dict[str, dict[str, Any]] = {}
        evaluations: dict[str, dict[str, Path]] = {}

        def on_trained(configuration: Configuration, outcome: dict[str, Any]) -> None:
            training[configuration.name] = outcome
            log.info("%s trained (%d epoch(s) run, resumed after epoch %d)", configuration.name,
                     outcome["epochs_run"], outcome["resumed_from_epoch"])
            checkpoint = chosen_checkpoint(outcome, config.evaluation.checkpoint)
            evaluations[configuration.name] = score_configuration(prepared, configuration, checkpoint, client)

        _run_trainings(prepared, indices, client, on_trained)
        reports, results = write_results(prepared, evaluations, training)
    return ExperimentResult(root, [c.name for c in prepared.configurations], training, evaluations, reports,
                            results, prepared.split, time.perf_counter() - started)
