"""The per-tile graph of a run — scenes → mosaic → class map → files — and tiles that flow.

For each tile of the run grid:

1. the scenes of the prediction season that overlap the tile are loaded on the tile's grid
   **padded by the model's context** (``halo`` rounded up for the network) and composited
   (SCL-masked median of one observation per pass, the checkpoint's band order);
2. the mosaic is padded with no data so that its top-left corner lies on the *run grid's*
   window grid (:class:`~clc_dask.run.layout.TileLayout`): every pixel is predicted by the
   same window, with the same context, as in one prediction over the whole grid;
3. pixels outside the AOI polygon become no data, and the tile's files are written **on the
   worker** that computed it (COG with the official colour table, and its chunk of the run's
   Zarr store), which returns only their paths and checksums.

Tiles flow: at most ``in_flight`` tiles are on the cluster at once and the next is submitted
as soon as one finishes (no barrier between groups of tiles); each tile is its own small
graph (thousands of tasks, far below the ~500k that stall a scheduler). The client only
records finished tiles in the journal. The generalization, which must see the whole map,
is the run's second phase (:mod:`clc_dask.run.generalized`).
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import CancelledError
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import numpy as np
from distributed import as_completed
from odc.geo.geobox import GeoBox
from odc.geo.geom import Geometry
from odc.geo.xr import rasterize

from clc_dask.classes import colormap
from clc_dask.errors import ClcDaskError, OutputError
from clc_dask.grid import Tile
from clc_dask.load import load_scenes
from clc_dask.mosaic import seasonal_mosaic
from clc_dask.predict import predict_region
from clc_dask.rasters import to_dataarray, write_geotiff
from clc_dask.run.context import RunContext
from clc_dask.run.layout import TileLayout
from clc_dask.run.manifest import file_record
from clc_dask.run.scenes import item_index, items_over
from clc_dask.run.store import TILE_FILES, ZARR_STORE, create_zarr, tile_dir, write_zarr_tile

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- results


@dataclass
class TileOutput:
    """A finished tile: its files (asset name → path), their records (made where they were
    written), and properties for the manifest/STAC."""

    tile: Tile
    files: dict[str, Path]
    extra: dict[str, Any]
    extra_files: dict[str, Path] = field(default_factory=dict)
    hashes: dict[Path, dict[str, Any]] = field(default_factory=dict)


@dataclass
class TileFailure:
    """A tile whose computation failed (the others go on; the run reports it at the end)."""

    tile: Tile
    error: BaseException


@dataclass
class TileTask:
    """The lazy computation of one tile."""

    layout: TileLayout
    item_ids: list[str]
    result: da.Array | None  # 1×1 object array holding the TileOutput; None when no scene covers the tile

    @staticmethod
    def output(computed: np.ndarray) -> TileOutput:
        """The :class:`TileOutput` from the computed ``result`` (a 1×1 object array)."""
        return computed.item()

    def task_count(self) -> int:
        """Tasks in this tile's graph (0 without scenes)."""
        return 0 if self.result is None else len(self.result.__dask_graph__())


# --------------------------------------------------------------------------- writing (on workers)


@dataclass(frozen=True)
class TileWriter:
    """Writes one layer of a tile into the run's store; small and picklable, it travels with the
    task to the worker that computed the tile (the store must be on storage workers share).

    Attributes:
        store: the run's output folder.
        layer: ``classes`` or ``generalized`` (the asset and the Zarr variable).
        level: CLC level of the codes (colour table, dtype).
        tile_size: edge of the run's tiles in pixels (the Zarr chunk).
        zarr: also write the tile's chunk of ``map.zarr``.
        tags: GeoTIFF tags (run name, season, checkpoint hash, rules).
    """

    store: Path
    layer: str
    level: int
    tile_size: int
    zarr: bool
    tags: tuple[tuple[str, str], ...]

    def write(self, tile: Tile, codes: np.ndarray, extra: Mapping[str, Any]) -> TileOutput:
        """Write ``codes`` as the tile's COG (and Zarr chunk); return the files and their records."""
        try:
            return self._write(tile, np.ascontiguousarray(codes), dict(extra))
        except OSError as exc:
            raise OutputError(
                f"Writing the {self.layer} of tile {tile.name} into {self.store} failed: {exc}. Check free "
                "space and permissions, then run again with `resume` (finished tiles are kept)."
            ) from exc

    def _write(self, tile: Tile, codes: np.ndarray, extra: dict[str, Any]) -> TileOutput:
        folder = tile_dir(self.store, tile)
        folder.mkdir(parents=True, exist_ok=True)
        tags = {**dict(self.tags), "clc_tile": tile.name}
        with dask.config.set(scheduler="sync"):  # the array is in memory: no cluster round trip
            path = write_geotiff(to_dataarray(codes, tile.geobox, name=self.layer), folder / TILE_FILES[self.layer],
                                 colormap=colormap(self.level), tags=tags)
        files = {self.layer: path}
        extra_files = {}
        if self.zarr:
            extra_files = write_zarr_tile(self.store / ZARR_STORE, tile, self.tile_size, {self.layer: codes})
        hashes = {p: file_record(p) for p in [*files.values(), *extra_files.values()]}
        log.info("tile %s: %s written", tile.name, self.layer)
        return TileOutput(tile, files, extra, extra_files, hashes)


