"""Deployment files: deploy/ (Docker, Kubernetes, SLURM, run configs) and environment.yml.

Offline and schema-level: every YAML parses; Kubernetes objects validate against the Kubernetes
1.32 OpenAPI schemas (kubernetes-validate, strict: a misspelt field fails instead of being
dropped by the API server) and against the shapes of the dask-kubernetes CRDs; every
``clc-dask`` and ``dask`` command line names real sub-commands and options, asked of the CLIs
themselves; run configs parse with the project's config model; the DaskJob launcher runs
against a fake ``kubectl`` and the SLURM script against a fake ``srun`` with a real scheduler and
worker on loopback; the images' pip steps resolve in a fresh virtual environment.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
import time
import tomllib
import venv
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import referencing
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

from clc_dask.cluster import GPU_RESOURCE
from clc_dask.config import load_run_config, parse_run_config
from clc_dask.errors import ConfigError
from clc_dask.grid import TileGrid, geobox_for_aoi, lonlat_box

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
DOCKER = DEPLOY / "docker"
HPC = DEPLOY / "hpc"
CONFIGS = DEPLOY / "configs"
K8S_VERSION = "1.32"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text("utf-8"))
VERSION = PYPROJECT["project"]["version"]
IMAGE_REPO = "ghcr.io/clc-dask/clc-dask"
#: Image tag → the Dockerfile that builds it.
IMAGES = {f"{IMAGE_REPO}:{VERSION}": DOCKER / "Dockerfile.cpu", f"{IMAGE_REPO}:{VERSION}-gpu": DOCKER / "Dockerfile.gpu"}
DASK_GROUP = "kubernetes.dask.org"
DASK_KINDS = ("DaskCluster", "DaskWorkerGroup", "DaskJob")

DEPLOY_YAMLS = sorted([*DEPLOY.rglob("*.yaml"), *DEPLOY.rglob("*.yml"), ROOT / "environment.yml"])
SHELL_SCRIPTS = sorted(DEPLOY.rglob("*.sh"))
DOCKERFILES = sorted(DOCKER.glob("Dockerfile.*"))


def load_docs(path: Path) -> list[Any]:
    """The non-empty YAML documents of a file."""
    return [doc for doc in yaml.safe_load_all(path.read_text("utf-8")) if doc is not None]


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


# --------------------------------------------------------------------------------------------
# Kubernetes objects: what `kubectl apply -k deploy/k8s` creates, plus the standalone manifests
# --------------------------------------------------------------------------------------------

_CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "PersistentVolume", "StorageClass"}


def kustomize_render(folder: Path = K8S) -> list[dict]:
    """The objects `kubectl kustomize folder` renders (resources, ConfigMap generators, namespace).

    Covers the kustomize features deploy/k8s uses; test_kustomize_matches_kubectl checks it
    against the real kubectl where one is installed.
    """
    kust = yaml.safe_load((folder / "kustomization.yaml").read_text("utf-8"))
    objects: list[dict] = []
    for resource in kust.get("resources", []):
        objects.extend(load_docs(folder / resource))
    options = kust.get("generatorOptions", {})
    assert options.get("disableNameSuffixHash"), "generated names must stay fixed: the manifests refer to them"
    for gen in kust.get("configMapGenerator", []):
        data = {Path(f).name: (folder / f).read_text("utf-8") for f in gen.get("files", [])}
        cm = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": gen["name"]}, "data": data}
        if options.get("labels"):
            cm["metadata"]["labels"] = dict(options["labels"])
        objects.append(cm)
    namespace = kust.get("namespace")
    if namespace:
        for obj in objects:
            if obj["kind"] not in _CLUSTER_SCOPED:
                obj["metadata"]["namespace"] = namespace
    return objects


RENDERED = kustomize_render()
STANDALONE = {name: load_docs(K8S / name) for name in ("daskcluster.yaml", "daskjob.yaml")}


def find(objects: list[dict], kind: str, name: str | None = None) -> dict:
    matches = [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(matches) == 1, f"expected one {kind} {name or ''}, found {len(matches)}"
    return matches[0]


def all_k8s_objects() -> list[tuple[str, dict]]:
    """(where, object) for every Kubernetes object under deploy/k8s (kustomize output included)."""
    found = [("kustomize deploy/k8s", o) for o in RENDERED]
    for name, docs in STANDALONE.items():
        found.extend((f"deploy/k8s/{name}", d) for d in docs)
    return found


def pod_specs(obj: dict) -> list[tuple[str, dict]]:
    """(role, PodSpec) of every pod an object makes."""
    kind, spec = obj["kind"], obj.get("spec", {})
    if kind == "CronJob":
        return [("launcher", spec["jobTemplate"]["spec"]["template"]["spec"])]
    if kind == "DaskCluster":
        return [("scheduler", spec["scheduler"]["spec"]), ("worker", spec["worker"]["spec"])]
    if kind == "DaskWorkerGroup":
        return [("worker", spec["worker"]["spec"])]
    if kind == "DaskJob":
        cluster = spec["cluster"]["spec"]
        return [("runner", spec["job"]["spec"]), ("scheduler", cluster["scheduler"]["spec"]),
                ("worker", cluster["worker"]["spec"])]
    return []


def all_containers() -> list[tuple[str, dict, dict]]:
    """(where, pod spec, container) for every container of every pod under deploy/k8s."""
    out = []
    for where, obj in all_k8s_objects():
        for role, spec in pod_specs(obj):
            for container in spec["containers"]:
                out.append((f"{where} {obj['kind']}/{obj['metadata']['name']} {role}/{container['name']}",
                            spec, container))
    return out


# --------------------------------------------------------------------------------------------
# Dockerfiles
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    keyword: str
    value: str
    line: int


def parse_dockerfile(path: Path) -> list[Instruction]:
    """Instructions of a Dockerfile, continuation lines joined and comments dropped."""
    out: list[Instruction] = []
    buffer, start = "", 0
    for number, raw in enumerate(path.read_text("utf-8").splitlines(), 1):
        stripped = raw.strip()
        if not buffer and (not stripped or stripped.startswith("#")):
            continue
        if buffer and stripped.startswith("#"):
            continue  # comment lines inside a continued instruction are removed by Docker
        if not buffer:
            start = number
        if stripped.endswith("\\"):
            buffer += stripped[:-1] + " "
            continue
        buffer += stripped
        keyword, _, value = buffer.partition(" ")
        out.append(Instruction(keyword.upper(), value.strip(), start))
        buffer = ""
    assert not buffer, f"{path}: dangling line continuation"
    return out


def final_stage(instructions: list[Instruction]) -> list[Instruction]:
    starts = [i for i, ins in enumerate(instructions) if ins.keyword == "FROM"]
    return instructions[starts[-1]:]


def exec_form(value: str) -> list[str]:
    """An ENTRYPOINT/CMD value as argv (exec form required: a shell form would swallow signals)."""
    argv = json.loads(value)
    assert isinstance(argv, list) and all(isinstance(a, str) for a in argv), value
    return argv


def image_argv(dockerfile: Path) -> tuple[list[str], list[str]]:
    """(ENTRYPOINT, CMD) of the image a Dockerfile builds."""
    stage = final_stage(parse_dockerfile(dockerfile))
    entry = [exec_form(i.value) for i in stage if i.keyword == "ENTRYPOINT"]
    cmd = [exec_form(i.value) for i in stage if i.keyword == "CMD"]
    return (entry[-1] if entry else []), (cmd[-1] if cmd else [])


def copy_sources(ins: Instruction) -> tuple[list[str], str] | None:
    """(sources, destination) of a COPY/ADD from the build context; None for COPY --from."""
    tokens = exec_form(ins.value) if ins.value.startswith("[") else shlex.split(ins.value)
    flags = [t for t in tokens if t.startswith("--")]
    if any(f.startswith("--from=") for f in flags):
        return None
    paths = [t for t in tokens if not t.startswith("--")]
    return paths[:-1], paths[-1]


def dockerignore_excludes(path: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore rule: the last pattern matching the path or a parent decides."""
    def regex(pattern: str) -> re.Pattern[str]:
        out, i = "", 0
        while i < len(pattern):
            if pattern.startswith("**", i):
                out += ".*"
                i += 2
            elif pattern[i] == "*":
                out += "[^/]*"
                i += 1
            elif pattern[i] == "?":
                out += "[^/]"
                i += 1
            else:
                out += re.escape(pattern[i])
                i += 1
        return re.compile(out + r"\Z")

    parts = Path(path).parts
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        body = pattern[1:] if negate else pattern
        body = os.path.normpath(body.strip().lstrip("/"))
        if any(regex(body).match(c) for c in candidates):
            excluded = not negate
    return excluded


