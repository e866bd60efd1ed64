"""`clc-dask evaluate` (score a class map) and `clc-dask report-table` (paper-style tables)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from clc_dask.errors import ConfigError
from clc_dask.grid import DEFAULT_TILE_SIZE, TileGrid, chunk_size_for

log = logging.getLogger(__name__)


def _int_list(text: str | None, what: str) -> list[int] | None:
    if not text:
        return None
    try:
        return [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError as exc:
        raise ConfigError(f"{what} must be comma-separated CLC codes such as 11,12,21, not {text!r}.") from exc


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
    chunks: Annotated[int, typer.Option(
        "--chunks", help="Dask chunk edge in pixels (made to divide --tile-size).")] = 2048,
    address: Annotated[str | None, typer.Option(
        "--scheduler", "--address", help="Dask scheduler to count on (default: threads in this process).")] = None,
) -> None:
    """Score a class map against a reference: IoU, precision, recall, F1, OA, kappa (JSON)."""
    from clc_dask import evaluate as ev
    from clc_dask import report as rp
    from clc_dask.rasters import check_writable, geobox_of, open_raster

    if tiles and per_tile:
        raise ConfigError("Give either --tiles NAMES or --per-tile, not both.")
    chunk = chunk_size_for(tile_size, chunks)
    pred = open_raster(prediction, chunks=chunk)
    ref = open_raster(reference, chunks=chunk)
    code_list = _int_list(codes, "--codes")
    tile_sel: TileGrid | list[str] | None = None
    if per_tile:
        tile_sel = TileGrid(geobox_of(ref), tile_size)
    elif tiles:
        tile_sel = [t for t in tiles.replace(" ", "").split(",") if t]
    ev.validate_inputs(pred, ref, level=level, codes=code_list, tiles=tile_sel, tile_size=tile_size)
    check_writable(out)
    if figures is not None:
        check_writable(figures / "iou.png")

    client = None
    if address:
        from clc_dask.cluster import get_client

        client = get_client(address, kind="address")
    try:
        report = ev.evaluate(pred, ref, level=level, codes=code_list, tiles=tile_sel, tile_size=tile_size)
    finally:
        if client is not None:
            client.close()
    report["prediction"] = str(prediction)
    report["reference"] = str(reference)
    ev.write_report(report, out)
    typer.echo(
        f"mIoU {_fmt(report['mean_iou'])}  OA {_fmt(report['overall_accuracy'])}  "
        f"kappa {_fmt(report['kappa'])}  ({len(report['codes'])} classes) → {out}"
    )
    for name, sub in report.get("tiles", {}).items():
        typer.echo(f"  tile {name}: mIoU {_fmt(sub['mean_iou'])}  OA {_fmt(sub['overall_accuracy'])}")

    if figures is not None and report["codes"]:
        rp.iou_bar_chart(report, figures / "iou.png", title=f"IoU per class – {prediction.stem}")
        rp.map_figure(pred, ref, figures / "map.png", level=level, title=prediction.stem)
        for name, sub in report.get("tiles", {}).items():
            y0, y1, x0, x1 = sub["pixel_slices"]
            window = {"y": slice(y0, y1), "x": slice(x0, x1)}
            if sub["codes"] and sub["valid_pixels"]:
                rp.iou_bar_chart({**sub, "level": level}, figures / f"iou_{name}.png", title=f"IoU per class – tile {name}")
            rp.map_figure(pred.isel(window), ref.isel(window), figures / f"map_{name}.png", level=level,
                          title=f"Tile {name}")
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
    table = rp.paper_table(rows, _int_list(classes, "--classes"), metric=metric, with_mean=mean)
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
