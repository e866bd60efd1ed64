"""`clc-dask labels`: a CLC vector or raster → a CLC code GeoTIFF on a given grid."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from clc_dask.cli.options import SCHEDULER_HELP, parse_bounds
from clc_dask.cluster import connect
from clc_dask.grid import DEFAULT_TILE_SIZE
from clc_dask.labels import DEFAULT_FIELD, crs_name, make_labels, write_labels
from clc_dask.rasters import check_writable

log = logging.getLogger(__name__)


def register(app: typer.Typer) -> None:
    """Add the `labels` command to `app`."""

    @app.command("labels")
    def labels(
        source: Annotated[Path, typer.Option("--source", help="CLC polygons (GeoPackage, "
                          "Shapefile, FileGDB) or CLC raster (GeoTIFF of codes or EEA GRID_CODE).")],
        out: Annotated[Path, typer.Option("--out", help="Output GeoTIFF (COG) of CLC codes.")],
        field: Annotated[str, typer.Option("--field", help="Vector field holding the codes "
                         "(text or integer), e.g. CODE_12 for CLC 2012.")] = DEFAULT_FIELD,
        layer: Annotated[str | None, typer.Option("--layer", help="Vector layer; needed only "
                         "when several layers hold the field.")] = None,
        level: Annotated[int, typer.Option("--level", min=1, max=3, help="CLC level of the "
                         "output: 2 (uint8 codes 11…52) or 3 (uint16 codes 111…523).")] = 2,
        like: Annotated[Path | None, typer.Option("--like", help="Take the grid (CRS, pixel "
                        "size, bounds) from this raster, e.g. a mosaic.")] = None,
        epsg: Annotated[int | None, typer.Option("--epsg", help="Grid CRS as an EPSG code.")] = None,
        resolution: Annotated[float | None, typer.Option("--resolution", help="Grid pixel size "
                              "in metres (CRS units); default 10.")] = None,
        bounds: Annotated[str | None, typer.Option("--bounds", help="LEFT,BOTTOM,RIGHT,TOP in "
                          "the --epsg CRS; snapped outwards to whole pixels.")] = None,
        grid_code: Annotated[bool | None, typer.Option("--grid-code/--codes", help="Raster "
                             "input: values are EEA GRID_CODE 1…44 (0/48/49/50/255 = no data) or "
                             "CLC codes. Default: decided from the values.")] = None,
        resampling: Annotated[str, typer.Option("--resampling", help="Raster input: auto "
                              "(nearest; mode when the grid is coarser than the source), nearest "
                              "or mode.")] = "auto",
        chunk_size: Annotated[int, typer.Option("--chunk-size", "--chunks", min=1, help="Dask chunk edge in "
                              "pixels (rounded down to a divisor of 2048).")] = DEFAULT_TILE_SIZE,
        overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace --out if it "
                             "exists.")] = False,
        scheduler: Annotated[str | None, typer.Option("--scheduler", "--address", help=SCHEDULER_HELP)] = None,
    ) -> None:
        """Rasterize CLC polygons (per chunk) or warp a CLC raster onto a grid, as CLC codes."""
        check_writable(out, overwrite)
        codes = make_labels(source, like=like, epsg=epsg, resolution=resolution, bounds=parse_bounds(bounds),
                            level=level, field=field, chunk_size=chunk_size, layer=layer, grid_code=grid_code,
                            resampling=resampling)
        with connect(scheduler):
            path = write_labels(codes, out, level=level, overwrite=overwrite)
        geobox = codes.odc.geobox
        typer.echo(f"{path}: Level-{level} CLC codes, {geobox.shape.y}×{geobox.shape.x} px, "
                   f"{crs_name(geobox.crs)}, {abs(geobox.resolution.x):g} m")
