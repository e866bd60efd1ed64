"""Shared test fixtures: paths to the real data in ../shared/data and tiny grids."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("CLC_DASK_SHARED_DATA", ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real data folder (../shared/data); tests needing it skip clearly if absent."""
    if not SHARED_DATA.exists():
        pytest.skip(f"real test data not found at {SHARED_DATA} (set CLC_DASK_SHARED_DATA)")
    return SHARED_DATA


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
