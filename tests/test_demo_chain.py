"""`clc-dask demo` runs the whole chain on a small region, and every stage's output fits the next."""

import json

import numpy as np
import pytest
import rasterio

from clc_dask.classes import official_codes
from clc_dask.demo import run_demo, step_names
from clc_dask.demo.chain import DEMO_SEASONS, held_out_rows
from clc_dask.generalize import generalize_array
from clc_dask.model import load_checkpoint
from clc_dask.rasters import geobox_of, open_raster


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("demo-chain")
    return run_demo(workdir, size=512, seed=0, epochs=2)


def test_every_step_ran(demo):
    assert list(demo.results) == step_names()
    assert step_names()[-1] == "run"


def test_mosaics_and_labels_share_the_region_grid(demo):
    region_grid = demo.region.geobox
    for season in DEMO_SEASONS:
        mosaic = open_raster(demo.outputs["mosaics"][season])
        assert geobox_of(mosaic) == region_grid
        assert list(mosaic["band"].values) == ["B02", "B03", "B04", "B08"] and mosaic.dtype == np.uint16
    labels = open_raster(demo.outputs["reference"])
    assert geobox_of(labels) == region_grid
    codes = set(np.unique(labels.values).tolist()) - {0}
    assert codes <= set(official_codes(2)) and len(codes) >= 10
    train = open_raster(demo.outputs["train_labels"]).values[0]
    assert not train[held_out_rows(512)].any(), "the held-out strip is not used for training"


def test_prediction_evaluation_and_generalization(demo):
    checkpoint = load_checkpoint(demo.outputs["checkpoint"])
    assert checkpoint.bands == ("B08", "B04", "B03")
    prediction = open_raster(demo.outputs["prediction"]).values[0]
    assert set(np.unique(prediction).tolist()) - {0} <= set(checkpoint.classes.codes)
    report = json.loads((demo.workdir / "evaluation" / "report_held_out.json").read_text())
    reference = open_raster(demo.outputs["reference"]).values[0][held_out_rows(512)]
    assert np.asarray(report["confusion_matrix"]).sum() + sum(report["missed_pixels"].values()) == np.count_nonzero(reference)
    assert 0 <= report["mean_iou"] <= 1 and demo.results["evaluate"]["held_out_miou"] == round(report["mean_iou"], 3)
    generalized = open_raster(demo.outputs["generalized"]).values[0]
    np.testing.assert_array_equal(generalized, generalize_array(prediction, 10.0, 25, 100))
    with rasterio.open(demo.outputs["generalized"]) as src:
        assert src.colormap(1)[31] == (128, 255, 0, 255)


def test_production_run_publishes_every_tile(demo):
    store = demo.workdir / "run"
    manifest = json.loads((store / "manifest.json").read_text())
    assert sorted(manifest["tiles"]) == ["1_1", "1_2", "2_1", "2_2"]
    collection = json.loads((store / "stac" / "collection.json").read_text())
    items = [link for link in collection["links"] if link["rel"] == "item"]
    assert len(items) == 4
    for name in manifest["tiles"]:
        with rasterio.open(store / "tiles" / name / "generalized.tif") as src:
            assert src.crs.to_epsg() == demo.region.epsg and src.shape == (256, 256)
