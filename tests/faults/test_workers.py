"""A worker SIGKILLed while it computes: the same outputs as without a cluster.

One local cluster (2 worker processes under nannies, which start a new worker for a killed
one) serves the module. A watcher thread kills the first worker that has tasks in progress;
each test checks that a worker was killed while busy and that the outputs equal those
computed by dask's threads in this process. (A worker killed during a production run:
tests/test_run.py ``test_worker_loss_mid_run_gives_identical_output``.)
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterator

import dask
import numpy as np
import psutil
import pytest
import rasterio

from clc_dask.load import load_scenes
from clc_dask.mosaic import composite_bands, seasonal_mosaic, write_mosaic
from clc_dask.patches import DaskPatchStream, load_patch_index
from clc_dask.predict import predict_to_file
from clc_dask.search import search_items


@pytest.fixture(scope="module")
def client():
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster:
        with Client(cluster, set_as_default=False) as c:
            yield c


@contextlib.contextmanager
def busy_worker_killed(client, timeout: float = 120) -> Iterator[list[int]]:
    """Kill (SIGKILL) the first worker seen with tasks in progress; yields the killed pids.
    On exit, waits until the nanny has replaced it."""
    pids = client.run(os.getpid)
    killed: list[int] = []
    done = threading.Event()

    def watch() -> None:
        deadline = time.monotonic() + timeout
        while not done.is_set() and time.monotonic() < deadline:
            busy = [w for w, keys in client.processing().items() if keys and w in pids]
            if busy:
                os.kill(pids[busy[0]], signal.SIGKILL)  # a worker of this module's cluster
                killed.append(pids[busy[0]])
                return
            time.sleep(0.01)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        yield killed
    finally:
        done.set()
        watcher.join()
        deadline = time.monotonic() + 60
        while len(client.scheduler_info()["workers"]) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
    assert killed and not psutil.pid_exists(killed[0]), "no worker was busy to be killed"


def _pixels(path):
    with rasterio.open(path) as src:
        return src.read()


@pytest.fixture(scope="module")
def items(demo_region):
    return search_items(str(demo_region.catalog_path), season="september", years=[2018], max_cloud=80)


def _computing_on(client):
    """Compute on ``client`` (made the current client, not put into dask's config: a nanny
    restarting a killed worker pickles the config for the new process), else on threads."""
    return client.as_current() if client is not None else dask.config.set(scheduler="threads")


def _mosaic(items, region, out, client=None):
    scenes = load_scenes(list(items), region.geobox, bands=composite_bands("nrg"), chunksize=128)
    with _computing_on(client):
        return write_mosaic(seasonal_mosaic(scenes, "nrg"), out)


@pytest.fixture(scope="module")
def clean_mosaic(items, demo_region, tmp_path_factory):
    return _mosaic(items, demo_region, tmp_path_factory.mktemp("clean") / "m.tif")


def test_worker_killed_during_mosaic(client, items, demo_region, clean_mosaic, tmp_path):
    with busy_worker_killed(client):
        written = _mosaic(items, demo_region, tmp_path / "m.tif", client)
    for path, expected in zip(written[:2], clean_mosaic[:2], strict=True):
        np.testing.assert_array_equal(_pixels(path), _pixels(expected), err_msg=path.name)


def test_worker_killed_during_predict(client, clean_mosaic, run_root, tmp_path):
    options = dict(halo=32, window=128, batch_size=4, device="cpu", chunk_size=128)
    expected = predict_to_file(clean_mosaic[0], run_root / "model.pt", tmp_path / "threads.tif", **options)
    with busy_worker_killed(client), _computing_on(client):
        got = predict_to_file(clean_mosaic[0], run_root / "model.pt", tmp_path / "cluster.tif", client, **options)
    np.testing.assert_array_equal(_pixels(got), _pixels(expected))


def test_worker_killed_during_the_training_patch_stream(client, train_index):
    index = load_patch_index(train_index)
    expected = [(s, x, y) for s, x, y in DaskPatchStream(index, "train", seed=3, prefetch=4).raw(epoch=1)]
    with busy_worker_killed(client):
        got = list(DaskPatchStream(index, "train", seed=3, client=client, prefetch=4).raw(epoch=1))
    assert [s for s, _, _ in got] == [s for s, _, _ in expected]
    for (_, xa, ya), (_, xb, yb) in zip(got, expected, strict=True):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)