def _write_block(codes: np.ndarray, *, tile: Tile, outside: Geometry | None, writer: TileWriter,
                 item_ids: Sequence[str]) -> np.ndarray:
    out = np.empty((1, 1), dtype=object)
    out[0, 0] = write_class_tile(codes, tile, outside, writer, item_ids)
    return out


def write_class_tile(codes: np.ndarray, tile: Tile, outside: Geometry | None, writer: TileWriter,
                     item_ids: Sequence[str]) -> TileOutput:
    """The tile's class map (no data outside the AOI), written by ``writer``; runs on a worker."""
    codes = np.asarray(codes)
    if outside is not None and not outside.is_empty:
        codes = np.where(rasterize(outside, tile.geobox).values, 0, codes).astype(codes.dtype)
    return writer.write(tile, codes, {"clc_dask:input_items": list(item_ids)})


# --------------------------------------------------------------------------- the processor


class TileProcessor:
    """Computes the class tiles of one run and writes them where they are computed.

    Args:
        ctx: the resolved run (config, checkpoint, scenes, grid, AOI, store).
        client: a distributed client (tiles flow over its workers), or None for dask's
            threaded scheduler in this process (tiles one after another).
    """

    def __init__(self, ctx: RunContext, client: Any = None) -> None:
        self.config = ctx.config
        self.checkpoint = ctx.checkpoint
        self.items = list(ctx.items or [])
        self.grid = ctx.grid
        self.aoi = ctx.aoi.to_crs(ctx.grid.geobox.crs, resolution=_densify_step(ctx.aoi))
        self.store = ctx.store
        self.client = client
        self._index = item_index(self.items) if self.items else None
        self.dtype = np.dtype(np.uint16 if ctx.checkpoint.classes.level == 3 else np.uint8)
        self.writer = self.writer_for("classes")

    def writer_for(self, layer: str, **tags: str) -> TileWriter:
        """A writer of ``layer`` tiles into this run's store."""
        level = self.checkpoint.classes.level
        base = {"clc_run": self.config.name, "clc_level": str(level),
                "clc_season": self.config.imagery.prediction_season, "clc_year": str(self.config.imagery.year),
                "checkpoint_sha256": self.checkpoint.sha256, **tags}
        return TileWriter(self.store, layer, level, self.grid.tile_size, "zarr" in self.config.output.formats,
                          tuple(sorted(base.items())))

    # ----------------------------------------------------------------- graph
    def build(self, tile: Tile) -> TileTask:
        """The lazy graph of one tile, ending in the task that writes it (nothing runs here)."""
        layout = TileLayout.for_tile(tile, self.config)
        items = items_over(self.items, self._index, layout.load_geobox) if self._index is not None else []
        if not items:
            return TileTask(layout, [], None)
        scenes = load_scenes(items, layout.load_geobox, bands=list(self.checkpoint.bands),
                             chunk_size=layout.load_chunks, gdal=dict(self.config.imagery.gdal) or None)
        mosaic = seasonal_mosaic(scenes, self.checkpoint.composite)["reflectance"]
        mosaic = mosaic.sel(band=list(self.checkpoint.bands))
        # the tile's windows in one task, on the run grid's window grid (array origin = its origin)
        (ny, nx), (by, bx) = layout.shape, layout.before
        model = self.config.model
        codes = predict_region(mosaic.data, self.checkpoint.path, origin=(by - layout.context, bx - layout.context),
                               region=(by, by + ny, bx, bx + nx), halo=model.halo, window=model.window,
                               batch_size=model.batch_size, device=model.device, client=self.client)
        outside = self._outside_aoi(tile.geobox)
        ids = [i.id for i in items]
        # the write stays an array operation (not dask.delayed, which would flatten the graph
        # and drop the inference tasks' resource annotations): one task, the tile in one block
        result = codes.map_blocks(
            _write_block, tile=tile, outside=outside, writer=self.writer, item_ids=ids,
            name=f"write-classes-{tile.name}-{dask.base.tokenize(codes.name, outside, self.writer, ids)}",
            chunks=((1,), (1,)), dtype=object, meta=np.empty((0, 0), dtype=object))
        return TileTask(layout, ids, result)

    def _outside_aoi(self, region: GeoBox) -> Geometry | None:
        """The part of ``region`` outside the AOI (None when the AOI covers it all)."""
        box = region.extent
        if self.aoi.contains(box):
            return None
        return box.difference(self.aoi)

    # ----------------------------------------------------------------- running
    def run(self, tiles: Sequence[Tile], in_flight: int) -> Iterator[TileOutput | TileFailure]:
        """Compute and write ``tiles``, yielding each as it finishes (or fails).

        On a distributed client at most ``in_flight`` tiles are on the cluster at once; the
        next one is built and submitted as one finishes. Without a client the tiles run one
        after another in this process.
        """
        for tile in tiles:
            folder = tile_dir(self.store, tile)
            shutil.rmtree(folder, ignore_errors=True)  # leftovers of an interrupted attempt
        if self.client is None:
            yield from (self._compute_here(t) for t in tiles)
            return
        yield from flow(self.client, tiles, self._submit, max(1, in_flight), unpack=TileTask.output)

    def _compute_here(self, tile: Tile) -> TileOutput | TileFailure:
        task = self.build(tile)
        if task.result is None:
            return self._empty(tile)
        try:
            return TileTask.output(dask.compute(task.result)[0])
        except Exception as exc:  # reported per tile; the run raises at the end
            return TileFailure(tile, exc)

    def _submit(self, tile: Tile) -> Any:
        """A future of the tile's output (or the output itself for a tile without scenes)."""
        task = self.build(tile)
        if task.result is None:
            return self._empty(tile)
        # unoptimized: the graph is lean already, and fusing would hand the inference task's
        # GPU / inference-slot annotation to the write (or the mosaic) it is fused with.
        # fifo_timeout=0: each tile is its own generation, so the scheduler finishes the tiles
        # in the order they were submitted (with the default, tiles submitted within a minute
        # share one and their reads interleave: the first inference waits for every read).
        return self.client.compute(task.result, optimize_graph=False, fifo_timeout=0)

    def _empty(self, tile: Tile) -> TileOutput:
        log.warning("tile %s: no scene of the season overlaps it; it is written as no data", tile.name)
        zeros = np.zeros((tile.geobox.shape.y, tile.geobox.shape.x), dtype=self.dtype)
        return self.writer.write(tile, zeros, {"clc_dask:input_items": []})

    # ----------------------------------------------------------------- run-level files
    def prepare_store(self) -> None:
        """Create the Zarr store the tiles are written into (one chunk per tile)."""
        if "zarr" in self.config.output.formats:
            variables = ["classes"] + (["generalized"] if self.config.generalize.enabled else [])
            create_zarr(self.store / ZARR_STORE, self.grid, variables, self.dtype, self.checkpoint.classes.level)


