"""The offline demo region: CLC-like polygons and Sentinel-2 L2A scenes with STAC metadata.

:func:`build_region` synthesizes, deterministically from a seed, a square region of
``size`` × ``size`` pixels at 10 m in central Italy (EPSG:32633, MGRS tile 33TUH, year 2018)
— or, with ``two_zone=True``, across the UTM zone border at 12° E on an EPSG:3035 grid,
each pass delivered as two overlapping granules in EPSG:32632 and EPSG:32633 (see
:mod:`clc_dask.demo.zones`):

- ``clc/clc.gpkg`` (layer ``clc``, fields ``ID``, ``CODE_18``, ``AREA_HA``) — CORINE-like
  polygons, every one ≥ 25 ha and ≥ 100 m wide, 16 Level-3 / 11 Level-2 classes;
  ``clc/clc_l3.tif`` — the 10 m Level-3 code raster they were made from;
- ``stac/`` — a static STAC catalog: collection ``sentinel-2-l2a`` with Earth Search v1
  style items for April, July and September, each with B02/B03/B04/B08 (10 m, uint16) and
  SCL (20 m, uint8) as tiled COGs next to the item JSON;
- ``region.json`` — the manifest, written last: a workdir without it holds no region.

Layout::

    WORKDIR/region.json
    WORKDIR/clc/clc.gpkg, clc_l3.tif
    WORKDIR/stac/catalog.json
    WORKDIR/stac/sentinel-2-l2a/collection.json
    WORKDIR/stac/sentinel-2-l2a/<item id>/<item id>.json, B02.tif, B03.tif, B04.tif, B08.tif, SCL.tif
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import pystac
import rasterio
import rasterio.features
import shapely.geometry
from odc.geo.geobox import GeoBox
from odc.geo.geom import Geometry
from rasterio.transform import Affine

from clc_dask.classes import colormap
from clc_dask.demo import landcover, scenes, stac, zones
from clc_dask.errors import ConfigError, InputError, OutputError
from clc_dask.generalize import fixed_gpkg_date
from clc_dask.stores import atomic_path

log = logging.getLogger(__name__)

DEMO_EPSG = 32633
#: Top-left corner (x, y) in metres of EPSG:32633: Umbria, central Italy (MGRS tile 33TUH).
DEMO_ORIGIN = (300000.0, 4800000.0)
DEMO_MGRS_TILE = "33TUH"
RESOLUTION = 10.0  # metres
SCL_RESOLUTION = 20.0  # metres
SIZE_STEP = 64  # pixels
MIN_SIZE = 256  # pixels
DEFAULT_SIZE = 4096  # pixels (40.96 km)
DEFAULT_YEAR = 2018
DEFAULT_DATES_PER_SEASON = 4
MANIFEST = "region.json"
MANIFEST_FORMAT = "clc-dask-demo-region"
MANIFEST_VERSION = 1
CLC_LAYER = "clc"
CLC_FIELD = "CODE_18"
_PARTIAL_PREFIX = ".region.partial-"


@dataclass(frozen=True)
class DemoScene:
    """One Sentinel-2 L2A scene of the demo region."""

    id: str
    season: str  # "april" | "july" | "september"
    datetime: str  # ISO 8601, UTC
    platform: str
    processing_baseline: str
    carries_boa_offset: bool  # True: DN carry the +1000 BOA offset
    cloud_cover: float  # eo:cloud_cover, percent of valid pixels
    nodata_percentage: float  # percent of the region outside the swath
    item_path: Path
    assets: dict[str, Path]  # blue/green/red/nir/scl → COG path
    epsg: int = DEMO_EPSG  # CRS of the granule's files
    mgrs_tile: str = DEMO_MGRS_TILE

    @property
    def offset(self) -> int:
        """DN offset of this scene's reflectance (1000 or 0)."""
        return scenes.BOA_OFFSET if self.carries_boa_offset else 0


