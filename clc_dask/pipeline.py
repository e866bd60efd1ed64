"""The per-tile processor of a production run: scenes → mosaic → class map → generalized map.

For each 2048 px tile of the run grid (see :mod:`clc_dask.run`):

1. the scenes of the prediction season that overlap the tile are loaded on the tile's grid
   **padded by the model's context** (``halo`` rounded up for the network) and by the
   generalization margin (``generalize.tile_margin_px``), and composited (SCL-masked
   median, the checkpoint's band order);
2. the mosaic is padded with no data so that its top-left corner lies on the *run grid's*
   window grid: :func:`clc_dask.predict.predict` anchors its windows at the array origin,
   so every pixel is predicted by the same window, with the same context, as it would be
   in one prediction over the whole grid — neighbouring tiles meet without seams. Only
   the inference blocks holding the tile (and margin) are computed;
3. pixels outside the AOI polygon become no data, the class map is cropped to the tile
   and generalized to CORINE rules (:func:`clc_dask.generalize.generalize_array`) on the
   tile plus its margin, then cropped to the tile.

The tile's graph ends in one task returning both maps; a batch of tiles is submitted at
once and each tile is written on the client as soon as it is finished (COGs with the
official colour table, optionally a region of a Zarr store whose chunks are the tiles, and
GeoPackage polygons), then recorded in the run manifest by the caller.

Tile-edge limitation of the generalization
------------------------------------------
Generalization is exact within what each tile sees: the tile plus ``tile_margin_px`` of
predicted surroundings (rounded up to whole model windows). A patch that crosses a tile
edge and reaches further than the margin is judged by its part inside that window, so it
may be merged although it is ≥ the MMU overall (or kept although its neighbour decides
otherwise across the edge). With a margin of 0 (the default, cheapest) this concerns every
patch cut by a tile edge; a margin of a few hundred metres (e.g. 256 px) removes nearly all
seams at the cost of ``((tile + 2·margin) / tile)²`` more inference. The class map itself
has no seams whatever the margin.
"""

from __future__ import annotations

import functools
import logging
import math
import re
import shutil
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import numpy as np
import pystac
import shapely
import shapely.geometry
import xarray as xr
from odc.geo.geobox import GeoBox
from odc.geo.geom import Geometry

from clc_dask.classes import ClassTable, colormap
from clc_dask.config import RunConfig
from clc_dask.errors import CheckpointError, ConfigError, InputError, OutputError
from clc_dask.generalize import fixed_gpkg_date
from clc_dask.grid import Tile, TileGrid
from clc_dask.model import COMPOSITES, composite_bands, composite_name, file_sha256, load_checkpoint
from clc_dask.predict import WindowGrid
from clc_dask.rasters import atomic_path, to_dataarray, write_geotiff

log = logging.getLogger(__name__)

ITEMS_FILE = "items.json"
ZARR_STORE = "map.zarr"
TILES_DIR = "tiles"
STYLES_DIR = "styles"
#: Output rasters of a tile (asset name → file name).
TILE_FILES = {"classes": "classes.tif", "generalized": "generalized.tif", "polygons": "polygons.gpkg"}
_MONTH_SEASON = re.compile(r"^\d{2}-\d{2}/\d{2}-\d{2}$")


# --------------------------------------------------------------------------- checkpoint


@dataclass(frozen=True)
class CheckpointInfo:
    """What a run needs to know about its checkpoint (the weights stay on disk)."""

    path: Path
    sha256: str
    bands: tuple[str, ...]
    classes: ClassTable
    encoder: str

    @property
    def composite(self) -> str:
        """Mosaic composite holding the checkpoint's bands (``all`` for custom band lists)."""
        name = composite_name(self.bands)
        return name if name in COMPOSITES else "all"


