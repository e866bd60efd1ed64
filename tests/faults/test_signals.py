"""Stop signals on long commands: everything they started stops, temp files go, work resumes.

Each command runs as a real ``clc-dask`` process with its own ``TMPDIR``; the test collects the
processes it started (psutil) and the ports they listen on, sends one signal to the command's
process only (as ``kill PID``, Kubernetes or systemd do), and checks that it exits with
128 + the signal's number, that none of those processes is left, no port answers, and the temp
folder is empty. A run then resumes to the bytes of an uninterrupted run; a training resumes to
the weights of an uninterrupted training.
"""

from __future__ import annotations

import re
import shutil
import signal

import psutil
import pytest
from test_run import assert_same_outputs, write_config
from typer.testing import CliRunner

from clc_dask import run as R
from clc_dask.cli import app
from clc_dask.config import load_run_config
from clc_dask.errors import OutputError
from clc_dask.model import load_checkpoint
from clc_dask.run.store import lock_holder
from faults.runs import (
    TRAIN_EPOCHS,
    TRAIN_OPTIONS,
    assert_nothing_left,
    assert_same_training,
    descendants,
    listening_ports,
    manifest_tiles,
    partial_files,
    start,
    stop,
    tail,
    wait_for,
)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_signal_on_demo_keep_serving_stops_rustac_ports_and_temp_folder(signum, demo_region, tmp_path):
    workdir = tmp_path / "demo"
    shutil.copytree(demo_region.workdir, workdir)  # a complete region: reused, not rebuilt
    log, tmpdir = tmp_path / "demo.log", tmp_path / "tmp"
    proc = start(["demo", "--workdir", str(workdir), "--size", "512", "--until", "search", "--keep-serving"],
                 log, tmpdir=tmpdir)
    wait_for(lambda: "Serving until Ctrl-C" in tail(log), proc, log, what="serving")
    urls = dict(re.findall(r"(STAC API|Data \(COGs.*?\)): (http://\S+)", tail(log)))
    ports = {int(url.rsplit(":", 1)[1]) for url in urls.values()}
    children = descendants(proc.pid)
    assert any("rustac" in " ".join(c.cmdline()) for c in children), [c.cmdline() for c in children]
    served = [p for p in tmpdir.iterdir() if p.name.startswith("clc-dask-served-")]
    assert len(ports) == 2 and ports <= listening_ports([psutil.Process(proc.pid), *children])
    assert len(served) == 1  # the served copies of the catalog, in this command's temp folder

    assert stop(proc, signum) == 128 + signum, tail(log)
    assert f"Stopped by {signal.Signals(signum).name}" in tail(log)
    assert_nothing_left(children, ports, tmpdir)


def test_sigterm_on_run_stops_its_cluster_then_resume_is_identical(run_root, demo_region, reference_run, tmp_path):
    """A run on a local cluster (a nanny and a worker process): a second run on its store is
    refused naming the first one's pid; SIGTERM stops the run, its cluster and its ports; the
    resumed run (on dask's threads, the cluster does not change the outputs) ends identical."""
    store = run_root / "sigterm"
    config = write_config(run_root, demo_region, "sigterm",
                          cluster={"kind": "local", "n_workers": 1, "threads_per_worker": 1})
    log, tmpdir = tmp_path / "run.log", tmp_path / "tmp"
    proc = start(["run", "--config", str(config), "--no-progress"], log, tmpdir=tmpdir)
    wait_for(lambda: manifest_tiles(store), proc, log, what="a finished tile")
    children = descendants(proc.pid)
    ports = listening_ports([*children])
    assert len(children) >= 2 and ports, [c.cmdline() for c in children]  # nanny, worker (and helpers)

    # a second run on the same store is refused, naming the first (its pid is in the lock file)
    assert lock_holder(store)["pid"] == proc.pid
    threads = load_run_config(write_config(run_root, demo_region, "sigterm-threads", output={"store": str(store)}))
    with pytest.raises(OutputError, match=rf"Another run holds the store .*sigterm \(pid {proc.pid} on host \S+"):
        R.execute_run(threads, resume=True)

    assert stop(proc, signal.SIGTERM) == 143, tail(log)
    assert "Stopped by SIGTERM" in tail(log)
    assert_nothing_left(children, ports, tmpdir)
    finished = manifest_tiles(store)
    assert 1 <= len(finished) < 4 or not (store / "polygons.gpkg").exists(), "the run ended before the signal"
    assert partial_files(store) == []

    result = R.execute_run(threads, resume=True)
    assert sorted(result.skipped) == finished
    assert_same_outputs(store, reference_run.store)


def test_sigterm_on_train_leaves_a_checkpoint_that_resumes_to_the_same_weights(train_index, whole_training,
                                                                                  tmp_path):
    base = ["train", "--patches", str(train_index), *TRAIN_OPTIONS, "--epochs", str(TRAIN_EPOCHS)]
    out, log, tmpdir = tmp_path / "stopped", tmp_path / "train.log", tmp_path / "tmp"
    proc = start([*base, "--out", str(out)], log, tmpdir=tmpdir)
    wait_for(lambda: (out / "checkpoint.pt").exists(), proc, log, what="the first checkpoint")
    children = descendants(proc.pid)
    assert stop(proc, signal.SIGTERM) == 143, tail(log)
    assert "Stopped by SIGTERM" in tail(log)
    assert_nothing_left(children, [], tmpdir)
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")], "temporary file left"
    assert 1 <= load_checkpoint(out / "checkpoint.pt").epoch < TRAIN_EPOCHS

    resumed = CliRunner().invoke(app, [*base, "--out", str(out), "--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert_same_training(out, whole_training)