def dockerignore_patterns() -> list[str]:
    path = ROOT / ".dockerignore"
    if not path.exists():
        return []
    return [ln.strip() for ln in path.read_text("utf-8").splitlines() if ln.strip() and not ln.startswith("#")]


def pip_install_commands(dockerfile: Path) -> list[tuple[str, list[str]]]:
    """(WORKDIR, pip arguments after `install`) of each pip install in the final stage."""
    workdir, found = "/", []
    for ins in final_stage(parse_dockerfile(dockerfile)):
        if ins.keyword == "WORKDIR":
            workdir = os.path.join(workdir, ins.value)
        if ins.keyword != "RUN":
            continue
        for part in re.split(r"&&|;", ins.value):
            tokens = shlex.split(part)
            for prefix in (["pip", "install"], ["python", "-m", "pip", "install"], ["pip3", "install"]):
                if tokens[: len(prefix)] == prefix:
                    found.append((workdir, tokens[len(prefix):]))
    return found


def stage_build_context(dockerfile: Path, target: Path) -> None:
    """Copy what the Dockerfile's COPY instructions put in the image into target (as /)."""
    workdir = "/"
    patterns = dockerignore_patterns()
    for ins in final_stage(parse_dockerfile(dockerfile)):
        if ins.keyword == "WORKDIR":
            workdir = os.path.join(workdir, ins.value)
        if ins.keyword not in ("COPY", "ADD"):
            continue
        parsed = copy_sources(ins)
        if parsed is None:
            continue
        sources, dest = parsed
        dest_path = target / os.path.join(workdir, dest).lstrip("/")
        into_dir = dest.endswith("/") or dest in (".", "./") or len(sources) > 1
        for source in sources:
            src = ROOT / source
            if src.is_dir():  # Docker copies a folder's contents into the destination
                files = [(f, dest_path / f.relative_to(src)) for f in src.rglob("*") if f.is_file()]
            else:
                files = [(src, dest_path / src.name if into_dir else dest_path)]
            for file, out in files:
                if dockerignore_excludes(str(file.relative_to(ROOT)), patterns):
                    continue
                out.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(file, out)


# --------------------------------------------------------------------------------------------
# Command lines: extraction from manifests, scripts and comments; validation against the CLIs
# --------------------------------------------------------------------------------------------


def clc_dask_command() -> Any:
    """The click group behind `clc-dask`, built from the typer app as the entry point does."""
    import typer.main

    from clc_dask.cli import app

    return typer.main.get_command(app)