def check_checkpoint(config: RunConfig) -> CheckpointInfo:
    """Open the checkpoint and check it against the config (classes, bands); writes nothing.

    Raises:
        CheckpointError: missing/unsafe file, or its class level or bands differ from the
            config's ``classes.level`` / ``imagery.composite`` (both are named).
    """
    path = Path(config.model.checkpoint).resolve()
    if not path.is_file():
        raise CheckpointError(
            f"model.checkpoint {path} does not exist: train one (clc-dask train) or fix the path in the config."
        )
    ckpt = load_checkpoint(path)
    if ckpt.classes.level != config.classes.level:
        raise CheckpointError(
            f"The checkpoint {path.name} predicts CLC Level-{ckpt.classes.level} classes "
            f"{list(ckpt.classes.codes)} but the config asks for classes.level {config.classes.level}: "
            f"set classes.level: {ckpt.classes.level} or use a checkpoint trained on Level-"
            f"{config.classes.level} classes."
        )
    wanted = composite_bands(config.imagery.composite)
    if tuple(ckpt.bands) != tuple(wanted):
        raise CheckpointError(
            f"The checkpoint {path.name} was trained on bands {list(ckpt.bands)} "
            f"({composite_name(ckpt.bands)}) but imagery.composite is {config.imagery.composite!r} "
            f"({list(wanted)}): set imagery.composite: {composite_name(ckpt.bands)} or use a checkpoint "
            "trained on that composite."
        )
    return CheckpointInfo(path, file_sha256(path), tuple(ckpt.bands), ckpt.classes, ckpt.encoder)


# --------------------------------------------------------------------------- scenes


def season_search_args(season: str, year: int) -> dict[str, Any]:
    """``search_items`` keywords for a config season: a month name or ``MM-DD/MM-DD`` in
    ``year``, or a full ``YYYY-MM-DD/YYYY-MM-DD`` range."""
    if season in ("april", "july", "september") or _MONTH_SEASON.match(season):
        return {"season": season, "years": [year]}
    return {"season": season, "years": []}


def search_area(aoi: Geometry, crs: Any, margin_m: float) -> shapely.Geometry:
    """The lon/lat area whose scenes a run needs: the AOI grown by ``margin_m`` metres
    (context of edge tiles), simplified to at most a few hundred vertices without shrinking."""
    tolerance = max(margin_m, 1000.0)
    grown = aoi.to_crs(crs).buffer(margin_m + tolerance).simplify(tolerance)
    return grown.to_crs("EPSG:4326", resolution=tolerance).geom


def find_scenes(config: RunConfig, aoi: Geometry, crs: Any, margin_m: float, *,
                timeout: float | tuple[float, float] = (10.0, 60.0), retries: int = 5) -> pystac.ItemCollection:
    """Search the config's catalog once for the whole AOI and the prediction season."""
    from clc_dask.search import search_items

    return search_items(
        config.imagery.source, aoi=search_area(aoi, crs, margin_m), max_cloud=config.imagery.max_cloud,
        collection=config.imagery.collection, timeout=timeout, retries=retries,
        **season_search_args(config.imagery.prediction_season, config.imagery.year),
    )


def item_index(items: Sequence[pystac.Item]) -> shapely.STRtree:
    """A spatial index of item footprints (lon/lat), for picking each tile's scenes."""
    return shapely.STRtree([_footprint(i) for i in items])


def _footprint(item: pystac.Item) -> shapely.Geometry:
    if item.geometry:
        return shapely.geometry.shape(item.geometry)
    if item.bbox:
        west, south, east, north = (item.bbox[0], item.bbox[1], item.bbox[-2], item.bbox[-1])
        return shapely.box(west, south, east, north)
    raise InputError(f"Item {item.id} has neither geometry nor bbox: it cannot be placed on the grid.")


def items_over(items: Sequence[pystac.Item], index: shapely.STRtree, geobox: GeoBox) -> list[pystac.Item]:
    """Items whose footprint intersects ``geobox`` (in the order given)."""
    footprint = geobox.extent.to_crs("EPSG:4326", resolution=geobox.extent.boundingbox.span_x / 8).geom
    hits = sorted(int(i) for i in index.query(footprint, predicate="intersects"))
    return [items[i] for i in hits]


# --------------------------------------------------------------------------- tile layout


