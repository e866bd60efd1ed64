"""Production runs: a country cut into tiles, processed in batches, resumable, published last.

``clc-dask run --config run.yaml`` resolves the config, fixes one grid, cuts the AOI into
2048 px tiles and processes them in batches whose graphs stay well under the ~500k tasks
that stall the scheduler (PITFALLS). It happens in two steps:

1. :func:`prepare_run` checks everything and writes nothing: the config, the tile names,
   the checkpoint against the config (class level, bands), the output store (another run's
   tiles are refused unless ``overwrite``), and searches the catalog once for the AOI (or,
   when resuming, re-reads the scenes saved with the run);
2. :func:`run_prepared` writes ``run.yaml``, ``items.json`` (the scenes, so the run can be
   repeated offline) and the manifest, then computes the tiles batch by batch
   (:class:`clc_dask.pipeline.TilePipeline`). Each finished tile is written once and
   recorded in the manifest with its files' SHA-256; ``resume`` skips recorded tiles whose
   files still match. The STAC Collection and Items are written last
   (:func:`publish_run`), for verified tiles only.

:func:`plan_run` / :meth:`RunPlan.summary` are the ``--dry-run``: tiles, scenes, bytes to
read, task counts and worker-hours, from a catalog search when one answers quickly, else
from the Sentinel-2 revisit.

Store layout::

    STORE/manifest.json          finished tiles (the completion record)
    STORE/run.yaml               the resolved config
    STORE/items.json             the scenes used (STAC item collection)
    STORE/tiles/<row_col>/       classes.tif, generalized.tif, polygons.gpkg
    STORE/map.zarr               (formats: zarr) classes/generalized, one chunk per tile
    STORE/styles/polygons.qml    QGIS / SLD styles for the polygons
    STORE/stac/collection.json   STAC Collection + one Item per finished tile
    STORE/performance-report.html  (--performance-report)
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import math
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pystac
import shapely
import yaml
from odc.geo.geobox import GeoBox
from odc.geo.geom import Geometry

from clc_dask.config import RunConfig, dump_run_config
from clc_dask.errors import ClcDaskError, InputError, OutputError
from clc_dask.grid import Tile, TileGrid, geobox_for_aoi, lonlat_box
from clc_dask.manifest import RUN_OUTPUTS, Manifest, config_fingerprint
from clc_dask.pipeline import (
    ITEMS_FILE,
    ZARR_STORE,
    CheckpointInfo,
    TileFailure,
    TileLayout,
    TileOutput,
    TilePipeline,
    check_checkpoint,
    find_scenes,
    item_index,
    items_over,
)

log = logging.getLogger(__name__)

#: Sentinel-2 A+B revisit at the equator (days); orbits overlap more towards the poles.
REVISIT_DAYS = 5.0
#: MGRS granule edge and spacing (km): 109.8 km granules every 100 km.
GRANULE_KM, GRANULE_SPACING_KM = 109.8, 100.0
#: Bytes per 10 m pixel of SCL (uint8 at 20 m).
SCL_BYTES_PER_PIXEL = 0.25
#: Keep each submitted graph this far below the scheduler's comfort zone (~500k tasks).
MAX_TASKS_PER_GRAPH = 200_000
#: Task counts of a tile's optimized graph per unit (see :func:`estimate_tile`), measured on
#: the demo region (tests/test_run.py checks the estimate against the real graph).
TASKS_PER_LOAD_CHUNK = 15  # stackstac selection + mosaic (masks, median, clear count), besides reads
TASKS_PER_PIECE = 1  # per band: one split of the mosaic per piece when padding and re-chunking it
TASKS_PER_ARRAY_CHUNK = 2  # merges into inference chunks
TASKS_PER_BLOCK = 4  # inference block: overlap, predict, trim, crop
TASKS_PER_SCENE = 2  # stackstac asset table entries
TASKS_PER_TILE = 4  # finishing task, its input and the graph's own bookkeeping
#: Default throughput assumptions of the worker-hours estimate.
DEFAULT_PX_PER_SECOND = 1.0e6  # class-map pixels one worker predicts per second (GPU, ResNet50)
DEFAULT_READ_MB_PER_SECOND = 100.0  # MB one worker reads per second from object storage


class TileProcessor(Protocol):
    """Computes and writes tiles (see :class:`clc_dask.pipeline.TilePipeline`)."""

    def prepare_store(self) -> None: ...

    def process_batch(self, tiles: Sequence[Tile]) -> Any: ...


# --------------------------------------------------------------------------- config helpers


def season_window(season: str, year: int) -> tuple[dt.datetime, dt.datetime]:
    """Start and end (UTC, inclusive) of a config season in ``year``."""
    from clc_dask.pipeline import season_search_args
    from clc_dask.search import season_intervals

    args = season_search_args(season, year)
    (start, end), *_ = season_intervals(args["season"], args["years"])
    return start, end


def aoi_geometry(config: RunConfig) -> Geometry:
    """The AOI in lon/lat: the bbox (edges densified, so it reprojects without cutting
    corners), or the union of a vector file's polygons."""
    if config.aoi.bbox is not None:
        box = lonlat_box(config.aoi.bbox)
        return Geometry(shapely.segmentize(box.geom, 0.05), "EPSG:4326")
    from clc_dask.search import read_aoi

    lonlat = Geometry(read_aoi(config.aoi.path or ""), "EPSG:4326")
    native = _aoi_in_grid_crs(config)
    return native if native is not None else lonlat


