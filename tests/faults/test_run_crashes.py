"""Runs killed, interrupted or disturbed on their store: each resumes to the bytes of an
uninterrupted run (``reference_run``), or stops with a clear error first.

* the client (``clc-dask run``) SIGKILLed at six points, one after another on one store, each
  resumed by the next attempt: before the first tile, after two class tiles, during the
  generalization, while writing the polygons, while publishing STAC, and while swapping the
  old catalog out (a point is the n-th rename onto a final name: tests/faults/killpoint.py);
* the leftovers of those crashes (temporary files and folders) are gone after the resume;
* a file-size limit (a full disk) during the tiles' COG writes: an OutputError naming the
  file, nothing that looks complete, then a resume with room again;
* a tile file changed after it was recorded: recomputed on resume, with a warning naming it;
* a truncated checkpoint: a CheckpointError naming it, before anything is written;
* every rename into a folder is followed by an fsync of that folder.
"""

from __future__ import annotations

import json
import logging
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from test_run import assert_same_outputs, write_config

from clc_dask import run as R
from clc_dask.config import load_run_config
from clc_dask.errors import CheckpointError
from clc_dask.run import Manifest
from faults.runs import (
    assert_complete_files_read,
    manifest_tiles,
    partial_files,
    start,
    tail,
    wait_for,
)

#: (what is happening, the rename that kills the run: path pattern, n-th match, before/after it)
KILL_POINTS = [
    ("before the first tile", {"match": "*/run.yaml", "count": 1, "when": "before"}),
    ("after two class tiles", {"match": "*/tiles/*/classes.tif", "count": 2, "when": "after"}),
    ("during the generalization", {"match": "*/tiles/*/generalized.tif", "count": 1, "when": "after"}),
    ("while writing the polygons", {"match": "*/polygons.gpkg", "count": 1, "when": "before"}),
    ("while publishing STAC", {"match": "*/stac", "count": 1, "when": "before"}),
]
#: Killed on a finished store: the old catalog moved aside, the new one not yet in its place.
SWAP_POINT = ("while swapping the catalog", {"match": "*/.stac.clc-partial-*.old", "count": 1, "when": "after"})


def _killed_run(config: Path, point: dict, log: Path, resume: bool) -> None:
    proc = start(["run", "--config", str(config), "--no-progress", *(["--resume"] if resume else [])], log,
                 kill_at=point)
    assert proc.wait(timeout=600) == -signal.SIGKILL, f"not killed at {point}:\n{tail(log)}"


def test_client_killed_at_six_points_resumes_each_time_to_identical_outputs(run_root, demo_region, reference_run,
                                                                             tmp_path):
    path = write_config(run_root, demo_region, "killed-six")
    store = run_root / "killed-six"
    seen = {}
    for number, (what, point) in enumerate(KILL_POINTS):
        _killed_run(path, point, tmp_path / f"{number}.log", resume=number > 0)
        assert_complete_files_read(store)  # nothing under a final name is half-written
        manifest = Manifest.read(store)
        seen[what] = (sorted(manifest.tiles) if manifest else [], sorted(manifest.generalized) if manifest else [],
                      (store / "polygons.gpkg").exists(), (store / "stac").exists(),
                      len(list(store.glob("tiles/*/classes.tif"))))
    # each point was reached in the state it names
    assert seen["before the first tile"] == ([], [], False, False, 0)
    assert len(seen["after two class tiles"][0]) < 2 and seen["after two class tiles"][4] == 2
    assert len(seen["during the generalization"][0]) == 4 and len(seen["during the generalization"][1]) < 4
    assert len(seen["while writing the polygons"][1]) == 4 and not seen["while writing the polygons"][2]
    assert seen["while publishing STAC"][2] and not seen["while publishing STAC"][3]
    assert partial_files(store), "the kills left no temporary file to clean up"

    config = load_run_config(path)
    R.execute_run(config, resume=True)
    assert partial_files(store) == []
    assert_same_outputs(store, reference_run.store)
    assert Manifest.read(store).complete

    # a finished store: a resume publishes again, swapping the catalog; killed in the middle
    _killed_run(path, SWAP_POINT[1], tmp_path / "swap.log", resume=True)
    assert not (store / "stac").exists() and partial_files(store)
    result = R.execute_run(config, resume=True)
    assert result.computed == [] and partial_files(store) == []
    assert_same_outputs(store, reference_run.store)


