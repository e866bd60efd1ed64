"""The plan of a run: tiles to compute and skip, batches under the task limit, and what it
will cost (scenes, bytes, tasks, worker-hours) — the ``--dry-run`` report.

Scenes are counted from a catalog search when one answers quickly, else estimated from the
Sentinel-2 revisit. Each batch's graph stays well under the ~500k tasks that stall the
scheduler (PITFALLS); the task estimate is checked against the real graph in the tests.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pystac
from odc.geo.geobox import GeoBox
from pyproj import Transformer

from clc_dask.config import RunConfig
from clc_dask.grid import Tile, TileGrid
from clc_dask.items import composite_bands
from clc_dask.run.context import RunContext, resolve_run
from clc_dask.run.layout import TileLayout
from clc_dask.run.scenes import item_index, items_over
from clc_dask.seasons import season_window

log = logging.getLogger(__name__)

#: Sentinel-2 A+B revisit at the equator (days); orbits overlap more towards the poles.
REVISIT_DAYS = 5.0
#: MGRS granule edge and spacing (km): 109.8 km granules every 100 km.
GRANULE_KM, GRANULE_SPACING_KM = 109.8, 100.0
#: Bytes per 10 m pixel of SCL (uint8 at 20 m).
SCL_BYTES_PER_PIXEL = 0.25
#: Tiles on the cluster at once when the config does not say (the run uses twice the
#: workers' threads when it knows the cluster).
DEFAULT_IN_FLIGHT = 4
#: Keep each submitted graph this far below the scheduler's comfort zone (~500k tasks).
MAX_TASKS_PER_GRAPH = 200_000
#: Task counts of a tile's optimized graph per unit (see :func:`estimate_tile`), measured on
#: the demo region (tests/test_run.py checks the estimate against the real graph).
TASKS_PER_LOAD_CHUNK = 1  # stackstac selection of the loaded chunk, besides reads
TASKS_PER_BAND_AND_CHUNK = 4  # mosaic of one band of a loaded chunk: selection, masks, median, merge
TASKS_PER_SCENE = 2  # stackstac asset table entries
TASKS_PER_TILE = 4  # the mosaic merged into one block, its inference, its write, the graph's result
#: Default throughput assumptions of the worker-hours estimate.
DEFAULT_PX_PER_SECOND = 1.0e6  # class-map pixels one worker predicts per second (GPU, ResNet50)
DEFAULT_READ_MB_PER_SECOND = 100.0  # MB one worker reads per second from object storage


@dataclass(frozen=True)
class TileEstimate:
    """What one tile will cost."""

    scenes: float  # scenes overlapping the tile (catalog count or revisit expectation)
    pixels_read: int  # pixels loaded per scene (tile + context)
    bytes_to_read: float  # uncompressed upper bound: scenes × pixels_read × bytes per pixel
    tasks: int  # tasks of the tile's graph
    pixels_predicted: int  # class-map pixels (the tile)


def bytes_per_pixel(config: RunConfig) -> float:
    """Uncompressed bytes per 10 m pixel and scene: the composite's uint16 bands + SCL."""
    return 2.0 * len(composite_bands(config.imagery.composite)) + SCL_BYTES_PER_PIXEL


def estimate_tile(config: RunConfig, layout: TileLayout, scenes: float) -> TileEstimate:
    """Bytes and tasks of one tile given the number of scenes overlapping it.

    Tasks are counted as the scheduler receives them (the graph of
    :class:`clc_dask.run.tiles.TileProcessor`, submitted unoptimized): stackstac reads each band
    of each loaded chunk in one task (all dates), the mosaic adds a fixed number per band and
    loaded chunk, and the tile's inference and write are one task each.
    """
    bands = len(composite_bands(config.imagery.composite))
    load = layout.load_geobox
    rows, cols = layout.load_chunks
    load_chunks = len(_regular(load.shape.y, rows)) * len(_regular(load.shape.x, cols))
    n = math.ceil(scenes) if scenes > 0 else 0
    tasks = 0 if n == 0 else (
        (bands + 1 + TASKS_PER_LOAD_CHUNK + TASKS_PER_BAND_AND_CHUNK * bands) * load_chunks
        + TASKS_PER_SCENE * n + TASKS_PER_TILE)
    pixels = load.shape.y * load.shape.x
    return TileEstimate(scenes=scenes, pixels_read=pixels, bytes_to_read=scenes * pixels * bytes_per_pixel(config),
                        tasks=int(tasks), pixels_predicted=layout.shape[0] * layout.shape[1])


