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

from clc_dask.cli.options import parse_tile_names
from clc_dask.errors import ConfigError

log = logging.getLogger(__name__)

PERFORMANCE_REPORT = "performance-report.html"  # as clc_dask.run.store.PERFORMANCE_REPORT


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
        from clc_dask.cluster import connect_for_run
        from clc_dask.config import load_run_config
        from clc_dask.run import dry_run as plan_dry_run
        from clc_dask.run import execute, plan_run, publish_run, resolve_run
        from clc_dask.run.store import remove_leftovers_unless_locked

        cfg = load_run_config(config)
        names = parse_tile_names(tiles)
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
        ctx = resolve_run(cfg, tile_names=names, resume=resume, overwrite=overwrite)
        plan = plan_run(ctx)
        typer.echo(f"{len(plan.tiles)} tile(s) to compute, {len(plan.skipped)} already finished, "
                   f"{plan.in_flight} at a time; output {ctx.store}", err=True)
        report = performance_report or cfg.output.performance_report
        if report and importlib.util.find_spec("bokeh") is None:
            raise ConfigError("A Dask performance report needs bokeh: pip install 'bokeh>=3.1,<3.10', "
                              "or run without --performance-report / output.performance_report.")
        try:
            with connect_for_run(cfg.cluster, scheduler) as client, \
                    _progress(len(plan.tiles) + len(plan.skipped), no_progress) as bar:
                if client is not None:
                    link = client.dashboard_link
                    log.info("Dask dashboard: %s", link)
                    typer.echo(f"Dask dashboard: {link}", err=True)
                elif report:
                    log.warning("cluster.kind 'threads' has no Dask dashboard and no performance report")
                with _performance_report(client, ctx.store / PERFORMANCE_REPORT if report else None):
                    result = execute(ctx, plan, client=client, progress=lambda name: bar.update(1))
        except BaseException:
            # stopped or failed: the workers are gone now; a write they were cut off in left
            # only a temporary name, removed here (or by the next run)
            remove_leftovers_unless_locked(ctx.store)
            raise
        typer.echo(json.dumps({"store": str(result.store), "computed": result.computed,
                               "skipped": result.skipped, "collection": str(result.collection)}))


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
