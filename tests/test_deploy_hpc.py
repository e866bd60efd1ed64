"""HPC: the dask-jobqueue config and the SLURM batch script, run against a fake ``srun`` with a
real scheduler and worker on loopback.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import yaml
from deploy_support import (
    HPC,
    ROOT,
    Call,
    check_dask_call,
    option_value,
)

from clc_dask.cluster import GPU_RESOURCE


def test_jobqueue_config_makes_gpu_worker_jobs():
    import dask
    from dask_jobqueue.slurm import SLURMJob

    ours = yaml.safe_load((HPC / "jobqueue.yaml").read_text("utf-8"))
    slurm = ours["jobqueue"]["slurm"]
    merged = dask.config.merge(dask.config.get("jobqueue"), ours["jobqueue"])
    with dask.config.set({"jobqueue": merged}):
        script = SLURMJob(scheduler="tcp://127.0.0.1:8786", name="test", config_name="slurm").job_script()
    assert "#SBATCH --gres=gpu:1" in script
    assert f"#SBATCH --cpus-per-task={slurm['cores']}" in script
    assert f"#SBATCH -t {slurm['walltime']}" in script
    assert slurm["processes"] == 1, "one worker per job: each owns the job's one GPU"
    worker_line = next(ln for ln in script.splitlines() if "distributed.cli.dask_worker" in ln)
    tokens = shlex.split(worker_line)
    args = tokens[tokens.index("distributed.cli.dask_worker") + 1:]
    check_dask_call(Call("dask", ("worker", *args), "jobqueue job script"))
    assert option_value(args, "--resources") == f"{GPU_RESOURCE}=1"
    assert option_value(args, "--nthreads") == str(slurm["cores"])


def test_sbatch_directives():
    text = (HPC / "run_slurm.sh").read_text("utf-8")
    directives = dict(
        m.groups() for m in re.finditer(r"^#SBATCH\s+(--[a-z-]+)=(\S+)", text, re.M)
    )
    assert directives["--ntasks-per-node"] == "1"
    assert re.fullmatch(r"gpu(:\w+)?:1", directives["--gres"]), "one GPU per node = one worker per node"
    assert re.fullmatch(r"\d+(-\d+)?(:\d\d){1,2}", directives["--time"])
    # all directives come before the first command, or sbatch ignores them
    first_command = next(i for i, ln in enumerate(text.splitlines()) if ln and not ln.startswith("#"))
    assert all(i < first_command for i, ln in enumerate(text.splitlines()) if ln.startswith("#SBATCH"))


def _session_pids(sid: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getsid(int(entry.name)) == sid:
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def test_run_slurm_script_runs_a_gpu_worker_cluster(tmp_path):
    """The sbatch script inside a fake one-node allocation: a real scheduler and a real worker on
    loopback (srun replaced by a pass-through), then the run, then everything stopped."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(textwrap.dedent("""\
        #!/bin/bash
        echo "$@" >> "$FAKE_SRUN_LOG"
        while [[ $# -gt 0 && $1 == -* ]]; do shift; done
        exec "$@"
    """))
    (bin_dir / "clc-dask").write_text(f"#!{sys.executable}\n" + textwrap.dedent("""\
        import json, os, sys
        from distributed import Client
        address = os.environ["DASK_SCHEDULER_ADDRESS"]
        with Client(address, timeout="30s") as client:
            workers = client.scheduler_info()["workers"]
        scheduler_file = os.path.join(os.environ["CLC_DASK_WORKDIR"], "scheduler.json")
        info = {"argv": sys.argv[1:], "address": address, "scheduler_file": json.load(open(scheduler_file)),
                "workers": [{"resources": w["resources"], "nthreads": w["nthreads"],
                             "memory_limit": w["memory_limit"]} for w in workers.values()]}
        json.dump(info, open(os.environ["FAKE_CLC_OUT"], "w"))
    """))
    for exe in bin_dir.iterdir():
        exe.chmod(0o755)
    out_file = tmp_path / "clc.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "DASK_"))}
    env.update(
        PATH=os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent), env["PATH"]]),
        SLURM_JOB_ID="4242", SLURM_NNODES="1", SLURM_CPUS_PER_TASK="2", SLURM_MEM_PER_NODE="2048",
        TMPDIR=str(tmp_path), CLC_DASK_WORKDIR=str(tmp_path / "work"), CLC_DASK_HOST="127.0.0.1",
        SCHEDULER_PORT="0", DASHBOARD_ADDRESS="127.0.0.1:0",
        FAKE_SRUN_LOG=str(tmp_path / "srun.log"), FAKE_CLC_OUT=str(out_file),
    )
    proc = subprocess.Popen(["bash", str(HPC / "run_slurm.sh")], cwd=ROOT, env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        output, _ = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, output
    info = json.loads(out_file.read_text())
    assert info["argv"] == ["run", "--config", "deploy/configs/turkiye.yaml", "--resume"]
    assert info["address"].startswith("tcp://127.0.0.1:")
    assert info["address"] == info["scheduler_file"]["address"]
    assert info["workers"] == [{"resources": {GPU_RESOURCE: 1}, "nthreads": 2,
                                "memory_limit": 2048 * 9 // 10 * 2**20}]
    srun = (tmp_path / "srun.log").read_text()
    assert "--ntasks=1" in srun and "--cpus-per-task=2" in srun
    # scheduler and worker are gone once the script has ended
    deadline = time.monotonic() + 20
    while (left := _session_pids(proc.pid)) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, f"processes left running after the batch script: {left}"


def test_run_slurm_script_refuses_a_missing_config(tmp_path):
    out = subprocess.run(["bash", str(HPC / "run_slurm.sh"), str(tmp_path / "nope.yaml")], cwd=tmp_path,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "not found" in out.stderr
    assert not (tmp_path / "clc-dask-local").exists(), "nothing may be created for a bad config path"
