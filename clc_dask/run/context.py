"""A run's context, resolved once: the AOI, the grid and its tiles, the checkpoint, the season,
the store's state and the scenes. Every check happens here, before anything is written.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pystac
import shapely
import yaml
from odc.geo.geobox import GeoBox
from odc.geo.geom import Geometry
from pyproj import CRS

from clc_dask.classes import ClassTable
from clc_dask.config import RunConfig
from clc_dask.errors import CheckpointError, InputError
from clc_dask.grid import Tile, TileGrid, geobox_for_aoi, lonlat_box
from clc_dask.items import COMPOSITES, composite_bands, composite_name
from clc_dask.model import load_checkpoint
from clc_dask.run.layout import TileLayout
from clc_dask.run.manifest import Manifest, config_fingerprint
from clc_dask.run.scenes import find_scenes
from clc_dask.run.store import ITEMS_FILE
from clc_dask.search import read_aoi_frame, search_items
from clc_dask.seasons import season_window
from clc_dask.stores import file_sha256

log = logging.getLogger(__name__)

#: How a context finds its scenes: ``search`` (required: saved scenes when resuming, else the
#: catalog), ``try`` (the same, but a catalog that fails or is slow leaves them unknown: the
#: dry run estimates them), ``none`` (no scenes).
ScenesMode = Literal["search", "try", "none"]


# --------------------------------------------------------------------------- settings


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


# --------------------------------------------------------------------------- AOI and grid


def aoi_geometry(config: RunConfig) -> Geometry:
    """The AOI: the lon/lat bbox (edges densified, so it reprojects without cutting corners),
    or a vector file's polygons — in their own CRS when that is the grid's (an AOI drawn on
    the grid, e.g. a region's footprint, gives exactly that grid), else in lon/lat."""
    if config.aoi.bbox is not None:
        box = lonlat_box(config.aoi.bbox)
        return Geometry(shapely.segmentize(box.geom, 0.05), "EPSG:4326")
    frame = read_aoi_frame(config.aoi.path or "")
    if CRS(frame.crs) == CRS.from_epsg(config.grid.epsg):
        return Geometry(frame.union_all(), f"EPSG:{config.grid.epsg}")
    return Geometry(frame.to_crs("EPSG:4326").union_all(), "EPSG:4326")


def run_grid(config: RunConfig, aoi: Geometry | None = None) -> tuple[Geometry, TileGrid]:
    """The AOI and the run's tile grid."""
    aoi = aoi if aoi is not None else aoi_geometry(config)
    geobox = geobox_for_aoi(aoi.to_crs(f"EPSG:{config.grid.epsg}", resolution=0.01), config.grid.epsg,
                            config.grid.resolution)
    return aoi, TileGrid(geobox, config.grid.tile_size)


def select_tiles(grid: TileGrid, aoi: Geometry, tile_names: Sequence[str] | None) -> list[Tile]:
    """The named tiles (each checked), or every tile of the grid meeting the AOI."""
    target = aoi.to_crs(grid.geobox.crs, resolution=0.01)
    if tile_names:
        tiles = grid.select([t.strip() for t in tile_names if t.strip()])
        outside = [t.name for t in tiles if not t.geobox.extent.intersects(target)]
        if outside:
            log.warning("tile(s) %s lie outside the AOI: they will be no data", ", ".join(outside))
        return tiles
    tiles = grid.intersecting(target)
    if not tiles:
        raise InputError("The AOI covers no tile of the grid: check aoi and grid.epsg.")
    return tiles


# --------------------------------------------------------------------------- the context


@dataclass
class RunContext:
    """Everything a run needs, resolved once from its config; nothing of it is written yet.

    Attributes:
        config: the validated run config.
        aoi: the area of interest (lon/lat, or the grid's CRS for an AOI file drawn on it).
        grid: the run's tile grid.
        tiles: the tiles asked for (named ones, or all tiles meeting the AOI).
        tiles_in_aoi: how many tiles of the grid meet the AOI.
        checkpoint: the checked checkpoint.
        manifest: the store's manifest (resumed) or a fresh one (``manifest.fresh``).
        items: the scenes (saved ones when resuming), or None when unknown (dry run).
        scenes_source: where ``items`` came from (shown by the dry run).
        overwrite: replacing another run's (or this run's) outputs is allowed.
    """

    config: RunConfig
    aoi: Geometry
    grid: TileGrid
    tiles: list[Tile]
    tiles_in_aoi: int
    checkpoint: CheckpointInfo
    manifest: Manifest
    items: pystac.ItemCollection | None
    scenes_source: str
    overwrite: bool = False

    @property
    def store(self) -> Path:
        return Path(self.config.output.store)

    @property
    def season(self) -> str:
        """The season whose mosaic the model maps."""
        return self.config.imagery.prediction_season

    @property
    def season_window(self) -> tuple[dt.datetime, dt.datetime]:
        """Start and end (UTC) of the mapped season."""
        return season_window(self.season, self.config.imagery.year)

    def layout(self, tile: Tile) -> TileLayout:
        """Where the tile's arrays lie (load area, padding)."""
        return TileLayout.for_tile(tile, self.config)

    @property
    def search_margin_m(self) -> float:
        """Metres around the AOI whose scenes are read too (the network's context)."""
        return self.layout(self.grid.tile("1_1")).context * self.config.grid.resolution



def resolve_run(config: RunConfig, *, tile_names: Sequence[str] | None = None, resume: bool = False,
                overwrite: bool = False, scenes: ScenesMode = "search",
                search_timeout: float = 5.0) -> RunContext:
    """Check a run and resolve its context; writes nothing.

    Raises:
        ConfigError, InputError: bad tile names or AOI.
        CheckpointError: the checkpoint is missing or does not match the config.
        OutputError: the store holds another run's outputs (without ``overwrite``).
        SearchError: the catalog has no scenes for the AOI and season (``scenes="search"``).
    """
    aoi, grid = run_grid(config)
    tiles = select_tiles(grid, aoi, tile_names)
    tiles_in_aoi = len(tiles) if not tile_names else len(select_tiles(grid, aoi, None))
    checkpoint = check_checkpoint(config)
    manifest = Manifest.open(Path(config.output.store), config.name, settings_fingerprint(config),
                             checkpoint.sha256, grid_record(grid.geobox, config.grid.tile_size),
                             resume=resume, overwrite=overwrite)
    ctx = RunContext(config, aoi, grid, tiles, tiles_in_aoi, checkpoint, manifest, None, "none", overwrite)
    if scenes != "none":
        ctx.items, ctx.scenes_source = _scenes(ctx, scenes == "try", search_timeout)
    return ctx


def _scenes(ctx: RunContext, optional: bool, timeout: float) -> tuple[pystac.ItemCollection | None, str]:
    saved = ctx.store / ITEMS_FILE
    if not ctx.manifest.fresh and saved.exists():
        items = search_items(str(saved))
        log.info("resuming with the %d scene(s) saved in %s", len(items), saved)
        return items, f"saved scenes ({ITEMS_FILE})"
    crs, margin = ctx.grid.geobox.crs, ctx.search_margin_m
    source = f"catalog search ({ctx.config.imagery.source})"
    if not optional:
        return find_scenes(ctx.config, ctx.aoi, crs, margin), source
    try:
        return find_scenes(ctx.config, ctx.aoi, crs, margin, timeout=(timeout, timeout), retries=0), source
    except Exception as exc:  # any failure (offline, DNS, 5xx, nothing found) → estimate
        log.warning("no catalog search for the plan (%s: %s); scenes are estimated from the "
                    "Sentinel-2 revisit", type(exc).__name__, str(exc)[:200])
        return None, "revisit estimate (catalog not reachable)"
