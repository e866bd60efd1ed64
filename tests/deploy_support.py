"""What the deployment tests read from deploy/: paths, Kubernetes objects, Dockerfiles, command lines.

Shared by the tests/test_deploy_*.py modules, one per deployment target. The Kubernetes objects
are what ``kubectl apply -k deploy/k8s`` creates plus the standalone manifests; the command lines
are every ``clc-dask`` and ``dask`` call found in manifests, scripts, Dockerfiles and comments,
checked against the CLIs themselves by ``check_call``.
"""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import yaml

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
