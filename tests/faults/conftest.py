"""Fixtures of the fault-injection suite."""

from __future__ import annotations

from functools import partial

import geopandas as gpd
import pytest
from test_run import _checkpoint

from faults.proxy import proxied_demo


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
