"""The default demo region, end to end through evaluation: the accuracy users are promised.

``clc-dask demo`` (4096 × 4096 px, seed 0) with the ``cpu-demo`` preset must reach a validation
mIoU ≥ 0.75 over the Level-2 classes present, and its map of the held-out southern quarter —
never seen in training — a mIoU ≥ 0.75 against the CLC reference. This is the longest test of
the suite (about 7.5 minutes on 2 cores: region 1 min, mosaics 1 min, training 6 min,
prediction and scoring 0.5 min); the step timings are printed for the record, never asserted.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from clc_dask.demo import DEFAULT_SIZE, run_demo
from clc_dask.demo.chain import held_out_rows
from clc_dask.model import load_checkpoint
from clc_dask.presets import PRESETS
from clc_dask.rasters import open_raster

TARGET_MIOU = 0.75
#: The module's fixture builds and trains the whole demo (~7.5 min here; a CPU without native
#: bfloat16 trains in float32, about twice as long): more than the suite's per-test default.
pytestmark = pytest.mark.timeout(2400)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    # as `clc-dask demo` runs: torch on every core (other test modules pin it to 1 thread)
    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)
    try:
        ctx = run_demo(tmp_path_factory.mktemp("demo-accuracy"), size=DEFAULT_SIZE, seed=0, until="evaluate")
    finally:
        torch.set_num_threads(threads)
    print("\ndemo step timings (s):", {name: r["seconds"] for name, r in ctx.results.items()})
    print("train:", ctx.results["train"], "\nevaluate:", ctx.results["evaluate"])
    return ctx


def test_cpu_demo_training_reaches_the_validation_miou(demo):
    metrics = json.loads((demo.workdir / "model" / "train" / "metrics.json").read_text())
    config = metrics["config"]
    assert config["name"] == "cpu-demo" and config["epochs"] == PRESETS["cpu-demo"].epochs
    reference = open_raster(demo.outputs["reference"]).values[0]
    present = sorted(int(c) for c in np.unique(reference) if c)
    assert len(present) == 11 and [r["code"] for r in metrics["classes"]] == present
    best = metrics["history"][metrics["best_epoch"] - 1]
    # every class present in the demo has a validation IoU, and the mean is over all of them
    ious = [best[f"iou_{code}"] for code in present]
    assert all(v is not None for v in ious)
    assert best["val_miou"] == pytest.approx(np.mean(ious), abs=1e-9)
    assert metrics["best_val_miou"] == best["val_miou"] >= TARGET_MIOU


def test_held_out_quarter_reaches_the_miou(demo):
    report = json.loads((demo.workdir / "evaluation" / "report_held_out.json").read_text())
    reference = open_raster(demo.outputs["reference"]).values[0][held_out_rows(DEFAULT_SIZE)]
    present = sorted(int(c) for c in np.unique(reference) if c)
    scored = [int(c) for c in report["codes"] if report["reference_pixels"][str(c)] > 0]
    assert scored == present
    assert report["mean_iou"] == pytest.approx(np.mean([report["iou"][str(c)] for c in present]), abs=1e-12)
    assert report["mean_iou"] >= TARGET_MIOU, report["iou"]
    # the strip was never trained on, and the model scored is the one training picked
    train_labels = open_raster(demo.outputs["train_labels"]).values[0]
    assert not train_labels[held_out_rows(DEFAULT_SIZE)].any()
    checkpoint = load_checkpoint(demo.outputs["checkpoint"])
    assert checkpoint.config["name"] == "cpu-demo" and checkpoint.bands == ("B08", "B04", "B03")
    assert demo.results["evaluate"]["held_out_miou"] == round(report["mean_iou"], 3)


def test_held_out_report_equals_scikit_learn_on_the_demo_maps(demo):
    """The cluster-reduced confusion matrix and IoU of the real demo maps equal scikit-learn's."""
    from test_evaluate import assert_matches_sklearn

    rows = held_out_rows(DEFAULT_SIZE)
    report = json.loads((demo.workdir / "evaluation" / "report_held_out.json").read_text())
    reference = open_raster(demo.outputs["reference"]).values[0][rows]
    prediction = open_raster(demo.outputs["prediction"]).values[0][rows]
    assert_matches_sklearn(report, reference, prediction)
    assert report["valid_pixels"] == int(np.count_nonzero(reference))

    # torchmetrics on the same pixels: predictions outside the scored codes form one extra class
    from torchmetrics.classification import MulticlassConfusionMatrix

    codes = report["codes"]
    lookup = np.full(256, len(codes), dtype=np.int64)
    lookup[codes] = np.arange(len(codes))
    valid = np.isin(reference, codes)
    target = torch.from_numpy(lookup[reference[valid]])
    preds = torch.from_numpy(lookup[prediction[valid]])
    matrix = MulticlassConfusionMatrix(num_classes=len(codes) + 1)(preds, target).numpy()
    np.testing.assert_array_equal(np.array(report["confusion_matrix"]), matrix[:-1, :-1])
    assert [report["missed_pixels"][str(c)] for c in codes] == matrix[:-1, -1].tolist()