@dataclass(frozen=True)
class DemoRegion:
    """A built demo region on disk (reopen with :meth:`load`)."""

    workdir: Path
    seed: int
    size: int  # pixels per side at 10 m
    resolution: float  # metres
    epsg: int
    bounds: tuple[float, float, float, float]  # left, bottom, right, top (metres, ``epsg``)
    bbox_lonlat: tuple[float, float, float, float]  # west, south, east, north (degrees)
    year: int
    dates_per_season: int
    mgrs_tile: str
    clc_path: Path  # GeoPackage
    clc_layer: str
    clc_field: str
    codes_path: Path  # 10 m Level-3 code raster (uint16 COG, nodata 0)
    catalog_path: Path
    collection_path: Path
    collection_id: str
    scenes: tuple[DemoScene, ...]
    two_zone: bool = False  # across UTM zones 32/33: EPSG:3035 grid, granules in both zones

    @property
    def crs(self) -> str:
        """The region's CRS as ``"EPSG:nnnn"``."""
        return f"EPSG:{self.epsg}"

    @property
    def geobox(self) -> GeoBox:
        """The 10 m grid of the region."""
        left, _, _, top = self.bounds
        return GeoBox((self.size, self.size), Affine(self.resolution, 0, left, 0, -self.resolution, top),
                      self.crs)

    @property
    def manifest_path(self) -> Path:
        return self.workdir / MANIFEST

    @property
    def seasons(self) -> dict[str, tuple[DemoScene, ...]]:
        """Scenes by season, in date order."""
        return {s: tuple(sc for sc in self.scenes if sc.season == s) for s in scenes.SEASON_MONTHS}

    def scene(self, scene_id: str) -> DemoScene:
        """The scene with this item id."""
        for sc in self.scenes:
            if sc.id == scene_id:
                return sc
        raise InputError(f"No scene {scene_id!r} in the demo region at {self.workdir}: "
                         f"known ids are {[s.id for s in self.scenes]}.")

    def items(self) -> list[pystac.Item]:
        """The STAC items as written (not migrated: ``proj:epsg`` is kept, as stackstac
        needs it), with absolute local asset hrefs."""
        out = []
        for sc in self.scenes:
            item = pystac.Item.from_dict(json.loads(sc.item_path.read_text()), href=str(sc.item_path),
                                         migrate=False)
            item.make_asset_hrefs_absolute()
            out.append(item)
        return out

    def item_collection(self) -> pystac.ItemCollection:
        """:meth:`items` as an ItemCollection."""
        return pystac.ItemCollection(self.items())

    def read_codes(self) -> np.ndarray:
        """The (y, x) uint16 Level-3 CLC codes at 10 m."""
        with rasterio.open(self.codes_path) as src:
            return src.read(1)

    def files(self) -> list[Path]:
        """Every file of the region (the manifest excepted)."""
        manifest = json.loads(self.manifest_path.read_text())
        return [self.workdir / rel for rel in manifest["files"]]

    def matches(self, size: int, seed: int, year: int = DEFAULT_YEAR,
                dates_per_season: int = DEFAULT_DATES_PER_SEASON, two_zone: bool = False) -> bool:
        """Whether this region was built with these parameters."""
        return ((self.size, self.seed, self.year, self.dates_per_season, self.two_zone)
                == (size, seed, year, dates_per_season, two_zone))

    @classmethod
    def load(cls, workdir: str | os.PathLike[str]) -> DemoRegion:
        """Reopen the region built in ``workdir`` (checks that every file is there, complete)."""
        workdir = Path(workdir).expanduser().resolve()
        path = workdir / MANIFEST
        if not path.is_file():
            raise InputError(f"{workdir} holds no demo region (no {MANIFEST}): build one with "
                             f"build_region({str(workdir)!r}) or clc-dask demo --workdir {workdir}.")
        try:
            man = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise InputError(f"{path} is not a readable demo manifest ({exc}): rebuild the region "
                             "in an empty `workdir`.") from exc
        if man.get("format") != MANIFEST_FORMAT or man.get("format_version") != MANIFEST_VERSION:
            raise InputError(f"{path} is not a clc-dask demo manifest of version {MANIFEST_VERSION}: "
                             "rebuild the region in an empty `workdir`.")
        for rel, nbytes in man["files"].items():
            f = workdir / rel
            if not f.is_file() or f.stat().st_size != nbytes:
                raise InputError(f"The demo region in {workdir} is incomplete or modified ({rel} is "
                                 "missing or has another size): rebuild it (delete the workdir, or "
                                 "use another `workdir`).")
        return cls._from_manifest(workdir, man)

    @classmethod
    def _from_manifest(cls, workdir: Path, man: dict[str, Any]) -> DemoRegion:
        sc = tuple(
            DemoScene(
                id=s["id"], season=s["season"], datetime=s["datetime"], platform=s["platform"],
                processing_baseline=s["processing_baseline"],
                carries_boa_offset=bool(s["carries_boa_offset"]), cloud_cover=float(s["cloud_cover"]),
                nodata_percentage=float(s["nodata_percentage"]), item_path=workdir / s["item"],
                assets={k: workdir / v for k, v in s["assets"].items()},
                epsg=int(s.get("epsg", man["epsg"])), mgrs_tile=s.get("mgrs_tile", man["mgrs_tile"]),
            )
            for s in man["scenes"]
        )
        return cls(
            workdir=workdir, seed=int(man["seed"]), size=int(man["size"]),
            resolution=float(man["resolution"]), epsg=int(man["epsg"]),
            bounds=tuple(man["bounds"]), bbox_lonlat=tuple(man["bbox_lonlat"]), year=int(man["year"]),
            dates_per_season=int(man["dates_per_season"]), mgrs_tile=man["mgrs_tile"],
            clc_path=workdir / man["clc"]["vector"], clc_layer=man["clc"]["layer"],
            clc_field=man["clc"]["field"], codes_path=workdir / man["clc"]["raster"],
            catalog_path=workdir / man["stac"]["catalog"],
            collection_path=workdir / man["stac"]["collection"],
            collection_id=man["stac"]["collection_id"], scenes=sc, two_zone=bool(man.get("two_zone", False)),
        )


