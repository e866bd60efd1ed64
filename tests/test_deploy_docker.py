"""Dockerfiles and the images' install steps: COPY sources, .dockerignore, non-root user, base
images, and the pip steps resolved in a fresh virtual environment.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import time
import venv
from pathlib import Path

import pytest
from deploy_support import (
    DOCKER,
    DOCKERFILES,
    IMAGES,
    PYPROJECT,
    ROOT,
    VERSION,
    Instruction,
    _rel,
    all_containers,
    exec_form,
    final_stage,
    image_argv,
    option_value,
    parse_dockerfile,
)
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version


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