def dask_command() -> dict[str, Any]:
    """`dask` sub-commands, found through the same entry points the `dask` CLI loads."""
    return {ep.name: ep.load() for ep in entry_points(group="dask_cli")}


def check_call(command: Any, args: list[str], where: str) -> None:
    """Fail unless `args` is a call of a click command: known sub-commands and options, values
    for options that take them, required options present, no surplus positional arguments.
    Values themselves are not checked (paths live inside containers)."""
    name = command.name
    options: dict[str, Any] = {}
    for param in command.params:
        if param.param_type_name == "option":
            for opt in [*param.opts, *param.secondary_opts]:
                options[opt] = param
    positional_params = [p for p in command.params if p.param_type_name == "argument"]
    is_group = hasattr(command, "commands")
    seen, positional, i = set(), [], 0
    while i < len(args):
        token = args[i]
        if token == "--help" and command.add_help_option:
            return
        if token.startswith("-") and token != "-":
            opt, eq, _ = token.partition("=")
            if opt not in options and not opt.startswith("--") and len(opt) > 2:
                opt = opt[:2]  # click's short option with an attached value (-v2)
            assert opt in options, (
                f"{where}: `{name}` has no option {opt!r}; it has {sorted(o for o in options if o.startswith('--'))}"
            )
            param = options[opt]
            seen.add(param.name)
            takes_value = not (getattr(param, "is_flag", False) or getattr(param, "count", False))
            if takes_value and not eq:
                i += max(param.nargs, 1)
                assert i < len(args), f"{where}: option {opt} of `{name}` needs a value"
            assert takes_value or not eq, f"{where}: flag {opt} of `{name}` takes no value"
            i += 1
            continue
        if is_group:
            known = sorted(command.commands)
            assert token in command.commands, (
                f"{where}: `{name}` has no sub-command {token!r} (it has {known}); deploy/ refers to "
                f"`{name} {token}`"
            )
            check_call(command.commands[token], args[i + 1:], where)
            return
        positional.append(token)
        i += 1
    if is_group:
        raise AssertionError(f"{where}: `{name}` called without a sub-command")
    capacity = sum(float("inf") if p.nargs < 0 else p.nargs for p in positional_params)
    assert len(positional) <= capacity, f"{where}: `{name}` takes {capacity} arguments, got {positional}"
    missing = [p.name for p in command.params if p.param_type_name == "option" and p.required and p.name not in seen]
    assert not missing, f"{where}: `{name}` is called without its required option(s) {missing}"
    required_args = sum(p.nargs for p in positional_params if p.required and p.nargs > 0)
    assert len(positional) >= required_args, f"{where}: `{name}` needs {required_args} argument(s)"


@dataclass(frozen=True)
class Call:
    program: str  # "clc-dask" or "dask"
    args: tuple[str, ...]
    where: str


_TERMINATORS = {"&", "&&", "||", ";", "|", ")"}


def _strip_substitutions(line: str) -> str:
    """Replace $( ... ) command substitutions (balanced) with a placeholder word."""
    out, i = "", 0
    while i < len(line):
        if line.startswith("$(", i):
            depth, j = 1, i + 2
            while j < len(line) and depth:
                depth += {"(": 1, ")": -1}.get(line[j], 0)
                j += 1
            out += "SUBSTITUTED"
            i = j
        else:
            out += line[i]
            i += 1
    return out


def _logical_shell_lines(text: str) -> list[tuple[int, str]]:
    """Non-comment shell lines with continuations joined and here-document bodies skipped."""
    lines, buffer, start, heredoc = [], "", 0, None
    for number, raw in enumerate(text.splitlines(), 1):
        if heredoc is not None:
            if raw.strip() == heredoc:
                heredoc = None
            continue
        if not buffer and raw.lstrip().startswith("#"):
            continue
        if not buffer:
            start = number
        if raw.rstrip().endswith("\\"):
            buffer += raw.rstrip()[:-1] + " "
            continue
        buffer += raw
        match = re.search(r"<<-?\s*['\"]?(\w+)['\"]?", buffer)
        if match:
            heredoc = match[1]
        lines.append((start, buffer))
        buffer = ""
    return lines


def shell_calls(path: Path) -> list[Call]:
    """clc-dask/dask invocations in a shell script (arrays expanded to everything appended to them)."""
    text = path.read_text("utf-8")
    arrays: dict[str, list[str]] = {}
    for match in re.finditer(r"^\s*(?:if .*then\s+)?(\w+)\+?=\((.*?)\)", text, re.M):
        arrays.setdefault(match[1], []).extend(shlex.split(_strip_substitutions(match[2])))
    calls = []
    for number, line in _logical_shell_lines(text):
        if not re.search(r"(^|\s)(clc-dask|dask)(\s|$)", line):
            continue
        tokens = shlex.split(_strip_substitutions(line), comments=True)
        for idx, token in enumerate(tokens):
            if token not in ("clc-dask", "dask"):
                continue
            before = tokens[:idx]
            command_position = (
                not before or before[-1] in ("exec", "then", "do", "&&", "||", ";")
                or (before[0] == "srun" and all(t.startswith("-") for t in before[1:]))
                or all(re.match(r"^\w+=", t) for t in before)
            )
            if not command_position:
                continue
            args: list[str] = []
            for tok in tokens[idx + 1:]:
                if tok in _TERMINATORS:
                    break
                array = re.fullmatch(r"\$\{(\w+)\[@\].*\}", tok)
                args.extend(arrays.get(array[1], []) if array else [tok])
            calls.append(Call(token, tuple(args), f"{_rel(path)}:{number}"))
    return calls


