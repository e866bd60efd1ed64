"""`clc-dask experiment`: a grid of configurations trained on the cluster and compared."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

log = logging.getLogger(__name__)


def register(app: typer.Typer) -> None:
    """Add the `experiment` command to `app`."""

    @app.command("experiment")
    def experiment_command(
        config: Annotated[Path, typer.Option(
            "--config", "-c", help="Experiment file (YAML): regions, split, configurations, transfer, "
            "statistics, cluster.")],
        output: Annotated[Path | None, typer.Option(
            "--out", "--output", help="Experiment folder (default: the file's output). Running again on "
            "it resumes.")] = None,
        scheduler: Annotated[str | None, typer.Option(
            "--scheduler", "--address", help="Dask scheduler address (default: DASK_SCHEDULER_ADDRESS, "
            "else the file's cluster section).")] = None,
        n_workers: Annotated[int | None, typer.Option(
            "--workers", min=1, help="Workers of a local cluster (default: one per configuration, at "
            "most one per core).")] = None,
        threads_per_worker: Annotated[int | None, typer.Option(
            "--threads-per-worker", min=1, help="Threads of each local worker (torch uses them).")] = None,
    ) -> None:
        """Split a region (guard bands), train every configuration on the cluster, score the test
        blocks and compare the configurations with block-bootstrap confidence intervals."""
        from clc_dask.experiment import load_experiment_config, run_experiment
        from clc_dask.experiment.runner import check_experiment, experiment_client

        cfg = load_experiment_config(config)
        check_experiment(cfg)  # every check that reads no pixel, before a cluster starts
        with experiment_client(cfg, scheduler, n_workers=n_workers, threads_per_worker=threads_per_worker) as client:
            if client is not None:
                typer.echo(f"Dask dashboard: {client.dashboard_link}", err=True)
            result = run_experiment(cfg, output, client=client)
        summary = Path(result.results["summary_markdown"])
        typer.echo(summary.read_text("utf-8"))
        typer.echo(f"Experiment folder: {result.root} ({result.seconds / 60:.1f} min)")