def test_crash_leftovers_are_removed_by_the_next_run(run_root, demo_region, reference_run, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(reference_run.store, store)
    planted = [store / ".stac-partial-3f2a", store / "stac" / ".demo-run-1_1.clc-partial-9c1d",
               store / "tiles" / "1_2" / ".classes.tif.clc-partial-0a1b2c.tif",
               store / "map.zarr" / "classes" / ".c.clc-partial-77aa", store / ".manifest.json.clc-partial-5e5e.json"]
    for path in planted:
        if path.name.endswith(("3f2a", "9c1d")):
            (path / "sub").mkdir(parents=True)
            (path / "sub" / "item.json").write_text("{}")
        else:
            path.write_bytes(b"half a file")
    config = load_run_config(write_config(run_root, demo_region, "leftovers", output={"store": str(store)}))
    result = R.execute_run(config, resume=True)
    assert result.computed == [] and not any(p.exists() for p in planted)
    assert partial_files(store) == []
    assert_same_outputs(store, reference_run.store)


FULL_DISK = textwrap.dedent("""
    import resource, signal, sys
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG), as on a full disk
    limit = int(sys.argv[1])
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    sys.argv = ["clc-dask", *sys.argv[2:]]
    from clc_dask.cli import main
    main()
""")


def test_full_disk_during_tile_cogs_is_a_clear_error_then_resume_completes(run_root, demo_region, reference_run,
                                                                          tmp_path):
    """The first tile is written with room; then the file-size limit is below every class COG
    and above every other file written before phase 2 (manifest, journal, STAC Items)."""
    store = run_root / "full-disk"
    path = write_config(run_root, demo_region, "full-disk")
    config = load_run_config(path)
    R.execute_run(config, tile_names=["1_1"])
    cogs = {t: (reference_run.store / "tiles" / t / "classes.tif").stat().st_size for t in ("1_2", "2_1", "2_2")}
    limit = min(cogs.values()) - 1
    others = [p.stat().st_size for p in store.rglob("*") if p.is_file() and "tiles" not in p.parts
              and "map.zarr" not in p.parts and p.name != "items.json"]  # items.json: kept on resume
    assert max(others) < limit, "the limit would stop another file first: adjust the test"
    script = tmp_path / "full_disk.py"
    script.write_text(FULL_DISK)
    done = subprocess.run([sys.executable, str(script), str(limit), "run", "--config", str(path), "--resume",
                           "--no-progress"], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 1, done.stderr[-3000:]
    error = done.stderr.strip().splitlines()[-1]
    failed = re.match(r"Error: (\d+) tile\(s\) failed", error)
    assert failed and int(failed[1]) >= 1, error
    finished = sorted(Manifest.read(store).tiles)
    lost = sorted(set(cogs) - set(finished))
    assert len(lost) == int(failed[1]) and "1_1" in finished, (finished, error)
    for tile in lost:
        cog = store / "tiles" / tile / "classes.tif"
        assert f"Cannot write {cog}: the file-size limit of this process (ulimit -f) of {limit} bytes" in error
        assert not cog.exists()
    assert "Free space on its disk" in error and "--resume" in error
    assert partial_files(store) == []
    assert resource.getrlimit(resource.RLIMIT_FSIZE)[0] == resource.RLIM_INFINITY  # room again, here
    result = R.execute_run(config, resume=True)
    assert sorted(result.computed) == lost
    assert_same_outputs(store, reference_run.store)


def test_a_changed_tile_file_is_recomputed_with_a_warning_naming_it(run_root, demo_region, reference_run, tmp_path,
                                                                    caplog):
    """Chosen: recompute, not refuse. The manifest records what the run wrote; a tile file that
    no longer matches its SHA-256 (edited, restored from an old backup, bit rot) is the run's
    own output, so the run can make it again without asking anybody, and one bad tile must not
    stop a country run. The warning names the file, so the change is not silent."""
    store = tmp_path / "store"
    shutil.copytree(reference_run.store, store)
    changed = store / "tiles" / "2_1" / "classes.tif"
    data = bytearray(changed.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, other bytes
    changed.write_bytes(bytes(data))
    config = load_run_config(write_config(run_root, demo_region, "changed", output={"store": str(store)}))
    with caplog.at_level(logging.WARNING, logger="clc_dask.run"):
        result = R.execute_run(config, resume=True)
    assert result.computed == ["2_1"]
    assert any(str(changed) in r.getMessage() and "changed" in r.getMessage() for r in caplog.records), caplog.text
    assert_same_outputs(store, reference_run.store)


def test_a_truncated_checkpoint_is_refused_naming_it_before_anything_is_written(run_root, demo_region, tmp_path):
    model = tmp_path / "model.pt"
    data = (run_root / "model.pt").read_bytes()
    model.write_bytes(data[: len(data) // 2])
    config = load_run_config(write_config(run_root, demo_region, "truncated-model",
                                          model={"checkpoint": str(model)}))
    with pytest.raises(CheckpointError, match=rf"Cannot read checkpoint {model}"):
        R.execute_run(config)
    assert not Path(config.output.store).exists()


def test_every_rename_into_a_folder_is_followed_by_its_fsync(run_root, demo_region, reference_run, tmp_path,
                                                            monkeypatch):
    """A renamed file survives a power cut only once its folder's entry is on disk: after each
    rename onto a final name, that folder is fsynced (spied on ``os.replace`` / ``os.fsync``)."""
    store = tmp_path / "store"
    events: list[tuple[str, str]] = []
    real_replace, real_fsync = os.replace, os.fsync

    def replace(src, dst, *args, **kwargs):
        result = real_replace(src, dst, *args, **kwargs)
        events.append(("rename", str(Path(dst).parent)))
        return result

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(os, "fsync", fsync)
    config = load_run_config(write_config(run_root, demo_region, "fsync", output={"store": str(store)}))
    R.execute_run(config)
    renames = [(i, folder) for i, (kind, folder) in enumerate(events) if kind == "rename"]
    assert len(renames) >= 12  # tiles, polygons, styles, STAC, manifest, run.yaml, items
    unsynced = [folder for i, folder in renames if ("fsync", folder) not in events[i + 1:]]
    assert unsynced == [], f"renamed into, never fsynced after: {sorted(set(unsynced))}"
    assert_same_outputs(store, reference_run.store)


def test_scheduler_killed_mid_run_is_a_clear_error_then_resume_completes(run_root, demo_region, reference_run,
                                                                        tmp_path):

    scheduler_log, worker_log = tmp_path / "scheduler.log", tmp_path / "worker.log"
    scheduler_file = tmp_path / "scheduler.json"  # the address, whatever the inherited log level
    with open(scheduler_log, "wb") as out:
        scheduler = subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1",
                                      "--port", "0", "--dashboard-address", ":0",
                                      "--scheduler-file", str(scheduler_file)], stdout=out,
                                     stderr=subprocess.STDOUT, start_new_session=True)
    worker = None
    try:
        address = wait_for(lambda: _scheduler_address(scheduler_file), scheduler, scheduler_log,
                           timeout=240, what="the scheduler")
        with open(worker_log, "wb") as out:
            worker = subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_worker", address, "--nthreads", "1",
                                       "--no-dashboard", "--death-timeout", "20"], stdout=out,
                                      stderr=subprocess.STDOUT, start_new_session=True,
                                      env={**os.environ, "OMP_NUM_THREADS": "1"})
        store = run_root / "scheduler-lost"
        path = write_config(run_root, demo_region, "scheduler-lost")  # one tile in flight
        log = tmp_path / "run.log"
        run = start(["run", "--config", str(path), "--no-progress", "--scheduler", address], log)
        wait_for(lambda: manifest_tiles(store), run, log, timeout=400, what="a finished tile")
        os.killpg(scheduler.pid, signal.SIGKILL)
        assert run.wait(timeout=180) == 1, tail(log)
    finally:
        for proc in (scheduler, worker):
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    error = tail(log).strip().splitlines()[-1]
    assert error.startswith(f"Error: Lost the connection to the Dask scheduler {address}"), tail(log)
    assert "run again with --resume" in error
    finished = sorted(Manifest.read(store).tiles)
    assert 1 <= len(finished) < 4
    result = R.execute_run(load_run_config(path), resume=True)
    assert sorted(result.skipped) == finished
    assert_same_outputs(store, reference_run.store)


def _scheduler_address(scheduler_file: Path) -> str | None:
    """The address a scheduler wrote to its ``--scheduler-file`` (None until it is complete)."""
    try:
        return json.loads(scheduler_file.read_text())["address"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return None

