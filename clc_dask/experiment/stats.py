"""Confidence intervals from a spatial block bootstrap, and paired comparisons of configurations.

Pixels of a class map are not independent draws: neighbouring pixels share fields, parcels and
errors, so intervals that treat them as independent are far too narrow. The bootstrap here
resamples whole *test blocks* (:mod:`clc_dask.experiment.split`) with replacement: a replicate
draws as many blocks as there are, adds their confusion matrices and computes the figures from
the sum, exactly as :func:`clc_dask.evaluate.metrics_from_confusion` does for the whole test area
(IoU per class, mean IoU over the classes present in the replicate's reference, overall accuracy,
Cohen's kappa; pixels predicted as no data count as misses). The interval is the percentile
interval: the ``(1 - confidence) / 2`` and ``(1 + confidence) / 2`` quantiles of the replicates
(numpy's default, linear interpolation).

A class's IoU is undefined (0/0) in a replicate that holds it in neither map; its interval is
taken over the replicates where it is defined, and the share of those is reported. With one test
block every replicate is that block: the interval has no width and no comparison can be made.

Two configurations are compared *paired*: both are scored on the same resampled blocks in every
replicate (the draws depend only on the seed and the number of blocks), and the interval of the
difference A − B decides: A is better at the confidence level when its lower bound is above 0.
The two-sided bootstrap p-value is ``2 · min(P(d ≤ 0), P(d ≥ 0))``. Comparing many pairs at the
same level multiplies false discoveries: the p-values are given to correct for that.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from clc_dask.errors import InputError

log = logging.getLogger(__name__)

#: Whole-area figures with intervals and comparisons.
SUMMARY_METRICS = ("mean_iou", "overall_accuracy", "kappa")
#: Below this many test blocks the intervals are rough; a warning says so.
FEW_BLOCKS = 10


@dataclass(frozen=True)
class BlockCounts:
    """Confusion matrices of the test blocks of one evaluation.

    Attributes:
        names: block names (``row_col``).
        codes: the classes (rows and columns), ascending.
        matrices: (blocks, n, n) int64 pixel counts, rows = reference, columns = prediction.
        missed: (blocks, n) int64 valid pixels per reference class predicted as no data.
    """

    names: tuple[str, ...]
    codes: tuple[int, ...]
    matrices: np.ndarray
    missed: np.ndarray

    @classmethod
    def from_report(cls, report: Mapping[str, Any], key: str = "tiles") -> BlockCounts:
        """The per-block counts of an evaluation report scored per tile (``evaluate(tiles=…)``)."""
        blocks = report.get(key) or {}
        if not blocks:
            raise InputError(f"The report has no per-block results under {key!r}: evaluate it per test block.")
        codes = tuple(int(c) for c in report["codes"])
        names = tuple(blocks)
        matrices = np.array([blocks[n]["confusion_matrix"] for n in names], dtype=np.int64)
        missed = np.array([[blocks[n]["missed_pixels"][str(c)] for c in codes] for n in names], dtype=np.int64)
        return cls(names, codes, matrices.reshape(len(names), len(codes), len(codes)), missed)

    def total(self) -> tuple[np.ndarray, np.ndarray]:
        """The whole test area's confusion matrix and misses (sum over blocks)."""
        return self.matrices.sum(axis=0), self.missed.sum(axis=0)


def bootstrap_weights(n_blocks: int, replicates: int, seed: int) -> np.ndarray:
    """How often each block is drawn in each replicate: (replicates, n_blocks) int64, rows sum to
    ``n_blocks``. A pure function of its arguments (same draws for every configuration)."""
    if n_blocks < 1 or replicates < 1:
        raise InputError(f"The bootstrap needs ≥ 1 block and ≥ 1 replicate (got {n_blocks}, {replicates}).")
    draws = np.random.default_rng(int(seed)).integers(0, n_blocks, size=(replicates, n_blocks))
    weights = np.zeros((replicates, n_blocks), np.int64)
    np.add.at(weights, (np.repeat(np.arange(replicates), n_blocks), draws.ravel()), 1)
    return weights


def batch_metrics(matrices: np.ndarray, missed: np.ndarray) -> dict[str, np.ndarray]:
    """Figures of many confusion matrices at once, as :func:`~clc_dask.evaluate.metrics_from_confusion`.

    Args:
        matrices: (r, n, n) counts, rows = reference.
        missed: (r, n) misses per reference class.

    Returns:
        ``iou`` (r, n), ``mean_iou``, ``overall_accuracy``, ``kappa`` (r,), float64 with NaN
        where a figure is undefined.
    """
    m = np.asarray(matrices, dtype=np.float64)
    miss = np.asarray(missed, dtype=np.float64)
    tp = np.diagonal(m, axis1=1, axis2=2)
    reference = m.sum(axis=2) + miss
    predicted = m.sum(axis=1)
    union = reference + predicted - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, tp / np.where(union > 0, union, 1), np.nan)
        present = reference > 0
        n_present = present.sum(axis=1)
        mean_iou = np.where(n_present > 0, np.where(present, iou, 0).sum(axis=1) / np.maximum(n_present, 1), np.nan)
        total = reference.sum(axis=1)
        observed = np.where(total > 0, tp.sum(axis=1) / np.where(total > 0, total, 1), np.nan)
        columns = np.concatenate([predicted, miss.sum(axis=1, keepdims=True)], axis=1)
        rows = np.concatenate([reference, np.zeros((len(m), 1))], axis=1)
        expected = (rows * columns).sum(axis=1) / np.where(total > 0, total * total, 1)
        kappa = np.where((total > 0) & (expected != 1.0), (observed - expected) / np.where(expected != 1.0, 1.0 - expected, 1), np.nan)
    return {"iou": iou, "mean_iou": mean_iou, "overall_accuracy": observed, "kappa": kappa}