def _aoi_in_grid_crs(config: RunConfig) -> Geometry | None:
    """The AOI file's polygons in their own CRS when that is the grid's CRS: no round trip
    through lon/lat, so an AOI drawn on the grid (e.g. a region's footprint) gives exactly
    that grid."""
    import geopandas as gpd
    from pyproj import CRS

    frame = gpd.read_file(config.aoi.path or "")
    if frame.crs is None or CRS(frame.crs) != CRS.from_epsg(config.grid.epsg):
        return None
    return Geometry(frame.union_all(), f"EPSG:{config.grid.epsg}")


def output_settings(config: RunConfig) -> dict[str, Any]:
    """The settings that decide a run's outputs: the config without the store path, the
    cluster and the performance report (a store can be moved, a run resumed on another
    cluster, and the same settings give the same bytes). Recorded as provenance in STAC
    (with ``output.store`` = ``.``, the catalog's own folder); their SHA-256 identifies
    "the same run" in the manifest."""
    data = config.model_dump(mode="json")
    data.pop("cluster", None)
    data["output"]["store"] = "."
    data["output"].pop("performance_report", None)
    return data


def settings_fingerprint(config: RunConfig) -> str:
    """SHA-256 of :func:`output_settings` (stable key order)."""
    return config_fingerprint(yaml.safe_dump(output_settings(config), sort_keys=True))


def grid_record(geobox: GeoBox, tile_size: int) -> dict[str, Any]:
    """The grid as plain values (stored in the manifest to recognise the same grid)."""
    return {"crs": str(geobox.crs), "transform": [round(float(v), 6) for v in list(geobox.affine)[:6]],
            "shape": [geobox.shape.y, geobox.shape.x], "tile_size": tile_size}


def run_grid(config: RunConfig) -> tuple[Geometry, TileGrid]:
    """The AOI and the run's tile grid."""
    aoi = aoi_geometry(config)
    geobox = geobox_for_aoi(aoi.to_crs(f"EPSG:{config.grid.epsg}", resolution=0.01), config.grid.epsg,
                            config.grid.resolution)
    return aoi, TileGrid(geobox, config.grid.tile_size)


def select_tiles(config: RunConfig, grid: TileGrid, aoi: Geometry, tile_names: Sequence[str] | None) -> list[Tile]:
    """The named tiles (each checked), or every tile of the grid meeting the AOI."""
    if tile_names:
        tiles = grid.select([t.strip() for t in tile_names if t.strip()])
        target = aoi.to_crs(grid.geobox.crs, resolution=0.01)
        outside = [t.name for t in tiles if not t.geobox.extent.intersects(target)]
        if outside:
            log.warning("tile(s) %s lie outside the AOI: they will be no data", ", ".join(outside))
        return tiles
    tiles = grid.intersecting(aoi.to_crs(grid.geobox.crs, resolution=0.01))
    if not tiles:
        raise InputError("The AOI covers no tile of the grid: check aoi and grid.epsg.")
    return tiles