_COMMENT_MENTION = re.compile(
    r"(?:^|`|&&\s+|;\s+|\b[A-Z_][A-Z0-9_]*=\S+\s+)clc-dask[ \t]+([^`\n]*)"
)


def comment_calls(path: Path) -> list[Call]:
    """clc-dask command lines quoted in comments (usage examples), checked like real ones."""
    calls = []
    for number, raw in enumerate(path.read_text("utf-8").splitlines(), 1):
        stripped = raw.strip()
        if "#" not in stripped:
            continue
        text = stripped[stripped.index("#"):].lstrip("#").strip()
        for match in _COMMENT_MENTION.finditer(text):
            rest = re.split(r"\s(?:&&|\|\||\|)\s|;|\s#", match[1])[0]
            calls.append(Call("clc-dask", tuple(shlex.split(rest)), f"{_rel(path)}:{number} (comment)"))
    return calls


def effective_argv(container: dict) -> list[str]:
    """The argv a container runs: command/args over the image's ENTRYPOINT/CMD, tini removed."""
    dockerfile = IMAGES.get(container["image"])
    entry, cmd = image_argv(dockerfile) if dockerfile else ([], [])
    if "command" in container:
        argv = [*container["command"], *container.get("args", [])]
    else:
        assert dockerfile, f"container {container['name']} uses {container['image']} without a command"
        argv = [*entry, *container.get("args", cmd)]
    if argv[:2] == ["tini", "--"]:
        argv = argv[2:]
    return argv


def container_calls() -> list[Call]:
    calls = []
    for where, _, container in all_containers():
        argv = effective_argv(container)
        if argv and argv[0] in ("clc-dask", "dask"):
            calls.append(Call(argv[0], tuple(argv[1:]), where))
    return calls


def dockerfile_calls() -> list[Call]:
    calls = []
    for dockerfile in DOCKERFILES:
        entry, cmd = image_argv(dockerfile)
        argv = [*entry, *cmd]
        if argv[:2] == ["tini", "--"]:
            argv = argv[2:]
        if argv and argv[0] == "clc-dask":
            calls.append(Call("clc-dask", tuple(argv[1:]), f"{_rel(dockerfile)} ENTRYPOINT+CMD"))
    return calls


def every_call() -> list[Call]:
    calls = container_calls() + dockerfile_calls()
    for script in SHELL_SCRIPTS:
        calls += shell_calls(script)
    for path in [*DEPLOY_YAMLS, *SHELL_SCRIPTS, *DOCKERFILES]:
        calls += comment_calls(path)
    return calls


CALLS = every_call()


def check_dask_call(call: Call) -> None:
    commands = dask_command()
    assert call.args and call.args[0] in commands, (
        f"{call.where}: `dask {call.args[:1]}` is not a dask sub-command (known: {sorted(commands)})"
    )
    check_call(commands[call.args[0]], list(call.args[1:]), call.where)


def option_value(args: list[str] | tuple[str, ...], option: str) -> str | None:
    """The value given to `option` in an argv (``--opt value`` or ``--opt=value``)."""
    args = list(args)
    for i, token in enumerate(args):
        if token == option and i + 1 < len(args):
            return args[i + 1]
        if token.startswith(option + "="):
            return token.split("=", 1)[1]
    return None


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


# ============================================================================================
# Tests: YAML and Kubernetes schemas
# ============================================================================================


@pytest.mark.parametrize("path", DEPLOY_YAMLS, ids=_rel)
def test_every_yaml_parses(path):
    docs = load_docs(path)
    assert docs, f"{_rel(path)} holds no YAML document"
    for doc in docs:
        assert isinstance(doc, dict), f"{_rel(path)}: a document is a {type(doc).__name__}, not a mapping"


def test_deploy_tree_is_complete():
    expected = [
        "docker/Dockerfile.cpu", "docker/Dockerfile.gpu", "k8s/daskcluster.yaml", "k8s/cronjob.yaml",
        "k8s/rbac.yaml", "k8s/configmap.yaml", "k8s/daskjob.yaml", "hpc/jobqueue.yaml", "hpc/run_slurm.sh",
        "configs/italy.yaml", "configs/turkiye.yaml", "configs/demo.yaml",
    ]
    missing = [p for p in expected if not (DEPLOY / p).is_file()]
    assert not missing, f"missing under deploy/: {missing}"
    for path in [*DEPLOY_YAMLS, *SHELL_SCRIPTS, *DOCKERFILES]:
        first = path.read_text("utf-8").lstrip().splitlines()[0]
        if first.startswith("#!"):
            first = path.read_text("utf-8").splitlines()[1]
        assert first.startswith("#"), f"{_rel(path)} should open with a comment saying what it is and how to use it"


@pytest.mark.parametrize("path", sorted(K8S.glob("*.yaml")), ids=_rel)
def test_k8s_documents_have_identity(path):
    for doc in load_docs(path):
        assert doc.get("apiVersion") and doc.get("kind"), f"{_rel(path)}: document without apiVersion/kind"
        if doc["kind"] == "Kustomization":
            continue
        assert doc.get("metadata", {}).get("name"), f"{_rel(path)}: {doc['kind']} without metadata.name"
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"]), doc["metadata"]["name"]


def _builtin_objects() -> list[tuple[str, dict]]:
    return [(w, o) for w, o in all_k8s_objects() if not o["apiVersion"].startswith(DASK_GROUP)]


@pytest.mark.parametrize("where,obj", _builtin_objects(),
                         ids=lambda x: x if isinstance(x, str) else f"{x['kind']}/{x['metadata']['name']}")
