"""Evaluation: confusion matrices and metrics equal scikit-learn/torchmetrics; reports, tables, figures."""

from __future__ import annotations

import json
import math
import warnings

import dask
import dask.array as da
import matplotlib.image as mpimg
import numpy as np
import pandas as pd
import pytest
import torch
from sklearn import metrics as skm
from torchmetrics.classification import MulticlassConfusionMatrix, MulticlassJaccardIndex
from typer.testing import CliRunner

from clc_dask.classes import colormap, official_codes, rgb_of
from clc_dask.cli import app
from clc_dask.errors import GridMismatchError, InputError
from clc_dask.evaluate import (
    confusion_counts,
    confusion_matrix,
    evaluate,
    metrics_from_confusion,
    read_report,
    write_report,
)
from clc_dask.grid import TileGrid, snapped_geobox
from clc_dask.rasters import to_dataarray, write_geotiff
from clc_dask.report import (
    iou_bar_chart,
    map_figure,
    paper_table,
    table_markdown,
    tile_reports,
    write_table,
)

GEOBOX = snapped_geobox((500_000, 4_000_000, 501_300, 4_000_960), 32633, 10)  # 96 × 130 px
MISS = -1  # label given to "no data / not a scored class" predictions in the sklearn reference
REF_CODES = [0, 11, 12, 21, 31, 32, 77]  # 77: not a CLC code (ignored in the reference)
PRED_CODES = [0, 11, 12, 21, 24, 31, 99]  # 24 never in the reference, 32 never predicted, 99 junk


def random_maps(seed: int = 0, shape: tuple[int, int] = (96, 130)) -> tuple[np.ndarray, np.ndarray]:
    """Seeded reference/prediction with no data, classes absent from one side and non-CLC values."""
    rng = np.random.default_rng(seed)
    ref = rng.choice(REF_CODES, size=shape, p=[0.1, 0.25, 0.1, 0.2, 0.2, 0.1, 0.05]).astype(np.uint8)
    pred = ref.copy()
    flip = rng.random(shape) < 0.35
    pred[flip] = rng.choice(PRED_CODES, size=int(flip.sum()))
    pred[ref == 32] = np.where(rng.random(int((ref == 32).sum())) < 0.5, 31, 12)
    return ref, pred


def as_da(array: np.ndarray, chunks: tuple[int, int] | None, geobox=GEOBOX, nodata: int | None = 0):
    data = array if chunks is None else da.from_array(array, chunks=chunks)
    return to_dataarray(data, geobox, nodata=nodata)


