"""Shared test fixtures: the real data in tests/data, and the demo region and its servers."""

from __future__ import annotations

from pathlib import Path

import pytest
from real_data import DATA, require_files

# Helpers whose asserts report like a test's own (they check what tests hand them).
pytest.register_assert_rewrite("deploy_support")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real data folder, tests/data (sources and licences in its README.md).

    A test that needs it fails, naming the files, when any listed data file is missing.
    """
    return require_files(DATA)


# --- offline demo region (clc_dask.demo) -------------------------------------------------------
#: Size of the session's demo region: 512 px at 10 m (5.12 km), 4 dates per season, seed 0.
DEMO_TEST_SIZE = 512


@pytest.fixture(scope="session")
def demo_region(tmp_path_factory):
    """A small demo region (512 × 512 px, seed 0), built once per test session (~3-5 s)."""
    from clc_dask.demo import build_region

    return build_region(tmp_path_factory.mktemp("demo-region"), size=DEMO_TEST_SIZE, seed=0)


@pytest.fixture(scope="session")
def demo_servers(demo_region):
    """The demo region served on loopback for the session: ``rustac serve`` STAC API
    (``.stac_url``) and the COG file server with range requests (``.data_url``)."""
    from clc_dask.demo import serve_region

    with serve_region(demo_region) as servers:
        yield servers
