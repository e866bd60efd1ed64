"""The scheduled run on Kubernetes: CronJob → launcher → DaskJob → ``clc-dask run``.

The launcher script runs against a fake ``kubectl`` in each scenario and its Role covers exactly
its calls; the DaskJob runs the ConfigMap's run config on shared storage; workers fit their pods
and GPU workers advertise their GPUs.
"""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from deploy_support import (
    DASK_GROUP,
    K8S,
    RENDERED,
    STANDALONE,
    all_containers,
    effective_argv,
    find,
    load_docs,
    option_value,
)

from clc_dask.cluster import GPU_RESOURCE
from clc_dask.config import parse_run_config
from clc_dask.errors import ConfigError


def quantity_bytes(text: str) -> float:
    """A Kubernetes quantity or a dask memory string in bytes."""
    match = re.fullmatch(r"([\d.]+)\s*([A-Za-z]*)", str(text))
    assert match, text
    units = {"": 1, "k": 1e3, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "Ki": 2**10, "Mi": 2**20,
             "Gi": 2**30, "Ti": 2**40, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40,
             "kB": 1e3, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12, "B": 1}
    return float(match[1]) * units[match[2]]


def run_config_from_configmap(key_path: str, pod: dict, container: dict) -> tuple[dict, str]:
    """The YAML text behind a path that a container reads from a mounted ConfigMap."""
    for mount in container.get("volumeMounts", []):
        prefix = mount["mountPath"].rstrip("/") + "/"
        if key_path.startswith(prefix):
            volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
            assert "configMap" in volume, f"{key_path} is on volume {mount['name']}, not a ConfigMap"
            cm = find(RENDERED, "ConfigMap", volume["configMap"]["name"])
            key = key_path[len(prefix):]
            assert key in cm["data"], f"ConfigMap {cm['metadata']['name']} has no key {key!r}"
            return cm, cm["data"][key]
    raise AssertionError(f"{key_path} is not on any volume mounted in container {container['name']}")


def test_cronjob_launches_one_run_at_a_time():
    cron = find(RENDERED, "CronJob")
    spec = cron["spec"]
    fields = spec["schedule"].split()
    assert len(fields) == 5, f"schedule {spec['schedule']!r} is not a 5-field cron expression"
    assert spec["concurrencyPolicy"] == "Forbid"
    job = spec["jobTemplate"]["spec"]
    pod = job["template"]["spec"]
    assert pod["restartPolicy"] in ("Never", "OnFailure")
    container = pod["containers"][0]
    assert container.get("command"), "the launcher container needs an explicit command"
    # The command is a script from a mounted ConfigMap, and the script is the one in deploy/k8s.
    script_path = next(a for a in container["command"] if a.endswith(".sh"))
    _, script = run_config_from_configmap(script_path, pod, container)
    assert script == (K8S / Path(script_path).name).read_text("utf-8")
    # The manifest the launcher creates is deploy/k8s/daskjob.yaml, and the name it waits on is its name.
    env = {e["name"]: e.get("value") for e in container.get("env", [])}
    _, manifest = run_config_from_configmap(env["DASKJOB_MANIFEST"], pod, container)
    assert manifest == (K8S / "daskjob.yaml").read_text("utf-8")
    daskjob = find(load_docs(K8S / "daskjob.yaml"), "DaskJob")
    assert env["DASKJOB_NAME"] == daskjob["metadata"]["name"]
    assert job.get("backoffLimit", 6) == 0, "a failed run waits for the next schedule (which resumes it)"


def test_rbac_binds_the_launcher():
    cron = find(RENDERED, "CronJob")
    account = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["serviceAccountName"]
    namespace = cron["metadata"]["namespace"]
    sa = find(RENDERED, "ServiceAccount", account)
    assert sa["metadata"]["namespace"] == namespace
    binding = next(b for b in RENDERED if b["kind"] == "RoleBinding"
                   and {"kind": "ServiceAccount", "name": account, "namespace": namespace} in b["subjects"])
    assert binding["metadata"]["namespace"] == namespace
    role = find(RENDERED, binding["roleRef"]["kind"], binding["roleRef"]["name"])
    assert role["kind"] == "Role" and role["metadata"]["namespace"] == namespace


