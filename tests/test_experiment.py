"""Experiments: config, split with guard bands, block bootstrap, a resumed two-configuration grid."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import rasterio
import torch
import yaml
from odc.geo.geobox import GeoBox
from scipy import ndimage
from test_patches import grid, synthetic_scene

from clc_dask.classes import official_codes
from clc_dask.errors import ConfigError, InputError
from clc_dask.evaluate import evaluate, metrics_from_confusion
from clc_dask.experiment import (
    PAPER_GRID,
    BlockCounts,
    block_bootstrap,
    check_experiment,
    load_experiment_config,
    paired_comparison,
    parse_experiment_config,
    resolve_configurations,
    run_experiment,
)
from clc_dask.experiment.config import SplitConfig
from clc_dask.experiment.split import TEST, TRAIN, VAL, Split, make_split
from clc_dask.experiment.stats import batch_metrics, bootstrap_weights
from clc_dask.grid import TileGrid
from clc_dask.model import build_model, load_checkpoint, receptive_field
from clc_dask.patches import load_patch_index
from clc_dask.rasters import open_raster, to_dataarray, write_geotiff

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]


# ============================================================================================
# receptive field
# ============================================================================================


def test_receptive_field_bounds_the_measured_gradient_support():
    """The output pixel's gradient is non-zero only inside the receptive field (positive weights,
    average pooling: every path counts), and the bound is tight to 32 px."""
    assert (receptive_field("resnet18"), receptive_field("resnet34")) == (576, 1056)
    model = build_model("resnet18", 1, 1, decoder_channels=(4, 4, 4, 4, 4)).double().eval()
    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d):
            module.weight.data = module.weight.data.abs() + 0.01
    model.encoder.maxpool = torch.nn.AvgPool2d(3, 2, 1)
    width, extents = 768, []
    for offset in (0, 28):
        x = (torch.rand(1, 1, 32, width, dtype=torch.float64) + 0.5).requires_grad_()
        centre = width // 2 + offset
        model(x)[0, 0, 16, centre].backward()
        support = np.nonzero(x.grad[0, 0].abs().sum(0).numpy())[0]
        assert 0 < support.min() and support.max() < width - 1  # the whole field fits
        extents.append(support.max() - support.min() + 1)
    assert receptive_field("resnet18") - 32 < max(extents) <= receptive_field("resnet18")


# ============================================================================================
# configuration
# ============================================================================================


def files_region(mosaics: dict[str, Path], labels: Path) -> dict:
    return {"mosaics": {s: str(p) for s, p in mosaics.items()}, "labels": str(labels)}


def test_grid_paper_expands_to_table_2(tmp_path):
    config = parse_experiment_config({"name": "paper", "regions": {"italy": {"mosaics": {"september": "s.tif"},
                                                                            "labels": "l.tif"}},
                                      "grid": "paper", "overrides": {"epochs": 3}})
    configs = resolve_configurations(config)
    assert [c.name for c in configs] == list(PAPER_GRID)
    rows = [(c.train.seasons, c.train.composite, c.train.encoder, c.train.patch_size, c.train.epochs)
            for c in configs]
    assert rows == [(("september",), "rgb", "resnet50", 256, 3), (("september",), "rgb", "resnet101", 256, 3),
                    (("september",), "nrg", "resnet101", 256, 3),
                    (("september", "april"), "nrg", "resnet101", 256, 3),
                    (("september", "april"), "nrg", "resnet101", 128, 3)]
    assert all(c.train.name == c.name and c.train.encoder_weights == "imagenet" for c in configs)


def test_config_file_paths_resolve_against_its_folder(tmp_path):
    path = tmp_path / "exp" / "experiment.yaml"
    path.parent.mkdir()
    path.write_text(yaml.safe_dump({
        "name": "x", "regions": {"a": {"mosaics": {"september": "m/sept.tif"}, "labels": "../l.tif"}},
        "configurations": [{"preset": "cpu-demo"}]}))
    config = load_experiment_config(path)
    assert config.regions["a"].mosaics == {"september": str(tmp_path / "exp" / "m" / "sept.tif")}
    assert config.regions["a"].labels == str(tmp_path / "l.tif")
    assert config.output == str(tmp_path / "exp" / "x")


@pytest.mark.parametrize("raw,message", [
    ({"configurations": [{"preset": "resnet-9000"}]}, r"configurations\[0\].*Unknown preset 'resnet-9000'.*cpu-demo"),
    ({"configurations": [{"preset": "cpu-demo", "overrides": {"epoch": 2}}]}, r"unknown override.*\['epoch'\]"),
    ({"configurations": [{"preset": "cpu-demo", "overrides": {"patch_size": 100}}]}, r"patch_size.*multiple of 32"),
    ({"configurations": [{"preset": "cpu-demo"}, {"preset": "cpu-demo"}]}, r"\['cpu-demo'\] appear twice.*`name`"),
    ({"level": 3, "configurations": [{"preset": "cpu-demo"}]}, r"Level-2 classes.*Level 3.*`level`"),
])
def test_bad_configurations_are_named(raw, message):
    config = parse_experiment_config({"name": "x", "regions": {"a": {"mosaics": {"september": "s.tif"},
                                                                     "labels": "l.tif"}}, **raw})
    with pytest.raises(ConfigError, match=message):
        resolve_configurations(config)


@pytest.mark.parametrize("raw,message", [
    ({"regions": {}}, "regions: .*at least one region"),
    ({"regions": {"a": {"labels": "l.tif"}}}, "both mosaics"),
    ({"split": {"block_size": 100}}, "block_size 100 must be a positive multiple of 32"),
    ({"split": {"val_bounds": [[0, 0, 1, 1]]}}, "need test_bounds"),
    ({"split": {"test_bounds": [[5, 0, 1, 1]]}}, "not left<right"),
    ({"transfer": [{"region": "b"}]}, "transfer region 'b' is not one of the regions"),
    ({"grid": "table9"}, "grid"),
])
def test_bad_experiment_fields_are_named(raw, message):
    base = {"name": "x", "regions": {"a": {"mosaics": {"september": "s.tif"}, "labels": "l.tif"}},
            "configurations": [{"preset": "cpu-demo"}]}
    with pytest.raises(ConfigError, match=message):
        parse_experiment_config({**base, **raw})


# ============================================================================================
# split and guard bands
# ============================================================================================


def synthetic_split(size=(1024, 768), block=64, guard=100, labelled=None, **split) -> Split:
    geobox = GeoBox.from_bbox((500000, 4500000 - size[0] * 10, 500000 + size[1] * 10, 4500000),
                              crs="EPSG:32633", resolution=10)
    shape = (math.ceil(size[0] / block), math.ceil(size[1] / block))
    counts = np.zeros((*shape, len(official_codes(2)) + 1), np.int64)
    counts[..., official_codes(2).index(21)] = block * block if labelled is None else labelled
    config = SplitConfig(block_size=block, guard_px=guard, **split)
    return make_split(config, geobox, counts, level=2, guard_px=guard)


def pixel_roles(split: Split, patch: int) -> dict[str, np.ndarray]:
    """Pixel masks of the test area and of the train / val patches of ``patch`` px."""
    height, width = int(split.geobox.shape.y), int(split.geobox.shape.x)
    blocks = np.repeat(np.repeat(split.roles, split.block_size, 0), split.block_size, 1)[:height, :width]
    masks = {TEST: blocks == TEST, "val_blocks": blocks == VAL, "train_blocks": blocks == TRAIN}
    roles = split.split_map(patch)
    for role in (TRAIN, VAL):
        mask = np.zeros((height, width), bool)
        for r, c in zip(*np.nonzero(roles == role), strict=True):
            mask[r * patch:(r + 1) * patch, c * patch:(c + 1) * patch] = True
        masks[role] = mask
    return masks


@pytest.mark.parametrize("patch,guard", [(32, 0), (64, 64), (64, 100), (128, 100), (32, 130), (256, 64)])
def test_no_training_or_validation_patch_within_the_guard_band(patch, guard):
    split = synthetic_split(guard=guard, block=64 if patch != 256 else 128)
    masks = pixel_roles(split, patch)
    to_test = ndimage.distance_transform_cdt(~masks[TEST], metric="chessboard")
    to_val = ndimage.distance_transform_cdt(~masks[VAL], metric="chessboard")
    assert masks[TRAIN].any() and masks[VAL].any()
    # at least `guard` pixels between a test pixel and any training or validation pixel ...
    assert to_test[masks[TRAIN] | masks[VAL]].min() > guard
    # ... and between a validation pixel and any training pixel
    assert to_val[masks[TRAIN]].min() > guard
    # exact, not wasteful: every patch of the train (val) blocks farther than the guard from the
    # test and validation blocks (the test blocks) is used
    height, width = masks[TEST].shape
    roles = split.split_map(patch)
    near = (to_test <= guard) | (ndimage.distance_transform_cdt(~masks["val_blocks"], metric="chessboard") <= guard)
    for r in range(height // patch):
        for c in range(width // patch):
            window = (slice(r * patch, (r + 1) * patch), slice(c * patch, (c + 1) * patch))
            if masks["train_blocks"][window].all() and not near[window].any():
                assert roles[r, c] == TRAIN
            if masks["val_blocks"][window].all() and (to_test[window] > guard).all():
                assert roles[r, c] == VAL


def test_strip_and_farthest_validation_blocks():
    split = synthetic_split(size=(640, 768), block=64, guard=64, test_fraction=0.2, val_fraction=0.1)
    rows, cols = split.block_shape
    assert (split.roles[-2:] == TEST).all() and not (split.roles[:-2] == TEST).any()  # 20 % = 2 of 10 rows
    assert set(split.blocks(VAL)) == {f"1_{c}" for c in range(1, 13)}  # the row farthest from the test strip
    assert len(split.test_blocks()) == 2 * cols
    summary = split.summary()
    assert sum(v["area_pixels"] for v in summary.values()) == 640 * 768
    assert summary["guard"]["area_pixels"] == (64 + 64) * 768  # one block row below val, one above test
    assert summary["test"]["area_pixels"] == summary["test"]["labelled_pixels"] == 2 * 64 * 768
    east = synthetic_split(size=(640, 768), block=64, guard=64, test_side="east", test_fraction=0.25)
    assert (east.roles[:, -3:] == TEST).all() and (east.roles[:, 0] == VAL).all()


def test_explicit_areas_snap_to_blocks_and_unlabelled_test_blocks_are_not_units():
    labelled = np.full((10, 12), 64 * 64)
    labelled[9, :6] = 0  # half of the bottom row has no labels
    split = synthetic_split(size=(640, 768), labelled=labelled, guard=0,
                            test_bounds=[[500000, 4493600, 507680, 4494880]],  # block rows 8-9
                            val_bounds=[[500000, 4499000, 500600, 4500000]])
    assert (split.roles[8:] == TEST).all()
    assert split.blocks(VAL) == ["1_1", "2_1"]
    assert len(split.test_blocks()) == 24 - 6 and "10_1" not in split.test_blocks()


def test_split_errors_are_clear():
    with pytest.raises(InputError, match=r"test area .* holds no labelled pixel.*`test_bounds`"):
        labelled = np.full((10, 12), 64 * 64)
        labelled[8:] = 0
        synthetic_split(size=(640, 768), labelled=labelled, test_fraction=0.01, test_side="south",
                        test_bounds=[[500000, 4493600, 507680, 4494000]])
    with pytest.raises(ConfigError, match=r"No train area .* guard bands of 700 px.*larger region"):
        synthetic_split(guard=700)
    with pytest.raises(ConfigError, match=r"`test_bounds` and `val_bounds` share block\(s\) \['1_1'\]"):
        synthetic_split(guard=0, test_bounds=[[500000, 4499990, 500100, 4500000]],
                        val_bounds=[[500200, 4499990, 500300, 4500000]])
    with pytest.raises(ConfigError, match=r"`test_bounds` box .* lies outside the training region"):
        synthetic_split(test_bounds=[[0, 0, 10, 10]])


# ============================================================================================
# statistics
# ============================================================================================


def random_blocks(n_blocks: int, n: int = 4, seed: int = 0, absent: dict[int, list[int]] | None = None) -> BlockCounts:
    rng = np.random.default_rng(seed)
    matrices = rng.integers(0, 50, size=(n_blocks, n, n)) + np.eye(n, dtype=int) * 200
    missed = rng.integers(0, 5, size=(n_blocks, n))
    for block, classes in (absent or {}).items():
        for k in classes:  # class k in neither map of this block
            matrices[block, k, :] = matrices[block, :, k] = missed[block, k] = 0
    return BlockCounts(tuple(f"1_{i + 1}" for i in range(n_blocks)), (11, 21, 31, 41)[:n], matrices, missed)


def direct(counts: BlockCounts, replicates: int, seed: int, confidence: float = 0.95) -> dict:
    """The bootstrap the slow, obvious way: draw blocks, add matrices, metrics_from_confusion."""
    draws = np.random.default_rng(seed).integers(0, len(counts.names), size=(replicates, len(counts.names)))
    values: dict = {"mean_iou": [], "overall_accuracy": [], "kappa": [], "iou": {c: [] for c in counts.codes}}
    for row in draws:
        m = sum(counts.matrices[i] for i in row)
        miss = sum(counts.missed[i] for i in row)
        report = metrics_from_confusion(m, counts.codes, missed=miss)
        for key in ("mean_iou", "overall_accuracy", "kappa"):
            values[key].append(report[key])
        for code in counts.codes:
            values["iou"][code].append(report["iou"][str(code)])
    alpha = (1 - confidence) / 2

    def interval(v):
        v = [x for x in v if x is not None]
        return list(np.quantile(v, [alpha, 1 - alpha])) if v else None

    return {"mean_iou": interval(values["mean_iou"]), "overall_accuracy": interval(values["overall_accuracy"]),
            "kappa": interval(values["kappa"]), "iou": {str(c): interval(v) for c, v in values["iou"].items()},
            "defined": {str(c): sum(x is not None for x in v) / replicates for c, v in values["iou"].items()}}


@pytest.mark.parametrize("n_blocks,absent", [(12, None), (7, {0: [3], 1: [3], 2: [3], 4: [3], 5: [3], 6: [3]}),
                                             (5, {0: [1], 2: [2, 3]})])
def test_bootstrap_intervals_equal_a_direct_computation(n_blocks, absent):
    counts = random_blocks(n_blocks, absent=absent)
    result = block_bootstrap(counts, replicates=300, confidence=0.9, seed=7)
    expected = direct(counts, 300, 7, confidence=0.9)
    for key in ("mean_iou", "overall_accuracy", "kappa"):
        np.testing.assert_allclose(result[key], expected[key], rtol=0, atol=1e-12)
    for code in map(str, counts.codes):
        np.testing.assert_allclose(result["iou"][code], expected["iou"][code], rtol=0, atol=1e-12)
        assert result["iou_defined"].get(code, 1.0) == pytest.approx(expected["defined"][code])
    assert result["blocks"] == n_blocks and result["replicates"] == 300
    if absent and n_blocks == 7:  # class 41 in one block only: defined only where that block was drawn
        assert 0.5 < result["iou_defined"]["41"] < 0.85  # 1 - (6/7)^7 = 0.66
    assert block_bootstrap(counts, replicates=300, confidence=0.9, seed=7) == result  # seeded


def test_bootstrap_degenerate_cases():
    one = random_blocks(1)
    result = block_bootstrap(one, replicates=200)
    report = metrics_from_confusion(one.matrices[0], one.codes, missed=one.missed[0])
    assert result["mean_iou"] == [pytest.approx(report["mean_iou"])] * 2  # no width
    assert result["kappa"] == [pytest.approx(report["kappa"])] * 2
    assert "one test block" in result["note"]
    # a class absent from every block: no interval; present in the prediction only: IoU 0
    never = random_blocks(6, absent={b: [3] for b in range(6)})
    assert block_bootstrap(never, replicates=100)["iou"]["41"] is None
    predicted_only = random_blocks(6, absent={b: [3] for b in range(6)})
    predicted_only.matrices[2, 0, 3] = 9  # class 41 predicted once, never in the reference
    assert block_bootstrap(predicted_only, replicates=100)["iou"]["41"] == [0.0, 0.0]
    # two blocks: the 95 % interval spans exactly the two single-block values (each resample
    # is AA, AB or BB; P(AA) = P(BB) = 1/4 > 2.5 %)
    two = random_blocks(2, seed=3)
    singles = [metrics_from_confusion(two.matrices[i], two.codes, missed=two.missed[i])["mean_iou"] for i in (0, 1)]
    assert block_bootstrap(two, replicates=2000)["mean_iou"] == pytest.approx(sorted(singles))


def test_batch_metrics_equal_the_evaluate_metrics():
    counts = random_blocks(9, n=4, absent={0: [2], 3: [0, 1]})
    got = batch_metrics(counts.matrices, counts.missed)
    for i in range(9):
        report = metrics_from_confusion(counts.matrices[i], counts.codes, missed=counts.missed[i])
        for key in ("mean_iou", "overall_accuracy", "kappa"):
            assert got[key][i] == pytest.approx(report[key], abs=1e-12)
        for k, code in enumerate(counts.codes):
            value = report["iou"][str(code)]
            assert (np.isnan(got["iou"][i, k]) and value is None) or got["iou"][i, k] == pytest.approx(value)


def test_paired_comparison_finds_the_better_configuration():
    good = random_blocks(20, seed=1)
    worse = BlockCounts(good.names, good.codes, good.matrices.copy(), good.missed.copy())
    for m in worse.matrices:  # move 30 % of each diagonal to the next class
        moved = (np.diag(m) * 0.3).astype(int)
        m[np.arange(4), np.arange(4)] -= moved
        m[np.arange(4), (np.arange(4) + 1) % 4] += moved
    result = paired_comparison(good, worse, replicates=500, seed=2)
    assert result["mean_iou"]["verdict"] == "A" and result["mean_iou"]["interval"][0] > 0
    assert result["mean_iou"]["p_value"] < 0.05
    assert paired_comparison(worse, good, replicates=500, seed=2)["kappa"]["verdict"] == "B"
    same = paired_comparison(good, good, replicates=500, seed=2)["overall_accuracy"]
    assert same["difference"] == 0 and same["interval"] == [0, 0] and same["verdict"] is None
    single = paired_comparison(random_blocks(1), random_blocks(1, seed=5), replicates=50)
    assert single["mean_iou"]["verdict"] is None  # one block: no comparison
    with pytest.raises(InputError, match="same test blocks"):
        paired_comparison(good, random_blocks(3), replicates=10)
    weights = bootstrap_weights(20, 500, 2)
    assert weights.shape == (500, 20) and (weights.sum(axis=1) == 20).all()


def test_block_counts_from_an_evaluate_report():
    rng = np.random.default_rng(0)
    gbox = grid(128)
    ref = rng.choice(np.array([0, 11, 21, 31], np.uint8), size=(128, 128))
    pred = rng.choice(np.array([0, 11, 21, 31], np.uint8), size=(128, 128))
    report = evaluate(to_dataarray(pred, gbox), to_dataarray(ref, gbox), codes=[11, 21, 31],
                      tiles=TileGrid(gbox, 64))
    counts = BlockCounts.from_report(report)
    assert counts.names == ("1_1", "1_2", "2_1", "2_2") and counts.codes == (11, 21, 31)
    matrix, missed = counts.total()
    assert matrix.tolist() == report["confusion_matrix"]
    assert missed.tolist() == [report["missed_pixels"][c] for c in ("11", "21", "31")]


# ============================================================================================
# bad input: clear errors before anything trains or is written
# ============================================================================================


@pytest.fixture(scope="module")
def small_scene(tmp_path_factory):
    root = tmp_path_factory.mktemp("experiment_scene")
    mosaics, labels = synthetic_scene(root, 256, ("september",), seed=3)
    with rasterio.open(mosaics["september"]) as src:
        nrg = src.read([4, 3, 2])
        profile_box = grid(256)
    nrg_only = write_geotiff(to_dataarray(nrg, profile_box, ["B08", "B04", "B03"]), root / "nrg.tif")
    codes = open_raster(labels).values[0]
    codes[192:] = 0  # no labels in the southern quarter
    south_unlabelled = write_geotiff(to_dataarray(codes, profile_box), root / "labels_north.tif")
    return root, mosaics, labels, nrg_only, south_unlabelled


def bad_config(tmp_path, region: dict, **raw) -> dict:
    base = {"name": "bad", "output": str(tmp_path / "out"), "regions": {"a": region},
            "split": {"block_size": 32, "guard_px": 32},
            "configurations": [{"preset": "cpu-demo", "overrides": {"patch_size": 32, "epochs": 1}}]}
    return parse_experiment_config({**base, **raw})


def test_a_configuration_whose_bands_have_no_mosaic(tmp_path, small_scene):
    root, mosaics, labels, nrg_only, _ = small_scene
    config = bad_config(tmp_path, files_region({"september": nrg_only}, labels), configurations=[
        {"name": "sept-rgb", "preset": "cpu-demo", "overrides": {"composite": "rgb"}}])
    with pytest.raises(ConfigError, match=r"'sept-rgb' uses bands \['B04', 'B03', 'B02'\].*september mosaic "
                                          r"of region 'a' has \['B08', 'B04', 'B03'\], without \['B02'\]"):
        run_experiment(config)
    config = bad_config(tmp_path, files_region(mosaics, labels), configurations=[
        {"name": "two-seasons", "preset": "cpu-demo", "overrides": {"seasons": ["september", "april"]}}])
    with pytest.raises(ConfigError, match=r"'two-seasons' needs a mosaic of april in region 'a'.*\['september'\]"):
        run_experiment(config)
    assert not (tmp_path / "out").exists()


def test_overlapping_train_and_test_areas(tmp_path, small_scene):
    root, mosaics, labels, _, _ = small_scene
    config = bad_config(tmp_path, files_region(mosaics, labels), split={
        "block_size": 32, "test_bounds": [[500000, 4497440, 502560, 4498000]],
        "val_bounds": [[500000, 4499680, 500320, 4500000]], "train_bounds": [[500000, 4497000, 502560, 4499000]]})
    with pytest.raises(ConfigError, match=r"`train_bounds` \[500000.0, 4497000.0, 502560.0, 4499000.0\] overlaps "
                                          r"`test_bounds`"):
        run_experiment(config)
    assert not (tmp_path / "out").exists()


def test_a_test_area_with_no_labels(tmp_path, small_scene):
    root, mosaics, _, _, south_unlabelled = small_scene
    config = bad_config(tmp_path, files_region(mosaics, south_unlabelled),  # the southern 64 px
                        split={"block_size": 32, "guard_px": 32, "test_bounds": [[500000, 4497440, 502560, 4498080]]})
    with pytest.raises(InputError, match=r"test area of region 'a' \(\d+ block\(s\) of 32 px\) holds no labelled"):
        run_experiment(config)
    assert not (tmp_path / "out").exists()


def test_guard_defaults_to_the_largest_receptive_field(tmp_path, small_scene):
    root, mosaics, labels, _, _ = small_scene
    config = bad_config(tmp_path, files_region(mosaics, labels), split={"block_size": 32}, configurations=[
        {"name": "a", "preset": "cpu-demo"}, {"name": "b", "preset": "cpu-demo", "overrides": {"encoder": "resnet34"}}])
    assert check_experiment(config).guard_px == 1056
    with pytest.raises(ConfigError, match=r"No train area of region 'a' is left outside the guard bands of 1056 px"):
        run_experiment(config)
    assert not (tmp_path / "out").exists()


# ============================================================================================
# a two-configuration grid on the demo region, killed and resumed
# ============================================================================================

EPOCHS_B = 5
DRIVER = textwrap.dedent("""
    import sys
    import torch
    torch.set_num_threads(1)
    from distributed import Client, LocalCluster
    from clc_dask.experiment import run_experiment
    if __name__ == "__main__":
        with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \\
                Client(cluster) as client:
            run_experiment(sys.argv[1], client=client)