def sk_labels(ref: np.ndarray, pred: np.ndarray, codes: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Valid pixels (reference in codes) with predictions outside codes relabelled MISS."""
    valid = np.isin(ref, codes)
    y_true = ref[valid].astype(np.int64)
    y_pred = pred[valid].astype(np.int64)
    y_pred[~np.isin(y_pred, codes)] = MISS
    return y_true, y_pred


def assert_matches_sklearn(report: dict, ref: np.ndarray, pred: np.ndarray) -> None:
    codes = report["codes"]
    y_true, y_pred = sk_labels(ref, pred, codes)
    labels = [*codes, MISS]
    cm = skm.confusion_matrix(y_true, y_pred, labels=labels)
    np.testing.assert_array_equal(np.array(report["confusion_matrix"]), cm[:-1, :-1])
    assert [report["missed_pixels"][str(c)] for c in codes] == cm[:-1, -1].tolist()
    assert [report["reference_pixels"][str(c)] for c in codes] == cm[:-1].sum(axis=1).tolist()
    assert [report["predicted_pixels"][str(c)] for c in codes] == cm[:, :-1].sum(axis=0).tolist()
    iou = skm.jaccard_score(y_true, y_pred, labels=labels, average=None, zero_division=0)[:-1]
    prec, rec, f1, _ = skm.precision_recall_fscore_support(
        y_true, y_pred, labels=codes, average=None, zero_division=np.nan
    )
    for i, code in enumerate(codes):
        key = str(code)
        denominator = cm[i, :].sum() + cm[:-1, i].sum()  # TP+FN + TP+FP > 0  ⇔  IoU defined
        if denominator == 0:
            assert report["iou"][key] is None
        else:
            assert report["iou"][key] == pytest.approx(iou[i], abs=1e-12)
        for name, expected in (("precision", prec[i]), ("recall", rec[i]), ("f1", f1[i])):
            if np.isnan(expected):
                assert report[name][key] is None, (name, code)
            else:
                assert report[name][key] == pytest.approx(expected, abs=1e-12), (name, code)
    assert report["overall_accuracy"] == pytest.approx(skm.accuracy_score(y_true, y_pred), abs=1e-12)
    assert report["kappa"] == pytest.approx(skm.cohen_kappa_score(y_true, y_pred), abs=1e-12)
    present = [c for c in codes if (y_true == c).any()]
    assert report["mean_iou"] == pytest.approx(np.mean([report["iou"][str(c)] for c in present]), abs=1e-12)


CHUNKINGS = {
    "in-memory": (None, None),
    "one-block": ((96, 130), (96, 130)),
    "regular": ((32, 50), (32, 50)),
    "ragged": ((17, 23), (17, 23)),
    "different-per-raster": ((48, 65), (20, 31)),
}


@pytest.mark.parametrize("name", list(CHUNKINGS))
def test_confusion_and_metrics_equal_sklearn(name):
    ref, pred = random_maps(seed=1)
    ref_chunks, pred_chunks = CHUNKINGS[name]
    report = evaluate(as_da(pred, pred_chunks), as_da(ref, ref_chunks))
    # Default codes: the Level-2 codes present in either raster (77/99 are not CLC codes).
    assert report["codes"] == [11, 12, 21, 24, 31, 32]
    assert_matches_sklearn(report, ref, pred)
    assert report["iou"]["24"] == 0.0  # predicted only: defined, but not in the mean
    assert report["recall"]["24"] is None
    assert report["ignored_reference_pixels"] == int((ref == 77).sum())
    assert report["reference_nodata_pixels"] == int((ref == 0).sum())
    assert report["valid_pixels"] == int(np.isin(ref, report["codes"]).sum())


def test_results_do_not_depend_on_chunking():
    ref, pred = random_maps(seed=2)
    reports = [
        evaluate(as_da(pred, pc), as_da(ref, rc), tiles=["1_1", "2_3"], tile_size=48)
        for rc, pc in CHUNKINGS.values()
    ]
    for other in reports[1:]:
        assert other == reports[0]


def test_confusion_and_iou_equal_torchmetrics():
    ref, pred = random_maps(seed=3)
    counts = confusion_counts(as_da(pred, (32, 40)), as_da(ref, (32, 40)))
    codes = list(counts.codes)
    n = len(codes)
    index = {c: i for i, c in enumerate(codes)}
    valid = np.isin(ref, codes)
    target = torch.tensor([index[c] for c in ref[valid]])
    preds = torch.tensor([index.get(int(c), n) for c in pred[valid]])  # n = "missed" class
    tm_cm = MulticlassConfusionMatrix(num_classes=n + 1)(preds, target).numpy()
    np.testing.assert_array_equal(counts.matrix, tm_cm[:n, :n])
    np.testing.assert_array_equal(counts.missed, tm_cm[:n, n])
    tm_iou = MulticlassJaccardIndex(num_classes=n + 1, average=None, zero_division=math.nan)(preds, target)
    tm_iou = tm_iou.double().numpy()[:n]
    report = metrics_from_confusion(counts.matrix, codes, missed=counts.missed)
    ours = np.array([math.nan if report["iou"][str(c)] is None else report["iou"][str(c)] for c in codes])
    # torchmetrics computes in float32: equal to its precision; sklearn above checks 1e-12.
    np.testing.assert_allclose(ours, tm_iou, rtol=1e-6, equal_nan=True)
    assert np.array_equal(np.isnan(ours), np.isnan(tm_iou))


def test_confusion_matrix_function_returns_int64_rows_reference():
    ref = np.array([[11, 11, 21], [21, 0, 31]], dtype=np.uint8)
    pred = np.array([[11, 21, 21], [0, 31, 11]], dtype=np.uint8)
    gbox = snapped_geobox((0, 0, 30, 20), 32633, 10)
    cm = confusion_matrix(as_da(pred, (1, 2), gbox), as_da(ref, (2, 1), gbox), [11, 21, 31])
    assert cm.dtype == np.int64
    # rows = reference 11, 21, 31; columns = prediction; the (21 → 0) pixel is a miss, not in cm.
    np.testing.assert_array_equal(cm, [[1, 1, 0], [0, 1, 0], [1, 0, 0]])


def test_level3_input_reduced_to_level2_and_level1():
    rng = np.random.default_rng(4)
    l3 = np.array(official_codes(3))
    ref = rng.choice(np.r_[0, l3], size=(96, 130)).astype(np.uint16)
    pred = np.where(rng.random(ref.shape) < 0.5, ref // 10, rng.choice(official_codes(2), size=ref.shape))
    pred = np.where(rng.random(ref.shape) < 0.3, ref, pred).astype(np.uint16)  # mixed Level 3 / Level 2
    ref2, pred2 = ref // 10, np.where(pred >= 100, pred // 10, pred)
    report = evaluate(as_da(pred, (40, 40)), as_da(ref, (30, 60)), level=2)
    assert report["level"] == 2
    assert report["codes"] == sorted(int(c) for c in (set(np.unique(ref2)) | set(np.unique(pred2))) - {0})
    assert_matches_sklearn(report, ref2, pred2)
    report1 = evaluate(as_da(pred, (40, 40)), as_da(ref, (30, 60)), level=1)
    assert report1["codes"] == [1, 2, 3, 4, 5]
    assert_matches_sklearn(report1, ref2 // 10, pred2 // 10)


def test_explicit_codes_ignore_other_reference_classes_and_miss_other_predictions():
    ref, pred = random_maps(seed=5)
    report = evaluate(as_da(pred, (32, 32)), as_da(ref, (32, 32)), codes=[31, 11, 21])
    assert report["codes"] == [11, 21, 31]
    assert_matches_sklearn(report, ref, pred)
    assert report["ignored_reference_pixels"] == int(np.isin(ref, [12, 32, 77]).sum())
    with pytest.raises(InputError, match="Level-2"):
        evaluate(as_da(pred, None), as_da(ref, None), codes=[311])
    with pytest.raises(InputError, match="Unknown Level-2"):
        evaluate(as_da(pred, None), as_da(ref, None), codes=[19])


def test_metrics_hand_example():
    cm = np.array([[5, 1, 0], [2, 3, 0], [0, 0, 0]])
    report = metrics_from_confusion(cm, [11, 21, 31], missed=[1, 0, 0], pixel_area_m2=100.0)
    # class 11: TP 5, FP 2, FN 1 + 1 miss; class 21: TP 3, FP 1, FN 2.
    assert report["iou"] == {"11": 5 / 9, "21": 3 / 6, "31": None}
    assert report["precision"] == {"11": 5 / 7, "21": 3 / 4, "31": None}
    assert report["recall"] == {"11": 5 / 7, "21": 3 / 5, "31": None}
    assert report["f1"] == {"11": 10 / 14, "21": 6 / 9, "31": None}
    assert report["reference_pixels"] == {"11": 7, "21": 5, "31": 0}
    assert report["tp"] == {"11": 5, "21": 3, "31": 0}
    assert report["mean_iou"] == pytest.approx((5 / 9 + 3 / 6) / 2)
    assert report["weighted_iou"] == pytest.approx((7 * 5 / 9 + 5 * 3 / 6) / 12)
    assert report["overall_accuracy"] == pytest.approx(8 / 12)
    assert report["area_ha"] == {"11": 0.07, "21": 0.05, "31": 0.0}
    y_true = [11] * 7 + [21] * 5
    y_pred = [11] * 5 + [21, MISS] + [11] * 2 + [21] * 3
    assert report["kappa"] == pytest.approx(skm.cohen_kappa_score(y_true, y_pred), abs=1e-12)


def test_metrics_of_empty_and_absent_classes_warn_nothing():
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        empty = metrics_from_confusion(np.zeros((2, 2), int), [11, 21])
        only_predicted = metrics_from_confusion(np.array([[0, 0], [0, 0]]) + np.array([[0, 4], [0, 0]]), [11, 21])
    assert empty["iou"] == {"11": None, "21": None}
    assert empty["mean_iou"] is None and empty["overall_accuracy"] is None and empty["kappa"] is None
    assert only_predicted["iou"] == {"11": 0.0, "21": 0.0}
    assert only_predicted["mean_iou"] == 0.0  # class 11 is in the reference, class 21 only predicted
    assert "NaN" not in json.dumps(empty, allow_nan=False)
    with pytest.raises(InputError, match="does not match"):
        metrics_from_confusion(np.zeros((2, 3), int), [11, 21])


def _exploding(shape, chunks):
    def boom(block):
        raise AssertionError("a pixel was read before the inputs were checked")

    return da.zeros(shape, dtype=np.uint8, chunks=chunks).map_blocks(boom, dtype=np.uint8)


def test_different_grids_refused_before_reading():
    shifted = snapped_geobox((500_010, 4_000_000, 501_310, 4_000_960), 32633, 10)
    other_crs = snapped_geobox((500_000, 4_000_000, 501_300, 4_000_960), 32632, 10)
    smaller = snapped_geobox((500_000, 4_000_000, 501_200, 4_000_960), 32633, 10)
    ref = to_dataarray(_exploding((96, 130), 32), GEOBOX)
    for gbox, message in ((shifted, "different grids"), (other_crs, "32632"), (smaller, "different grids")):
        pred = to_dataarray(_exploding(gbox.shape.yx, 32), gbox)
        with pytest.raises(GridMismatchError, match=message):
            evaluate(pred, ref)
        with pytest.raises(GridMismatchError):
            confusion_matrix(pred, ref, [11])
    with pytest.raises(InputError, match="outside this grid"):
        evaluate(to_dataarray(_exploding((96, 130), 32), GEOBOX), ref, tiles=["9_9"], tile_size=48)


def test_codes_coarser_than_level_and_multiband_refused():
    ref, pred = random_maps(seed=6)
    with pytest.raises(InputError, match="coarser than Level 3"):
        evaluate(as_da(pred, (48, 65)), as_da(ref, (48, 65)), level=3)
    three_bands = to_dataarray(np.stack([ref] * 3), GEOBOX)
    with pytest.raises(InputError, match="3 entries along 'band'"):
        evaluate(three_bands, as_da(ref, None))
    one_band = to_dataarray(ref[None], GEOBOX)  # (1, y, x) as from open_raster: accepted
    assert evaluate(one_band, as_da(ref, None))["overall_accuracy"] == 1.0


def test_nodata_value_other_than_zero_is_no_data():
    ref, pred = random_maps(seed=7)
    ref255 = np.where(ref == 0, 255, ref).astype(np.uint8)
    report = evaluate(as_da(pred, (50, 50)), as_da(ref255, (50, 50), nodata=255))
    assert report["reference_nodata_pixels"] == int((ref == 0).sum())
    assert report == evaluate(as_da(pred, (50, 50)), as_da(ref, (50, 50)))
    as_float = np.where(ref == 0, np.nan, ref).astype(np.float32)
    report_f = evaluate(as_da(pred, (50, 50)), as_da(as_float, (50, 50), nodata=None))
    assert report_f["confusion_matrix"] == report["confusion_matrix"]


def test_per_tile_reports_match_sliced_arrays():
    ref, pred = random_maps(seed=8)
    report = evaluate(as_da(pred, (25, 25)), as_da(ref, (25, 25)), tiles=TileGrid(GEOBOX, 48))
    assert list(report["tiles"]) == [f"{r}_{c}" for r in (1, 2) for c in (1, 2, 3)]
    total = np.zeros_like(np.array(report["confusion_matrix"]))
    for name, sub in report["tiles"].items():
        y0, y1, x0, x1 = sub["pixel_slices"]
        r, c = (int(v) for v in name.split("_"))
        assert (y0, x0) == ((r - 1) * 48, (c - 1) * 48)
        assert sub["bounds"][0] == 500_000 + x0 * 10 and sub["bounds"][3] == 4_000_960 - y0 * 10
        assert sub["codes"] == report["codes"]  # one column set for all tiles
        assert_matches_sklearn(sub, ref[y0:y1, x0:x1], pred[y0:y1, x0:x1])
        total += np.array(sub["confusion_matrix"])
    np.testing.assert_array_equal(total, report["confusion_matrix"])
    named = evaluate(as_da(pred, (48, 48)), as_da(ref, (48, 48)), tiles=["2_3", "1_2"], tile_size=48)
    assert list(named["tiles"]) == ["2_3", "1_2"]
    assert named["tiles"]["2_3"] == report["tiles"]["2_3"]


def test_tree_reduction_runs_on_a_distributed_client():
    distributed = pytest.importorskip("distributed")
    ref, pred = random_maps(seed=9)
    expected = evaluate(as_da(pred, (24, 26)), as_da(ref, (24, 26)), split_every=2)
    with distributed.Client(processes=False, n_workers=1, threads_per_worker=2, dashboard_address=None):
        got = evaluate(as_da(pred, (24, 26)), as_da(ref, (24, 26)), split_every=2)
    assert got == expected
    with dask.config.set(scheduler="sync"):
        assert evaluate(as_da(pred, (24, 26)), as_da(ref, (24, 26))) == expected


def test_write_report_json(tmp_path):
    ref, pred = random_maps(seed=10)
    report = evaluate(as_da(pred, (48, 65)), as_da(ref, (48, 65)), codes=[11, 12, 21, 24, 31, 32, 41])
    path = write_report(report, tmp_path / "out" / "report.json")
    assert sorted(p.name for p in path.parent.iterdir()) == ["report.json"]
    loaded = json.loads(path.read_text())
    assert loaded == report == read_report(path)
    for key in ("codes", "confusion_matrix", "iou", "precision", "recall", "f1", "reference_pixels",
                "predicted_pixels", "tp", "mean_iou", "overall_accuracy", "kappa", "level", "area_ha"):
        assert key in loaded, key
    assert loaded["codes"] == [11, 12, 21, 24, 31, 32, 41]
    assert list(loaded["iou"]) == ["11", "12", "21", "24", "31", "32", "41"]
    assert loaded["iou"]["41"] is None and '"41": null' in path.read_text()
    assert loaded["crs"] == "EPSG:32633" and loaded["pixel_size_m"] == [10.0, 10.0]
    assert loaded["area_ha"]["11"] == pytest.approx(loaded["reference_pixels"]["11"] * 0.01)
    with pytest.raises(InputError, match="not JSON"):
        (tmp_path / "bad.json").write_text("{")
        read_report(tmp_path / "bad.json")


def _report(ious: dict[str, float | None], mean: float) -> dict:
    codes = sorted(int(c) for c in ious)
    return {"codes": codes, "iou": ious, "mean_iou": mean}


def test_paper_table_layout_and_files(tmp_path):
    reports = {
        "RGB, ResNet50": _report({"11": 0.6412, "12": 0.5749, "32": None}, 0.47),
        "NRG, ResNet101": _report({"11": 0.7361, "21": 0.9449, "32": 0.291}, 0.55),
    }
    table = paper_table(reports)
    assert list(table.columns) == [11, 12, 21, 32]
    assert list(table.index) == ["RGB, ResNet50", "NRG, ResNet101"]
    assert table.loc["RGB, ResNet50", 11] == 0.64 and table.loc["NRG, ResNet101", 21] == 0.94
    assert np.isnan(table.loc["RGB, ResNet50", 21]) and np.isnan(table.loc["RGB, ResNet50", 32])
    subset = paper_table(reports, classes=[32, 11], with_mean=True)
    assert list(subset.columns) == [32, 11, "mIoU"]
    assert subset.loc["NRG, ResNet101"].tolist() == [0.29, 0.74, 0.55]
    md = write_table(table, tmp_path / "table.md").read_text()
    assert md.splitlines() == [
        "| run | 11 | 12 | 21 | 32 |",
        "| --- | ---: | ---: | ---: | ---: |",
        "| RGB, ResNet50 | 0.64 | 0.57 |  |  |",
        "| NRG, ResNet101 | 0.74 |  | 0.94 | 0.29 |",
    ]
    assert md == table_markdown(table)
    csv = write_table(table, tmp_path / "table.csv").read_text()
    assert csv.splitlines() == ["run,11,12,21,32", '"RGB, ResNet50",0.64,0.57,,', '"NRG, ResNet101",0.74,,0.94,0.29']
    assert pd.read_csv(tmp_path / "table.csv", index_col=0).loc["NRG, ResNet101", "21"] == 0.94
    with pytest.raises(Exception, match=r"\.md"):
        write_table(table, tmp_path / "table.xlsx")
    by_tile = tile_reports({"tiles": {"4_3": reports["RGB, ResNet50"], "3_2": reports["NRG, ResNet101"]}}, "Apr ")
    assert list(paper_table(by_tile).index) == ["Apr 4_3", "Apr 3_2"]


def _colours(path) -> set[tuple[int, int, int]]:
    image = mpimg.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    rgb = np.round(image[..., :3] * 255).astype(int).reshape(-1, 3)
    return {tuple(v) for v in np.unique(rgb, axis=0)}


def test_iou_bar_chart_uses_official_colours(tmp_path):
    ref, pred = random_maps(seed=11)
    report = evaluate(as_da(pred, None), as_da(ref, None), codes=[11, 12, 21, 31, 41])
    path = iou_bar_chart(report, tmp_path / "iou.png")
    assert path.stat().st_size > 5000
    colours = _colours(path)
    for code in (11, 12, 21, 31):
        assert report["iou"][str(code)] > 0.1
        assert rgb_of(code) in colours, code
    assert report["iou"]["41"] is None and rgb_of(41) not in colours  # no bar for an absent class


def test_map_figure_colours_and_downsampling(tmp_path):
    gbox = snapped_geobox((500_000, 4_000_000, 530_000, 4_020_000), 32633, 10)  # 2000 × 3000 px
    yy, xx = da.meshgrid(da.arange(2000, chunks=500), da.arange(3000, chunks=500), indexing="ij")
    level2 = 21 + 10 * (xx // 1000) + yy // 1000  # 21, 31, 41 over 22, 32, 42
    ref = (level2 * 10 + 1).astype(np.uint16)  # Level 3: 211, 311, 411, 221, 321, 421
    ref = da.where(yy < 100, 0, ref)
    pred = da.where(xx < 1500, ref // 10, 51).astype(np.uint8)
    path = map_figure(to_dataarray(pred, gbox), to_dataarray(ref, gbox), tmp_path / "map.png",
                      level=2, title="test", max_pixels=300)
    assert path.stat().st_size > 5000
    colours = _colours(path)
    for code in (21, 31, 41, 22, 32, 42, 51):
        assert rgb_of(code) in colours, code
    assert rgb_of(11) not in colours
    other = snapped_geobox((500_000, 4_000_000, 530_010, 4_020_000), 32633, 10)
    with pytest.raises(GridMismatchError):
        map_figure(to_dataarray(_exploding(other.shape.yx, 500), other), to_dataarray(ref, gbox),
                   tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()


# --------------------------------------------------------------------------- CLI


@pytest.fixture()
def rasters(tmp_path):
    rng = np.random.default_rng(12)
    blocks = rng.choice([111, 112, 211, 311, 312, 523], size=(12, 13))
    ref = np.repeat(np.repeat(blocks, 8, 0), 10, 1).astype(np.uint16)
    ref[:5] = 0
    pred = (ref // 10).astype(np.uint8)
    noise = rng.random(ref.shape) < 0.2
    pred[noise] = rng.choice([0, 11, 21, 24], size=int(noise.sum()))
    write_geotiff(to_dataarray(ref, GEOBOX), tmp_path / "ref.tif", colormap=colormap(3))
    write_geotiff(to_dataarray(pred, GEOBOX), tmp_path / "pred.tif", colormap=colormap(2))
    shifted = snapped_geobox((500_010, 4_000_000, 501_310, 4_000_960), 32633, 10)
    write_geotiff(to_dataarray(pred, shifted), tmp_path / "shifted.tif", colormap=colormap(2))
    return tmp_path, ref // 10, pred


def test_cli_evaluate_report_tiles_and_figures(rasters):
    folder, ref, pred = rasters
    out, figs = folder / "out" / "report.json", folder / "figs"
    result = CliRunner().invoke(app, [
        "evaluate", "--prediction", str(folder / "pred.tif"), "--reference", str(folder / "ref.tif"),
        "--level", "2", "--out", str(out), "--tiles", "2_3,1_1", "--tile-size", "48",
        "--chunks", "32", "--figures", str(figs),
    ])
    assert result.exit_code == 0, result.output
    assert "mIoU" in result.output and "tile 2_3" in result.output
    report = json.loads(out.read_text())
    assert report["codes"] == [11, 21, 24, 31, 52]
    assert report["prediction"].endswith("pred.tif")
    assert_matches_sklearn(report, ref, pred)
    assert list(report["tiles"]) == ["2_3", "1_1"]
    assert_matches_sklearn(report["tiles"]["2_3"], ref[48:96, 96:130], pred[48:96, 96:130])
    assert sorted(p.name for p in figs.iterdir()) == [
        "iou.png", "iou_1_1.png", "iou_2_3.png", "map.png", "map_1_1.png", "map_2_3.png"]
    assert rgb_of(52) in _colours(figs / "iou.png") and rgb_of(52) in _colours(figs / "map.png")

    per_tile = CliRunner().invoke(app, [
        "evaluate", "-p", str(folder / "pred.tif"), "-r", str(folder / "ref.tif"),
        "--out", str(folder / "all.json"), "--per-tile", "--tile-size", "64"])
    assert per_tile.exit_code == 0, per_tile.output
    assert list(json.loads((folder / "all.json").read_text())["tiles"]) == ["1_1", "1_2", "1_3", "2_1", "2_2", "2_3"]


def test_cli_evaluate_refuses_bad_input_and_writes_nothing(rasters):
    folder, _, _ = rasters
    runner = CliRunner()
    base = ["evaluate", "--reference", str(folder / "ref.tif"), "--out", str(folder / "o" / "r.json"),
            "--figures", str(folder / "figs")]
    bad_grid = runner.invoke(app, [*base, "--prediction", str(folder / "shifted.tif")])
    assert bad_grid.exit_code != 0
    assert isinstance(bad_grid.exception, GridMismatchError)
    assert "different grids" in str(bad_grid.exception)
    bad_tile = runner.invoke(app, [*base, "--prediction", str(folder / "pred.tif"), "--tiles", "7_1"])
    assert isinstance(bad_tile.exception, InputError) and "7_1" in str(bad_tile.exception)
    both = runner.invoke(app, [*base, "--prediction", str(folder / "pred.tif"), "--tiles", "1_1", "--per-tile"])
    assert "either --tiles" in str(both.exception)
    assert not (folder / "o").exists() and not (folder / "figs").exists()


def test_cli_report_table(rasters):
    folder, _, _ = rasters
    runner = CliRunner()
    for name, tiles in (("sept", "1_1,2_3"), ("april", "1_1")):
        result = runner.invoke(app, [
            "evaluate", "-p", str(folder / "pred.tif"), "-r", str(folder / "ref.tif"),
            "--out", str(folder / f"{name}.json"), "--tiles", tiles, "--tile-size", "48",
            *(["--codes", "11,21,31"] if name == "april" else [])])
        assert result.exit_code == 0, result.output
    result = runner.invoke(app, [
        "report-table", str(folder / "sept.json"), str(folder / "april.json"),
        "--names", "Sept 256px", "--names", "Sept + Apr 128px",
        "--out", str(folder / "t.md"), "--out", str(folder / "t.csv"), "--mean"])
    assert result.exit_code == 0, result.output
    sept, april = (json.loads((folder / f"{n}.json").read_text()) for n in ("sept", "april"))
    csv = pd.read_csv(folder / "t.csv", index_col=0)
    assert list(csv.columns) == ["11", "21", "24", "31", "52", "mIoU"]
    assert list(csv.index) == ["Sept 256px", "Sept + Apr 128px"]
    assert csv.loc["Sept 256px", "21"] == round(sept["iou"]["21"], 2)
    assert csv.loc["Sept + Apr 128px", "mIoU"] == round(april["mean_iou"], 2)
    assert np.isnan(csv.loc["Sept + Apr 128px", "52"])  # not scored in that report: blank
    md = (folder / "t.md").read_text()
    assert md.splitlines()[0] == "| run | 11 | 21 | 24 | 31 | 52 | mIoU |" and md in result.output
    tiles = runner.invoke(app, ["report-table", str(folder / "sept.json"), "--per-tile", "--out", str(folder / "tiles.md")])
    assert tiles.exit_code == 0, tiles.output
    rows = [line.split(" | ")[0] for line in (folder / "tiles.md").read_text().splitlines()[2:]]
    assert rows == ["| 1_1", "| 2_3"]
    mismatch = runner.invoke(app, ["report-table", str(folder / "sept.json"), "--names", "a", "--names", "b", "--out", str(folder / "x.md")])
    assert "1 report" in str(mismatch.exception) and not (folder / "x.md").exists()


def test_cli_evaluate_on_a_scheduler_address(rasters):
    distributed = pytest.importorskip("distributed")
    folder, ref, pred = rasters
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                                  dashboard_address=None) as cluster:
        result = CliRunner().invoke(app, [
            "evaluate", "-p", str(folder / "pred.tif"), "-r", str(folder / "ref.tif"),
            "--out", str(folder / "remote.json"), "--address", cluster.scheduler_address, "--chunks", "32"])
    assert result.exit_code == 0, result.output
    assert_matches_sklearn(json.loads((folder / "remote.json").read_text()), ref, pred)
