"""The per-tile graph of a run: scenes → mosaic → class map → generalized map, and its files.

For each tile of the run grid:

1. the scenes of the prediction season that overlap the tile are loaded on the tile's grid
   **padded by the model's context** (``halo`` rounded up for the network) and by the
   generalization margin (``generalize.tile_margin_px``), and composited (SCL-masked
   median, the checkpoint's band order);
2. the mosaic is padded with no data so that its top-left corner lies on the *run grid's*
   window grid (:class:`~clc_dask.run.layout.TileLayout`), so neighbouring tiles meet
   without seams; only the inference blocks holding the tile (and margin) are computed;
3. pixels outside the AOI polygon become no data, the class map is cropped to the tile
   and generalized to CORINE rules on the tile plus its margin, then cropped to the tile.

The tile's graph ends in one task returning both maps; a batch of tiles is submitted at
once and each tile is written as soon as it is finished (COGs with the official colour
table, optionally a region of the Zarr store whose chunks are the tiles, and GeoPackage
polygons), then recorded in the run manifest by the caller.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import numpy as np
import xarray as xr
from odc.geo.geobox import GeoBox
from odc.geo.geom import Geometry
from odc.geo.xr import rasterize

from clc_dask.classes import colormap
from clc_dask.errors import OutputError
from clc_dask.generalize import fixed_gpkg_date, generalize_array, qml_style, sld_style, vectorize
from clc_dask.grid import Tile
from clc_dask.load import load_scenes
from clc_dask.mosaic import seasonal_mosaic
from clc_dask.predict import predict
from clc_dask.rasters import to_dataarray, write_geotiff
from clc_dask.run.context import RunContext
from clc_dask.run.layout import TileLayout
from clc_dask.run.scenes import item_index, items_over
from clc_dask.run.store import (
    STYLES_DIR,
    TILE_FILES,
    ZARR_STORE,
    create_zarr,
    tile_dir,
    write_text,
    write_zarr_tile,
)

log = logging.getLogger(__name__)


@dataclass
class TileOutput:
    """A finished tile: its files (asset name → path) and properties for the manifest/STAC."""

    tile: Tile
    files: dict[str, Path]
    extra: dict[str, Any]
    extra_files: dict[str, Path] = field(default_factory=dict)


@dataclass
class TileFailure:
    """A tile whose computation failed (the batch goes on; the run reports it at the end)."""

    tile: Tile
    error: BaseException


@dataclass
class TileTask:
    """The lazy computation of one tile."""

    layout: TileLayout
    item_ids: list[str]
    result: Any  # dask Delayed → (classes, generalized | None), or None when no scene covers the tile

    def task_count(self) -> int:
        """Tasks in this tile's graph (0 without scenes)."""
        return 0 if self.result is None else len(self.result.__dask_graph__())


# --------------------------------------------------------------------------- the processor


