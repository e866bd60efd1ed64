"""`clc-dask run`: a production run from one YAML config, resumable by tile."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer

from clc_dask.errors import ConfigError

log = logging.getLogger(__name__)

PERFORMANCE_REPORT = "performance-report.html"


def register(app: typer.Typer) -> None:
    """Add the `run` command to `app`."""

    @app.command("run")
    def run_command(
        config: Annotated[Path, typer.Option(
            "--config", "-c", help="Run config (YAML): AOI, grid, imagery, model, output, cluster.")],
        resume: Annotated[bool, typer.Option(
            "--resume", help="Continue the run in output.store: finished tiles are skipped.")] = False,
        tiles: Annotated[str | None, typer.Option(
            "--tiles", help="Only these tiles (comma list of row_col from 1, e.g. 1_1,1_2).")] = None,
        dry_run: Annotated[bool, typer.Option(
            "--dry-run", help="Check everything and print the plan (tiles, scenes, bytes, tasks, "
            "worker-hours); compute and write nothing.")] = False,
        overwrite: Annotated[bool, typer.Option(
            "--overwrite", help="Replace the outputs of another run (or of this run) in output.store.")] = False,
        performance_report: Annotated[bool, typer.Option(
            "--performance-report", help=f"Save a Dask performance report as {PERFORMANCE_REPORT} in "
            "output.store (also output.performance_report).")] = False,
        scheduler: Annotated[str | None, typer.Option(
            "--scheduler", "--address", help="Dask scheduler address (overrides the config's cluster; default "
            "DASK_SCHEDULER_ADDRESS or cluster.kind).")] = None,
        as_json: Annotated[bool, typer.Option(
            "--json", help="With --dry-run: print the plan as JSON instead of a table.")] = False,
        publish_only: Annotated[bool, typer.Option(
            "--publish-only", help="Only rewrite the STAC catalog from the manifest (files verified).")] = False,
        px_per_second: Annotated[float, typer.Option(
            "--px-per-second", help="With --dry-run: class-map pixels one worker predicts per second "
            "(the run logs the measured rate).")] = 1.0e6,
        no_progress: Annotated[bool, typer.Option("--no-progress", help="No progress bar (log lines only).")] = False,
    ) -> None:
        """Map an AOI tile by tile: scenes → mosaic → U-Net → generalized CLC map, COG/Zarr + STAC."""
        from clc_dask.config import load_run_config
        from clc_dask.run import dry_run as plan_dry_run
        from clc_dask.run import prepare_run, publish_run, run_prepared

        cfg = load_run_config(config)
        names = _tile_names(tiles)
        if publish_only:
            typer.echo(str(publish_run(cfg)))
            return
        if dry_run:
            plan = plan_dry_run(cfg, tile_names=names, resume=resume, overwrite=overwrite)
            if as_json:
                typer.echo(json.dumps(plan.summary(px_per_second=px_per_second), indent=2))
            else:
                typer.echo(plan.table(px_per_second=px_per_second))
            return
        prepared = prepare_run(cfg, tile_names=names, resume=resume, overwrite=overwrite)
        plan = prepared.plan
        typer.echo(f"{len(plan.tiles)} tile(s) to compute, {len(plan.skipped)} already finished, "
                   f"{len(plan.batches)} batch(es); output {prepared.store}", err=True)
        report = performance_report or cfg.output.performance_report
        if report and importlib.util.find_spec("bokeh") is None:
            raise ConfigError("A Dask performance report needs bokeh: pip install 'bokeh>=3.1,<3.10', "
                              "or run without --performance-report / output.performance_report.")
        with _client(cfg, scheduler) as client, _progress(len(plan.tiles) + len(plan.skipped), no_progress) as bar:
            if client is not None:
                link = client.dashboard_link
                log.info("Dask dashboard: %s", link)
                typer.echo(f"Dask dashboard: {link}", err=True)
            elif report:
                log.warning("cluster.kind 'threads' has no Dask dashboard and no performance report")
            with _performance_report(client, prepared.store / PERFORMANCE_REPORT if report else None):
                result = run_prepared(prepared, client=client, progress=lambda name: bar.update(1))
        typer.echo(json.dumps({"store": str(result.store), "computed": result.computed,
                               "skipped": result.skipped, "collection": str(result.collection)}))


def _tile_names(tiles: str | None) -> list[str] | None:
    if tiles is None:
        return None
    names = [t.strip() for t in tiles.split(",") if t.strip()]
    if not names:
        raise ConfigError("--tiles is empty: give tiles as row_col, e.g. --tiles 1_1,1_2.")
    return names


@contextlib.contextmanager
def _client(cfg: Any, scheduler: str | None) -> Iterator[Any]:
    """The run's Dask client (None for cluster.kind 'threads'); a started cluster is closed after."""
    from clc_dask.cluster import get_client

    c = cfg.cluster
    if scheduler is None and c.kind == "threads":
        yield None
        return
    kind = "address" if scheduler else ("auto" if c.kind == "address" else c.kind)
    client = get_client(address=scheduler or c.address, kind=kind, n_workers=c.n_workers,
                        threads_per_worker=c.threads_per_worker, memory_limit=c.memory_limit)
    cluster = client.cluster  # None when connected to a running scheduler
    try:
        yield client
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


@contextlib.contextmanager
def _progress(total: int, disabled: bool) -> Iterator[Any]:
    """A tqdm bar over tiles, on stderr."""
    from tqdm import tqdm

    with tqdm(total=total, unit="tile", desc="tiles", file=sys.stderr, disable=disabled) as bar:
        yield bar


@contextlib.contextmanager
def _performance_report(client: Any, path: Path | None) -> Iterator[None]:
    """``distributed.performance_report`` saved at ``path`` (nothing without a client or path)."""
    if client is None or path is None:
        yield
        return
    from distributed import performance_report

    path.parent.mkdir(parents=True, exist_ok=True)
    with performance_report(filename=str(path)):
        yield
    log.info("performance report saved to %s", path)