# --------------------------------------------------------------------------- estimates


@dataclass(frozen=True)
class TileEstimate:
    """What one tile will cost."""

    scenes: float  # scenes overlapping the tile (catalog count or revisit expectation)
    pixels_read: int  # pixels loaded per scene (tile + margin + context)
    bytes_to_read: float  # uncompressed upper bound: scenes × pixels_read × bytes per pixel
    tasks: int  # tasks of the tile's graph
    pixels_predicted: int  # class-map pixels (tile + margin)


def bytes_per_pixel(config: RunConfig) -> float:
    """Uncompressed bytes per 10 m pixel and scene: the composite's uint16 bands + SCL."""
    from clc_dask.model import composite_bands

    return 2.0 * len(composite_bands(config.imagery.composite)) + SCL_BYTES_PER_PIXEL


def estimate_tile(config: RunConfig, layout: TileLayout, scenes: float) -> TileEstimate:
    """Bytes and tasks of one tile given the number of scenes overlapping it.

    Tasks are counted as the scheduler receives them (the optimized graph of
    :class:`clc_dask.pipeline.TilePipeline`): stackstac reads each band of each loaded chunk
    in one task (all dates), the mosaic adds a fixed number per loaded chunk, padding the
    mosaic onto the inference chunks splits it into pieces (per band), and each inference
    block of the tile (and margin) costs a fixed number.
    """
    from clc_dask.model import composite_bands

    bands = len(composite_bands(config.imagery.composite))
    load = layout.load_geobox
    chunk = layout.chunk
    ys, xs = layout.array_chunks()
    load_axes = [_regular(load.shape.y, chunk), _regular(load.shape.x, chunk)]
    pad_before = [layout.before[0] - layout.context, layout.before[1] - layout.context]
    pad_after = layout.after - layout.context
    padded = [[p, *c, pad_after] for p, c in zip(pad_before, load_axes, strict=True)]
    pieces = math.prod(_pieces(p, a) for p, a in zip(padded, (ys, xs), strict=True))
    padded_chunks = math.prod(len([s for s in p if s]) for p in padded)
    load_chunks = len(load_axes[0]) * len(load_axes[1])
    m = layout.margin
    blocks = math.prod(len(_regular(n, chunk)) + (2 if m else 0) for n in layout.shape)
    n = math.ceil(scenes) if scenes > 0 else 0
    tasks = 0 if n == 0 else (
        (bands + 1 + TASKS_PER_LOAD_CHUNK) * load_chunks + TASKS_PER_PIECE * bands * (pieces + padded_chunks)
        + TASKS_PER_ARRAY_CHUNK * len(ys) * len(xs) + TASKS_PER_BLOCK * blocks + TASKS_PER_SCENE * n
        + TASKS_PER_TILE)
    region = layout.region_geobox
    pixels = load.shape.y * load.shape.x
    return TileEstimate(scenes=scenes, pixels_read=pixels, bytes_to_read=scenes * pixels * bytes_per_pixel(config),
                        tasks=int(tasks), pixels_predicted=region.shape.y * region.shape.x)