def _regular(n: int, chunk: int) -> list[int]:
    return [chunk] * (n // chunk) + ([n % chunk] if n % chunk else [])


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
    crs = tiles[0].geobox.crs
    to_lonlat = Transformer.from_crs(crs.to_wkt(), "EPSG:4326", always_xy=True)
    xs = np.array([t.geobox.extent.centroid.coords[0][0] for t in tiles])
    ys = np.array([t.geobox.extent.centroid.coords[0][1] for t in tiles])
    _, lats = to_lonlat.transform(xs, ys)
    tile_km = config.grid.tile_size * config.grid.resolution / 1000
    return {t.name: scenes_from_revisit(config, tile_km, float(lat)) for t, lat in zip(tiles, lats, strict=True)}


@dataclass
class RunPlan:
    """Tiles and estimates of a run, before anything is read or written.

    Tiles flow through the cluster, at most ``in_flight`` at once; ``batches`` are the
    successive groups of ``in_flight`` tiles (what is on the cluster at one time), kept to
    show the graph sizes the scheduler will hold.
    """

    config: RunConfig
    grid: TileGrid
    tiles: list[Tile]  # to process
    skipped: list[str]  # already finished (resume)
    in_flight: int
    estimates: dict[str, TileEstimate]
    scenes_source: str
    tiles_in_aoi: int = 0

    @property
    def batches(self) -> list[list[Tile]]:
        """The tiles in groups of ``in_flight``, in the order they are submitted."""
        return [self.tiles[i:i + self.in_flight] for i in range(0, len(self.tiles), self.in_flight)]

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
            "tiles_in_flight": self.in_flight,
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


def plan_run(ctx: RunContext, *, in_flight: int | None = None) -> RunPlan:
    """The tiles to compute and what they will cost (reads no pixel, writes nothing).

    Tiles the manifest records as finished (and whose files verify) are skipped; scenes are
    counted from the context's items, or estimated from the Sentinel-2 revisit without them.

    Args:
        ctx: the resolved run (:func:`clc_dask.run.resolve_run`).
        in_flight: tiles on the cluster at once (default: the config's ``cluster.tiles_in_flight``,
            else :data:`DEFAULT_IN_FLIGHT`); lowered so that they hold fewer than
            :data:`MAX_TASKS_PER_GRAPH` tasks together.
    """
    config = ctx.config
    manifest = None if ctx.manifest.fresh else ctx.manifest
    skipped = [t.name for t in ctx.tiles if manifest is not None and manifest.is_done(t.name)]
    done = set(skipped)
    todo = [t for t in ctx.tiles if t.name not in done]
    if ctx.items is None:
        counts, source = revisit_scenes(config, todo), "revisit estimate"
        if ctx.scenes_source != "none":
            source = ctx.scenes_source
    else:
        counts, source = scenes_per_tile(ctx.items, todo, config), ctx.scenes_source
    estimates = {t.name: estimate_tile(config, TileLayout.for_tile(t, config), counts[t.name]) for t in todo}
    wanted = in_flight or config.cluster.tiles_in_flight or config.cluster.tiles_per_batch or DEFAULT_IN_FLIGHT
    return RunPlan(config, ctx.grid, todo, skipped, tiles_in_flight(wanted, estimates), estimates, source,
                   ctx.tiles_in_aoi)


def tiles_in_flight(wanted: int, estimates: Mapping[str, TileEstimate]) -> int:
    """``wanted`` tiles in flight, fewer if their graphs together would pass the task limit."""
    largest = max((e.tasks for e in estimates.values()), default=0)
    limit = max(1, MAX_TASKS_PER_GRAPH // largest) if largest else wanted
    if limit < wanted:
        log.warning("%d tiles in flight instead of %d, to keep the graphs on the cluster under %d tasks",
                    limit, wanted, MAX_TASKS_PER_GRAPH)
    return max(1, min(wanted, limit))


def dry_run(config: RunConfig, *, tile_names: Sequence[str] | None = None, resume: bool = False,
            overwrite: bool = False, search_timeout: float = 5.0) -> RunPlan:
    """The ``--dry-run``: every check of a real run, then the plan. Writes and reads no pixel.

    Scenes are counted from the catalog when it answers within ``search_timeout`` seconds
    (a local catalog file always does); otherwise they are estimated from the revisit, and
    the reason is logged.
    """
    ctx = resolve_run(config, tile_names=tile_names, resume=resume, overwrite=overwrite, scenes="try",
                      search_timeout=search_timeout)
    return plan_run(ctx)