def test_daskjob_runs_clc_dask_run_on_the_configmap_config(monkeypatch):
    daskjob = find(STANDALONE["daskjob.yaml"], "DaskJob")
    pod = daskjob["spec"]["job"]["spec"]
    assert pod.get("restartPolicy") in ("Never", "OnFailure"), "a runner with restartPolicy Always never finishes"
    runner = pod["containers"][0]
    argv = effective_argv(runner)
    assert argv[:2] == ["clc-dask", "run"] and "--resume" in argv, argv
    config_path = option_value(argv, "--config")
    assert config_path, argv
    _, text = run_config_from_configmap(config_path, pod, runner)
    raw = yaml.safe_load(text)
    # The operator gives the runner DASK_SCHEDULER_ADDRESS of the DaskJob's own scheduler.
    assert "DASK_SCHEDULER_ADDRESS" not in {e["name"] for e in runner.get("env", [])}
    namespace = find(RENDERED, "CronJob")["metadata"]["namespace"]
    address = f"tcp://{daskjob['metadata']['name']}-scheduler.{namespace}.svc.cluster.local:8786"
    monkeypatch.setenv("DASK_SCHEDULER_ADDRESS", address)
    config = parse_run_config(raw, source=config_path)
    assert config.cluster.kind == "address" and config.cluster.address is None
    assert config.grid.tile_size == 2048 and config.grid.tile_size % config.grid.chunk_size == 0
    # The checkpoint and the output store lie on one volume that the runner and every worker mount.
    worker_pod = daskjob["spec"]["cluster"]["spec"]["worker"]["spec"]
    for path in (config.model.checkpoint, config.output.store):
        claims = []
        for spec in (pod, worker_pod):
            container = spec["containers"][0]
            mount = next((m for m in container.get("volumeMounts", [])
                          if path.startswith(m["mountPath"].rstrip("/") + "/")), None)
            assert mount, f"{path} is not on a volume of {container['name']}"
            volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
            assert "persistentVolumeClaim" in volume, f"{path} must be on shared storage, not {volume}"
            claims.append(volume["persistentVolumeClaim"]["claimName"])
        assert len(set(claims)) == 1, f"runner and workers see {path} on different volumes: {claims}"
        pvc = find(RENDERED, "PersistentVolumeClaim", claims[0])
        assert "ReadWriteMany" in pvc["spec"]["accessModes"]


def test_configmap_run_config_needs_the_operators_address(monkeypatch):
    monkeypatch.delenv("DASK_SCHEDULER_ADDRESS", raising=False)
    raw = yaml.safe_load(find(RENDERED, "ConfigMap", "clc-dask-run-config")["data"]["run.yaml"])
    with pytest.raises(ConfigError, match="cluster"):
        parse_run_config(raw)