def _regular(n: int, chunk: int) -> list[int]:
    return [chunk] * (n // chunk) + ([n % chunk] if n % chunk else [])


def _pieces(a: Sequence[int], b: Sequence[int]) -> int:
    """Intervals cut by the chunk boundaries of two chunkings of one axis."""
    edges = set(np.cumsum([0, *a]).tolist()) | set(np.cumsum([0, *b]).tolist())
    return len(edges) - 1


def season_days(config: RunConfig) -> float:
    """Length of the prediction season in days."""
    start, end = season_window(config.imagery.prediction_season, config.imagery.year)
    return (end - start).total_seconds() / 86400


def scenes_from_revisit(config: RunConfig, tile_km: float, lat: float) -> float:
    """Expected scenes (items) per tile without a catalog: acquisitions in the prediction
    season × MGRS granules overlapping a tile. No cloud filtering: an upper bound."""
    revisit = REVISIT_DAYS * max(math.cos(math.radians(lat)), 0.3)  # orbits overlap towards the poles
    granules = ((tile_km + GRANULE_KM - GRANULE_SPACING_KM) / GRANULE_SPACING_KM + 1) ** 2
    return season_days(config) / revisit * granules


def scenes_per_tile(items: Sequence[pystac.Item], tiles: Sequence[Tile], config: RunConfig) -> dict[str, float]:
    """Items overlapping each tile's loaded area (catalog counts)."""
    if not items:
        return {t.name: 0.0 for t in tiles}
    index = item_index(items)
    return {t.name: float(len(items_over(items, index, TileLayout.for_tile(t, config).load_geobox))) for t in tiles}


def revisit_scenes(config: RunConfig, tiles: Sequence[Tile]) -> dict[str, float]:
    """Expected items per tile from the revisit, at each tile centre's latitude."""
    if not tiles:
        return {}
    from pyproj import Transformer

    crs = tiles[0].geobox.crs
    to_lonlat = Transformer.from_crs(crs.to_wkt(), "EPSG:4326", always_xy=True)
    xs = np.array([t.geobox.extent.centroid.coords[0][0] for t in tiles])
    ys = np.array([t.geobox.extent.centroid.coords[0][1] for t in tiles])
    _, lats = to_lonlat.transform(xs, ys)
    tile_km = config.grid.tile_size * config.grid.resolution / 1000
    return {t.name: scenes_from_revisit(config, tile_km, float(lat)) for t, lat in zip(tiles, lats, strict=True)}


@dataclass
class RunPlan:
    """Tiles, batches and estimates of a run, before anything is read or written."""

    config: RunConfig
    grid: TileGrid
    tiles: list[Tile]  # to process
    skipped: list[str]  # already finished (resume)
    batches: list[list[Tile]]
    estimates: dict[str, TileEstimate]
    scenes_source: str
    tiles_in_aoi: int = 0

    @property
    def geobox(self) -> GeoBox:
        return self.grid.geobox

    def summary(self, px_per_second: float = DEFAULT_PX_PER_SECOND,
                read_mb_per_second: float = DEFAULT_READ_MB_PER_SECOND) -> dict[str, Any]:
        """The plan as numbers (the ``--dry-run`` report).

        Args:
            px_per_second: class-map pixels one worker predicts per second. Measure yours
                (the run logs it per tile); CPU workers with ResNet18 do ~1e5, GPUs with
                ResNet50/101 ~1e6–1e7.
            read_mb_per_second: MB one worker reads per second from the catalog's storage.
        """
        est = [self.estimates[t.name] for t in self.tiles]
        res = abs(self.geobox.resolution.x)
        pixels = sum(t.geobox.shape.x * t.geobox.shape.y for t in self.tiles)
        total_bytes = sum(e.bytes_to_read for e in est)
        predicted = sum(e.pixels_predicted for e in est)
        seconds = predicted / px_per_second + total_bytes / (read_mb_per_second * 1e6)
        batch_tasks = [sum(self.estimates[t.name].tasks for t in b) for b in self.batches]
        scenes = [e.scenes for e in est]
        bbox = self.geobox.extent.boundingbox
        return {
            "run": self.config.name,
            "crs": str(self.geobox.crs),
            "resolution_m": res,
            "grid_shape_px": [self.geobox.shape.y, self.geobox.shape.x],
            "grid_bounds": [round(float(v), 2) for v in bbox],
            "tile_size_px": self.grid.tile_size,
            "tile_area_km2": round((self.grid.tile_size * res) ** 2 / 1e6, 4),
            "tiles_in_grid": len(self.grid),
            "tiles_in_aoi": self.tiles_in_aoi,
            "tiles_to_process": len(self.tiles),
            "tiles_already_done": len(self.skipped),
            "batches": len(self.batches),
            "tiles_per_batch": max((len(b) for b in self.batches), default=0),
            "area_km2": round(pixels * res**2 / 1e6, 1),
            "season": self.config.imagery.prediction_season,
            "year": self.config.imagery.year,
            "scenes_source": self.scenes_source,
            "scenes_total": round(sum(scenes), 1),
            "scenes_per_tile_mean": round(sum(scenes) / len(scenes), 2) if scenes else 0.0,
            "scenes_per_tile_max": round(max(scenes), 2) if scenes else 0.0,
            "pixels_read_per_scene_and_tile": est[0].pixels_read if est else 0,
            "bytes_per_pixel": bytes_per_pixel(self.config),
            "bytes_to_read": int(total_bytes),
            "pixels_predicted": int(predicted),
            "tasks_per_tile_max": max((e.tasks for e in est), default=0),
            "tasks_per_batch_max": max(batch_tasks, default=0),
            "tasks_total": int(sum(e.tasks for e in est)),
            "max_tasks_per_graph": MAX_TASKS_PER_GRAPH,
            "worker_hours": round(seconds / 3600, 2),
            "assumptions": {"px_per_second": px_per_second, "read_mb_per_second": read_mb_per_second,
                            "bytes": "uncompressed upper bound: every scene over a tile read over its "
                                     "whole loaded area"},
        }

    def table(self, **kwargs: float) -> str:
        """:meth:`summary` as aligned ``key  value`` lines (for terminals)."""
        data = self.summary(**kwargs)
        width = max(len(k) for k in data)
        lines = []
        for key, value in data.items():
            if key == "bytes_to_read":
                value = f"{value} ({value / 1e12:.2f} TB)"
            lines.append(f"{key.ljust(width)}  {value}")
        return "\n".join(lines)


def plan_run(
    config: RunConfig,
    *,
    tile_names: Sequence[str] | None = None,
    manifest: Manifest | None = None,
    items: Sequence[pystac.Item] | None = None,
    scenes_source: str | None = None,
) -> RunPlan:
    """Cut the AOI into tiles and batches and estimate the cost (reads no pixel).

    Args:
        config: the run config.
        tile_names: only these ``row_col`` tiles.
        manifest: tiles it records as finished (and verified) are skipped.
        items: scenes found for the run; None estimates them from the revisit.
        scenes_source: how ``items`` were obtained (shown in the summary).
    """
    aoi, grid = run_grid(config)
    tiles = select_tiles(config, grid, aoi, tile_names)
    tiles_in_aoi = len(tiles) if not tile_names else len(grid.intersecting(aoi.to_crs(grid.geobox.crs,
                                                                                     resolution=0.01)))
    skipped = [t.name for t in tiles if manifest is not None and manifest.is_done(t.name)]
    done = set(skipped)
    todo = [t for t in tiles if t.name not in done]
    if items is None:
        counts, source = revisit_scenes(config, todo), scenes_source or "revisit estimate"
    else:
        counts, source = scenes_per_tile(items, todo, config), scenes_source or "catalog search"
    estimates = {t.name: estimate_tile(config, TileLayout.for_tile(t, config), counts[t.name]) for t in todo}
    batches = make_batches(todo, estimates, config.cluster.tiles_per_batch)
    return RunPlan(config, grid, todo, skipped, batches, estimates, source, tiles_in_aoi)


def make_batches(tiles: Sequence[Tile], estimates: dict[str, TileEstimate], tiles_per_batch: int) -> list[list[Tile]]:
    """Consecutive tiles in batches of at most ``tiles_per_batch`` and ``MAX_TASKS_PER_GRAPH`` tasks."""
    batches: list[list[Tile]] = []
    current: list[Tile] = []
    tasks = 0
    lowered = False
    for tile in tiles:
        cost = estimates[tile.name].tasks
        if current and (len(current) >= tiles_per_batch or tasks + cost > MAX_TASKS_PER_GRAPH):
            lowered |= len(current) < tiles_per_batch
            batches.append(current)
            current, tasks = [], 0
        current.append(tile)
        tasks += cost
    if current:
        batches.append(current)
    if lowered:
        log.warning("batches hold fewer than %d tiles to keep graphs under %d tasks",
                    tiles_per_batch, MAX_TASKS_PER_GRAPH)
    return batches


def dry_run(config: RunConfig, *, tile_names: Sequence[str] | None = None, resume: bool = False,
            overwrite: bool = False, search_timeout: float = 5.0) -> RunPlan:
    """The ``--dry-run``: every check of a real run, then the plan. Writes and reads no pixel.

    Scenes are counted from the catalog when it answers within ``search_timeout`` seconds
    (a local catalog file always does); otherwise they are estimated from the revisit, and
    the reason is logged.
    """
    aoi, grid = run_grid(config)
    select_tiles(config, grid, aoi, tile_names)
    checkpoint = check_checkpoint(config)
    manifest = open_manifest(config, grid, checkpoint, resume=resume, overwrite=overwrite)
    store_items = Path(config.output.store) / ITEMS_FILE
    items: Sequence[pystac.Item] | None
    if not manifest.fresh and store_items.exists():
        items, source = _read_saved_items(store_items), f"saved scenes ({ITEMS_FILE})"
    else:
        try:
            layout = TileLayout.for_tile(grid.tile("1_1"), config)
            items = find_scenes(config, aoi, grid.geobox.crs, (layout.margin + layout.context) * config.grid.resolution,
                                timeout=(search_timeout, search_timeout), retries=0)
            source = f"catalog search ({config.imagery.source})"
        except Exception as exc:  # any failure (offline, DNS, 5xx, nothing found) → estimate
            log.warning("no catalog search for the plan (%s: %s); scenes are estimated from the "
                        "Sentinel-2 revisit", type(exc).__name__, str(exc)[:200])
            items, source = None, "revisit estimate (catalog not reachable)"
    return plan_run(config, tile_names=tile_names, manifest=None if manifest.fresh else manifest,
                    items=items, scenes_source=source)


# --------------------------------------------------------------------------- preparing a run


def open_manifest(config: RunConfig, grid: TileGrid, checkpoint: CheckpointInfo, *, resume: bool,
                  overwrite: bool) -> Manifest:
    """The run's manifest (resumed or fresh); refuses another run's store. Writes nothing."""
    return Manifest.open(Path(config.output.store), config.name, settings_fingerprint(config),
                         checkpoint.sha256, grid_record(grid.geobox, config.grid.tile_size),
                         resume=resume, overwrite=overwrite)


@dataclass
class PreparedRun:
    """A checked run, ready to write: nothing of it is on disk yet (unless resumed)."""

    config: RunConfig
    aoi: Geometry
    plan: RunPlan
    manifest: Manifest
    checkpoint: CheckpointInfo
    items: pystac.ItemCollection
    overwrite: bool

    @property
    def store(self) -> Path:
        return Path(self.config.output.store)


def prepare_run(config: RunConfig, *, tile_names: Sequence[str] | None = None, resume: bool = False,
                overwrite: bool = False) -> PreparedRun:
    """Check a run and find its scenes; writes nothing (see the module docstring).

    Raises:
        ConfigError, InputError: bad tile names or AOI.
        CheckpointError: the checkpoint is missing or does not match the config.
        OutputError: the store holds another run's outputs (without ``overwrite``).
        SearchError: the catalog has no scenes for the AOI and season.
    """
    aoi, grid = run_grid(config)
    select_tiles(config, grid, aoi, tile_names)
    checkpoint = check_checkpoint(config)
    manifest = open_manifest(config, grid, checkpoint, resume=resume, overwrite=overwrite)
    saved = Path(config.output.store) / ITEMS_FILE
    if not manifest.fresh and saved.exists():
        items = _read_saved_items(saved)
        log.info("resuming with the %d scene(s) saved in %s", len(items), saved)
    else:
        layout = TileLayout.for_tile(grid.tile("1_1"), config)
        items = find_scenes(config, aoi, grid.geobox.crs, (layout.margin + layout.context) * config.grid.resolution)
    plan = plan_run(config, tile_names=tile_names, manifest=None if manifest.fresh else manifest, items=items)
    return PreparedRun(config, aoi, plan, manifest, checkpoint, items, overwrite)


def _read_saved_items(path: Path) -> pystac.ItemCollection:
    from clc_dask.search import search_items

    return search_items(str(path))


# --------------------------------------------------------------------------- running


@dataclass
class RunResult:
    """What a run did."""

    store: Path
    computed: list[str]
    skipped: list[str]
    collection: Path | None
    plan: RunPlan
    failed: dict[str, str] = field(default_factory=dict)


def execute_run(
    config: RunConfig,
    processor_factory: Callable[[PreparedRun, Any], TileProcessor] | None = None,
    *,
    tile_names: Sequence[str] | None = None,
    resume: bool = False,
    overwrite: bool = False,
    client: Any = None,
    progress: Callable[[str], None] | None = None,
) -> RunResult:
    """Check, then run (or resume) a production run: :func:`prepare_run` + :func:`run_prepared`."""
    prepared = prepare_run(config, tile_names=tile_names, resume=resume, overwrite=overwrite)
    return run_prepared(prepared, client=client, progress=progress, processor_factory=processor_factory)


def default_processor(prepared: PreparedRun, client: Any) -> TilePipeline:
    """The real per-tile processor (search results, checkpoint and AOI of the prepared run)."""
    return TilePipeline(prepared.config, prepared.checkpoint, list(prepared.items), prepared.plan.grid,
                        prepared.aoi, prepared.store, client=client)


def run_prepared(
    prepared: PreparedRun,
    *,
    client: Any = None,
    progress: Callable[[str], None] | None = None,
    processor_factory: Callable[[PreparedRun, Any], TileProcessor] | None = None,
) -> RunResult:
    """Write the run's files and compute its tiles batch by batch; publish STAC last.

    Args:
        prepared: from :func:`prepare_run`.
        client: a distributed client (tiles of a batch run concurrently), or None for
            dask's default scheduler in this process.
        progress: called with each tile's name when it is finished or skipped.
        processor_factory: builds the tile processor (default :func:`default_processor`).

    Raises:
        ClcDaskError: some tiles failed (the others are recorded; fix and ``--resume``).
    """
    store = prepared.store
    store.mkdir(parents=True, exist_ok=True)
    with store_lock(store):
        return _run_locked(prepared, client, progress, processor_factory)


@contextlib.contextmanager
def store_lock(store: Path) -> Iterator[None]:
    """Hold ``store/.lock`` (an advisory file lock, released by the OS even on SIGKILL)."""
    import fcntl

    with open(store / ".lock", "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise OutputError(
                f"Another process is running a run in {store}: wait for it to finish (or stop it), "
                "then --resume."
            ) from None
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _run_locked(prepared: PreparedRun, client: Any, progress: Callable[[str], None] | None,
                processor_factory: Callable[[PreparedRun, Any], TileProcessor] | None) -> RunResult:
    from clc_dask.rasters import atomic_path
    from clc_dask.search import save_item_collection

    config, plan, manifest, store = prepared.config, prepared.plan, prepared.manifest, prepared.store
    if manifest.fresh:
        for name in RUN_OUTPUTS:
            target = store / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    if manifest.fresh or not (store / ITEMS_FILE).exists():
        save_item_collection(prepared.items, store / ITEMS_FILE)
    with atomic_path(store / "run.yaml", suffix=".yaml") as tmp:
        tmp.write_text(dump_run_config(config), encoding="utf-8")
    for name in [t.name for t in plan.tiles if t.name in manifest.tiles]:
        manifest.forget(name)  # recorded, but its files changed: recomputed below
    manifest.save()
    processor = (processor_factory or default_processor)(prepared, client)
    processor.prepare_store()
    if (store / "stac").exists():
        publish_run(config, manifest, plan.grid, recheck=False)  # no Item may point at a tile being rewritten
    for name in plan.skipped:
        log.info("tile %s already finished: skipped", name)
        if progress:
            progress(name)
    computed: list[str] = []
    failed: dict[str, str] = {}
    total = len(plan.tiles)
    started = time.perf_counter()
    for number, batch in enumerate(plan.batches, start=1):
        log.info("batch %d/%d: tiles %s", number, len(plan.batches), ", ".join(t.name for t in batch))
        for out in processor.process_batch(batch):
            if isinstance(out, TileFailure):
                failed[out.tile.name] = f"{type(out.error).__name__}: {out.error}"
                log.error("tile %s failed: %s", out.tile.name, failed[out.tile.name])
                continue
            assert isinstance(out, TileOutput)
            manifest.record(out.tile.name, out.files, out.extra, out.extra_files)
            computed.append(out.tile.name)
            log.info("tile %s finished (%d/%d)", out.tile.name, len(computed), total)
            if progress:
                progress(out.tile.name)
        if failed:
            break
    _log_throughput(plan, computed, time.perf_counter() - started, client)
    collection = publish_run(config, manifest, plan.grid)
    all_tiles = select_tiles(config, plan.grid, prepared.aoi, None)
    manifest.complete = not failed and all(manifest.is_done(t.name) for t in all_tiles)
    manifest.save()
    if failed:
        details = "; ".join(f"{k}: {v}" for k, v in sorted(failed.items()))
        raise ClcDaskError(
            f"{len(failed)} tile(s) failed ({details}). The {len(manifest.tiles)} finished tile(s) are "
            "recorded and published: fix the cause and run again with --resume."
        )
    return RunResult(store, computed, plan.skipped, collection, plan, failed)


def _log_throughput(plan: RunPlan, computed: Sequence[str], seconds: float, client: Any) -> None:
    """Log the measured class-map pixels per second and worker (for ``--px-per-second``)."""
    if not computed or seconds <= 0:
        return
    workers = len(client.scheduler_info().get("workers", {})) if client is not None else 1
    pixels = sum(plan.estimates[name].pixels_predicted for name in computed)
    log.info("computed %d tile(s) (%.3g px) in %.1f s on %d worker(s): %.3g px/s per worker "
             "(--px-per-second for --dry-run)", len(computed), pixels, seconds, max(workers, 1),
             pixels / seconds / max(workers, 1))


# --------------------------------------------------------------------------- publishing


def publish_run(config: RunConfig, manifest: Manifest | None = None, grid: TileGrid | None = None,
                *, recheck: bool = True) -> Path:
    """Write the STAC Collection and an Item per finished tile (files verified first).

    Also usable on its own (``clc-dask run --publish-only``): tiles whose files are
    missing or changed get no Item.

    Args:
        config: the run's config.
        manifest: the run's manifest (default: read from ``output.store``).
        grid: the run's tile grid (default: made from the config).
        recheck: hash every file again (False: trust this process's earlier checks).
    """
    from clc_dask import __version__
    from clc_dask.publish import tile_item, write_catalog

    store = Path(config.output.store)
    if manifest is None:
        manifest = Manifest.read(store)
        if manifest is None:
            raise InputError(f"{store} holds no run manifest: nothing to publish (run it first).")
        if manifest.run_name != config.name:
            raise InputError(f"{store} holds run {manifest.run_name!r}, not {config.name!r}: check output.store.")
    if grid is None:
        grid = run_grid(config)[1]
    start, end = season_window(config.imagery.prediction_season, config.imagery.year)
    base = {"clc_dask:version": __version__, "clc_dask:config": output_settings(config),
            "clc_dask:checkpoint_sha256": manifest.checkpoint_sha256,
            "clc_dask:season": config.imagery.prediction_season, "clc_dask:items_file": ITEMS_FILE}
    items = []
    for name in sorted(manifest.tiles):
        if not manifest.is_done(name, recheck=recheck):
            continue
        entry = manifest.tiles[name]
        assets = {k: store / rel for k, rel in entry["assets"].items()}
        sums = {k: (entry["files"][rel]["sha256"], entry["files"][rel]["bytes"]) for k, rel in entry["assets"].items()}
        extra = {k: v for k, v in entry.items() if k.startswith("clc_dask:")}
        items.append(tile_item(name, grid.tile(name).geobox, assets, run_name=config.name,
                               level=config.classes.level, start=start, end=end,
                               provenance={**base, **extra}, checksums=sums))
    zarr = {"zarr": store / ZARR_STORE} if (store / ZARR_STORE).exists() else {}
    bbox = list(grid.geobox.extent.to_crs("EPSG:4326").boundingbox)
    return write_catalog(store, items, collection_id=config.name,
                         description=f"CORINE Land Cover Level {config.classes.level} map made by clc-dask",
                         bbox=bbox, start=start, end=end, properties=base, assets=zarr)
