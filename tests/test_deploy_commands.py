"""Command lines everywhere in deploy/: every ``clc-dask`` and ``dask`` call names real
sub-commands and options, asked of the CLIs themselves.
"""

from __future__ import annotations

import pytest
from deploy_support import (
    CALLS,
    Call,
    check_call,
    check_dask_call,
    clc_dask_command,
)


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