def flow(client: Any, tiles: Sequence[Tile], submit: Callable[[Tile], Any],
         in_flight: int, unpack: Callable[[Any], TileOutput] | None = None) -> Iterator[TileOutput | TileFailure]:
    """Keep at most ``in_flight`` tiles on the cluster; yield each result as it arrives.

    ``submit(tile)`` returns a future, or a finished result for tiles with nothing to compute;
    ``unpack`` turns a future's value into the :class:`TileOutput` (default: it is one).
    """
    queue = list(tiles)
    tile_of: dict[str, tuple[Tile, Any]] = {}
    running = as_completed([], loop=client.loop)
    try:
        yield from _drain(client, queue, tile_of, running, submit, in_flight, unpack or (lambda value: value))
    finally:  # stopped early (an error, a signal): nothing keeps computing for nobody
        if client.status == "running":
            client.cancel([future for _, future in tile_of.values()])


def scheduler_lost(client: Any, error: BaseException) -> bool:
    """True if ``error`` (raised by a future's result) means the client lost its scheduler."""
    return (isinstance(error, CancelledError) and client.status != "running") or \
        getattr(error, "reason", None) == "scheduler-connection-lost"


def _scheduler_lost_error(client: Any, error: BaseException) -> ClcDaskError:
    address = getattr(getattr(client, "scheduler", None), "address", None) or "(unknown address)"
    return ClcDaskError(
        f"Lost the connection to the Dask scheduler {address} ({type(error).__name__}; the scheduler "
        "stopped or the network failed): the run stopped. Every tile finished so far is recorded: start the "
        "scheduler and its workers again (or use another one), then run again with `resume`."
    )


def _drain(client: Any, queue: list[Tile], tile_of: dict[str, tuple[Tile, Any]], running: Any,
           submit: Callable[[Tile], Any], in_flight: int,
           unpack: Callable[[Any], TileOutput]) -> Iterator[TileOutput | TileFailure]:
    while queue or running.count():
        while queue and running.count() < in_flight:
            tile = queue.pop(0)
            try:
                submitted = submit(tile)
            except Exception as exc:  # building the graph failed: reported like a failed tile
                yield TileFailure(tile, exc)
                continue
            if isinstance(submitted, TileOutput | TileFailure):
                yield submitted
                continue
            tile_of[submitted.key] = (tile, submitted)
            running.add(submitted)
        if not running.count():
            continue
        future = next(running)
        tile, _ = tile_of.pop(future.key)
        try:
            result = unpack(future.result())
        except Exception as exc:
            if scheduler_lost(client, exc):  # every other tile would fail the same way: stop now
                raise _scheduler_lost_error(client, exc) from exc
            result = TileFailure(tile, exc)
        finally:
            future.release()
        yield result


def _densify_step(aoi: Geometry) -> float | None:
    """Vertex spacing (in the AOI's units) for reprojecting it without cutting corners."""
    if aoi.crs is not None and aoi.crs.geographic:
        return 0.01  # degrees (~1 km)
    return None
