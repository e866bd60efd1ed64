"""An experiment's results: reports with intervals, paper-style tables, comparisons and figures.

For every test area (the training region's test blocks on a season's mosaic, or a transfer
region's) the experiment writes:

* ``configurations/<name>/<area>/report.json`` — the evaluation report of the test blocks
  (:func:`clc_dask.evaluate.evaluate`, per block under ``tiles``) plus ``intervals`` (the block
  bootstrap of :mod:`~clc_dask.experiment.stats`) and ``training`` (epochs, best epoch);
* ``results/<area>/table.csv`` — the paper's Tables 3–5 layout: one row per configuration,
  per-class IoU, then mIoU, overall accuracy and kappa (4 decimals); ``table.md`` the same with
  2 decimals and the intervals (``0.72 [0.65, 0.78]``); ``intervals.csv`` every figure with its
  interval (long format); ``comparisons.csv`` every pair of configurations (difference A − B,
  interval, p-value, which is better at the confidence level);
* ``results/<area>/iou_intervals.png`` (per-class IoU bars with interval whiskers) and
  ``maps.png`` (reference, best and worst configuration by mIoU);

and once: ``results/training_curves.png``, ``results/split.png``, ``results/summary.md`` (all
tables and comparisons) and ``results/results.json``.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Patch, Rectangle

from clc_dask.evaluate import read_report, write_report
from clc_dask.experiment.scoring import masked_window
from clc_dask.experiment.stats import (
    SUMMARY_METRICS,
    BlockCounts,
    block_bootstrap,
    paired_comparison,
)
from clc_dask.rasters import open_raster, to_dataarray
from clc_dask.report import maps_figure, paper_table
from clc_dask.stores import atomic_path

if TYPE_CHECKING:
    from clc_dask.experiment.runner import PreparedExperiment
    from clc_dask.experiment.split import Split

log = logging.getLogger(__name__)

#: A configuration's report on a test area, in ``configurations/<name>/<area>/``.
REPORT_FILE = "report.json"
#: Column names of the whole-area figures in the tables.
SUMMARY_COLUMNS = {"mean_iou": "mIoU", "overall_accuracy": "OA", "kappa": "kappa"}
#: Colours of the split's roles in ``split.png``.
ROLE_COLOURS = {"train": "#4daf4a", "val": "#377eb8", "test": "#e41a1c", "guard": "#bdbdbd", "unused": "#ffffff"}


# --------------------------------------------------------------------------- reports


def configuration_report(evaluation: Mapping[str, Any], intervals: Mapping[str, Any],
                         training: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The report of one configuration on one test area: evaluation + intervals + training."""
    report = dict(evaluation)
    report["intervals"] = dict(intervals)
    if training is not None:
        report["training"] = {k: training.get(k) for k in ("best_epoch", "best_val_miou", "epochs_run",
                                                            "resumed_from_epoch", "checkpoint", "best_checkpoint")}
    return report


def results_table(reports: Mapping[str, Mapping[str, Any]], codes: Sequence[int], decimals: int = 4) -> pd.DataFrame:
    """Tables 3–5 of the paper: rows = configurations, per-class IoU, then mIoU, OA and kappa."""
    table = paper_table(reports, classes=list(codes), with_mean=True, decimals=decimals)
    table["OA"] = [_round(r.get("overall_accuracy"), decimals) for r in reports.values()]
    table["kappa"] = [_round(r.get("kappa"), decimals) for r in reports.values()]
    table.index.name = "configuration"
    return table


def _round(value: Any, decimals: int) -> float:
    return math.nan if value is None else round(float(value), decimals)


def intervals_frame(reports: Mapping[str, Mapping[str, Any]]) -> pd.DataFrame:
    """Every figure with its interval: configuration, metric, class, value, lower, upper."""
    rows = []
    for name, report in reports.items():
        ci = report["intervals"]
        for metric in SUMMARY_METRICS:
            low, high = ci[metric] or (None, None)
            rows.append((name, metric, None, report.get(metric), low, high))
        for code in report["codes"]:
            low, high = ci["iou"].get(str(code)) or (None, None)
            rows.append((name, "iou", int(code), report["iou"].get(str(code)), low, high))
    frame = pd.DataFrame(rows, columns=["configuration", "metric", "class", "value", "lower", "upper"])
    frame["class"] = frame["class"].astype("Int64")
    return frame