def test_builtin_objects_match_kubernetes_schema(where, obj):
    try:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        path = ".".join(str(p) for p in exc.path)
        pytest.fail(f"{where}: {obj['kind']}/{obj['metadata']['name']} at {path}: {exc.message}")


# The dask-kubernetes CRDs (operator 2026.3, customresources/templates.yaml), with the pod and
# service specs of Kubernetes itself. additionalProperties: false marks fields the API server
# would silently prune.
_DEFS = "https://kubernetes.io/api/_definitions.json#/$defs/"
_META = {"type": "object", "additionalProperties": False, "properties": {
    "labels": {"type": "object", "additionalProperties": {"type": "string"}},
    "annotations": {"type": "object", "additionalProperties": {"type": "string"}}}}
_WORKER = {"type": "object", "required": ["spec"], "additionalProperties": False, "properties": {
    "replicas": {"type": "integer", "minimum": 0}, "metadata": _META,
    "spec": {"$ref": _DEFS + "io.k8s.api.core.v1.PodSpec"}}}
_SCHEDULER = {"type": "object", "required": ["spec", "service"], "additionalProperties": False, "properties": {
    "metadata": _META, "spec": {"$ref": _DEFS + "io.k8s.api.core.v1.PodSpec"},
    "service": {"$ref": _DEFS + "io.k8s.api.core.v1.ServiceSpec"}}}
_CLUSTER_SPEC = {"type": "object", "required": ["scheduler", "worker"], "additionalProperties": False,
                 "properties": {"idleTimeout": {"type": "integer"}, "scheduler": _SCHEDULER, "worker": _WORKER}}


def _custom_resource(kind: str, spec: dict) -> dict:
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "type": "object",
            "required": ["apiVersion", "kind", "metadata", "spec"], "additionalProperties": False,
            "properties": {"apiVersion": {"const": f"{DASK_GROUP}/v1"}, "kind": {"const": kind},
                           "metadata": {"$ref": _DEFS + "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"},
                           "spec": spec}}


DASK_SCHEMAS = {
    "DaskCluster": _custom_resource("DaskCluster", _CLUSTER_SPEC),
    "DaskWorkerGroup": _custom_resource("DaskWorkerGroup", {
        "type": "object", "required": ["cluster", "worker"], "additionalProperties": False,
        "properties": {"cluster": {"type": "string"}, "worker": _WORKER}}),
    "DaskJob": _custom_resource("DaskJob", {
        "type": "object", "required": ["cluster", "job"], "additionalProperties": False, "properties": {
            "job": {"type": "object", "required": ["spec"], "additionalProperties": False,
                    "properties": {"metadata": _META, "spec": {"$ref": _DEFS + "io.k8s.api.core.v1.PodSpec"}}},
            "cluster": {"type": "object", "required": ["spec"], "additionalProperties": False,
                        "properties": {"metadata": _META, "spec": _CLUSTER_SPEC}}}}),
}


def dask_validator(kind: str) -> jsonschema.protocols.Validator:
    import importlib_resources

    folder = importlib_resources.files("kubernetes_validate") / "kubernetes-json-schema"
    strict = folder / f"v{K8S_VERSION}.0-local-strict" / "_definitions.json"
    definitions = referencing.Resource.from_contents(json.loads(strict.read_text("utf-8")))
    registry = definitions @ referencing.Registry()
    return jsonschema.Draft202012Validator(DASK_SCHEMAS[kind], registry=registry)


def _dask_objects() -> list[tuple[str, dict]]:
    return [(w, o) for w, o in all_k8s_objects() if o["apiVersion"].startswith(DASK_GROUP)]


@pytest.mark.parametrize("where,obj", _dask_objects(),
                         ids=lambda x: x if isinstance(x, str) else f"{x['kind']}/{x['metadata']['name']}")