def _replicate_metrics(counts: BlockCounts, weights: np.ndarray) -> dict[str, np.ndarray]:
    n = len(counts.codes)
    flat = counts.matrices.reshape(len(counts.names), n * n)
    matrices = (weights @ flat).reshape(len(weights), n, n)
    return batch_metrics(matrices, weights @ counts.missed)


def _interval(values: np.ndarray, confidence: float) -> list[float] | None:
    defined = values[~np.isnan(values)]
    if defined.size == 0:
        return None
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(defined, [alpha, 1.0 - alpha])
    return [float(low), float(high)]


def block_bootstrap(counts: BlockCounts, *, replicates: int = 2000, confidence: float = 0.95,
                    seed: int = 0) -> dict[str, Any]:
    """Percentile intervals of IoU per class, mean IoU, overall accuracy and kappa.

    Args:
        counts: the test blocks' confusion matrices.
        replicates: bootstrap resamples (≥ 1000 for 95 % intervals).
        confidence: two-sided level, e.g. 0.95.
        seed: seeds the draws.

    Returns:
        JSON-ready: ``method``, ``confidence``, ``replicates``, ``seed``, ``blocks`` and
        ``[lower, upper]`` for ``mean_iou``, ``overall_accuracy``, ``kappa`` and each code under
        ``iou`` (None where never defined); ``iou_defined`` gives the share of replicates
        defining each class's IoU when below 1; ``note`` warns about few blocks.
    """
    if not 0 < confidence < 1:
        raise InputError(f"`confidence` must lie strictly between 0 and 1, not {confidence}.")
    weights = bootstrap_weights(len(counts.names), replicates, seed)
    values = _replicate_metrics(counts, weights)
    out: dict[str, Any] = {
        "method": "spatial block bootstrap, percentile interval", "confidence": confidence,
        "replicates": replicates, "seed": seed, "blocks": len(counts.names),
    }
    for metric in SUMMARY_METRICS:
        out[metric] = _interval(values[metric], confidence)
    out["iou"] = {str(c): _interval(values["iou"][:, k], confidence) for k, c in enumerate(counts.codes)}
    defined = {str(c): float(np.mean(~np.isnan(values["iou"][:, k]))) for k, c in enumerate(counts.codes)}
    out["iou_defined"] = {c: share for c, share in defined.items() if share < 1.0}
    out["note"] = _note(len(counts.names))
    return out


def _note(blocks: int) -> str | None:
    if blocks == 1:
        log.warning("one test block: the intervals have no width; test on more (smaller) blocks")
        return "one test block: the intervals have no width and configurations cannot be compared"
    if blocks < FEW_BLOCKS:
        log.warning("only %d test blocks: the intervals are rough; use more (smaller) blocks", blocks)
        return f"only {blocks} test blocks: the intervals are rough"
    return None


def paired_comparison(a: BlockCounts, b: BlockCounts, *, replicates: int = 2000, confidence: float = 0.95,
                      seed: int = 0, metrics: Sequence[str] = SUMMARY_METRICS) -> dict[str, Any]:
    """Is configuration A better than B? The difference A − B of each figure with its interval.

    Both are scored on the same resampled blocks in each replicate.

    Returns:
        ``{metric: {"difference", "interval", "p_value", "verdict"}}`` plus ``blocks``;
        ``verdict`` is ``"A"`` or ``"B"`` (better at the confidence level) or ``None``.

    Raises:
        InputError: the two were not scored on the same blocks and classes.
    """
    if a.names != b.names or a.codes != b.codes:
        raise InputError("Paired comparisons need both configurations scored on the same test blocks "
                         "and classes (same split and `codes`).")
    weights = bootstrap_weights(len(a.names), replicates, seed)
    rep_a, rep_b = _replicate_metrics(a, weights), _replicate_metrics(b, weights)
    point_a = batch_metrics(*(x[None] for x in a.total()))
    point_b = batch_metrics(*(x[None] for x in b.total()))
    out: dict[str, Any] = {"blocks": len(a.names), "confidence": confidence, "replicates": replicates}
    for metric in metrics:
        diff = rep_a[metric] - rep_b[metric]
        diff = diff[~np.isnan(diff)]
        point = float(point_a[metric][0] - point_b[metric][0])
        interval = _interval(diff, confidence) if diff.size else None
        p_value = float(min(1.0, 2 * min(np.mean(diff <= 0), np.mean(diff >= 0)))) if diff.size else None
        verdict = None
        if interval is not None and len(a.names) > 1:
            verdict = "A" if interval[0] > 0 else "B" if interval[1] < 0 else None
        out[metric] = {"difference": None if np.isnan(point) else point, "interval": interval,
                       "p_value": p_value, "verdict": verdict}
    return out
