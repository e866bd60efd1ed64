"""`clc-dask mosaic`: a seasonal cloud-free Sentinel-2 mosaic (COG or Zarr) for an area."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from clc_dask.cli.options import SCHEDULER_HELP, SEASON_HELP, SOURCE_HELP, parse_bbox
from clc_dask.errors import ConfigError

log = logging.getLogger(__name__)

DEFAULT_CHUNK_SIZE = 1024  # pixels, as clc_dask.load.DEFAULT_CHUNK_SIZE (not imported: fast --help)


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
        like: Annotated[Path | None, typer.Option("--like", help="Mosaic on exactly this raster's "
                        "grid (CRS, pixel size, bounds), e.g. another season's mosaic; instead of "
                        "--bbox/--aoi.")] = None,
        season: Annotated[str | None, typer.Option("--season", help=SEASON_HELP)] = None,
        years: Annotated[list[int] | None, typer.Option("--year", help="Year of --season "
                         "(repeat for several years).")] = None,
        datetime: Annotated[str | None, typer.Option("--datetime", help="START/END (ISO 8601) "
                            "instead of --season.")] = None,
        max_cloud: Annotated[float | None, typer.Option("--max-cloud", min=0, max=100,
                             help="Maximum scene cloud cover in %.")] = None,
        composite: Annotated[str, typer.Option("--composite", help="rgb (B04,B03,B02), nrg "
                             "(B08,B04,B03) or all (B02,B03,B04,B08).")] = "nrg",
        epsg: Annotated[int | None, typer.Option("--epsg", help="Grid CRS (EPSG code); default: "
                        "the UTM zone of the area's centre.")] = None,
        resolution: Annotated[float | None, typer.Option("--resolution", min=0.0, help="Pixel size in "
                              "metres (default 10).")] = None,
        format: Annotated[str, typer.Option("--format", help="cog or zarr.")] = "cog",
        gdal: Annotated[list[str] | None, typer.Option("--gdal", help="GDAL option KEY=VALUE "
                        "(repeatable), e.g. GDAL_DISABLE_READDIR_ON_OPEN=NO.")] = None,
        chunk_size: Annotated[int, typer.Option("--chunk-size", "--chunks", min=1, help="Dask chunk edge "
                              "in pixels.")] = DEFAULT_CHUNK_SIZE,
        mask_snow: Annotated[bool, typer.Option("--mask-snow", help="Also mask SCL snow/ice "
                             "(11).")] = False,
        clear_count: Annotated[bool, typer.Option("--clear-count/--no-clear-count", help="Also "
                               "write the per-pixel number of clear dates.")] = True,
        scheduler: Annotated[str | None, typer.Option("--scheduler", "--address", help=SCHEDULER_HELP)] = None,
        overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace existing "
                             "outputs.")] = False,
    ) -> None:
        """Search (or reuse) scenes, mask clouds with SCL and write the seasonal median."""
        from clc_dask.cluster import connect
        from clc_dask.gdalenv import parse_gdal_options
        from clc_dask.mosaic import make_mosaic, write_mosaic

        if format not in ("cog", "zarr"):
            raise ConfigError(f"--format {format!r}: use cog or zarr.")
        result = make_mosaic(
            source, items=items, bbox=parse_bbox(bbox), aoi=aoi, season=season, years=years or (),
            datetime=datetime, max_cloud=max_cloud, collection=collection, composite=composite,
            like=like, epsg=epsg, resolution=resolution, chunk_size=chunk_size, mask_snow=mask_snow,
            gdal=parse_gdal_options(gdal or []),
        )
        with connect(scheduler):
            written = write_mosaic(result, out, format=format, clear_count=clear_count,  # type: ignore[arg-type]
                                   overwrite=overwrite)
        grid = result.odc.geobox
        typer.echo(f"{written[0]}: {result.attrs['composite']} mosaic ({', '.join(map(str, result['band'].values))}) "
                   f"of {result.attrs['n_dates']} date(s), {grid.shape.y}×{grid.shape.x} px, "
                   f"EPSG:{grid.crs.epsg}, {abs(grid.resolution.x):g} m; items: {written[-1]}")