def test_dask_resources_match_crd_schema(where, obj):
    assert obj["kind"] in DASK_KINDS and obj["apiVersion"] == f"{DASK_GROUP}/v1", obj["kind"]
    errors = sorted(dask_validator(obj["kind"]).iter_errors(obj), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{where} at {'.'.join(map(str, e.path))}: {e.message}" for e in errors)


def test_schema_checks_catch_mistakes():
    """The validators used above do reject what the API server would reject or silently drop."""
    job = copy.deepcopy(find(STANDALONE["daskjob.yaml"], "DaskJob"))
    job["spec"]["cluster"]["spec"]["worker"]["spec"]["containers"][0]["comand"] = ["dask"]
    assert list(dask_validator("DaskJob").iter_errors(job))
    del job["spec"]["cluster"]["spec"]["worker"]["spec"]["containers"][0]["comand"]
    del job["spec"]["cluster"]["spec"]["scheduler"]["service"]
    assert list(dask_validator("DaskJob").iter_errors(job))
    cron = copy.deepcopy(find(RENDERED, "CronJob"))
    cron["spec"]["concurrencyPolicy"] = 5
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(cron, K8S_VERSION, strict=True)
    cron = copy.deepcopy(find(RENDERED, "CronJob"))
    cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["args"] = [8]
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(cron, K8S_VERSION, strict=True)


def test_kustomize_matches_kubectl():
    """Our reading of deploy/k8s/kustomization.yaml equals what kubectl renders (when installed)."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: the kustomize rendering is checked in Python only")
    out = subprocess.run([kubectl, "kustomize", str(K8S)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    rendered = [d for d in yaml.safe_load_all(out.stdout) if d]

    def key(o: dict) -> tuple:
        return (o["kind"], o["metadata"]["name"], o["metadata"].get("namespace"))

    assert sorted(map(key, rendered)) == sorted(map(key, RENDERED))
    ours = {key(o): o for o in RENDERED}
    for obj in rendered:
        assert obj == ours[key(obj)], f"{key(obj)} differs between kubectl kustomize and the test's reading"


def test_images_are_built_here():
    """Every clc-dask image a manifest names is one of deploy/docker's, at the package version."""
    for where, _, container in all_containers():
        image = container["image"]
        if image.startswith(IMAGE_REPO):
            assert image in IMAGES, f"{where}: {image} is not built by deploy/docker (tags: {sorted(IMAGES)})"
        else:
            assert ":" in image and not image.endswith(":latest"), f"{where}: pin a tag for {image}"


# ============================================================================================
# Tests: the scheduled run (CronJob → launcher → DaskJob → clc-dask run)
# ============================================================================================


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


def test_shell_scripts_parse():
    for script in SHELL_SCRIPTS:
        out = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert out.returncode == 0, f"{_rel(script)}: {out.stderr}"
        assert script.read_text("utf-8").startswith("#!/bin/bash"), f"{_rel(script)}: needs a bash shebang"
        assert "set -euo pipefail" in script.read_text("utf-8"), f"{_rel(script)}: fail on errors"


# ============================================================================================
# Tests: command lines everywhere in deploy/
# ============================================================================================


def test_commands_found_where_expected():
    """The extraction sees the runs that matter (so the checks below cannot pass vacuously)."""
    runs = [c for c in CALLS if c.program == "clc-dask" and c.args[:1] == ("run",)]
    places = {c.where.split(":")[0].split()[0] for c in runs}
    assert {"deploy/k8s/daskjob.yaml", "deploy/hpc/run_slurm.sh"} <= places, places
    workers = [c for c in CALLS if c.program == "dask" and c.args[:1] == ("worker",)]
    assert any("run_slurm.sh" in c.where for c in workers) and len(workers) >= 4


@pytest.mark.parametrize("call", [c for c in CALLS if c.program == "clc-dask"], ids=lambda c: c.where)
def test_clc_dask_commands_exist(call):
    check_call(clc_dask_command(), list(call.args), call.where)


@pytest.mark.parametrize("call", [c for c in CALLS if c.program == "dask"], ids=lambda c: c.where)
def test_dask_commands_exist(call):
    check_dask_call(call)


def test_command_check_rejects_mistakes():
    group = clc_dask_command()
    first = sorted(group.commands)[0]
    with pytest.raises(AssertionError, match="no sub-command"):
        check_call(group, ["no-such-command"], "test")
    with pytest.raises(AssertionError, match="no option"):
        check_call(group, [first, "--no-such-option"], "test")
    with pytest.raises(AssertionError, match="no option"):
        check_dask_call(Call("dask", ("worker", "--gpus", "1"), "test"))
    with pytest.raises(AssertionError, match="needs a value"):
        check_dask_call(Call("dask", ("worker", "--resources"), "test"))
    check_dask_call(Call("dask", ("worker", "tcp://h:8786", "--resources", "GPU=1", "--no-dashboard"), "test"))


# ============================================================================================
# Tests: run configs
# ============================================================================================


@pytest.mark.parametrize("path", sorted(p for p in CONFIGS.glob("*.yaml") if not p.name.startswith("experiment-")),
                         ids=_rel)
def test_run_configs_parse(path, monkeypatch):
    monkeypatch.setenv("DASK_SCHEDULER_ADDRESS", "tcp://127.0.0.1:8786")
    config = load_run_config(path)
    assert config.grid.tile_size % config.grid.chunk_size == 0
    # relative paths resolve against the config's folder
    assert Path(config.output.store).is_relative_to(path.parent.resolve()) or path.stem == "demo"
    if path.stem == "demo":  # the demo's working folder of the README: clc-dask demo --workdir demo-run
        for p in (config.output.store, config.model.checkpoint, config.imagery.source):
            assert Path(p).is_relative_to(ROOT / "demo-run"), p


@pytest.mark.parametrize("name,epsg,bbox_centre", [
    ("italy", 32632, (11.6, 43.07)),       # southern Tuscany
    ("turkiye", 32635, (26.6, 40.0)),      # Çanakkale
])
def test_paper_regions(name, epsg, bbox_centre, monkeypatch):
    """The paper's test areas: 20 tiles of 2048 px (1_1 … 4_5, with 4_3 and 3_2), 10 m,
    April + September 2018, NRG, CLC Level 2, generalized to 25 ha / 100 m."""
    monkeypatch.setenv("DASK_SCHEDULER_ADDRESS", "tcp://127.0.0.1:8786")
    config = load_run_config(CONFIGS / f"{name}.yaml")
    assert config.grid.epsg == epsg and config.grid.resolution == 10.0 and config.grid.tile_size == 2048
    west, south, east, north = config.aoi.bbox
    assert west < bbox_centre[0] < east and south < bbox_centre[1] < north
    grid = TileGrid(geobox_for_aoi(lonlat_box(config.aoi.bbox), epsg, config.grid.resolution), config.grid.tile_size)
    assert grid.shape == (4, 5) and len(grid) == 20
    assert [t.name for t in grid.select(["4_3", "3_2"])] == ["4_3", "3_2"]  # the paper's Tables 4 and 5
    assert grid.tile("3_2").geobox.shape == (2048, 2048)
    assert config.imagery.year == 2018 and config.imagery.seasons == ["april", "september"]
    assert config.imagery.source == "earth-search" and config.imagery.composite == "nrg"
    assert config.classes.level == 2
    assert (config.generalize.mmu_ha, config.generalize.min_width_m) == (25, 100)


def test_address_configs_need_a_scheduler(monkeypatch):
    """turkiye.yaml connects to DASK_SCHEDULER_ADDRESS, which run_slurm.sh exports."""
    monkeypatch.delenv("DASK_SCHEDULER_ADDRESS", raising=False)
    with pytest.raises(ConfigError, match="cluster"):
        load_run_config(CONFIGS / "turkiye.yaml")
    assert "export DASK_SCHEDULER_ADDRESS" in (HPC / "run_slurm.sh").read_text("utf-8")


# ============================================================================================
# Tests: HPC (dask-jobqueue and the sbatch script)
# ============================================================================================


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


# ============================================================================================
# Tests: Dockerfiles and the images' install steps
# ============================================================================================


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=_rel)
def test_dockerfile_copies_existing_files(dockerfile):
    patterns = dockerignore_patterns()
    copied = []
    for ins in final_stage(parse_dockerfile(dockerfile)):
        if ins.keyword in ("COPY", "ADD"):
            parsed = copy_sources(ins)
            if parsed is None:
                continue
            for source in parsed[0]:
                assert (ROOT / source).exists(), f"{_rel(dockerfile)}:{ins.line}: COPY of missing {source}"
                assert not dockerignore_excludes(source, patterns), f"{source} is excluded by .dockerignore"
                copied.append(source)
    # everything pyproject.toml needs to build the package is in the image
    assert {"pyproject.toml", "README.md", "constraints.txt", "clc_dask"} <= set(copied)
    assert PYPROJECT["project"]["readme"] in copied
    # every pip install honours the repository's constraints
    installs = pip_install_commands(dockerfile)
    assert len(installs) >= 2
    for _, args in installs:
        assert option_value(args, "-c") == "constraints.txt", f"{_rel(dockerfile)}: pip install {args} without -c constraints.txt"


