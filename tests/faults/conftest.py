"""Fixtures of the fault-injection suite."""

from __future__ import annotations

from functools import partial

import geopandas as gpd
import pytest
from test_run import _checkpoint

from faults.proxy import proxied_demo
from faults.runs import TRAIN_EPOCHS, TRAIN_OPTIONS


@pytest.fixture
def faulty_demo(demo_servers):
    """``faulty_demo(rates, seed=0, **options)``: a context manager putting a
    :class:`~faults.proxy.FaultProxy` in front of the session's demo servers; it yields
    :class:`~faults.proxy.ProxiedDemo` (``.stac_url``, ``.data_url``, ``.proxy``), e.g. to run
    ``clc-dask run`` with ``--source`` set to ``.stac_url`` under faults."""
    return partial(proxied_demo, demo_servers)


@pytest.fixture(scope="session")
def run_root(tmp_path_factory, demo_region):
    """A folder with the checkpoint and AOI of tests/test_run.py's runs (512 px demo region,
    4 tiles); every run config of the suite is written here."""
    folder = tmp_path_factory.mktemp("fault-runs")
    _checkpoint(folder / "model.pt")
    left, bottom, right, top = demo_region.bounds
    ring = [[left + 1, bottom + 1], [right - 1, bottom + 1], [right - 1, top - 1], [left + 1, top - 1],
            [left + 1, bottom + 1]]
    frame = gpd.GeoDataFrame.from_features(
        [{"type": "Feature", "properties": {}, "geometry": {"type": "Polygon", "coordinates": [ring]}}],
        crs=demo_region.crs)
    frame.to_file(folder / "aoi.gpkg", driver="GPKG")
    return folder


@pytest.fixture(scope="session")
def reference_run(run_root, demo_region):
    """One uninterrupted, fault-free run (dask's threads in this process): every faulted run of
    the suite must end with the same bytes."""
    from test_run import write_config

    from clc_dask import run as R
    from clc_dask.config import load_run_config

    return R.execute_run(load_run_config(write_config(run_root, demo_region, "reference")))


@pytest.fixture(scope="session")
def train_index(tmp_path_factory):
    """A small patch index (128 px synthetic scene, 32 px patches) saved to a folder."""
    from test_patches import synthetic_scene

    from clc_dask.patches import build_patch_index

    root = tmp_path_factory.mktemp("train-index")
    mosaics, labels = synthetic_scene(root, 128, ("september",), seed=1)
    build_patch_index(mosaics, labels, patch_size=32, bands="nrg", split_block=1, seed=0).save(root / "index")
    return root / "index"


@pytest.fixture(scope="session")
def whole_training(train_index, tmp_path_factory):
    """An uninterrupted ``clc-dask train`` of :data:`TRAIN_EPOCHS` epochs: its run folder."""
    import torch
    from typer.testing import CliRunner

    from clc_dask.cli import app

    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("whole-training") / "run"
    result = CliRunner().invoke(app, ["train", "--patches", str(train_index), *TRAIN_OPTIONS,
                                      "--epochs", str(TRAIN_EPOCHS), "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out
