"""Publishing a run: a STAC Collection with one Item per finished tile, written last.

Written from the run manifest, and only for tiles whose files are complete (their size and
SHA-256 are verified first): no Item ever points at a missing or partial file. The catalog
is built in a temporary folder beside ``stac/`` and swapped into place
(:func:`clc_dask.stores.atomic_directory`), so stale Items (of tiles whose files have since
changed) disappear with the old catalog.

Items carry the projection, raster, classification and file (size, checksum) extensions,
and provenance: the resolved config, package version, checkpoint SHA-256 and the ids of
the input scenes. Everything is deterministic (no wall-clock times, relative hrefs), so
the same run gives the same bytes wherever its store lives.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pystac
from odc.geo.geobox import GeoBox
from pystac.extensions.classification import Classification, ClassificationExtension
from pystac.extensions.file import FileExtension
from pystac.extensions.projection import ProjectionExtension
from pystac.extensions.raster import DataType, RasterBand, RasterExtension

from clc_dask import __version__
from clc_dask.classes import label_of, official_codes, rgb_of
from clc_dask.config import RunConfig
from clc_dask.errors import InputError
from clc_dask.grid import TileGrid
from clc_dask.run.context import output_settings, run_grid
from clc_dask.run.manifest import Manifest
from clc_dask.run.store import ITEMS_FILE, POLYGONS_FILE, STAC_DIR, ZARR_STORE
from clc_dask.seasons import season_window
from clc_dask.stores import atomic_directory

log = logging.getLogger(__name__)

ASSET_TITLES = {
    "classes": "U-Net class map (CLC codes)",
    "generalized": "Class map generalized to CORINE rules (MMU, minimum width)",
    "polygons": "Generalized map of the whole run as polygons dissolved across tiles (GeoPackage, layer clc)",
    "zarr": "Class maps of the whole run grid (Zarr, one chunk per tile)",
}
MEDIA_TYPES = {".tif": pystac.MediaType.COG, ".gpkg": "application/geopackage+sqlite3",
               ".zarr": "application/vnd+zarr", ".json": pystac.MediaType.JSON}
#: Multihash prefix of a SHA-256 digest (file extension ``file:checksum``).
SHA256_MULTIHASH = "1220"


def classification_classes(level: int) -> list[Classification]:
    """The classification-extension class list for CLC codes of ``level`` (0 = no data)."""
    classes = [Classification.create(value=0, description="No data", name="nodata", nodata=True)]
    for code in official_codes(level):
        r, g, b = rgb_of(code)
        classes.append(Classification.create(value=code, description=label_of(code), name=str(code),
                                              color_hint=f"{r:02X}{g:02X}{b:02X}"))
    return classes


def tile_item(
    tile_name: str,
    geobox: GeoBox,
    assets: Mapping[str, Path],
    *,
    run_name: str,
    level: int,
    start: dt.datetime,
    end: dt.datetime,
    provenance: Mapping[str, Any],
    checksums: Mapping[str, tuple[str, int]] | None = None,
) -> pystac.Item:
    """A STAC Item for one tile (asset hrefs become relative when the catalog is written).

    Args:
        tile_name: ``row_col``.
        geobox: the tile's grid (pixels, CRS).
        assets: asset name (``classes``, ``generalized``, ``polygons``) → file.
        run_name: the run's name (item ids are ``<run>-<tile>``).
        level: CLC level of the codes (2 or 3).
        start: first day of the imagery season the map shows (UTC).
        end: last moment of that season (UTC).
        provenance: extra properties (config, version, checkpoint hash, input scene ids).
        checksums: asset name → (SHA-256 hex, bytes), recorded with the file extension.
    """
    footprint = geobox.extent.to_crs("EPSG:4326")
    item = pystac.Item(
        id=f"{run_name}-{tile_name}",
        geometry=footprint.json,
        bbox=[round(v, 9) for v in footprint.boundingbox],
        datetime=None,
        start_datetime=start,
        end_datetime=end,
        properties={"clc_dask:tile": tile_name, "clc_dask:level": level, **dict(provenance)},
    )
    proj = ProjectionExtension.ext(item, add_if_missing=True)
    epsg = geobox.crs.epsg
    if epsg is not None:
        proj.code = f"EPSG:{epsg}"
    else:
        proj.wkt2 = geobox.crs.to_wkt()
    proj.shape = [geobox.shape.y, geobox.shape.x]
    proj.transform = [float(v) for v in list(geobox.affine)[:6]]
    proj.bbox = [float(v) for v in geobox.extent.boundingbox]
    for key, path in sorted(assets.items()):
        asset = pystac.Asset(href=str(Path(path).resolve()), media_type=MEDIA_TYPES.get(Path(path).suffix),
                             title=ASSET_TITLES.get(key, key), roles=["data"])
        item.add_asset(key, asset)
        if checksums and key in checksums:
            digest, size = checksums[key]
            file_ext = FileExtension.ext(asset, add_if_missing=True)
            file_ext.checksum = SHA256_MULTIHASH + digest
            file_ext.size = int(size)
        if Path(path).suffix == ".tif":
            RasterExtension.ext(asset, add_if_missing=True).bands = [
                RasterBand.create(nodata=0, data_type=DataType.UINT8 if level < 3 else DataType.UINT16,
                                  spatial_resolution=abs(geobox.resolution.x))
            ]
            ClassificationExtension.ext(asset, add_if_missing=True).classes = classification_classes(level)
    return item


def write_catalog(
    store: Path,
    items: Sequence[pystac.Item],
    *,
    collection_id: str,
    description: str,
    bbox: Sequence[float],
    start: dt.datetime,
    end: dt.datetime,
    properties: Mapping[str, Any] | None = None,
    assets: Mapping[str, Path] | None = None,
) -> Path:
    """Write ``store/stac/collection.json`` and ``store/stac/<id>/<id>.json`` per item.

    The catalog is self-contained (relative links and hrefs, no self links), built in a
    staging folder and swapped in place of the old ``stac/``.

    Args:
        store: the run's output folder.
        items: from :func:`tile_item`.
        collection_id: the run's name.
        description: one line describing the map.
        bbox: lon/lat extent of the run grid (used when there is no item yet).
        start: start of the temporal extent (UTC).
        end: end of the temporal extent (UTC).
        properties: extra collection fields (provenance shared by all items).
        assets: collection-level assets (e.g. the Zarr store of the whole grid).
    """
    store = Path(store)
    boxes = [i.bbox for i in items if i.bbox] or [list(bbox)]
    extent = pystac.Extent(pystac.SpatialExtent([_union_bbox(boxes)]), pystac.TemporalExtent([[start, end]]))
    collection = pystac.Collection(id=collection_id, description=description, extent=extent,
                                   license="CC-BY-4.0", title=f"CLC map {collection_id}",
                                   extra_fields=dict(properties or {}))
    target = store / STAC_DIR
    for key, path in sorted((assets or {}).items()):
        href = Path(os.path.relpath(Path(path).resolve(), target.resolve())).as_posix()
        collection.add_asset(key, pystac.Asset(href=href, title=ASSET_TITLES.get(key, key),
                                               media_type=MEDIA_TYPES.get(Path(path).suffix), roles=["data"]))
    for item in sorted(items, key=lambda i: i.id):
        collection.add_item(item)
    with atomic_directory(target) as staging:
        collection.normalize_hrefs(str(staging) + "/")
        collection.make_all_asset_hrefs_relative()
        collection.save(catalog_type=pystac.CatalogType.SELF_CONTAINED)
    log.info("wrote STAC collection %s with %d item(s)", target / "collection.json", len(items))
    return target / "collection.json"


def _union_bbox(boxes: Sequence[Sequence[float]]) -> list[float]:
    return [min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes), max(b[3] for b in boxes)]


def publish_run(config: RunConfig, manifest: Manifest | None = None, grid: TileGrid | None = None,
                *, recheck: bool = False) -> Path:
    """Write the STAC Collection and an Item per finished tile (files verified first).

    An Item holds the tile's class map and, once phase 2 wrote it, its generalized map; the
    Collection holds the run-wide assets (the polygons layer, the Zarr store). Also usable on
    its own (``clc-dask run --publish-only``): tiles whose files are missing or changed get
    no Item.

    Args:
        config: the run's config.
        manifest: the run's manifest (default: read from ``output.store``).
        grid: the run's tile grid (default: made from the config).
        recheck: hash every file again (default: files whose size and modification time are
            as recorded are trusted; others are hashed).
    """
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
        entries = [manifest.tiles[name]]
        if name in manifest.generalized and manifest.is_done(name, recheck=recheck, phase="generalized"):
            entries.append(manifest.generalized[name])
        assets = {k: store / rel for e in entries for k, rel in e["assets"].items()}
        sums = {k: (e["files"][rel]["sha256"], e["files"][rel]["bytes"]) for e in entries
                for k, rel in e["assets"].items()}
        extra = {k: v for e in entries for k, v in e.items() if k.startswith("clc_dask:")}
        items.append(tile_item(name, grid.tile(name).geobox, assets, run_name=config.name,
                               level=config.classes.level, start=start, end=end,
                               provenance={**base, **extra}, checksums=sums))
    run_assets = {"zarr": store / ZARR_STORE} if (store / ZARR_STORE).exists() else {}
    polygons = manifest.state.get("polygons")
    if polygons and (store / POLYGONS_FILE).exists():
        run_assets["polygons"] = store / POLYGONS_FILE
    bbox = list(grid.geobox.extent.to_crs("EPSG:4326").boundingbox)
    return write_catalog(store, items, collection_id=config.name,
                         description=f"CORINE Land Cover Level {config.classes.level} map made by clc-dask",
                         bbox=bbox, start=start, end=end, properties=base, assets=run_assets)