@dataclass(frozen=True)
class TileLayout:
    """Where a tile's arrays lie, in pixels relative to the tile's top-left corner.

    Attributes:
        tile: the tile.
        margin: predicted surroundings generalized with the tile (px, whole windows).
        context: real imagery loaded around the margin for the network (px).
        before: (y, x) no-data-padded context before the margin, putting the array origin
            on the run grid's window grid (px, ≥ ``context``).
        after: context after the margin (px, ≥ ``context``).
        chunk: dask chunk edge inside the tile (px).
    """

    tile: Tile
    margin: int
    context: int
    before: tuple[int, int]
    after: int
    chunk: int

    @classmethod
    def for_tile(cls, tile: Tile, config: RunConfig) -> TileLayout:
        """The layout of ``tile`` under the config's window, halo, margin and chunk size."""
        windows = _window_grid(config.model.window, config.model.halo)
        window = windows.window
        margin = math.ceil(config.generalize.tile_margin_px / window) * window if config.generalize.enabled else 0
        context = max(windows.before, windows.after)
        starts = (tile.pixel_slices[0].start - margin, tile.pixel_slices[1].start - margin)
        before = tuple(context + (s - context) % window for s in starts)
        after = math.ceil(context / window) * window
        return cls(tile, margin, context, (int(before[0]), int(before[1])), after, config.grid.chunk_size)

    @property
    def shape(self) -> tuple[int, int]:
        """(rows, cols) of the tile."""
        return (self.tile.geobox.shape.y, self.tile.geobox.shape.x)

    @property
    def load_geobox(self) -> GeoBox:
        """The grid the scenes are loaded on: tile + margin + context on every side."""
        return self.tile.geobox.pad(self.margin + self.context)

    @property
    def region_geobox(self) -> GeoBox:
        """Tile + margin: what is predicted and generalized."""
        return self.tile.geobox.pad(self.margin) if self.margin else self.tile.geobox

    @property
    def array_geobox(self) -> GeoBox:
        """The inference array: region + no-data-padded context (origin on the window grid)."""
        pad = self.margin + max(*self.before, self.after)
        big = self.tile.geobox.pad(pad)
        (ny, nx), m = self.shape, self.margin
        by, bx = self.before
        return big[pad - m - by: pad + ny + m + self.after, pad - m - bx: pad + nx + m + self.after]

    @property
    def crop(self) -> tuple[slice, slice]:
        """The tile inside the region (tile + margin)."""
        (ny, nx), m = self.shape, self.margin
        return slice(m, m + ny), slice(m, m + nx)

    def array_chunks(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Chunks of the inference array: padding, margin, tile chunks, margin, padding."""
        out = []
        for axis, n in enumerate(self.shape):
            inner = [self.chunk] * (n // self.chunk) + ([n % self.chunk] if n % self.chunk else [])
            sizes = [self.before[axis], self.margin, *inner, self.margin, self.after]
            out.append(tuple(s for s in sizes if s))
        return out[0], out[1]

    def load_pixels(self) -> int:
        """Pixels of the loaded grid (tile + margin + context)."""
        gb = self.load_geobox
        return gb.shape.y * gb.shape.x


@functools.lru_cache(maxsize=8)
def _window_grid(window: int, halo: int) -> WindowGrid:
    return WindowGrid.from_options(window, halo)  # checked (and warned about) once per process


# --------------------------------------------------------------------------- results


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


class TilePipeline:
    """Computes and writes the tiles of one run.

    Args:
        config: the run's config.
        checkpoint: from :func:`check_checkpoint`.
        items: the scenes found for the run (any supported catalog's items).
        grid: the run's tile grid.
        aoi: the AOI (any CRS); pixels outside it are no data.
        store: the output folder.
        client: a distributed client (tiles of a batch run concurrently on it), or None for
            dask's default scheduler in this process (tiles one after another).
        provenance: run-level properties written into the GeoTIFF tags.
    """

    def __init__(self, config: RunConfig, checkpoint: CheckpointInfo, items: Sequence[pystac.Item],
                 grid: TileGrid, aoi: Geometry, store: Path, client: Any = None) -> None:
        self.config = config
        self.checkpoint = checkpoint
        self.items = list(items)
        self.grid = grid
        self.aoi = aoi.to_crs(grid.geobox.crs, resolution=_densify_step(aoi))
        self.store = Path(store)
        self.client = client
        self._index = item_index(self.items) if self.items else None
        self._dtype = np.dtype(np.uint16 if checkpoint.classes.level == 3 else np.uint8)

    # ----------------------------------------------------------------- graph
    def build(self, tile: Tile) -> TileTask:
        """The lazy graph of one tile (nothing is read or computed here)."""
        from clc_dask.load import load_scenes
        from clc_dask.mosaic import seasonal_mosaic
        from clc_dask.predict import predict

        layout = TileLayout.for_tile(tile, self.config)
        items = items_over(self.items, self._index, layout.load_geobox) if self._index is not None else []
        if not items:
            log.warning("tile %s: no scene of the season overlaps it; it is written as no data", tile.name)
            return TileTask(layout, [], None)
        scenes = load_scenes(items, layout.load_geobox, bands=list(self.checkpoint.bands),
                             chunksize=layout.chunk, gdal=dict(self.config.imagery.gdal) or None)
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
    def tile_dir(self, tile: Tile) -> Path:
        return self.store / TILES_DIR / tile.name

    def _write(self, tile: Tile, classes: np.ndarray, generalized: np.ndarray | None, task: TileTask) -> TileOutput:
        """Write a tile's files (replacing leftovers of an interrupted attempt)."""
        try:
            return self._write_files(tile, classes, generalized, task)
        except OSError as exc:
            raise OutputError(
                f"Writing tile {tile.name} into {self.store} failed: {exc}. Check free space and "
                "permissions, then run again with --resume (finished tiles are kept)."
            ) from exc

    def _write_files(self, tile: Tile, classes: np.ndarray, generalized: np.ndarray | None,
                     task: TileTask) -> TileOutput:
        folder = self.tile_dir(tile)
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
        from clc_dask.generalize import vectorize

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
            from clc_dask.generalize import qml_style, sld_style

            level = self.checkpoint.classes.level
            for suffix, text in ((".qml", qml_style(level)), (".sld", sld_style(level, "clc"))):
                target = self.store / STYLES_DIR / f"polygons{suffix}"
                with atomic_path(target, suffix=suffix) as tmp:
                    tmp.write_text(text, encoding="utf-8")


def finish_tile(codes: np.ndarray, region: GeoBox, crop: tuple[slice, slice], outside: Geometry | None,
                mmu_ha: float | None, min_width_m: float) -> tuple[np.ndarray, np.ndarray | None]:
    """The tile's class map and generalized map from the predicted region (tile + margin).

    Runs on a worker. Pixels in ``outside`` (the part of ``region`` outside the AOI) become
    no data before generalizing; ``mmu_ha=None`` skips the generalization.
    """
    from clc_dask.generalize import generalize_array

    codes = np.asarray(codes)
    if outside is not None and not outside.is_empty:
        from odc.geo.xr import rasterize

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


# --------------------------------------------------------------------------- Zarr


def create_zarr(path: Path, grid: TileGrid, variables: Sequence[str], dtype: np.dtype, level: int) -> None:
    """Create the run's Zarr store (metadata and coordinates only) if it does not exist.

    Zarr chunks equal the tiles, so every tile is written as exactly one chunk per variable
    (aligned region writes never lose data; xarray#8371). Missing chunks read as 0 (no
    data); the manifest, not the chunks, says which tiles are finished (xarray#10117).
    """
    if (path / ".zgroup").exists() or (path / "zarr.json").exists():
        return
    from odc.geo.xr import xr_coords

    gbox = grid.geobox
    size = grid.tile_size
    shape = (gbox.shape.y, gbox.shape.x)
    data_vars = {}
    for name in variables:
        lazy = da.zeros(shape, chunks=(size, size), dtype=dtype)
        data_vars[name] = xr.DataArray(lazy, dims=("y", "x"), attrs={
            "nodata": 0, "clc_level": level, "long_name": f"CLC Level-{level} codes ({name})"})
    ds = xr.Dataset(data_vars, coords=xr_coords(gbox, crs_coord_name="spatial_ref"))
    for name in variables:
        ds[name].attrs["grid_mapping"] = "spatial_ref"
    encoding = {name: {"chunks": (size, size), "_FillValue": None} for name in variables}
    staging = path.with_name(f".{path.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    ds.to_zarr(staging, mode="w", compute=False, encoding=encoding, zarr_format=2, consolidated=True)
    shutil.rmtree(path, ignore_errors=True)
    staging.rename(path)
    log.info("created Zarr store %s (%d×%d px, chunks %d px)", path, shape[0], shape[1], size)


def write_zarr_tile(path: Path, tile: Tile, tile_size: int, arrays: Mapping[str, np.ndarray | None]) -> dict[str, Path]:
    """Write a tile into its chunk of each variable; returns the chunk files written.

    Chunks are written even when they hold only no data, so that every finished tile has
    its files (and checksums) in the manifest.
    """
    import zarr

    ys, xs = tile.pixel_slices
    files = {}
    with zarr.config.set({"array.write_empty_chunks": True}):
        for name, values in arrays.items():
            if values is None:
                continue
            array = zarr.open_array(path / name, mode="r+")
            if tuple(array.chunks) != (tile_size, tile_size):
                raise ConfigError(
                    f"Zarr store {path} has chunks {tuple(array.chunks)}, not the run's {tile_size} px tiles: "
                    "start the run again with --overwrite (or choose another output.store)."
                )
            array[ys, xs] = values
            index = (ys.start // tile_size, xs.start // tile_size)
            files[f"zarr:{name}"] = path / name / array.metadata.encode_chunk_key(index)
    return files
