"""`clc-dask labels`: a CLC vector or raster → a CLC code GeoTIFF on a given grid."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer
from odc.geo.geobox import GeoBox

from clc_dask.errors import ConfigError
from clc_dask.grid import DEFAULT_RESOLUTION, DEFAULT_TILE_SIZE, snapped_geobox
from clc_dask.labels import DEFAULT_FIELD, crs_name, geobox_like, label_raster, write_labels
from clc_dask.rasters import check_writable

log = logging.getLogger(__name__)


def grid_from_options(
    like: Path | None, epsg: int | None, resolution: float | None, bounds: str | None
) -> GeoBox:
    """The target grid: ``like``'s grid, or ``epsg`` + ``bounds`` (in that CRS) at ``resolution``."""
    explicit = [name for name, value in (("--epsg", epsg), ("--resolution", resolution),
                                         ("--bounds", bounds)) if value is not None]
    if like is not None:
        if explicit:
            raise ConfigError(f"Give either --like or {'/'.join(explicit)}, not both: --like takes "
                              "the whole grid (CRS, resolution, bounds) from that raster.")
        return geobox_like(like)
    if epsg is None or bounds is None:
        raise ConfigError("No target grid: give --like RASTER (e.g. a mosaic), or --epsg and "
                          "--bounds LEFT,BOTTOM,RIGHT,TOP (in that CRS) with --resolution metres.")
    return snapped_geobox(parse_bounds(bounds), epsg,
                          DEFAULT_RESOLUTION if resolution is None else resolution)


def parse_bounds(text: str) -> tuple[float, float, float, float]:
    """``"left,bottom,right,top"`` → four floats (in the grid's CRS units)."""
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 4:
        raise ConfigError(f"--bounds {text!r} is not LEFT,BOTTOM,RIGHT,TOP: give four numbers "
                          "in the --epsg CRS, e.g. 453250,4081010,465090,4099650.")
    return values  # type: ignore[return-value]


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
        chunk_size: Annotated[int, typer.Option("--chunk-size", min=1, help="Dask chunk edge in "
                              "pixels (rounded down to a divisor of 2048).")] = DEFAULT_TILE_SIZE,
        overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace --out if it "
                             "exists.")] = False,
        address: Annotated[str | None, typer.Option("--scheduler", "--address", help="Dask scheduler to run "
                           "on (default: threads in this process).")] = None,
    ) -> None:
        """Rasterize CLC polygons (per chunk) or warp a CLC raster onto a grid, as CLC codes."""
        check_writable(out, overwrite)
        geobox = grid_from_options(like, epsg, resolution, bounds)
        codes = label_raster(source, geobox, level=level, field=field, chunk_size=chunk_size,
                             layer=layer, grid_code=grid_code, resampling=resampling)
        client = None
        if address:
            from clc_dask.cluster import get_client

            client = get_client(address, kind="address")
        try:
            path = write_labels(codes, out, level=level, overwrite=overwrite)
        finally:
            if client is not None:
                client.close()
        typer.echo(f"{path}: Level-{level} CLC codes, {geobox.shape.y}×{geobox.shape.x} px, "
                   f"{crs_name(geobox.crs)}, {abs(geobox.resolution.x):g} m")