class TileProcessor:
    """Computes and writes the tiles of one run.

    Args:
        ctx: the resolved run (config, checkpoint, scenes, grid, AOI, store).
        client: a distributed client (tiles of a batch run concurrently on it), or None for
            dask's default scheduler in this process (tiles one after another).
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
        self._dtype = np.dtype(np.uint16 if ctx.checkpoint.classes.level == 3 else np.uint8)

    # ----------------------------------------------------------------- graph
    def build(self, tile: Tile) -> TileTask:
        """The lazy graph of one tile (nothing is read or computed here)."""
        layout = TileLayout.for_tile(tile, self.config)
        items = items_over(self.items, self._index, layout.load_geobox) if self._index is not None else []
        if not items:
            log.warning("tile %s: no scene of the season overlaps it; it is written as no data", tile.name)
            return TileTask(layout, [], None)
        scenes = load_scenes(items, layout.load_geobox, bands=list(self.checkpoint.bands),
                             chunk_size=layout.chunk, gdal=dict(self.config.imagery.gdal) or None)
        mosaic = seasonal_mosaic(scenes, self.checkpoint.composite)["reflectance"]
        mosaic = mosaic.sel(band=list(self.checkpoint.bands))
        pad = layout.context
        padding = ((0, 0), (layout.before[0] - pad, layout.after - pad), (layout.before[1] - pad, layout.after - pad))
        data = da.pad(mosaic.data, padding, mode="constant", constant_values=0)
        chunks = layout.array_chunks()
        data = data.rechunk(((data.shape[0],), *chunks))
        arr = to_dataarray(data, layout.array_geobox, band_names=list(self.checkpoint.bands), name="mosaic")
        model = self.config.model
        class_map = predict(arr, self.checkpoint.path, halo=model.halo, window=model.window,
                            batch_size=model.batch_size, device=model.device, chunk_size=None, client=self.client)
        (ny, nx), m = layout.shape, layout.margin
        by, bx = layout.before
        region = class_map.data[by:by + ny + 2 * m, bx:bx + nx + 2 * m]
        region_box = layout.region_geobox
        outside = self._outside_aoi(region_box)
        gen = self.config.generalize
        finish = dask.delayed(finish_tile, pure=True)
        result = finish(region, region_box, layout.crop, outside,
                        gen.mmu_ha if gen.enabled else None, gen.min_width_m,
                        dask_key_name=f"finish-tile-{tile.name}-{dask.base.tokenize(region.name, outside, gen)}")
        return TileTask(layout, [i.id for i in items], result)

    def _outside_aoi(self, region: GeoBox) -> Geometry | None:
        """The part of ``region`` outside the AOI (None when the AOI covers it all)."""
        box = region.extent
        if self.aoi.contains(box):
            return None
        return box.difference(self.aoi)

    # ----------------------------------------------------------------- run a batch
    def process_batch(self, tiles: Sequence[Tile]) -> Iterator[TileOutput | TileFailure]:
        """Compute the tiles (concurrently on a distributed client) and write each when done.

        Yields each tile's :class:`TileOutput` in the order they finish (or a
        :class:`TileFailure` when its computation failed).
        """
        tasks = {t.name: self.build(t) for t in tiles}
        for task in tasks.values():
            if task.result is None:
                yield self._write(task.layout.tile, *self._empty(task.layout), task)
        pending = {n: t for n, t in tasks.items() if t.result is not None}
        if not pending:
            return
        if self.client is None:
            for task in pending.values():
                try:
                    classes, generalized = dask.compute(task.result)[0]
                except Exception as exc:  # reported per tile; the run raises after the batch
                    yield TileFailure(task.layout.tile, exc)
                    continue
                yield self._write(task.layout.tile, classes, generalized, task)
            return
        from distributed import as_completed

        futures = self.client.compute([t.result for t in pending.values()])
        names = {f.key: n for f, n in zip(futures, pending, strict=True)}
        try:
            for future in as_completed(futures):
                name = names[future.key]
                try:
                    classes, generalized = future.result()
                except Exception as exc:
                    yield TileFailure(pending[name].layout.tile, exc)
                    continue
                finally:
                    future.release()
                yield self._write(pending[name].layout.tile, classes, generalized, pending[name])
        finally:
            self.client.cancel([f for f in futures if not f.done()])

    def _empty(self, layout: TileLayout) -> tuple[np.ndarray, np.ndarray | None]:
        zeros = np.zeros(layout.shape, dtype=self._dtype)
        return zeros, (zeros.copy() if self.config.generalize.enabled else None)

    # ----------------------------------------------------------------- writing
    def _write(self, tile: Tile, classes: np.ndarray, generalized: np.ndarray | None, task: TileTask) -> TileOutput:
        """Write a tile's files (replacing leftovers of an interrupted attempt)."""
        try:
            return self._write_files(tile, classes, generalized, task)
        except OSError as exc:
            raise OutputError(
                f"Writing tile {tile.name} into {self.store} failed: {exc}. Check free space and "
                "permissions, then run again with `resume` (finished tiles are kept)."
            ) from exc

    def _write_files(self, tile: Tile, classes: np.ndarray, generalized: np.ndarray | None,
                     task: TileTask) -> TileOutput:
        folder = tile_dir(self.store, tile)
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        level = self.checkpoint.classes.level
        tags = {"clc_run": self.config.name, "clc_tile": tile.name, "clc_level": str(level),
                "clc_season": self.config.imagery.prediction_season, "clc_year": str(self.config.imagery.year),
                "checkpoint_sha256": self.checkpoint.sha256}
        files: dict[str, Path] = {}
        with dask.config.set(scheduler="sync"):  # the arrays are in memory: no cluster round trip
            files["classes"] = write_geotiff(to_dataarray(classes, tile.geobox, name="classes"),
                                             folder / TILE_FILES["classes"], colormap=colormap(level), tags=tags)
            if generalized is not None:
                gen = self.config.generalize
                gtags = {**tags, "mmu_ha": f"{gen.mmu_ha:g}", "min_width_m": f"{gen.min_width_m:g}",
                         "tile_margin_px": str(task.layout.margin)}
                gmap = to_dataarray(generalized, tile.geobox, name="generalized")
                files["generalized"] = write_geotiff(gmap, folder / TILE_FILES["generalized"],
                                                     colormap=colormap(level), tags=gtags)
                if self.config.output.vectorize:
                    files["polygons"] = self._polygons(gmap, folder / TILE_FILES["polygons"], tile.name)
        extra_files = {}
        if "zarr" in self.config.output.formats:
            extra_files = write_zarr_tile(self.store / ZARR_STORE, tile, self.grid.tile_size,
                                          {"classes": classes, "generalized": generalized})
        extra = {"clc_dask:input_items": task.item_ids, "clc_dask:tile_margin_px": task.layout.margin}
        log.info("tile %s written (%d scene(s))", tile.name, len(task.item_ids))
        return TileOutput(tile, files, extra, extra_files)

    def _polygons(self, gmap: xr.DataArray, path: Path, tile_name: str) -> Path:
        """The generalized tile as GeoPackage polygons (styles are written once per run)."""
        with fixed_gpkg_date(self.config.imagery.year):
            return vectorize(gmap, path, level=self.checkpoint.classes.level, layer=f"clc_{tile_name}",
                             styles=False)

    # ----------------------------------------------------------------- run-level files
    def prepare_store(self) -> None:
        """Create the run-level outputs that tiles are written into (Zarr store, styles)."""
        if "zarr" in self.config.output.formats:
            variables = ["classes"] + (["generalized"] if self.config.generalize.enabled else [])
            create_zarr(self.store / ZARR_STORE, self.grid, variables, self._dtype, self.checkpoint.classes.level)
        if self.config.generalize.enabled and self.config.output.vectorize:
            level = self.checkpoint.classes.level
            for suffix, text in ((".qml", qml_style(level)), (".sld", sld_style(level, "clc"))):
                target = self.store / STYLES_DIR / f"polygons{suffix}"
                write_text(target, text)


def finish_tile(codes: np.ndarray, region: GeoBox, crop: tuple[slice, slice], outside: Geometry | None,
                mmu_ha: float | None, min_width_m: float) -> tuple[np.ndarray, np.ndarray | None]:
    """The tile's class map and generalized map from the predicted region (tile + margin).

    Runs on a worker. Pixels in ``outside`` (the part of ``region`` outside the AOI) become
    no data before generalizing; ``mmu_ha=None`` skips the generalization.
    """
    codes = np.asarray(codes)
    if outside is not None and not outside.is_empty:
        codes = np.where(rasterize(outside, region).values, 0, codes).astype(codes.dtype)
    classes = np.ascontiguousarray(codes[crop])
    if mmu_ha is None:
        return classes, None
    res = region.resolution
    generalized = generalize_array(codes, (abs(res.y), abs(res.x)), mmu_ha, min_width_m)
    return classes, np.ascontiguousarray(generalized[crop])


def _densify_step(aoi: Geometry) -> float | None:
    """Vertex spacing (in the AOI's units) for reprojecting it without cutting corners."""
    if aoi.crs is not None and aoi.crs.geographic:
        return 0.01  # degrees (~1 km)
    return None
