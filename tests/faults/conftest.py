"""Fixtures of the fault-injection suite."""

from __future__ import annotations

from functools import partial

import pytest

from faults.proxy import proxied_demo


@pytest.fixture
def faulty_demo(demo_servers):
    """``faulty_demo(rates, seed=0, **options)``: a context manager putting a
    :class:`~faults.proxy.FaultProxy` in front of the session's demo servers; it yields
    :class:`~faults.proxy.ProxiedDemo` (``.stac_url``, ``.data_url``, ``.proxy``), e.g. to run
    ``clc-dask run`` with ``--source`` set to ``.stac_url`` under faults."""
    return partial(proxied_demo, demo_servers)