def _gpu_workers() -> list[tuple[str, dict, dict]]:
    return [(w, s, c) for w, s, c in all_containers() if c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu")]


def test_gpu_workers_advertise_their_gpus():
    gpu = _gpu_workers()
    kinds = {w.split()[-2].split("/")[0] for w, _, _ in gpu}
    assert {"DaskWorkerGroup", "DaskJob"} <= kinds, f"GPU workers expected in the worker group and the DaskJob: {kinds}"
    for where, pod, container in gpu:
        count = int(container["resources"]["limits"]["nvidia.com/gpu"])
        argv = effective_argv(container)
        assert argv[:2] == ["dask", "worker"], f"{where}: {argv}"
        assert option_value(argv, "--resources") == f"{GPU_RESOURCE}={count}", (
            f"{where}: a worker with {count} GPU(s) must pass --resources {GPU_RESOURCE}={count}"
        )
        assert container["image"].endswith("-gpu"), f"{where}: GPU workers need the CUDA image"
        assert any(t.get("key") == "nvidia.com/gpu" for t in pod.get("tolerations", [])), (
            f"{where}: tolerate the nvidia.com/gpu taint of GPU nodes"
        )
    gpu_group = find(STANDALONE["daskcluster.yaml"], "DaskWorkerGroup")
    cluster = find(STANDALONE["daskcluster.yaml"], "DaskCluster")
    assert gpu_group["spec"]["cluster"] == cluster["metadata"]["name"]
    assert gpu_group["metadata"].get("namespace") == cluster["metadata"].get("namespace")


def test_workers_fit_their_pods():
    """--nthreads ≤ requested CPUs, --memory-limit ≤ the pod's memory limit; no GPU claim without a GPU."""
    workers = [(w, c) for w, _, c in all_containers() if effective_argv(c)[:2] == ["dask", "worker"]]
    assert len(workers) >= 3
    for where, container in workers:
        argv = effective_argv(container)
        resources = container["resources"]
        threads = option_value(argv, "--nthreads")
        assert threads and int(threads) <= float(resources["requests"]["cpu"]), where
        memory = option_value(argv, "--memory-limit")
        assert memory and quantity_bytes(memory) <= quantity_bytes(resources["limits"]["memory"]), where
        if not resources.get("limits", {}).get("nvidia.com/gpu"):
            assert option_value(argv, "--resources") is None, f"{where} claims a GPU resource without a GPU"


def _fake_kubectl(folder: Path) -> Path:
    """A kubectl that plays a DaskJob's life from a JSON state file and logs every call."""
    script = folder / "kubectl"
    script.write_text(f"#!{sys.executable}\n" + textwrap.dedent('''
        import json, os, sys
        state_path = os.environ["FAKE_KUBECTL_STATE"]
        state = json.load(open(state_path))
        args = sys.argv[1:]
        with open(os.environ["FAKE_KUBECTL_LOG"], "a") as log:
            log.write(json.dumps(args) + "\\n")
        def save():
            json.dump(state, open(state_path, "w"))
        verb = args[0]
        if verb == "get" and args[1] == "daskjob":
            name = args[2]
            if "-o" in args and args[args.index("-o") + 1] == "name":
                if state["exists"]:
                    print(f"daskjob.kubernetes.dask.org/{name}")
                sys.exit(0)
            if state.get("get_errors", 0) > 0:
                state["get_errors"] -= 1
                save()
                print("Unable to connect to the server: timeout", file=sys.stderr)
                sys.exit(1)
            if not state["exists"]:
                print(f'Error from server (NotFound): daskjobs "{name}" not found', file=sys.stderr)
                sys.exit(1)
            statuses = state["statuses"]
            print(statuses.pop(0) if len(statuses) > 1 else statuses[0], end="")
            if state.get("vanish_after") is not None:
                state["vanish_after"] -= 1
                if state["vanish_after"] == 0:
                    state["exists"] = False
            save()
        elif verb == "delete" and args[1] == "daskjob":
            if "--cascade=foreground" not in args:
                print("a background delete returns before the runner pod is gone", file=sys.stderr)
                sys.exit(4)
            state["exists"] = False
            state["deleted"] += 1
            save()
        elif verb == "create" and args[1] == "-f":
            import yaml
            doc = yaml.safe_load(open(args[2]))
            if state.get("create_fails") or doc["kind"] != "DaskJob":
                print("error: create refused", file=sys.stderr)
                sys.exit(1)
            state.update(exists=True, statuses=list(state["after_create"]), created=state["created"] + 1,
                         created_name=doc["metadata"]["name"])
            save()
        elif verb == "logs":
            print("runner: Error: something went wrong")
        else:
            print(f"fake kubectl: unexpected call {args}", file=sys.stderr)
            sys.exit(3)
    '''))
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return script


LAUNCHER_SCENARIOS = {
    # name: (initial state, expected exit code, expected deletes, expected creates)
    "first-run": ({"exists": False, "statuses": [], "after_create": ["", "JobCreated", "Running", "Successful"]}, 0, 0, 1),
    "previous-finished": ({"exists": True, "statuses": ["Successful"], "after_create": ["Running", "Successful"]}, 0, 1, 1),
    "previous-failed": ({"exists": True, "statuses": ["Failed"], "after_create": ["Running", "Successful"]}, 0, 1, 1),
    "previous-still-running": ({"exists": True, "statuses": ["Running", "Running", "Successful"], "after_create": []}, 0, 0, 0),
    "run-fails": ({"exists": False, "statuses": [], "after_create": ["Running", "Failed"]}, 1, 0, 1),
    "create-refused": ({"exists": False, "statuses": [], "after_create": [], "create_fails": True}, 2, 0, 0),
    "api-hiccups": ({"exists": False, "statuses": [], "after_create": ["Running", "Successful"], "get_errors": 3}, 0, 0, 1),
    "deleted-meanwhile": ({"exists": True, "statuses": ["Running"], "after_create": [], "vanish_after": 2}, 1, 0, 0),
}


def run_launcher(tmp_path: Path, state: dict) -> tuple[subprocess.CompletedProcess, dict, list[list[str]]]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    _fake_kubectl(bin_dir)
    state_path, log_path = tmp_path / "state.json", tmp_path / "calls.jsonl"
    state_path.write_text(json.dumps({"deleted": 0, "created": 0, **state}))
    log_path.write_text("")
    cron = find(RENDERED, "CronJob")
    container = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    env = {**os.environ, **{e["name"]: e["value"] for e in container["env"]}}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", POLL_SECONDS="0", DASKJOB_MANIFEST=str(K8S / "daskjob.yaml"),
               FAKE_KUBECTL_STATE=str(state_path), FAKE_KUBECTL_LOG=str(log_path))
    result = subprocess.run(["bash", str(K8S / "launch-daskjob.sh")], env=env, capture_output=True, text=True,
                            timeout=120)
    calls = [json.loads(line) for line in log_path.read_text().splitlines()]
    return result, json.loads(state_path.read_text()), calls