# --- validation ----------------------------------------------------------------------------------

def validate_parameters(size: int, seed: int, year: int = DEFAULT_YEAR,
                        dates_per_season: int = DEFAULT_DATES_PER_SEASON) -> None:
    """Raise :class:`ConfigError` for parameters the demo cannot build (before any write)."""
    if isinstance(size, bool) or not isinstance(size, int) or size < MIN_SIZE or size % SIZE_STEP:
        raise ConfigError(
            f"`size` must be a multiple of {SIZE_STEP} pixels and at least {MIN_SIZE} "
            f"({MIN_SIZE * RESOLUTION / 1000:g} km at 10 m), not {size!r}: e.g. 512 for a quick "
            f"try, {DEFAULT_SIZE} (the default) for the full demo."
        )
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"`seed` must be a non-negative integer, not {seed!r}.")
    if not isinstance(year, int) or not 2017 <= year <= 2100:
        raise ConfigError(f"year must be 2017 or later (both Sentinel-2 satellites flying), not {year!r}.")
    if not isinstance(dates_per_season, int) or not 3 <= dates_per_season <= 6:
        raise ConfigError(f"dates_per_season must be 3 to 6 (one pass every 5 days), not {dates_per_season!r}.")


def prepare_workdir(workdir: str | os.PathLike[str]) -> Path:
    """Create ``workdir`` if needed and check it can be written; raise :class:`OutputError`."""
    path = Path(workdir).expanduser()
    if path.exists() and not path.is_dir():
        raise OutputError(f"The workdir {path} is a file, not a folder: pass a folder as `workdir`.")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(
            f"Cannot create the workdir {path}: {exc.strerror or exc}. Choose a folder you can "
            "write to as `workdir`."
        ) from exc
    if not os.access(path, os.W_OK | os.X_OK):
        raise OutputError(f"Cannot write to the workdir {path}: permission denied. Choose a folder "
                          "you can write to as `workdir`.")
    return path.resolve()


def existing_region(workdir: str | os.PathLike[str]) -> DemoRegion | None:
    """The complete region in ``workdir``, or None if there is none (or it is incomplete)."""
    try:
        return DemoRegion.load(workdir)
    except InputError:
        return None


# --- build ---------------------------------------------------------------------------------------