def comparisons_frame(counts: Mapping[str, BlockCounts], *, replicates: int, confidence: float,
                      seed: int) -> pd.DataFrame:
    """Paired comparison of every pair of configurations (in order) on mIoU, OA and kappa."""
    rows = []
    for a, b in itertools.combinations(counts, 2):
        result = paired_comparison(counts[a], counts[b], replicates=replicates, confidence=confidence, seed=seed)
        for metric in SUMMARY_METRICS:
            r = result[metric]
            low, high = r["interval"] or (None, None)
            better = {"A": a, "B": b}.get(r["verdict"] or "", None)
            rows.append((a, b, metric, r["difference"], low, high, r["p_value"], better))
    return pd.DataFrame(rows, columns=["a", "b", "metric", "difference", "lower", "upper", "p_value", "better"])


# --------------------------------------------------------------------------- text


def _cell(value: Any, interval: Sequence[float] | None, decimals: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    text = f"{value:.{decimals}f}"
    if interval:
        text += f" [{interval[0]:.{decimals}f}, {interval[1]:.{decimals}f}]"
    return text


def table_markdown(reports: Mapping[str, Mapping[str, Any]], codes: Sequence[int], decimals: int = 2) -> str:
    """The results table as Markdown, each figure followed by its interval."""
    columns = [str(c) for c in codes] + list(SUMMARY_COLUMNS.values())
    lines = ["| configuration | " + " | ".join(columns) + " |", "| --- |" + " ---: |" * len(columns)]
    for name, report in reports.items():
        ci = report["intervals"]
        cells = [_cell(report["iou"].get(str(c)), ci["iou"].get(str(c)), decimals) for c in codes]
        cells += [_cell(report.get(m), ci.get(m), decimals) for m in SUMMARY_COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def comparisons_markdown(frame: pd.DataFrame, confidence: float) -> str:
    """Paired comparisons as Markdown: which configuration is better, or no difference."""
    lines = [f"| A | B | figure | A − B | {confidence:.0%} interval | p | better at {confidence:.0%} |",
             "| --- | --- | --- | ---: | --- | ---: | --- |"]
    for row in frame.itertuples():
        interval = "" if pd.isna(row.lower) else f"[{row.lower:+.3f}, {row.upper:+.3f}]"
        diff = "" if pd.isna(row.difference) else f"{row.difference:+.3f}"
        p = "" if pd.isna(row.p_value) else f"{row.p_value:.3f}"
        lines.append(f"| {row.a} | {row.b} | {SUMMARY_COLUMNS[row.metric]} | {diff} | {interval} | {p} | "
                     f"{row.better or 'no difference'} |")
    return "\n".join(lines) + "\n"


def _write_text(path: Path, text: str) -> Path:
    with atomic_path(path, suffix=path.suffix) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


def _write_csv(frame: pd.DataFrame, path: Path, index: bool = False) -> Path:
    with atomic_path(path, suffix=".csv") as tmp:
        frame.to_csv(tmp, index=index, na_rep="")
    return path


# --------------------------------------------------------------------------- figures


def _save(fig: Figure, path: Path, dpi: int = 100) -> Path:
    FigureCanvasAgg(fig)
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    log.info("wrote figure %s", path)
    return path


def _colours(n: int) -> list[Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return [cmap(i % 10) for i in range(n)]


def training_curves_figure(metrics: Mapping[str, pd.DataFrame], path: str | os.PathLike[str]) -> Path:
    """Training loss and validation mIoU per epoch, one line per configuration, side by side."""
    fig = Figure(figsize=(10, 3.8), layout="constrained")
    loss_ax, miou_ax = fig.subplots(1, 2)
    for colour, (name, frame) in zip(_colours(len(metrics)), metrics.items(), strict=True):
        loss_ax.plot(frame["epoch"], frame["train_loss"], color=colour, label=name, marker=".")
        val = frame.dropna(subset=["val_miou"]) if "val_miou" in frame else frame.iloc[0:0]
        miou_ax.plot(val["epoch"], val["val_miou"], color=colour, label=name, marker="o", markersize=3)
    loss_ax.set(xlabel="epoch", ylabel="training loss", title="Training loss")
    miou_ax.set(xlabel="epoch", ylabel="validation mIoU", title="Validation mIoU", ylim=(0, 1))
    miou_ax.legend(fontsize=7, frameon=False, loc="lower right")
    return _save(fig, Path(path))


def iou_intervals_figure(reports: Mapping[str, Mapping[str, Any]], codes: Sequence[int],
                         path: str | os.PathLike[str], title: str | None = None) -> Path:
    """Per-class IoU (and mIoU) of every configuration as grouped bars with interval whiskers."""
    labels = [str(c) for c in codes] + ["mIoU"]
    x = np.arange(len(labels))
    width = 0.8 / max(1, len(reports))
    fig = Figure(figsize=(max(6.0, 0.7 * len(labels) * max(1, len(reports)) ** 0.5 + 2), 4.0), layout="constrained")
    ax = fig.add_subplot()
    for k, (colour, (name, report)) in enumerate(zip(_colours(len(reports)), reports.items(), strict=True)):
        ci = report["intervals"]
        values = [report["iou"].get(str(c)) for c in codes] + [report.get("mean_iou")]
        bounds = [ci["iou"].get(str(c)) for c in codes] + [ci.get("mean_iou")]
        heights = np.array([np.nan if v is None else v for v in values], dtype=float)
        low = np.array([np.nan if b is None or v is None else v - b[0] for v, b in zip(values, bounds, strict=True)])
        high = np.array([np.nan if b is None or v is None else b[1] - v for v, b in zip(values, bounds, strict=True)])
        offsets = x - 0.4 + width * (k + 0.5)
        ax.bar(offsets, np.nan_to_num(heights), width=width * 0.9, color=colour, label=name)
        ax.errorbar(offsets, heights, yerr=np.vstack([np.maximum(low, 0), np.maximum(high, 0)]), fmt="none",
                    ecolor="0.2", elinewidth=0.8, capsize=2)
    confidence = next(iter(reports.values()))["intervals"]["confidence"]
    ax.set_xticks(x, labels)
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("CLC class")
    ax.set_ylabel(f"IoU ({confidence:.0%} interval)")
    ax.set_title(title or "IoU per class")
    ax.legend(fontsize=7, frameon=False, ncols=min(3, len(reports)), loc="upper left")
    return _save(fig, Path(path))


def split_figure(split: Split, path: str | os.PathLike[str], title: str | None = None) -> Path:
    """The split's roles (train, validation, test, guard band), test blocks outlined and named."""
    cell = math.gcd(split.block_size, 64)
    roles = split.cell_roles(cell)
    names = list(ROLE_COLOURS)
    image = np.vectorize(names.index)(roles)
    left, bottom, right, top = split.geobox.boundingbox
    fig = Figure(figsize=(6.5, 5.5 * roles.shape[0] / max(roles.shape[1], 1) + 0.8), layout="constrained")
    ax = fig.add_subplot()
    ax.imshow(image, cmap=ListedColormap(list(ROLE_COLOURS.values())), vmin=0, vmax=len(names) - 1,
              extent=(left / 1000, right / 1000, bottom / 1000, top / 1000), interpolation="nearest")
    res = abs(float(split.geobox.resolution.x)) / 1000
    for name in split.test_blocks():
        row, col = (int(v) - 1 for v in name.split("_"))
        x0, y0 = left / 1000 + col * split.block_size * res, top / 1000 - (row + 1) * split.block_size * res
        size = split.block_size * res
        ax.add_patch(Rectangle((x0, y0), size, size, fill=False, edgecolor="0.1", linewidth=0.5))
        ax.text(x0 + size / 2, y0 + size / 2, name, ha="center", va="center", fontsize=5)
    handles = [Patch(facecolor=c, edgecolor="0.5", linewidth=0.5, label=r) for r, c in ROLE_COLOURS.items()]
    ax.legend(handles=handles, loc="upper right", fontsize=7)
    ax.set(xlabel="x (km)", ylabel="y (km)",
           title=title or f"Split: {split.block_size} px blocks, guard band {split.guard_px} px")
    return _save(fig, Path(path))


def test_maps_figure(prepared: PreparedExperiment, area_name: str, maps: Mapping[str, str | os.PathLike[str]],
                     path: str | os.PathLike[str], title: str | None = None) -> Path:
    """Reference and class maps of the test area side by side (``maps``: panel title → test map)."""
    area = next(a for a in prepared.areas if a.name == area_name)
    labels = prepared.regions[area.region].open_labels(area.block_size)
    reference = to_dataarray(masked_window(area, labels.data, labels.dtype), area.window_geobox())
    panels = {"Reference (CLC)": reference}
    panels.update({name: open_raster(p).isel(band=0, drop=True) for name, p in maps.items()})
    return maps_figure(panels, path, level=prepared.config.level, title=title)


# --------------------------------------------------------------------------- all results


def write_results(prepared: PreparedExperiment, evaluations: Mapping[str, Mapping[str, Path]],
                  training: Mapping[str, Mapping[str, Any]]) -> tuple[dict[str, dict[str, Path]], dict[str, Any]]:
    """Reports with intervals, tables, comparisons and figures of every test area.

    Returns:
        (configuration → area → report path, a summary of the files written and the findings).
    """
    stats = prepared.config.statistics
    layout = prepared.layout
    names = [c.name for c in prepared.configurations]
    report_paths: dict[str, dict[str, Path]] = {n: {} for n in names}
    summary: dict[str, Any] = {"experiment": prepared.config.name, "areas": {}}
    markdown = [f"# Experiment {prepared.config.name}\n"]
    for area in prepared.areas:
        reports, counts = {}, {}
        for name in names:
            evaluation = read_report(evaluations[name][area.name])
            counts[name] = BlockCounts.from_report(evaluation)
            intervals = block_bootstrap(counts[name], replicates=stats.replicates, confidence=stats.confidence,
                                        seed=stats.seed)
            reports[name] = configuration_report(evaluation, intervals, training.get(name))
            report_paths[name][area.name] = write_report(
                reports[name], layout.area(name, area.name) / REPORT_FILE)
        folder = layout.results / area.name
        folder.mkdir(parents=True, exist_ok=True)
        table = results_table(reports, prepared.codes)
        comparisons = comparisons_frame(counts, replicates=stats.replicates, confidence=stats.confidence,
                                        seed=stats.seed)
        files = {
            "table": _write_csv(table, folder / "table.csv", index=True),
            "table_markdown": _write_text(folder / "table.md", table_markdown(reports, prepared.codes)),
            "intervals": _write_csv(intervals_frame(reports), folder / "intervals.csv"),
            "comparisons": _write_csv(comparisons, folder / "comparisons.csv"),
            "iou_intervals": iou_intervals_figure(reports, prepared.codes, folder / "iou_intervals.png",
                                                  title=f"IoU per class on {area.name}"),
        }
        ranked = sorted(names, key=lambda n: -(reports[n]["mean_iou"] or 0.0))
        best, worst = ranked[0], ranked[-1]
        maps = {f"best: {best}": reports[best]["experiment"]["test_map"]}
        if worst != best:
            maps[f"worst: {worst}"] = reports[worst]["experiment"]["test_map"]
        files["maps"] = test_maps_figure(prepared, area.name, maps, folder / "maps.png",
                                         title=f"Test blocks of {area.region}, {area.season} mosaic")
        summary["areas"][area.name] = {
            "files": {k: str(v) for k, v in files.items()}, "best": best, "worst": worst,
            "blocks": len(area.blocks), "season": area.season, "region": area.region,
            "configurations": {n: {m: reports[n].get(m) for m in SUMMARY_METRICS}
                               | {f"{m}_interval": reports[n]["intervals"][m] for m in SUMMARY_METRICS}
                               for n in names},
            "comparisons": comparisons.replace({np.nan: None}).to_dict("records"),
        }
        markdown += [f"\n## {area.name} ({len(area.blocks)} test blocks of {area.block_size} px, "
                     f"{stats.confidence:.0%} intervals from {stats.replicates} block-bootstrap replicates)\n\n",
                     table_markdown(reports, prepared.codes), "\n",
                     comparisons_markdown(comparisons, stats.confidence) if len(names) > 1 else ""]
    metrics = {n: pd.read_csv(layout.train(n) / "metrics.csv") for n in names
               if (layout.train(n) / "metrics.csv").is_file()}
    summary["training_curves"] = str(training_curves_figure(metrics, layout.results / "training_curves.png"))
    summary["split_figure"] = str(split_figure(prepared.split, layout.results / "split.png"))
    summary["split"] = prepared.split.summary()
    summary["summary_markdown"] = str(_write_text(layout.results / "summary.md", "".join(markdown)))
    _write_text(layout.results / "results.json", json.dumps(summary, indent=2, allow_nan=False))
    return report_paths, summary
