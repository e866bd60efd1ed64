"""deploy/ as a whole, and environment.yml: every YAML parses, every file opens with a comment
saying what it is and how to use it, shell scripts parse and stop on errors.
"""

from __future__ import annotations

import subprocess

import pytest
from deploy_support import (
    DEPLOY,
    DEPLOY_YAMLS,
    DOCKERFILES,
    SHELL_SCRIPTS,
    _rel,
    load_docs,
)


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


def test_shell_scripts_parse():
    for script in SHELL_SCRIPTS:
        out = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert out.returncode == 0, f"{_rel(script)}: {out.stderr}"
        assert script.read_text("utf-8").startswith("#!/bin/bash"), f"{_rel(script)}: needs a bash shebang"
        assert "set -euo pipefail" in script.read_text("utf-8"), f"{_rel(script)}: fail on errors"
