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