def build_region(
    workdir: str | os.PathLike[str],
    size: int = DEFAULT_SIZE,
    seed: int = 0,
    *,
    year: int = DEFAULT_YEAR,
    dates_per_season: int = DEFAULT_DATES_PER_SEASON,
    overwrite: bool = False,
    two_zone: bool = False,
) -> DemoRegion:
    """Build the demo region in ``workdir`` (or reuse the one already there).

    Args:
        workdir: folder for the region (created if missing).
        size: pixels per side at 10 m; a multiple of 64, at least 256. 4096 px = 40.96 km
            (about 2 minutes on 2 cores); 512 is enough for tests.
        seed: everything (land cover, dates, clouds, noise) follows from it: the same seed
            and size give byte-identical rasters.
        year: acquisition year of the scenes.
        dates_per_season: scenes in each of April, July and September (3–6).
        overwrite: replace a complete region built with other parameters (otherwise that is
            an :class:`OutputError`). A region with the same parameters is always reused.
        two_zone: build the region across the UTM zone border at 12° E instead: its grid is
            EPSG:3035 and every pass comes as two overlapping granules, one in EPSG:32632
            (MGRS 32TQN) and one in EPSG:32633 (33TTH), as real Sentinel-2 there: twice as
            many items, each covering about two thirds of the region.

    The region is written into a hidden ``.region.partial-*`` folder inside ``workdir``,
    moved into place when complete, and marked complete by writing ``region.json`` last.
    """
    validate_parameters(size, seed, year, dates_per_season)
    if not isinstance(two_zone, bool):
        raise ConfigError(f"two_zone must be True or False, not {two_zone!r}.")
    workdir = prepare_workdir(workdir)
    current = existing_region(workdir)
    if current is not None:
        if current.matches(size, seed, year, dates_per_season, two_zone):
            log.info("reusing the demo region in %s (seed %d, %d px)", workdir, seed, size)
            return current
        if not overwrite:
            zones_built = "across UTM zones 32/33 (--two-zone)" if current.two_zone else "in one UTM zone"
            raise OutputError(
                f"{workdir} already holds a demo region built {zones_built} with seed "
                f"{current.seed}, size {current.size}, {current.dates_per_season} dates per "
                "season: pass those, or choose another `workdir`."
            )
    for stale in workdir.glob(_PARTIAL_PREFIX + "*"):
        shutil.rmtree(stale, ignore_errors=True)
    partial = workdir / f"{_PARTIAL_PREFIX}{os.getpid()}"
    started = time.perf_counter()
    try:
        partial.mkdir()
        manifest = _synthesize(partial, size, seed, year, dates_per_season, two_zone)
        (workdir / MANIFEST).unlink(missing_ok=True)
        for name in ("clc", "stac"):
            target = workdir / name
            if target.exists():
                shutil.rmtree(target)
            os.replace(partial / name, target)
        with atomic_path(workdir / MANIFEST, suffix=".json") as tmp:
            tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    except OSError as exc:
        raise OutputError(f"Writing the demo region to {workdir} failed: {exc}. Check free space "
                          "and permissions, or choose another `workdir`.") from exc
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    log.info("built the demo region in %s (%d px, seed %d) in %.1f s", workdir, size, seed,
             time.perf_counter() - started)
    return DemoRegion.load(workdir)


def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2) + "\n")


def _round_coords(obj: Any, ndigits: int = 9) -> Any:
    if isinstance(obj, float):
        return round(obj, ndigits)
    if isinstance(obj, (list, tuple)):
        return [_round_coords(v, ndigits) for v in obj]
    return obj


