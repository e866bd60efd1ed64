"""`clc-dask evaluate` (score a class map) and `clc-dask report-table` (paper-style tables)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from clc_dask.cli.options import SCHEDULER_HELP, parse_codes, parse_tile_names
from clc_dask.errors import ConfigError
from clc_dask.grid import DEFAULT_TILE_SIZE

log = logging.getLogger(__name__)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def evaluate_command(
    prediction: Annotated[Path, typer.Option("--prediction", "-p", help="Class map GeoTIFF (CLC codes, 0 = no data).")],
    reference: Annotated[Path, typer.Option("--reference", "-r", help="Reference CLC GeoTIFF on the same grid.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Report JSON to write.")],
    level: Annotated[int, typer.Option("--level", help="CLC level to evaluate at (Level-3 inputs are reduced).")] = 2,
    codes: Annotated[str | None, typer.Option(
        "--codes", help="Classes to score, e.g. 11,12,21 (default: codes present in either map).")] = None,
    tiles: Annotated[str | None, typer.Option(
        "--tiles", help="Also report these tiles, e.g. 4_3,3_2 (row_col from 1).")] = None,
    per_tile: Annotated[bool, typer.Option("--per-tile", help="Also report every tile of the grid.")] = False,
    tile_size: Annotated[int, typer.Option("--tile-size", help="Tile edge in pixels.")] = DEFAULT_TILE_SIZE,
    figures: Annotated[Path | None, typer.Option(
        "--figures", help="Folder for PNGs: IoU bar chart and reference/prediction maps (and per tile).")] = None,
    chunk_size: Annotated[int, typer.Option(
        "--chunk-size", "--chunks", help="Dask chunk edge in pixels (made to divide --tile-size).")] = 2048,
    scheduler: Annotated[str | None, typer.Option("--scheduler", "--address", help=SCHEDULER_HELP)] = None,
) -> None:
    """Score a class map against a reference: IoU, precision, recall, F1, OA, kappa (JSON)."""
    from clc_dask.cluster import connect
    from clc_dask.evaluate import evaluate_files

    with connect(scheduler):
        report = evaluate_files(prediction, reference, out, level=level, codes=parse_codes(codes, "--codes"),
                                tiles=parse_tile_names(tiles), per_tile=per_tile, tile_size=tile_size,
                                chunk_size=chunk_size, figures=figures)
    typer.echo(
        f"mIoU {_fmt(report['mean_iou'])}  OA {_fmt(report['overall_accuracy'])}  "
        f"kappa {_fmt(report['kappa'])}  ({len(report['codes'])} classes) → {out}"
    )
    for name, sub in report.get("tiles", {}).items():
        typer.echo(f"  tile {name}: mIoU {_fmt(sub['mean_iou'])}  OA {_fmt(sub['overall_accuracy'])}")
    if figures is not None and report["codes"]:
        typer.echo(f"figures → {figures}")


def report_table_command(
    reports: Annotated[list[Path], typer.Argument(help="Report JSON files written by clc-dask evaluate.")],
    out: Annotated[list[Path], typer.Option(
        "--out", "-o", help="Table file(s): .md (Markdown) or .csv; repeat for both.")],
    names: Annotated[list[str] | None, typer.Option(
        "--names", "--name",
        help="Row names, one per report (repeat the option, or one comma-separated list); default: file names.",
    )] = None,
    per_tile: Annotated[bool, typer.Option("--per-tile", help="One row per tile of each report.")] = False,
    classes: Annotated[str | None, typer.Option(
        "--classes", help="Columns, e.g. 11,12,21 (default: all codes).")] = None,
    metric: Annotated[str, typer.Option("--metric", help="Per-class figure: iou, precision, recall or f1.")] = "iou",
    mean: Annotated[bool, typer.Option("--mean", help="Add a mIoU column.")] = False,
) -> None:
    """A table like the paper's Tables 3–5 (classes as columns, one row per report or tile)."""
    from clc_dask import report as rp
    from clc_dask.evaluate import read_report

    row_names = _row_names(reports, names)
    loaded = [read_report(p) for p in reports]
    for path in out:
        if path.suffix.lower() not in (".md", ".markdown", ".csv"):
            raise ConfigError(f"--out {path}: name table files .md (Markdown) or .csv.")
    rows: dict[str, dict] = {}
    for name, report in zip(row_names, loaded, strict=True):
        if per_tile:
            rows.update(rp.tile_reports(report, prefix=f"{name} " if len(loaded) > 1 else ""))
        else:
            rows[name] = report
    table = rp.paper_table(rows, parse_codes(classes, "--classes"), metric=metric, with_mean=mean)
    for path in out:
        rp.write_table(table, path)
    typer.echo(rp.table_markdown(table), nl=False)


def _row_names(reports: list[Path], names: list[str] | None) -> list[str]:
    if not names:
        return [p.stem for p in reports]
    if len(names) == 1 and len(reports) > 1:
        names = [n.strip() for n in names[0].split(",")]
    if len(names) != len(reports):
        raise ConfigError(f"{len(names)} name(s) for {len(reports)} report(s): give one --names per report.")
    if len(set(names)) != len(names):
        raise ConfigError(f"Row names {names} repeat: give each report its own name.")
    return names


def register(app: typer.Typer) -> None:
    """Add the `evaluate` and `report-table` commands to `app`."""
    app.command("evaluate")(evaluate_command)
    app.command("report-table")(report_table_command)