""")


@pytest.fixture(scope="module")
def demo_inputs(demo_region, tmp_path_factory):
    """September and April mosaics (all four bands) and Level-2 labels of the 512 px demo region."""
    from clc_dask.labels import label_raster, write_labels
    from clc_dask.load import load_scenes
    from clc_dask.mosaic import seasonal_mosaic, write_mosaic
    from clc_dask.search import search_items

    root = tmp_path_factory.mktemp("experiment_inputs")
    mosaics = {}
    for season in ("september", "april"):
        items = search_items(str(demo_region.catalog_path), season=season, years=[demo_region.year],
                             max_cloud=90, collection=demo_region.collection_id)
        scenes = load_scenes(items, demo_region.geobox, chunksize=256)
        mosaics[season] = write_mosaic(seasonal_mosaic(scenes, "all"), root / f"{season}.tif")[0]
    labels = write_labels(label_raster(demo_region.clc_path, demo_region.geobox, level=2, chunk_size=256),
                          root / "labels.tif")
    return mosaics, labels


@pytest.fixture(scope="module")
def cluster_client():
    from distributed import Client, LocalCluster

    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None)
    client = Client(cluster)
    try:
        yield client
    finally:
        client.close(timeout=120)
        try:
            cluster.close(timeout=120)
        except TimeoutError:  # a worker that imported torch can take > 4 s to exit on a loaded
            pass  # machine; the nanny has killed it by then


def grid_config(root: Path, mosaics, labels) -> Path:
    path = root / "experiment.yaml"
    path.write_text(yaml.safe_dump({
        "name": "two-configurations", "output": "out",
        # the same files as a transfer region: only its tile 2_2 (256 px tiles), on the April mosaic
        "regions": {"demo": files_region(mosaics, labels), "demo-again": files_region(mosaics, labels)},
        "transfer": [{"region": "demo-again", "seasons": ["april"], "tiles": ["2_2"], "tile_size": 256}],
        # 64 px guard bands: the demo region is far smaller than ResNet18's 576 px receptive field
        "split": {"block_size": 64, "guard_px": 64, "test_fraction": 0.25, "val_fraction": 0.15},
        "overrides": {"patch_size": 64, "patches_per_epoch": 16, "batch_size": 4, "val_every": 1, "amp": "off"},
        "configurations": [
            {"name": "sept-nrg", "preset": "cpu-demo", "overrides": {"epochs": 1}},
            {"name": "sept-rgb", "preset": "cpu-demo", "overrides": {"composite": "rgb", "epochs": EPOCHS_B}},
        ],
        "evaluation": {"window": 256, "halo": 64},
        "statistics": {"replicates": 400, "seed": 1},
    }))
    return path


def history(path: Path) -> list:
    try:
        return json.loads(path.read_text())["history"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return []


def kill_after_first_configuration(config: Path, out: Path) -> int:
    """Run the experiment in a process (2 workers), SIGKILL it once configuration A finished
    training and B has 2 epochs behind it; return B's checkpoint epoch at the kill."""
    script = config.parent / "driver.py"
    script.write_text(DRIVER)
    proc = subprocess.Popen([sys.executable, str(script), str(config)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    a_done = out / "configurations" / "sept-nrg" / "train" / "checkpoint.pt"
    b_metrics = out / "configurations" / "sept-rgb" / "train" / "metrics.json"
    deadline = time.monotonic() + 600
    try:
        while not (a_done.exists() and len(history(b_metrics)) >= 2):
            assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
            assert time.monotonic() < deadline, "configuration A did not finish in 10 min"
            time.sleep(0.1)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and its cluster's workers
        proc.wait()
    checkpoint = out / "configurations" / "sept-rgb" / "train" / "checkpoint.pt"
    return load_checkpoint(checkpoint).epoch if checkpoint.exists() else 0


def test_grid_killed_after_the_first_configuration_resumes(tmp_path, demo_inputs, cluster_client):
    mosaics, labels = demo_inputs
    config = grid_config(tmp_path, mosaics, labels)
    out = tmp_path / "out"
    epoch_b = kill_after_first_configuration(config, out)
    assert 1 <= epoch_b < EPOCHS_B, "configuration B was not interrupted mid-way"
    a_checkpoint = out / "configurations" / "sept-nrg" / "train" / "checkpoint.pt"
    a_bytes = a_checkpoint.read_bytes()

    result = run_experiment(config, client=cluster_client)

    # A is not trained again, B continues from its checkpoint
    assert result.training["sept-nrg"]["resumed_from_epoch"] == 1 and result.training["sept-nrg"]["epochs_run"] == 0
    assert a_checkpoint.read_bytes() == a_bytes
    assert result.training["sept-rgb"]["resumed_from_epoch"] == epoch_b
    assert result.training["sept-rgb"]["epochs_run"] == EPOCHS_B - epoch_b
    metrics = pd.read_csv(out / "configurations" / "sept-rgb" / "train" / "metrics.csv")
    assert metrics["epoch"].tolist() == list(range(1, EPOCHS_B + 1))
    assert not [p for p in out.rglob("*") if ".clc-partial-" in p.name or ".tmp-" in p.name]

    # the split: test strip in the south, guard bands kept by every patch index
    split = result.split
    assert split.guard_px == 64 and (split.roles[-2:] == TEST).all()
    area = "demo-september"
    test_pixels = np.repeat(np.repeat(split.roles == TEST, 64, 0), 64, 1)
    distance = ndimage.distance_transform_cdt(~test_pixels, metric="chessboard")
    for name in ("sept-nrg", "sept-rgb"):
        index = load_patch_index(out / "configurations" / name / "patches")
        for split_name in ("train", "val"):
            samples = index.samples(split_name)
            assert samples
            assert min(distance[s.window].min() for s in samples) > 64

    # reports: evaluation + intervals; the table equals them
    reports = {n: json.loads((out / "configurations" / n / area / "report.json").read_text())
               for n in ("sept-nrg", "sept-rgb")}
    table = pd.read_csv(out / "results" / area / "table.csv", index_col=0)
    assert list(table.index) == ["sept-nrg", "sept-rgb"]
    codes = [int(c) for c in reports["sept-nrg"]["codes"]]
    assert [int(c) for c in table.columns[:-3]] == codes == list(split.codes())
    assert list(table.columns[-3:]) == ["mIoU", "OA", "kappa"]
    for name, report in reports.items():
        assert sorted(report["tiles"]) == sorted(split.test_blocks()) and len(report["tiles"]) == 16
        total = np.sum([b["confusion_matrix"] for b in report["tiles"].values()], axis=0)
        assert total.tolist() == report["confusion_matrix"]
        in_test = split.counts[split.roles == TEST].sum(axis=0)  # labelled pixels per official code
        per_code = dict(zip(official_codes(2), in_test[:-1].tolist(), strict=True))
        assert report["valid_pixels"] == sum(per_code[c] for c in codes) > 0.5 * 128 * 512
        assert report["ignored_reference_pixels"] == sum(n for c, n in per_code.items() if c not in codes)
        for code in codes:
            value, expected = table.loc[name, str(code)], report["iou"][str(code)]
            assert (np.isnan(value) and expected is None) or value == pytest.approx(round(expected, 4))
        for column, key in (("mIoU", "mean_iou"), ("OA", "overall_accuracy"), ("kappa", "kappa")):
            assert table.loc[name, column] == pytest.approx(round(report[key], 4))
            low, high = report["intervals"][key]
            assert low <= report[key] <= high
        assert report["intervals"]["blocks"] == 16 and report["intervals"]["replicates"] == 400
        assert report["training"]["best_epoch"] >= 1
    intervals = pd.read_csv(out / "results" / area / "intervals.csv")
    row = intervals[(intervals["configuration"] == "sept-rgb") & (intervals["metric"] == "kappa")].iloc[0]
    assert [row["lower"], row["upper"]] == pytest.approx(reports["sept-rgb"]["intervals"]["kappa"])
    comparisons = pd.read_csv(out / "results" / area / "comparisons.csv")
    assert len(comparisons) == 3 and set(comparisons["metric"]) == {"mean_iou", "overall_accuracy", "kappa"}
    for r in comparisons.itertuples():
        significant = r.lower > 0 or r.upper < 0
        assert (r.better == ("sept-nrg" if r.lower > 0 else "sept-rgb")) if significant else pd.isna(r.better)
        assert r.difference == pytest.approx(reports["sept-nrg"][r.metric] - reports["sept-rgb"][r.metric])
    transfer = json.loads((out / "configurations" / "sept-rgb" / "demo-again-2_2-april" / "report.json").read_text())
    assert sorted(transfer["tiles"]) == sorted(f"{r}_{c}" for r in range(5, 9) for c in range(5, 9))
    assert transfer["experiment"]["season"] == "april" and transfer["codes"] == reports["sept-rgb"]["codes"]
    transfer_table = pd.read_csv(out / "results" / "demo-again-2_2-april" / "table.csv", index_col=0)
    assert transfer_table.loc["sept-rgb", "mIoU"] == pytest.approx(round(transfer["mean_iou"], 4))
    for figure in ("training_curves.png", "split.png", f"{area}/iou_intervals.png", f"{area}/maps.png"):
        assert (out / "results" / figure).stat().st_size > 5000
    summary = (out / "results" / "summary.md").read_text()
    assert "| sept-nrg |" in summary and "better at 95%" in summary

    # run again: nothing to train or score, same results
    evaluation = out / "configurations" / "sept-rgb" / area / "evaluation.json"
    stamp = evaluation.stat().st_mtime_ns
    again = run_experiment(config, client=cluster_client)
    assert all(t["epochs_run"] == 0 for t in again.training.values())
    assert evaluation.stat().st_mtime_ns == stamp
    assert json.loads((out / "configurations" / "sept-rgb" / area / "report.json").read_text())["intervals"] == \
        reports["sept-rgb"]["intervals"]

    # a configuration changed under the same name is refused before anything trains
    changed = yaml.safe_load(config.read_text())
    changed["configurations"][1]["overrides"]["lr"] = 0.01
    config.write_text(yaml.safe_dump(changed))
    b_checkpoint = (out / "configurations" / "sept-rgb" / "train" / "checkpoint.pt").read_bytes()
    with pytest.raises(ConfigError, match=r"'sept-rgb' was trained in .* with other settings \(lr\).*another `name`"):
        run_experiment(config, client=cluster_client)
    assert (out / "configurations" / "sept-rgb" / "train" / "checkpoint.pt").read_bytes() == b_checkpoint


def test_cli_reports_bad_experiment_files_in_one_line(tmp_path, monkeypatch, capsys):
    from clc_dask.cli import main

    path = tmp_path / "experiment.yaml"
    path.write_text(yaml.safe_dump({"name": "x", "regions": {"a": {"mosaics": {"september": "s.tif"},
                                                                   "labels": "l.tif"}},
                                    "configurations": [{"preset": "nope"}]}))
    monkeypatch.setattr(sys, "argv", ["clc-dask", "experiment", "--config", str(path)])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 1
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(
        "Error: configurations[0] (nope): Unknown preset 'nope'")


@pytest.mark.parametrize("name", ["experiment-paper", "experiment-demo"])
def test_deploy_experiment_files_parse(name, monkeypatch):
    monkeypatch.setenv("DASK_SCHEDULER_ADDRESS", "tcp://127.0.0.1:8786")
    config = load_experiment_config(ROOT / "deploy" / "configs" / f"{name}.yaml")
    assert resolve_configurations(config) and Path(config.output).is_absolute()
    if name == "experiment-demo":  # the demo's working folder of the README
        assert Path(config.regions["demo"].labels) == ROOT / "demo-run" / "labels" / "clc_level2.tif"
        assert [c.train.bands for c in resolve_configurations(config)] == [
            ("B08", "B04", "B03"), ("B04", "B03", "B02"), ("B08", "B04", "B03")]


def test_deploy_config_is_the_paper_grid(monkeypatch):
    monkeypatch.setenv("DASK_SCHEDULER_ADDRESS", "tcp://127.0.0.1:8786")
    config = load_experiment_config(ROOT / "deploy" / "configs" / "experiment-paper.yaml")
    assert config.grid == "paper" and [c.name for c in resolve_configurations(config)] == list(PAPER_GRID)
    assert config.regions["italy"].built and config.regions["italy"].imagery.composite == "all"
    assert [t.region for t in config.transfer] == ["canakkale"]
    assert config.transfer[0].tiles == ["4_3", "3_2"] and config.transfer[0].seasons == ["april", "september"]
    assert config.split.guard_px == "auto" and config.evaluation.seasons == ["september"]
    assert config.cluster.kind in ("cuda", "address")
