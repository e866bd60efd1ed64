"""`clc-dask generalize`: class map → map following CORINE rules (MMU, minimum width)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from clc_dask.cluster import connect
from clc_dask.generalize import generalize_file


def generalize_command(
    input_path: Annotated[Path, typer.Option(
        "--input", "-i", help="Class map GeoTIFF: one band of CLC codes, 0 = no data.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Generalized class map COG to write.")],
    mmu_ha: Annotated[float, typer.Option(
        "--mmu-ha", help="Minimum mapping unit in hectares: smaller patches merge into a neighbour (0: off).")] = 25.0,
    min_width_m: Annotated[float, typer.Option(
        "--min-width-m", help="Minimum width in metres: narrower parts are refilled from neighbours (0: off).")] = 100.0,
    connectivity: Annotated[int, typer.Option(
        "--connectivity", help="4 (CLC-like polygons) or 8: how pixels of one class connect into a patch.")] = 4,
    vector: Annotated[Path | None, typer.Option(
        "--vector", help="Also write polygons to this GeoPackage (.qml and .sld styles beside it).")] = None,
    level: Annotated[int | None, typer.Option(
        "--level", help="CLC level of the codes (default: from the codes present).")] = None,
    chunk_size: Annotated[int, typer.Option("--chunk-size", help="Dask chunk edge in pixels.")] = 2048,
    compare_sieve: Annotated[bool, typer.Option(
        "--compare-sieve", help="Also report the distance to GDAL's sieve filter (loads the map into memory).")] = False,
    scheduler: Annotated[str | None, typer.Option(
        "--scheduler", "--address", help="Dask scheduler address (default: threads in this process).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace existing outputs.")] = False,
) -> None:
    """Generalize a class map to CORINE rules, chunk by chunk (identical to the whole map in memory)."""
    with connect(scheduler):
        summary = generalize_file(
            input_path, out, mmu_ha=mmu_ha, min_width_m=min_width_m, connectivity=connectivity,
            vector=vector, level=level, chunk_size=chunk_size, compare_sieve=compare_sieve, overwrite=overwrite,
        )
    wy, wx = summary["min_width_px"]
    typer.echo(f"generalized (MMU {summary['mmu_px']} px, width {wy}×{wx} px, "
               f"{connectivity}-connected, Level {summary['level']}) → {out}")
    if "vector" in summary:
        typer.echo(f"polygons → {summary['vector']}")
    if "sieve" in summary:
        typer.echo(json.dumps(summary["sieve"], indent=2))


def register(app: typer.Typer) -> None:
    """Add the `generalize` command to `app`."""
    app.command("generalize")(generalize_command)