def _to_lonlat(geom: Geometry) -> Geometry:
    """Reproject to EPSG:4326, densified every 500 m (odc-geo's shapely call is deprecated
    in shapely 2.1: that warning is not ours to act on)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, message=".*shapely.ops.transform")
        return geom.to_crs("EPSG:4326", resolution=500.0)


def _footprint(valid20: np.ndarray, transform20: Affine, crs: str) -> tuple[dict[str, Any], list[float]]:
    """GeoJSON footprint (lon/lat) of the valid data, and its bbox."""
    polys = [shapely.geometry.shape(g) for g, v in
             rasterio.features.shapes(valid20.astype(np.uint8), mask=valid20, transform=transform20)
             if v == 1]
    poly = max(polys, key=lambda p: p.area).simplify(SCL_RESOLUTION * 1.5)
    geom = _to_lonlat(Geometry(poly, crs))
    mapping = shapely.geometry.mapping(geom.geom)
    geojson = {"type": mapping["type"], "coordinates": _round_coords(mapping["coordinates"])}
    return geojson, [round(v, 9) for v in geom.boundingbox]


def _synthesize(root: Path, size: int, seed: int, year: int, dates_per_season: int,
                two_zone: bool = False) -> dict[str, Any]:
    """Write every region file under ``root``; return the manifest (not yet written)."""
    epsg = zones.TWO_ZONE_EPSG if two_zone else DEMO_EPSG
    crs = f"EPSG:{epsg}"
    left, top = zones.two_zone_origin(size, RESOLUTION) if two_zone else DEMO_ORIGIN
    transform10 = Affine(RESOLUTION, 0, left, 0, -RESOLUTION, top)
    transform20 = Affine(SCL_RESOLUTION, 0, left, 0, -SCL_RESOLUTION, top)
    shape20 = (size // 2, size // 2)
    geobox = GeoBox((size, size), transform10, crs)
    bounds = tuple(float(v) for v in geobox.extent.boundingbox)
    bbox_ll = [round(v, 9) for v in _to_lonlat(geobox.extent).boundingbox]
    centre = ((bbox_ll[0] + bbox_ll[2]) / 2, (bbox_ll[1] + bbox_ll[3]) / 2)
    files: list[Path] = []

    t0 = time.perf_counter()
    land = landcover.synthesize_landcover(seed, shape20)
    log.info("land cover: %d classes in %.1f s", len(np.unique(land.codes)), time.perf_counter() - t0)

    clc_dir = root / "clc"
    clc_dir.mkdir()
    codes_path = clc_dir / "clc_l3.tif"
    scenes.write_cog(scenes.repeat2(land.codes).astype(np.uint16), codes_path, transform10, crs,
                     resampling="NEAREST", description=CLC_FIELD, colormap=colormap(3))
    files.append(codes_path)
    gpkg_path = clc_dir / "clc.gpkg"
    n_polygons, class_area = _write_clc_vector(land.codes, transform20, crs, gpkg_path, year)
    files.append(gpkg_path)

    t0 = time.perf_counter()
    surfaces = scenes.build_surfaces(seed, land)
    tiles = [g.mgrs_tile for g in zones.TWO_ZONE_GRANULES] if two_zone else [DEMO_MGRS_TILE]
    plans = scenes.plan_scenes(seed, year, dates_per_season, tiles[-1], centre)
    log.info("surfaces and scene plan in %.1f s", time.perf_counter() - t0)

    grid = _Grid(crs, (size, size), transform10, shape20, transform20, DEMO_EPSG, DEMO_MGRS_TILE)
    coll_dir = root / "stac" / stac.COLLECTION_ID
    if two_zone:
        scene_records, written = _write_two_zone_scenes(root, coll_dir, seed, plans, surfaces, geobox)
    else:
        scene_records, written = _write_scenes(root, coll_dir, seed, plans, surfaces, grid)
    files += written
    item_hrefs = [f"./{r['id']}/{r['id']}.json" for r in scene_records]

    datetimes = [r["datetime"] for r in scene_records]
    grid10 = {} if two_zone else {"proj:shape": [size, size], "proj:transform": list(transform10)[:6]}
    grid20 = {} if two_zone else {"proj:shape": list(shape20), "proj:transform": list(transform20)[:6]}
    collection_path = coll_dir / "collection.json"
    _write_json(collection_path, stac.collection_dict(bbox_ll, (min(datetimes), max(datetimes)),
                                                      item_hrefs, grid10, grid20))
    catalog_path = root / "stac" / "catalog.json"
    where = (f"across the UTM zone border at 12° E (EPSG:{epsg}; granules "
             + " and ".join(f"{g.mgrs_tile} in EPSG:{g.epsg}" for g in zones.TWO_ZONE_GRANULES) + ")"
             if two_zone else f"(EPSG:{DEMO_EPSG})")
    _write_json(catalog_path, stac.catalog_dict(
        "clc-dask demo region",
        f"Synthetic Sentinel-2 L2A scenes of {year} over a {size * RESOLUTION / 1000:g} km square "
        f"in central Italy {where}, seed {seed}."))
    files += [collection_path, catalog_path]

    manifest: dict[str, Any] = {
        "format": MANIFEST_FORMAT,
        "format_version": MANIFEST_VERSION,
        "seed": seed,
        "size": size,
        "resolution": RESOLUTION,
        "epsg": epsg,
        "bounds": list(bounds),
        "bbox_lonlat": bbox_ll,
        "year": year,
        "dates_per_season": dates_per_season,
        "mgrs_tile": "+".join(tiles),
    }
    if two_zone:
        manifest["two_zone"] = True
        manifest["granules"] = [{"mgrs_tile": g.mgrs_tile, "epsg": g.epsg} for g in zones.TWO_ZONE_GRANULES]
    manifest.update({
        "clc": {"vector": "clc/clc.gpkg", "layer": CLC_LAYER, "field": CLC_FIELD,
                "raster": "clc/clc_l3.tif", "polygons": n_polygons,
                "area_ha": {str(k): v for k, v in sorted(class_area.items())}},
        "stac": {"catalog": "stac/catalog.json",
                 "collection": f"stac/{stac.COLLECTION_ID}/collection.json",
                 "collection_id": stac.COLLECTION_ID},
        "seasons": {s: [r["id"] for r in scene_records if r["season"] == s] for s in scenes.SEASON_MONTHS},
        "scenes": scene_records,
        "files": {str(f.relative_to(root)): f.stat().st_size for f in files},
    })
    return manifest


@dataclass(frozen=True)
class _Grid:
    crs: str
    shape10: tuple[int, int]
    transform10: Affine
    shape20: tuple[int, int]
    transform20: Affine
    epsg: int
    mgrs_tile: str


def _season_masks(seed: int, plans: list[scenes.ScenePlan], season: str,
                  shape20: tuple[int, int]) -> tuple[list[scenes.ScenePlan], list[scenes.SceneMasks]]:
    """The season's plans and their 20 m masks, with a clear view kept at every pixel."""
    season_plans = [p for p in plans if p.season == season]
    masks = [scenes.draw_masks(seed, p, shape20, SCL_RESOLUTION) for p in season_plans]
    cleared = scenes.keep_clear_views(season_plans, masks)
    log.debug("%s: cleared %d px so every pixel has a clear date", season, cleared)
    return season_plans, masks