def test_dockerignore_keeps_the_context_small():
    patterns = dockerignore_patterns()
    for path in ("tests/test_deploy.py", ".git/config", "notebooks/x.ipynb", "clc_dask/__pycache__/cli.pyc",
                 "demo-run/run/1_1.tif"):
        assert dockerignore_excludes(path, patterns), f"{path} would be sent to the Docker daemon"
    for path in ("clc_dask/cli/__init__.py", "clc_dask/data/clc_legend.csv", "pyproject.toml"):
        assert not dockerignore_excludes(path, patterns), f"{path} is needed by the image"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=_rel)
def test_dockerfile_runs_the_cli_as_non_root(dockerfile):
    stage = final_stage(parse_dockerfile(dockerfile))
    users = [i.value for i in stage if i.keyword == "USER"]
    assert users, f"{_rel(dockerfile)}: no USER: the image would run as root"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, f"{_rel(dockerfile)}: USER {users[-1]} (numeric non-root for runAsNonRoot)"
    for _, pod, container in all_containers():
        if IMAGES.get(container["image"]) == dockerfile:
            context = {**pod.get("securityContext", {}), **container.get("securityContext", {})}
            assert context.get("runAsUser") in (None, int(uid)), "pods run the image's user"
    entry, cmd = image_argv(dockerfile)
    assert entry[-1] == "clc-dask", f"{_rel(dockerfile)}: ENTRYPOINT {entry}"
    assert not [i for i in stage if i.keyword == "HEALTHCHECK"]


def test_dockerfile_bases_and_torch_builds():
    cpu = parse_dockerfile(DOCKER / "Dockerfile.cpu")
    gpu = parse_dockerfile(DOCKER / "Dockerfile.gpu")
    assert final_stage(cpu)[0].value == "python:3.11-slim"
    args = {i.value.split("=", 1)[0]: i.value.split("=", 1)[1] for i in gpu if i.keyword == "ARG" and "=" in i.value}
    base = final_stage(gpu)[0].value
    base = re.sub(r"\$\{(\w+)\}", lambda m: args[m[1]], base)
    assert re.fullmatch(r"nvidia/cuda:\d+\.\d+\.\d+-(cudnn-)?runtime-ubuntu\d\d\.\d\d", base), base
    cpu_installs = pip_install_commands(DOCKER / "Dockerfile.cpu")
    torch_step = next(a for _, a in cpu_installs if "torch" in a)
    assert option_value(torch_step, "--index-url") == "https://download.pytorch.org/whl/cpu"
    gpu_installs = pip_install_commands(DOCKER / "Dockerfile.gpu")
    assert not any(option_value(a, "--index-url") for _, a in gpu_installs), "CUDA torch comes from PyPI"
    assert any(".[gpu]" in a for _, a in gpu_installs), "the GPU image installs the gpu extra (dask-cuda)"
    assert any("3.11" in i.value for i in final_stage(gpu) if i.keyword == "RUN"), "GPU image on Python 3.11"


@pytest.fixture(scope="module")
def fresh_venv(tmp_path_factory) -> Path:
    """A new virtual environment with nothing but pip (no system site-packages)."""
    folder = tmp_path_factory.mktemp("venv")
    venv.EnvBuilder(with_pip=True, system_site_packages=False).create(folder)
    return folder / "bin" / "python"


