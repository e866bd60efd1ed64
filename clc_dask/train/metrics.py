"""Validation scores (loss, confusion matrix, IoU) and the per-epoch metrics files."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from clc_dask.classes import IGNORE_INDEX
from clc_dask.evaluate import metrics_from_confusion
from clc_dask.stores import atomic_path

METRICS_CSV = "metrics.csv"
METRICS_JSON = "metrics.json"


def validation_scores(model: nn.Module, loader: Iterable[tuple[torch.Tensor, torch.Tensor]], n_classes: int,
                      device: torch.device, amp: torch.dtype | None) -> tuple[float | None, np.ndarray]:
    """Validation cross-entropy per labelled pixel and the (n, n) confusion matrix (rows = reference)."""
    model.eval()
    cm = torch.zeros(n_classes * n_classes, dtype=torch.int64)
    loss_sum, pixels = 0.0, 0
    with torch.no_grad():
        for xb, yb in loader:
            xb = xb.to(device, memory_format=torch.channels_last)
            yb = yb.to(device).long()
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                logits = model(xb)
            logits = logits.float()
            loss_sum += float(nn.functional.cross_entropy(logits, yb, ignore_index=IGNORE_INDEX,
                                                          reduction="sum"))
            valid = yb != IGNORE_INDEX
            pixels += int(valid.sum())
            pred = logits.argmax(dim=1)
            cm += torch.bincount((yb[valid] * n_classes + pred[valid]).cpu(),
                                 minlength=n_classes * n_classes)
    return (loss_sum / pixels if pixels else None), cm.reshape(n_classes, n_classes).numpy()


def validation_record(loss: float | None, cm: np.ndarray, codes: Sequence[int]) -> dict[str, Any]:
    """``val_loss``, ``val_miou``, ``val_overall_accuracy`` and ``iou_<code>`` of one validation."""
    metrics = metrics_from_confusion(cm, codes)
    record: dict[str, Any] = {"val_loss": loss, "val_miou": metrics["mean_iou"],
                              "val_overall_accuracy": metrics["overall_accuracy"]}
    for code in codes:
        record[f"iou_{code}"] = metrics["iou"][str(code)]
    return record


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_metrics(out_dir: Path, history: Sequence[Mapping[str, Any]], codes: Sequence[int],
                  summary: Mapping[str, Any]) -> None:
    """Write ``metrics.csv`` (one row per epoch) and ``metrics.json`` (``summary`` + history), atomically."""
    columns = ["epoch", "train_loss", "val_loss", "val_miou", "val_overall_accuracy",
               *[f"iou_{c}" for c in codes], "lr", "train_patches", "train_batches", "seconds"]
    with atomic_path(out_dir / METRICS_CSV, suffix=".csv") as tmp:
        with open(tmp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
            writer.writeheader()
            for row in history:
                writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in columns})
    doc = dict(summary)
    doc["history"] = [{k: _clean(v) for k, v in row.items()} for row in history]
    with atomic_path(out_dir / METRICS_JSON, suffix=".json") as tmp:
        tmp.write_text(json.dumps(doc, indent=2))