@pytest.fixture(scope="module")
def launcher_runs(tmp_path_factory) -> dict[str, tuple[subprocess.CompletedProcess, dict, list[list[str]]]]:
    """Each launcher scenario run once against the fake kubectl."""
    return {name: run_launcher(tmp_path_factory.mktemp(name), state)
            for name, (state, *_rest) in LAUNCHER_SCENARIOS.items()}


@pytest.mark.parametrize("scenario", LAUNCHER_SCENARIOS)
def test_launcher_runs_one_daskjob_to_completion(launcher_runs, scenario):
    _, code, deletes, creates = LAUNCHER_SCENARIOS[scenario]
    result, final, calls = launcher_runs[scenario]
    assert result.returncode == code, result.stdout + result.stderr
    assert (final["deleted"], final["created"]) == (deletes, creates), calls
    if creates:
        assert final["created_name"] == find(STANDALONE["daskjob.yaml"], "DaskJob")["metadata"]["name"]
        # never create while an earlier DaskJob of that name exists
        assert calls.index(next(c for c in calls if c[0] == "create")) > max(
            (i for i, c in enumerate(calls) if c[0] == "delete"), default=-1)
    if scenario == "run-fails":
        assert "something went wrong" in result.stdout
    if scenario == "previous-still-running":
        assert "waiting for it" in result.stdout
    if scenario == "deleted-meanwhile":
        assert "giving up" in result.stdout


_KUBECTL_RESOURCES = {"daskjob": (DASK_GROUP, "daskjobs"), "daskjobs": (DASK_GROUP, "daskjobs"),
                      "pod": ("", "pods"), "pods": ("", "pods")}


def kubectl_permissions(argv: list[str]) -> set[tuple[str, str, str]]:
    """(apiGroup, resource, verb) the Kubernetes API checks for one kubectl call."""
    verb = argv[0]
    if verb in ("get", "delete"):
        group, resource = _KUBECTL_RESOURCES[argv[1].split("/")[0]]
        verbs = {"get"} if verb == "get" else {"delete", "get", "list", "watch"}  # --wait watches
        return {(group, resource, v) for v in verbs}
    if verb == "create":
        doc = yaml.safe_load(Path(argv[argv.index("-f") + 1]).read_text("utf-8"))
        group = doc["apiVersion"].rpartition("/")[0]
        return {(group, doc["kind"].lower() + "s", "create")}
    if verb == "logs":
        return {("", "pods", "get"), ("", "pods/log", "get")}
    raise AssertionError(f"no permission mapping for kubectl {argv}")


def test_rbac_role_covers_every_launcher_call(launcher_runs):
    needed: set[tuple[str, str, str]] = set()
    for _, _, calls in launcher_runs.values():
        for call in calls:
            needed |= kubectl_permissions(call)
    assert {(DASK_GROUP, "daskjobs", "create"), ("", "pods/log", "get")} <= needed
    role = find(RENDERED, "Role", "clc-dask-launcher")

    def allowed(group: str, resource: str, verb: str) -> bool:
        return any((group in r["apiGroups"] or "*" in r["apiGroups"])
                   and (resource in r["resources"] or "*" in r["resources"])
                   and (verb in r["verbs"] or "*" in r["verbs"]) for r in role["rules"])

    missing = sorted(p for p in needed if not allowed(*p))
    assert not missing, f"Role clc-dask-launcher lacks {missing}"
    # least privilege: nothing beyond the launcher's needs may be written
    writes = {(g, r, v) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]
              for v in rule["verbs"] if v not in ("get", "list", "watch")}
    assert writes <= needed, f"Role grants writes the launcher never makes: {sorted(writes - needed)}"