def _pip_report(python: Path, cwd: Path, args: list[str], report: Path) -> dict:
    out = subprocess.run([str(python), "-m", "pip", "install", "--dry-run", "--quiet", "--report", str(report),
                          *args], cwd=cwd, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, f"pip install {' '.join(args)} failed in a fresh venv:\n{out.stderr[-3000:]}"
    return json.loads(report.read_text())


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=_rel)
def test_image_context_builds_the_package(dockerfile, fresh_venv, tmp_path):
    """The files the Dockerfile copies are enough to build clc-dask (metadata only, no deps)."""
    stage_build_context(dockerfile, tmp_path)
    workdir = pip_install_commands(dockerfile)[-1][0]
    report = _pip_report(fresh_venv, tmp_path / workdir.lstrip("/"), ["--no-deps", "."], tmp_path / "report.json")
    (item,) = report["install"]
    meta = item["metadata"]
    assert (meta["name"], meta["version"]) == ("clc-dask", VERSION)
    declared = {canonicalize_name(Requirement(r).name) for r in PYPROJECT["project"]["dependencies"]}
    built = {canonicalize_name(Requirement(r).name) for r in meta["requires_dist"] if "extra ==" not in r}
    assert built == declared


@pytest.mark.slow  # ~60-100 s: resolves ~140 packages through the package index
@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=_rel)
def test_image_pip_steps_resolve(dockerfile, fresh_venv, tmp_path):
    """The Dockerfile's pip install steps, resolved together (dry run) in a fresh venv.

    Differences from the image build, each harmless to what is checked: the PyTorch CPU index
    is replaced by this machine's index (same versions; its 2.14.1 is the CUDA build), and the
    steps are resolved as one: each step's requirements are a subset of the last one's with
    the same constraints, so one resolution decides them all.
    """
    stage_build_context(dockerfile, tmp_path / "image")
    steps = pip_install_commands(dockerfile)
    workdir = tmp_path / "image" / steps[-1][0].lstrip("/")
    requirements, constraints = [], set()
    for _, args in steps:
        i = 0
        while i < len(args):
            if args[i] in ("--index-url", "-i", "-c", "--constraint", "--extra-index-url"):
                if args[i] in ("-c", "--constraint"):
                    constraints.add(args[i + 1])
                i += 2
                continue
            if not args[i].startswith("-"):
                requirements.append(args[i])
            i += 1
    assert constraints == {"constraints.txt"}
    start = time.monotonic()
    report = _pip_report(fresh_venv, workdir, [*[f"-c{c}" for c in constraints], *requirements],
                         tmp_path / "report.json")
    elapsed = time.monotonic() - start
    versions = {canonicalize_name(i["metadata"]["name"]): Version(i["metadata"]["version"]) for i in report["install"]}
    print(f"{_rel(dockerfile)}: {len(versions)} packages resolved in {elapsed:.0f} s")
    assert versions["clc-dask"] == Version(VERSION)
    assert versions["torch"].base_version == "2.14.1" and versions["torchvision"].base_version == "0.29.1"
    assert versions["dask"] == versions["distributed"] == Version("2026.7.1")
    assert versions["bokeh"] < Version("3.10") and versions["pandas"] < Version("3")
    if dockerfile.name == "Dockerfile.gpu":
        assert versions["dask-cuda"].major == 26
        assert versions["rapids-dask-dependency"].major == 26


# ============================================================================================
# Tests: environment.yml
# ============================================================================================

#: pip name → conda-forge names that provide it.
CONDA_NAMES = {"torch": {"pytorch"}, "matplotlib": {"matplotlib", "matplotlib-base"}}


def _conda_spec(spec: str) -> tuple[str, SpecifierSet]:
    match = re.fullmatch(r"([A-Za-z0-9_.-]+)\s*(.*)", spec.strip())
    assert match, spec
    name, version = match[1], match[2].replace(" ", "")
    if re.fullmatch(r"=[^=<>!,]+", version):  # conda's name=1.2 means 1.2.*
        version = f"=={version[1:]}.*" if not version.endswith("*") else f"=={version[1:]}"
    return canonicalize_name(name), SpecifierSet(version)


def test_environment_yml_lists_the_stack():
    env = yaml.safe_load((ROOT / "environment.yml").read_text("utf-8"))
    assert env["channels"][0] == "conda-forge" and "defaults" not in env["channels"]
    conda = dict(_conda_spec(d) for d in env["dependencies"] if isinstance(d, str))
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    pip_names = {canonicalize_name(Requirement(p).name) for p in pip if not p.startswith("-")}
    assert "-e ." in pip, "the environment installs this repository itself"
    assert Version("3.11.0") in conda["python"] and Version("3.12.0") not in conda["python"]
    missing = []
    for dep in PYPROJECT["project"]["dependencies"]:
        name = canonicalize_name(Requirement(dep).name)
        if not (CONDA_NAMES.get(name, {name}) & set(conda)) and name not in pip_names:
            missing.append(name)
    assert not missing, f"environment.yml lacks {missing} (pyproject dependencies)"
    for name in ("gdal", "dask", "distributed", "pytorch", "segmentation-models-pytorch", "rustac"):
        assert name in conda or name in pip_names, name
    # the versions constraints.txt pins satisfy environment.yml
    for line in (ROOT / "constraints.txt").read_text("utf-8").splitlines():
        line = line.split("#")[0].strip()
        if "==" not in line:
            continue
        req = Requirement(line)
        pinned = Version(next(iter(req.specifier)).version)
        for conda_name in CONDA_NAMES.get(canonicalize_name(req.name), {canonicalize_name(req.name)}):
            if conda_name in conda:
                assert conda[conda_name].contains(pinned, prereleases=True), (
                    f"environment.yml {conda_name} {conda[conda_name]} excludes the tested {req}"
                )
    assert conda["dask"].contains("2026.7.1") and conda["distributed"].contains("2026.7.1")
