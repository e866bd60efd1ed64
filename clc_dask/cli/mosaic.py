"""`clc-dask mosaic`: a seasonal cloud-free Sentinel-2 mosaic (COG or Zarr) for an area."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from clc_dask.cli.search import SEASON_HELP, SOURCE_HELP, parse_bbox
from clc_dask.errors import ConfigError

log = logging.getLogger(__name__)

COMPOSITES = ("rgb", "nrg", "all")  # as clc_dask.mosaic.COMPOSITES (not imported: fast --help)
DEFAULT_CHUNK_SIZE = 1024  # pixels, as clc_dask.load.DEFAULT_CHUNK_SIZE
DEFAULT_RESOLUTION = 10.0  # metres


def items_path_for(out: Path) -> Path:
    """Where the item collection used for a mosaic is saved: ``<out stem>.items.json``."""
    return out.with_name(f"{out.name.removesuffix(out.suffix) or out.name}.items.json")


def register(app: typer.Typer) -> None:
    """Add the `mosaic` command to `app`."""

    @app.command("mosaic")
    def mosaic(
        out: Annotated[Path, typer.Option("--out", help="Output COG (.tif) or Zarr store.")],
        source: Annotated[str | None, typer.Option("--source", help=SOURCE_HELP)] = None,
        items: Annotated[Path | None, typer.Option("--items", help="Use this saved item "
                         "collection as it is (no search), e.g. to repeat a run offline.")] = None,
        collection: Annotated[str | None, typer.Option("--collection", help="Collection id; "
                              "default: the preset's.")] = None,
        bbox: Annotated[str | None, typer.Option("--bbox", help="WEST,SOUTH,EAST,NORTH in "
                        "degrees.")] = None,
        aoi: Annotated[Path | None, typer.Option("--aoi", help="Vector file with the area.")] = None,
        season: Annotated[str | None, typer.Option("--season", help=SEASON_HELP)] = None,
        year: Annotated[list[int] | None, typer.Option("--year", help="Year of --season "
                        "(repeat for several years).")] = None,
        datetime: Annotated[str | None, typer.Option("--datetime", help="START/END (ISO 8601) "
                            "instead of --season.")] = None,
        max_cloud: Annotated[float | None, typer.Option("--max-cloud", min=0, max=100,
                             help="Maximum scene cloud cover in %.")] = None,
        composite: Annotated[str, typer.Option("--composite", help="rgb (B04,B03,B02), nrg "
                             "(B08,B04,B03) or all (B02,B03,B04,B08).")] = "nrg",
        epsg: Annotated[int | None, typer.Option("--epsg", help="Grid CRS (EPSG code); default: "
                        "the UTM zone of the area's centre.")] = None,
        resolution: Annotated[float, typer.Option("--resolution", min=0.0, help="Pixel size in "
                              "metres.")] = DEFAULT_RESOLUTION,
        format: Annotated[str, typer.Option("--format", help="cog or zarr.")] = "cog",
        gdal: Annotated[list[str] | None, typer.Option("--gdal", help="GDAL option KEY=VALUE "
                        "(repeatable), e.g. GDAL_DISABLE_READDIR_ON_OPEN=NO.")] = None,
        chunk_size: Annotated[int, typer.Option("--chunk-size", min=1, help="Dask chunk edge "
                              "in pixels.")] = DEFAULT_CHUNK_SIZE,
        mask_snow: Annotated[bool, typer.Option("--mask-snow", help="Also mask SCL snow/ice "
                             "(11).")] = False,
        clear_count: Annotated[bool, typer.Option("--clear-count/--no-clear-count", help="Also "
                               "write the per-pixel number of clear dates.")] = True,
        address: Annotated[str | None, typer.Option("--scheduler", "--address", help="Dask scheduler to use "
                           "(default: threads in this process).")] = None,
        overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace existing "
                             "outputs.")] = False,
    ) -> None:
        """Search (or reuse) scenes, mask clouds with SCL and write the seasonal median."""
        from odc.geo.geom import Geometry

        from clc_dask.gdalenv import parse_gdal_options
        from clc_dask.grid import geobox_for_aoi, utm_epsg
        from clc_dask.items import normalize_items
        from clc_dask.load import load_scenes
        from clc_dask.mosaic import composite_bands, seasonal_mosaic, write_mosaic
        from clc_dask.rasters import check_writable
        from clc_dask.search import area_geometry, save_item_collection, search_items

        if composite not in COMPOSITES:
            raise ConfigError(f"--composite {composite!r}: use one of {', '.join(COMPOSITES)}.")
        if format not in ("cog", "zarr"):
            raise ConfigError(f"--format {format!r}: use cog or zarr.")
        if (source is None) == (items is None):
            raise ConfigError("Give either --source (to search) or --items (a saved item "
                              "collection), not both or neither.")
        if source is not None and not (season or datetime):
            raise ConfigError("A mosaic needs a time window: give --season (with --year) or "
                              "--datetime START/END.")
        if (bbox is None) == (aoi is None):
            raise ConfigError("Give the area: either --bbox WEST,SOUTH,EAST,NORTH or --aoi FILE.")
        check_writable(out, overwrite)
        items_out = check_writable(items_path_for(out), overwrite)
        gdal_options = parse_gdal_options(gdal or [])
        box = parse_bbox(bbox)
        area = area_geometry(box, aoi)
        if items is not None:
            filters = [name for name, value in (("--season", season), ("--datetime", datetime),
                       ("--year", year), ("--max-cloud", max_cloud), ("--collection", collection))
                       if value]
            if filters:
                raise ConfigError(f"--items is used as saved; drop {', '.join(filters)} (or "
                                  "search again with --source).")
            scenes_used = search_items(items)
        else:
            scenes_used = search_items(
                source, bbox=box, aoi=aoi, datetime=datetime, season=season,  # type: ignore[arg-type]
                years=year or (), max_cloud=max_cloud, collection=collection,
            )
        geom = Geometry(area, "EPSG:4326")
        lon, lat = geom.centroid.points[0]
        crs = epsg or utm_epsg(lon, lat)
        geobox = geobox_for_aoi(geom, crs, resolution)
        bands = composite_bands(composite)
        normalized = normalize_items(scenes_used, bands)
        scenes = load_scenes(normalized, geobox, bands=bands, chunksize=chunk_size,
                             gdal=gdal_options)
        result = seasonal_mosaic(scenes, composite=composite, mask_snow=mask_snow)  # type: ignore[arg-type]
        tasks = len(result.__dask_graph__())
        log.info("mosaic graph: %d tasks", tasks)
        client = None
        if address:
            from clc_dask.cluster import get_client

            client = get_client(address, kind="address")
        try:
            written = write_mosaic(result, out, format=format, clear_count=clear_count,  # type: ignore[arg-type]
                                   overwrite=overwrite)
        finally:
            if client is not None:
                client.close()
        save_item_collection(scenes_used, items_out)
        typer.echo(f"{written[0]}: {composite} mosaic ({', '.join(bands)}) of "
                   f"{scenes.sizes['time']} date(s), {geobox.shape.y}×{geobox.shape.x} px, "
                   f"EPSG:{crs}, {resolution:g} m; items: {items_out}")