def _write_scenes(root: Path, coll_dir: Path, seed: int, plans: list[scenes.ScenePlan],
                  surfaces: scenes.SurfaceModel, grid: _Grid) -> tuple[list[dict[str, Any]], list[Path]]:
    """Every scene on the region's own grid; return their manifest records and files."""
    records: list[dict[str, Any]] = []
    files: list[Path] = []
    for season in scenes.SEASON_MONTHS:
        season_plans, masks = _season_masks(seed, plans, season, grid.shape20)
        surface = surfaces.reflectance(season)
        clear = scenes.clear_scl(surface, surfaces.water)
        for plan, mask in zip(season_plans, masks, strict=True):
            t0 = time.perf_counter()
            record, written = _write_scene(root, coll_dir / plan.id, seed, plan, mask, surface, clear, grid)
            files += written
            records.append(record)
            log.info("scene %s (%s, baseline %s, cloud %.1f %%) in %.1f s", plan.id, season,
                     plan.processing_baseline, record["cloud_cover"], time.perf_counter() - t0)
        del surface, masks
    return records, files


def _write_two_zone_scenes(root: Path, coll_dir: Path, seed: int, plans: list[scenes.ScenePlan],
                           surfaces: scenes.SurfaceModel, region: GeoBox) -> tuple[list[dict[str, Any]], list[Path]]:
    """Every pass as one granule per UTM zone (:mod:`clc_dask.demo.zones`); records in pass
    order, west granule first."""
    records: dict[tuple[int, int], dict[str, Any]] = {}
    files: list[Path] = []
    granules = zones.granule_grids(region)
    water = [granule.sample20(surfaces.water) for granule in granules]
    for season in scenes.SEASON_MONTHS:
        season_plans, masks = _season_masks(seed, plans, season, (region.shape.y // 2, region.shape.x // 2))
        surface = surfaces.reflectance(season)
        for g, granule in enumerate(granules):
            grid = _Grid(granule.crs, granule.shape10, granule.transform10, granule.shape20,
                         granule.transform20, granule.spec.epsg, granule.spec.mgrs_tile)
            tile_surface = granule.sample10(surface)
            clear = scenes.clear_scl(tile_surface, water[g])
            tile_plans = [zones.granule_plan(plan, granule.spec) for plan in season_plans]
            tile_masks = [zones.tile_cloud_edges(m, seed, p) for m, p in zip(masks, tile_plans, strict=True)]
            scenes.keep_clear_views(tile_plans, tile_masks)
            for plan, tile_plan, mask in zip(season_plans, tile_plans, tile_masks, strict=True):
                t0 = time.perf_counter()
                tile_mask = zones.granule_masks(mask, granule)
                record, written = _write_scene(root, coll_dir / tile_plan.id, seed, tile_plan, tile_mask,
                                               tile_surface, clear, grid, datatake_start=plan.datetime)
                files += written
                records[plans.index(plan), g] = record
                log.info("scene %s (%s, %s, cloud %.1f %%) in %.1f s", tile_plan.id, season, granule.crs,
                         record["cloud_cover"], time.perf_counter() - t0)
            del tile_surface
        del surface, masks
    return [records[key] for key in sorted(records)], files


def _write_scene(root: Path, item_dir: Path, seed: int, plan: scenes.ScenePlan, mask: scenes.SceneMasks,
                 surface: np.ndarray, clear: np.ndarray, grid: _Grid,
                 datatake_start: datetime | None = None) -> tuple[dict[str, Any], list[Path]]:
    """Write one scene (four band COGs, SCL COG, item JSON); return its manifest record and files.

    ``datatake_start`` marks a granule of a pass delivered in several granules: its record
    then names the granule's CRS and MGRS tile.
    """
    item_dir.mkdir(parents=True)
    assets: dict[str, dict[str, Any]] = {}
    # GDAL encodes one band (in a thread, without the GIL) while numpy draws the next.
    with ThreadPoolExecutor(max_workers=1) as writer:
        pending = []
        for b, band in enumerate(scenes.BANDS):
            dn = scenes.render_band(seed, plan, b, surface[b], mask)
            pending.append(writer.submit(scenes.write_cog, dn, item_dir / f"{band}.tif", grid.transform10,
                                         grid.crs, resampling="AVERAGE", description=band))
            key = scenes.ASSET_KEYS[band]
            assets[key] = stac.band_asset(key, f"{band}.tif", grid.shape10, grid.transform10,
                                          plan.carries_boa_offset)
        scl = scenes.scene_scl(mask, clear)
        pending.append(writer.submit(scenes.write_cog, scl, item_dir / "SCL.tif", grid.transform20,
                                     grid.crs, resampling="NEAREST", description="SCL"))
        files = [f.result() for f in pending]
    assets["scl"] = stac.scl_asset("SCL.tif", grid.shape20, grid.transform20)
    stats = scenes.scl_statistics(scl)
    geometry, bbox = _footprint(mask.valid, grid.transform20, grid.crs)
    item = stac.item_dict(plan, stats, geometry, bbox, grid.epsg, grid.mgrs_tile, assets,
                          datatake_start=datatake_start)
    item_path = item_dir / f"{plan.id}.json"
    _write_json(item_path, item)
    files.append(item_path)
    rel = item_dir.relative_to(root)
    record = {
        "id": plan.id, "season": plan.season, "datetime": item["properties"]["datetime"],
        "platform": plan.platform, "processing_baseline": plan.processing_baseline,
        "carries_boa_offset": plan.carries_boa_offset, "cloud_cover": stats["eo:cloud_cover"],
        "nodata_percentage": stats["s2:nodata_pixel_percentage"],
        "item": str(rel / item_path.name),
        "assets": {k: str(rel / a["href"]) for k, a in assets.items()},
    }
    if datatake_start is not None:
        record.update(epsg=grid.epsg, mgrs_tile=grid.mgrs_tile)
    return record, files


def _write_clc_vector(codes20: np.ndarray, transform20: Affine, crs: str, path: Path,
                      year: int) -> tuple[int, dict[int, float]]:
    """Polygonize the 20 m codes (4-connected patches) into the CLC GeoPackage."""
    geoms, codes = [], []
    for geom, value in rasterio.features.shapes(codes20, mask=codes20 > 0, connectivity=4,
                                                transform=transform20):
        poly = shapely.geometry.shape(geom)
        geoms.append(shapely.geometry.MultiPolygon([poly]))
        codes.append(int(value))
    areas = [round(g.area / 1e4, 6) for g in geoms]
    frame = gpd.GeoDataFrame(
        {"ID": [f"DEMO_{i + 1:06d}" for i in range(len(geoms))],
         CLC_FIELD: [str(c) for c in codes], "AREA_HA": areas},
        geometry=geoms, crs=crs,
    )
    with fixed_gpkg_date(year):
        frame.to_file(path, layer=CLC_LAYER, driver="GPKG", engine="pyogrio")
    class_area: dict[int, float] = {}
    for c, a in zip(codes, areas, strict=True):
        class_area[c] = round(class_area.get(c, 0.0) + a, 4)
    log.info("CLC vector: %d polygons, %d classes", len(geoms), len(class_area))
    return len(geoms), class_area
