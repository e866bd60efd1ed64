"""environment.yml lists the project's stack, at versions that admit the tested pins."""

from __future__ import annotations

import re

import yaml
from deploy_support import (
    PYPROJECT,
    ROOT,
)
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

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
