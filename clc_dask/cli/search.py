"""`clc-dask search`: find Sentinel-2 scenes and save them as an item-collection JSON."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from clc_dask.cli.options import SEASON_HELP, SOURCE_HELP, parse_bbox

log = logging.getLogger(__name__)


def register(app: typer.Typer) -> None:
    """Add the `search` command to `app`."""

    @app.command("search")
    def search(
        source: Annotated[str, typer.Option("--source", help=SOURCE_HELP)],
        out: Annotated[Path, typer.Option("--out", help="Item-collection JSON to write.")],
        collection: Annotated[str | None, typer.Option("--collection", help="Collection id(s), "
                              "comma-separated; default: the preset's (sentinel-2-l2a).")] = None,
        bbox: Annotated[str | None, typer.Option("--bbox", help="WEST,SOUTH,EAST,NORTH in "
                        "degrees.")] = None,
        aoi: Annotated[Path | None, typer.Option("--aoi", help="Vector file with the area "
                       "(GeoJSON, GeoPackage, Shapefile).")] = None,
        season: Annotated[str | None, typer.Option("--season", help=SEASON_HELP)] = None,
        years: Annotated[list[int] | None, typer.Option("--year", help="Year of --season "
                         "(repeat for several years).")] = None,
        datetime: Annotated[str | None, typer.Option("--datetime", help="START/END in ISO 8601 "
                            "('..' for open), instead of --season.")] = None,
        max_cloud: Annotated[float | None, typer.Option("--max-cloud", min=0, max=100,
                             help="Maximum scene cloud cover in %.")] = None,
        max_items: Annotated[int | None, typer.Option("--max-items", min=1, help="Stop after "
                             "this many items (default: all pages).")] = None,
        overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace --out if it "
                             "exists.")] = False,
    ) -> None:
        """Search a STAC source and save the matching items (reusable offline with --source)."""
        from clc_dask.rasters import check_writable
        from clc_dask.search import save_item_collection, search_items

        check_writable(out, overwrite)
        items = search_items(
            source, bbox=parse_bbox(bbox), aoi=aoi, datetime=datetime, season=season,
            years=years or (), max_cloud=max_cloud, collection=collection, max_items=max_items,
        )
        path = save_item_collection(items, out)
        dates = sorted({i.datetime.date().isoformat() for i in items if i.datetime})
        span = f", {dates[0]} … {dates[-1]}" if dates else ""
        typer.echo(f"{path}: {len(items)} item(s){span}")
