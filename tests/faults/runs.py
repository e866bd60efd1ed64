"""Helpers of the fault suite: commands in subprocesses, their process trees, ports and stores.

The run configs and the output comparison are those of ``tests/test_run.py`` (a 512 px demo
region, 4 tiles of 256 px, a seeded ResNet18 U-Net), so that a faulted run is compared with
the same reference a plain run is.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import psutil
import pytest
import rasterio

from clc_dask.model import load_checkpoint
from clc_dask.stores import is_partial

#: ``clc-dask train`` options of the suite's small trainings (ResNet18, random start, CPU).
TRAIN_OPTIONS = ["--encoder", "resnet18", "--encoder-weights", "none", "--batch-size", "4", "--device", "cpu",
                 "--seed", "2", "--no-progress"]
#: Epochs of the suite's trainings.
TRAIN_EPOCHS = 3


#: Starts the clc-dask CLI; with ``--kill-at SPEC`` first, the process SIGKILLs itself at a
#: rename matching SPEC (see tests/faults/killpoint.py).
CLI = [sys.executable, "-c", "from clc_dask.cli import main; main()"]
KILLPOINT = Path(__file__).with_name("killpoint.py")


def start(args: list[str], log: Path, *, tmpdir: Path | None = None, env: dict[str, str] | None = None,
          kill_at: dict | None = None) -> subprocess.Popen:
    """``clc-dask ARGS`` in a new session, output to ``log``; temporary files under ``tmpdir``."""
    extra = {"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    if tmpdir is not None:
        tmpdir.mkdir(parents=True, exist_ok=True)
        extra["TMPDIR"] = str(tmpdir)
    command = CLI if kill_at is None else [sys.executable, str(KILLPOINT), json.dumps(kill_at)]
    with open(log, "wb") as out:
        return subprocess.Popen([*command, *args], stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, env={**os.environ, **extra})


def wait_for(condition: Callable[[], object], proc: subprocess.Popen, log: Path, timeout: float = 240,
             what: str = "the condition") -> object:
    """Poll ``condition`` until it is truthy; fail if ``proc`` ends first or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if proc.poll() is not None:
            raise AssertionError(f"the command ended (code {proc.returncode}) before {what}:\n{tail(log)}")
        time.sleep(0.05)
    raise AssertionError(f"{what} did not happen within {timeout} s:\n{tail(log)}")


def tail(log: Path, chars: int = 3000) -> str:
    return log.read_text(errors="replace")[-chars:] if log.exists() else ""


def descendants(pid: int) -> list[psutil.Process]:
    """Every process started by ``pid`` (children, grandchildren, …)."""
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def listening_ports(processes: Iterable[psutil.Process]) -> set[int]:
    """TCP ports the processes listen on."""
    ports = set()
    for proc in processes:
        try:
            for conn in proc.net_connections(kind="tcp"):
                if conn.status == psutil.CONN_LISTEN:
                    ports.add(conn.laddr.port)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return ports


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    """True if something accepts connections on ``host:port``."""
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex((host, port)) == 0


def stop(proc: subprocess.Popen, signum: int = signal.SIGTERM, timeout: float = 120) -> int:
    """Send ``signum`` to the process (not its group: its children get nothing from us) and
    wait for it to end; returns its exit code."""
    os.kill(proc.pid, signum)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise AssertionError(f"the command did not end within {timeout} s of {signal.Signals(signum).name}") from None


def assert_nothing_left(processes: Iterable[psutil.Process], ports: Iterable[int], tmpdir: Path | None) -> None:
    """No process of the tree alive, no port still answering, nothing left in the temp folder."""
    gone, alive = psutil.wait_procs(list(processes), timeout=20)
    alive = [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    for proc in alive:  # don't leave them to the next test
        proc.kill()
    assert not alive, f"processes left running: {[(p.pid, p.name()) for p in alive]}"
    still = [port for port in ports if port_open(port)]
    assert not still, f"ports still answering: {still}"
    if tmpdir is not None:
        left = sorted(p.relative_to(tmpdir).as_posix() for p in tmpdir.rglob("*"))
        assert not left, f"temporary files left: {left[:10]}"


def partial_files(folder: Path) -> list[str]:
    """Temporary names (``*.clc-partial-*``, ``.stac-partial-*``) under ``folder``."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob(".*") if is_partial(p))


def assert_complete_files_read(store: Path) -> None:
    """Every GeoTIFF under a final name in ``store`` opens and reads (none is half-written)."""
    for path in store.rglob("*.tif"):
        if any(is_partial(p) for p in (path, *path.parents)):
            continue
        with rasterio.open(path) as src:
            src.read()


def manifest_tiles(store: Path) -> list[str]:
    """Finished class tiles of the run in ``store`` (manifest + journal), [] before it exists."""
    from clc_dask.run import Manifest

    try:
        manifest = Manifest.read(store)
    except Exception:  # being replaced at this moment
        return []
    return sorted(manifest.tiles) if manifest is not None else []


def assert_same_training(a, b) -> None:
    """Two run folders end with the same weights and the same history (within 1e-6)."""
    ca, cb = load_checkpoint(a / "checkpoint.pt"), load_checkpoint(b / "checkpoint.pt")
    assert ca.epoch == cb.epoch
    for key, value in cb.state_dict.items():
        np.testing.assert_allclose(ca.state_dict[key].float().numpy(), value.float().numpy(), atol=1e-6,
                                   err_msg=key)
    assert [h["train_loss"] for h in ca.history] == pytest.approx([h["train_loss"] for h in cb.history], abs=1e-6)
