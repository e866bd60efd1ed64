"""Shared test fixtures: the real data in tests/data, the demo region and its servers, and
``run_cli``, which runs the ``clc-dask`` command in the test's process."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from real_data import DATA, require_files

# Helpers whose asserts report like a test's own (they check what tests hand them).
pytest.register_assert_rewrite("deploy_support")

#: Test modules that run first (the longest), so that with ``-n 2`` the rest runs beside them.
FIRST = ("test_demo_accuracy.py",)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """With pytest-xdist (``-n 2 --dist loadgroup --no-loadscope-reorder``, the README's command) each test module runs
    on one worker, so its module and session fixtures are built once there; ``tests/faults``
    shares its reference run across modules and runs as one group. The longest module starts first."""
    for item in items:
        path = Path(str(item.fspath))
        group = "faults" if path.parent.name == "faults" else path.stem
        item.add_marker(pytest.mark.xdist_group(group))
    items.sort(key=lambda item: Path(str(item.fspath)).name not in FIRST)


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


@pytest.fixture(scope="session")
def two_zone_demo(tmp_path_factory):
    """A two-zone demo region across the UTM 32/33 border (256 px on EPSG:3035, seed 0; every
    pass as overlapping granules in EPSG:32632 and 32633), served on loopback for the session:
    ``(region, servers)``."""
    from clc_dask.demo import build_region, serve_region

    region = build_region(tmp_path_factory.mktemp("two-zone"), size=256, seed=0, two_zone=True)
    with serve_region(region) as servers:
        yield region, servers


# --- the command line ----------------------------------------------------------------------------


def exit_status(exc: SystemExit) -> int:
    """The status a shell sees for ``exc``: ``None`` is 0, a message (not an int) is 1."""
    if exc.code is None:
        return 0
    return exc.code if isinstance(exc.code, int) else 1


@pytest.fixture
def run_cli(monkeypatch, capsys) -> Callable[..., tuple[int, str, str]]:
    """``run_cli(*args)`` runs ``clc-dask ARGS…`` through its entry point (``clc_dask.cli.main``,
    which turns errors into one line and an exit code) in this process, and returns
    ``(exit status, stdout, stderr)`` of that call. Arguments may be paths or numbers."""
    from clc_dask.cli import main  # imports torch: only the tests that run the CLI pay for it

    def run(*args: object) -> tuple[int, str, str]:
        capsys.readouterr()  # what the test printed before is not the command's output
        monkeypatch.setattr(sys, "argv", ["clc-dask", *map(str, args)])
        try:
            main()
            code = 0
        except SystemExit as exc:
            code = exit_status(exc)
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run
