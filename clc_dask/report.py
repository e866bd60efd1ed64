"""Evaluation output for people: paper-style tables, IoU bar charts and map figures.

Tables follow the paper's Tables 3–5: one column per CLC class, one row per model, season or
tile, IoU with two decimals, blank where a class has no figure. Figures use the official CLC
colours (:func:`clc_dask.classes.rgb_of`) and are drawn with matplotlib's Agg canvas (no display,
no global pyplot state). Every file is written atomically.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

from clc_dask.classes import NODATA_CODE, label_of, official_codes, rgb_of, to_level
from clc_dask.errors import InputError, OutputError
from clc_dask.grid import assert_same_grid
from clc_dask.rasters import check_writable, geobox_of
from clc_dask.stores import atomic_path

log = logging.getLogger(__name__)

#: Per-class metrics a table or chart can show.
CLASS_METRICS = ("iou", "precision", "recall", "f1")
_METRIC_NAMES = {"iou": "IoU", "precision": "Precision", "recall": "Recall", "f1": "F1"}
#: Longest edge (pixels) of a map panel; larger rasters are strided down for the figure.
MAP_MAX_PIXELS = 1000
#: Background shown where a map has no data (0) or no CLC code (light grey).
NODATA_RGB = (0.85, 0.85, 0.85)


# --------------------------------------------------------------------------- tables


def tile_reports(report: Mapping[str, Any], prefix: str = "") -> dict[str, dict[str, Any]]:
    """The per-tile reports of an evaluation, as rows for :func:`paper_table` (``prefix`` + name)."""
    tiles = report.get("tiles")
    if not tiles:
        raise InputError("This report has no per-tile results: evaluate with `tiles` or `per_tile`.")
    return {f"{prefix}{name}": dict(sub) for name, sub in tiles.items()}


def paper_table(
    reports: Mapping[str, Mapping[str, Any]],
    classes: Sequence[int] | None = None,
    *,
    metric: str = "iou",
    with_mean: bool = False,
    decimals: int = 2,
) -> pd.DataFrame:
    """A table laid out like the paper's Tables 3–5: classes as columns, runs as rows.

    Args:
        reports: ``{row name: report}``, e.g. ``{"NRG, ResNet101": …, "RGB, ResNet50": …}`` or
            one row per season or tile (:func:`tile_reports`). Row order is kept.
        classes: CLC codes to show, in this order; default: every code of any report, ascending.
        metric: per-class figure to show: ``iou`` (paper), ``precision``, ``recall`` or ``f1``.
        with_mean: add a last column ``mIoU`` (the report's mean IoU over reference classes).
        decimals: rounding of the values (paper: 2).

    Returns:
        DataFrame with int code columns (plus ``"mIoU"``), row index = names; NaN (shown blank)
        where a report has no figure for a class (class not scored or absent from both maps).
    """
    if metric not in CLASS_METRICS:
        raise InputError(f"Unknown metric {metric!r}: choose one of {list(CLASS_METRICS)}.")
    if not reports:
        raise InputError("No reports given: pass at least one evaluation report.")
    for name, report in reports.items():
        if metric not in report or "codes" not in report:
            raise InputError(f"Report {name!r} has no {metric!r} per class: is it an evaluation report?")
    if classes is None:
        classes = sorted({int(c) for r in reports.values() for c in r["codes"]})
    columns: list[Any] = [int(c) for c in classes]
    rows = []
    for report in reports.values():
        values = report[metric]
        row: list[float] = [_number(values.get(str(c))) for c in columns]
        if with_mean:
            row.append(_number(report.get("mean_iou")))
        rows.append(row)
    if with_mean:
        columns.append("mIoU")
    table = pd.DataFrame(rows, index=pd.Index(list(reports), name="run"), columns=columns, dtype=float)
    return table.round(decimals)


def _number(value: Any) -> float:
    return math.nan if value is None else float(value)


def table_markdown(table: pd.DataFrame, decimals: int = 2) -> str:
    """The table as a GitHub Markdown table (blank cells where a value is missing)."""
    header = [str(table.index.name or "")] + [str(c) for c in table.columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join([" --- "] + [" ---: "] * len(table.columns)) + "|"]
    for name, row in table.iterrows():
        cells = ["" if pd.isna(v) else f"{v:.{decimals}f}" for v in row]
        lines.append("| " + " | ".join([str(name).replace("|", "\\|"), *cells]) + " |")
    return "\n".join(lines) + "\n"


def write_table(table: pd.DataFrame, path: str | os.PathLike[str], decimals: int = 2) -> Path:
    """Write a :func:`paper_table` as Markdown (``.md``) or CSV (``.csv``), by suffix, atomically."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in (".md", ".markdown"):
        text = table_markdown(table, decimals)
    elif suffix == ".csv":
        text = table.to_csv(float_format=f"%.{decimals}f", na_rep="")
    else:
        raise OutputError(f"Cannot tell the table format of {path}: name it .md (Markdown) or .csv.")
    check_writable(path)
    with atomic_path(path, suffix=suffix) as tmp:
        tmp.write_text(text, encoding="utf-8")
    log.info("wrote table %s", path)
    return path


# --------------------------------------------------------------------------- figures


def _rgb01(code: int) -> tuple[float, float, float]:
    r, g, b = rgb_of(code)
    return (r / 255.0, g / 255.0, b / 255.0)


def _save(fig: Figure, path: str | os.PathLike[str], dpi: int) -> Path:
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise OutputError(f"Figures are PNG: name {path} with a .png suffix.")
    check_writable(path)
    FigureCanvasAgg(fig)
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    log.info("wrote figure %s", path)
    return path


def iou_bar_chart(
    report: Mapping[str, Any],
    path: str | os.PathLike[str],
    *,
    metric: str = "iou",
    title: str | None = None,
    dpi: int = 100,
) -> Path:
    """A PNG bar chart of a per-class metric, one bar per class in its official CLC colour.

    Classes without a figure (absent from both maps) are marked "n/a"; the dashed line is the
    mean IoU over the reference classes.
    """
    if metric not in CLASS_METRICS:
        raise InputError(f"Unknown metric {metric!r}: choose one of {list(CLASS_METRICS)}.")
    codes = [int(c) for c in report["codes"]]
    if not codes:
        raise InputError("The report has no classes: nothing to chart (is the reference all no data?).")
    values = [report[metric].get(str(c)) for c in codes]
    fig = Figure(figsize=(max(4.0, 0.55 * len(codes) + 1.5), 3.6))
    ax = fig.add_subplot()
    x = np.arange(len(codes))
    heights = [0.0 if v is None else float(v) for v in values]
    ax.bar(x, heights, width=0.8, color=[_rgb01(c) for c in codes], edgecolor="none", antialiased=False)
    for xi, v in zip(x, values, strict=True):
        ax.text(xi, 0.02 if v is None else float(v) + 0.02, "n/a" if v is None else f"{v:.2f}",
                ha="center", va="bottom", fontsize=7)
    if metric == "iou" and report.get("mean_iou") is not None:
        ax.axhline(report["mean_iou"], color="0.3", linestyle="--", linewidth=1,
                   label=f"mIoU {report['mean_iou']:.2f}")
        ax.legend(loc="upper right", fontsize=8, frameon=False)
    ax.set_xticks(x, [str(c) for c in codes])
    ax.set_ylim(0, 1.1)
    ax.set_xlabel(f"CLC Level-{report.get('level', '')} class")
    ax.set_ylabel(_METRIC_NAMES[metric])
    ax.set_title(title or f"{_METRIC_NAMES[metric]} per class")
    fig.tight_layout()
    return _save(fig, path, dpi)


def _class_band(array: xr.DataArray, what: str) -> xr.DataArray:
    extra = [d for d in array.dims if d not in ("y", "x")]
    for dim in extra:
        if array.sizes[dim] != 1:
            raise InputError(f"The {what} raster has {array.sizes[dim]} '{dim}' entries: pass the class band only.")
        array = array.isel({dim: 0}, drop=True)
    return array.transpose("y", "x")


def _strided(array: xr.DataArray, max_pixels: int) -> np.ndarray:
    """Every ``step``-th pixel (nearest-neighbour downsampling) so the longest edge ≤ max_pixels."""
    step = max(1, math.ceil(max(array.shape) / max_pixels))
    return np.asarray(array.data[::step, ::step])


def _rgba_image(codes: np.ndarray, level: int) -> np.ndarray:
    """CLC codes → RGBA float image in official colours; no data and non-codes transparent."""
    lut = np.zeros((1000, 4), dtype=np.float32)
    for finer in range(level, 4):
        for code in official_codes(finer):
            lut[code] = (*_rgb01(int(to_level(code, level))), 1.0)
    values = np.asarray(codes).astype(np.int64)
    values = np.where((values < 0) | (values > 999), NODATA_CODE, values)
    return lut[values]


def _reduced(codes: np.ndarray, level: int) -> np.ndarray:
    """Codes of ``level`` or finer reduced to ``level``; anything else (no data, coarser) → 0."""
    values = np.asarray(codes).astype(np.int64)
    out = np.zeros_like(values)
    for finer in range(level, 4):
        lo, hi = 10 ** (finer - 1), 10**finer - 1
        mask = (values >= lo) & (values <= hi)
        out = np.where(mask, values // 10 ** (finer - level), out)
    return out


def map_figure(
    prediction: xr.DataArray,
    reference: xr.DataArray,
    path: str | os.PathLike[str],
    *,
    level: int = 2,
    title: str | None = None,
    max_pixels: int = MAP_MAX_PIXELS,
    dpi: int = 100,
) -> Path:
    """Reference and prediction side by side in official CLC colours, with a legend.

    Args:
        prediction: class map of CLC codes (y, x) or (1, y, x); lazily read rasters are fine.
        reference: reference codes on the same grid.
        path: PNG to write.
        level: CLC level to colour at (finer codes take the colour of their Level-``level`` class).
        title: figure title.
        max_pixels: longest edge of each panel in pixels; larger rasters are downsampled by
            taking every n-th pixel (only those pixels' chunks are read).
        dpi: resolution of the PNG.
    """
    return maps_figure({"Reference": reference, "Prediction": prediction}, path, level=level, title=title,
                       max_pixels=max_pixels, dpi=dpi)


def maps_figure(
    panels: Mapping[str, xr.DataArray],
    path: str | os.PathLike[str],
    *,
    level: int = 2,
    title: str | None = None,
    max_pixels: int = MAP_MAX_PIXELS,
    dpi: int = 100,
) -> Path:
    """Class maps side by side (e.g. the reference, the best and the worst model) in official
    CLC colours, with one legend.

    Args:
        panels: ``{panel title: class map}``, all on the grid of the first (e.g. the reference),
            (y, x) or (1, y, x) CLC codes; lazily read rasters are fine.
        path: PNG to write.
        level: CLC level to colour at (finer codes take the colour of their Level-``level`` class).
        title: figure title.
        max_pixels: longest edge of each panel in pixels; larger rasters are downsampled by
            taking every n-th pixel (only those pixels' chunks are read).
        dpi: resolution of the PNG.
    """
    if not panels:
        raise InputError("No map to draw: give at least one panel.")
    names = list(panels)
    arrays = [_class_band(panels[n], n.lower()) for n in names]
    geobox = geobox_of(arrays[0])
    for name, array in zip(names[1:], arrays[1:], strict=True):
        assert_same_grid(geobox_of(array), geobox, name.lower(), names[0].lower())
    images = [_reduced(_strided(a, max_pixels), level) for a in arrays]
    left, bottom, right, top = geobox.boundingbox
    extent = (left / 1000, right / 1000, bottom / 1000, top / 1000)
    height, width = images[0].shape
    panel = 4.5
    fig = Figure(figsize=(len(images) * panel + 3.0, panel * height / max(width, 1) + 1.2), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(images), sharex=True, sharey=True))
    for ax, image, name in zip(axes, images, names, strict=True):
        ax.set_facecolor(NODATA_RGB)
        ax.imshow(_rgba_image(image, level), extent=extent, interpolation="nearest", resample=False)
        ax.set_title(name)
        ax.set_xlabel("x (km)")
        ax.xaxis.set_major_locator(MaxNLocator(4))
        ax.yaxis.set_major_locator(MaxNLocator(5))
        ax.tick_params(labelsize=7)
    axes[0].set_ylabel("y (km)")
    present = sorted({int(c) for image in images for c in np.unique(image)} - {NODATA_CODE})
    handles = [Patch(facecolor=_rgb01(c), edgecolor="none", label=f"{c} {_short(label_of(c))}") for c in present]
    if any((image == NODATA_CODE).any() for image in images):
        handles.append(Patch(facecolor=NODATA_RGB, edgecolor="0.5", linewidth=0.5, label="no data / other"))
    fig.legend(handles=handles, loc="outside right center", fontsize=7, frameon=False,
               title=f"CLC Level {level}", title_fontsize=8)
    if title:
        fig.suptitle(title)
    return _save(fig, path, dpi)


def _short(label: str, width: int = 34) -> str:
    return label if len(label) <= width else label[: width - 1] + "…"


def write_figures(
    report: Mapping[str, Any],
    prediction: xr.DataArray,
    reference: xr.DataArray,
    folder: str | os.PathLike[str],
    *,
    title: str = "",
) -> list[Path]:
    """The figures of an evaluation: ``iou.png`` and ``map.png``, and ``iou_<tile>.png`` /
    ``map_<tile>.png`` for every tile of a per-tile report. Nothing is drawn without classes."""
    folder = Path(folder)
    level = int(report.get("level", 2))
    if not report.get("codes"):
        return []
    written = [iou_bar_chart(report, folder / "iou.png", title=f"IoU per class – {title}".rstrip(" –")),
               map_figure(prediction, reference, folder / "map.png", level=level, title=title or None)]
    for name, sub in report.get("tiles", {}).items():
        y0, y1, x0, x1 = sub["pixel_slices"]
        window = {"y": slice(y0, y1), "x": slice(x0, x1)}
        if sub["codes"] and sub["valid_pixels"]:
            written.append(iou_bar_chart({**sub, "level": level}, folder / f"iou_{name}.png",
                                         title=f"IoU per class – tile {name}"))
        written.append(map_figure(prediction.isel(window), reference.isel(window), folder / f"map_{name}.png",
                                  level=level, title=f"Tile {name}"))
    return written
