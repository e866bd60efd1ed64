"""Executing a run: phase 1 (class tiles flowing over the cluster, each journaled when
written), phase 2 (the whole map generalized, one vector layer), then the STAC catalog."""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clc_dask.config import RunConfig, dump_run_config
from clc_dask.errors import ClcDaskError
from clc_dask.run.context import RunContext, resolve_run, select_tiles
from clc_dask.run.generalized import POLYGONS_STATE, generalize_run
from clc_dask.run.plan import RunPlan, plan_run, tiles_in_flight
from clc_dask.run.publish import publish_run
from clc_dask.run.store import (
    CONFIG_FILE,
    ITEMS_FILE,
    RUN_OUTPUTS,
    STAC_DIR,
    store_lock,
    write_text,
)
from clc_dask.run.tiles import TileFailure, TileProcessor
from clc_dask.search import save_item_collection
from clc_dask.stores import remove_leftovers

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    """What a run did."""

    store: Path
    computed: list[str]
    skipped: list[str]
    collection: Path | None
    plan: RunPlan
    failed: dict[str, str] = field(default_factory=dict)
    generalized: list[str] = field(default_factory=list)  # tiles whose generalized map was written now


def execute_run(
    config: RunConfig,
    *,
    tile_names: Sequence[str] | None = None,
    resume: bool = False,
    overwrite: bool = False,
    client: Any = None,
    progress: Callable[[str], None] | None = None,
) -> RunResult:
    """Run (or resume) a production run: every check first, then the tiles, then STAC.

    The production stage in one call: :func:`~clc_dask.run.resolve_run` (context: AOI, grid,
    checkpoint, store state, scenes — nothing written), :func:`~clc_dask.run.plan_run`,
    then :func:`execute`.

    Args:
        config: the validated run config (:func:`clc_dask.config.load_run_config`).
        tile_names: only these ``row_col`` tiles (default: every tile meeting the AOI). The
            generalization (phase 2) runs once every tile of the AOI has its class map.
        resume: continue a run whose store holds some finished tiles (they are skipped when
            their files still match their checksums).
        overwrite: replace the outputs of another run (or a finished run) in the store.
        client: a distributed client (tiles flow over its workers, which write them: the
            store must be on storage they share), or None for dask's threaded scheduler here.
        progress: called with each tile's name when it is finished or skipped.
    """
    ctx = resolve_run(config, tile_names=tile_names, resume=resume, overwrite=overwrite)
    return execute(ctx, plan_run(ctx), client=client, progress=progress)


def execute(ctx: RunContext, plan: RunPlan, *, client: Any = None,
            progress: Callable[[str], None] | None = None) -> RunResult:
    """Write the run's files, compute its tiles (phase 1) and generalize the whole map
    (phase 2); publish STAC last.

    Raises:
        ClcDaskError: some tiles failed (the others are recorded; fix and resume).
        OutputError: another process holds the store.
    """
    with store_lock(ctx.store):
        _remove_leftovers(ctx, "of an interrupted run")
        _start_store(ctx, plan)
        processor = TileProcessor(ctx, client=client)
        processor.prepare_store()
        if (ctx.store / STAC_DIR).exists():
            # no Item may point at a tile being rewritten
            publish_run(ctx.config, ctx.manifest, ctx.grid, recheck=False)
        for name in plan.skipped:
            log.info("tile %s already finished: skipped", name)
            if progress:
                progress(name)
        in_flight = _in_flight(ctx, plan, client)
        started = time.perf_counter()
        computed, failed = _compute(ctx, plan, processor, in_flight, progress)
        _log_throughput(plan, computed, time.perf_counter() - started, client)
        generalized: list[str] = []
        if ctx.config.generalize.enabled and not failed:
            generalized, failed = generalize_run(ctx, processor, client=client, in_flight=in_flight)
        # a worker killed mid-write leaves its temporary file behind (its task ran again elsewhere)
        _remove_leftovers(ctx, "of tasks killed mid-write")
        collection = publish_run(ctx.config, ctx.manifest, ctx.grid)
        ctx.manifest.complete = not failed and _finished(ctx)
        ctx.manifest.save()
    if failed:
        details = "; ".join(f"{k}: {v}" for k, v in sorted(failed.items()))
        raise ClcDaskError(
            f"{len(failed)} tile(s) failed ({details}). The {len(ctx.manifest.tiles)} finished tile(s) are "
            "recorded and published: fix the cause and run again with `resume`."
        )
    return RunResult(ctx.store, computed, plan.skipped, collection, plan, failed, generalized)


def _remove_leftovers(ctx: RunContext, whose: str) -> None:
    """Remove the store's temporary files (the store lock is held: no one else writes there)."""
    removed = remove_leftovers(ctx.store)
    if removed:
        log.info("removed %d leftover(s) %s: %s", len(removed), whose, ", ".join(p.name for p in removed[:5]))


def _start_store(ctx: RunContext, plan: RunPlan) -> None:
    """A fresh run clears the store's old outputs; every run (re)writes run.yaml, the scenes
    (once) and the manifest without the tiles about to be recomputed."""
    store, manifest = ctx.store, ctx.manifest
    if manifest.fresh:
        for name in RUN_OUTPUTS:
            target = store / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    if (manifest.fresh or not (store / ITEMS_FILE).exists()) and ctx.items is not None:
        save_item_collection(ctx.items, store / ITEMS_FILE)
    write_text(store / CONFIG_FILE, dump_run_config(ctx.config))
    for tile in plan.tiles:  # recorded but changed, or never finished: computed again below
        if tile.name in manifest.tiles:
            manifest.forget(tile.name)
        if tile.name in manifest.generalized:
            manifest.forget(tile.name, phase="generalized")
    manifest.save()


def _in_flight(ctx: RunContext, plan: RunPlan, client: Any) -> int:
    """Tiles on the cluster at once: the plan's, or twice the cluster's threads by default."""
    cluster = ctx.config.cluster
    if client is None or cluster.tiles_in_flight or cluster.tiles_per_batch:
        return plan.in_flight
    threads = sum(w.get("nthreads", 1) for w in client.scheduler_info().get("workers", {}).values())
    return tiles_in_flight(max(2, 2 * threads), plan.estimates)


def _compute(ctx: RunContext, plan: RunPlan, processor: TileProcessor, in_flight: int,
             progress: Callable[[str], None] | None) -> tuple[list[str], dict[str, str]]:
    computed: list[str] = []
    failed: dict[str, str] = {}
    if plan.tiles:
        log.info("computing %d tile(s), %d at a time", len(plan.tiles), in_flight)
    for out in processor.run(plan.tiles, in_flight):
        if isinstance(out, TileFailure):
            failed[out.tile.name] = f"{type(out.error).__name__}: {out.error}"
            log.error("tile %s failed: %s", out.tile.name, failed[out.tile.name])
            continue
        ctx.manifest.record(out.tile.name, out.files, out.extra, out.extra_files, hashes=out.hashes)
        computed.append(out.tile.name)
        log.info("tile %s finished (%d/%d)", out.tile.name, len(computed), len(plan.tiles))
        if progress:
            progress(out.tile.name)
    return computed, failed


def _finished(ctx: RunContext) -> bool:
    """Every tile of the AOI has its class map (and generalized map, and the polygons)."""
    every = select_tiles(ctx.grid, ctx.aoi, None)
    if not all(ctx.manifest.is_done(t.name) for t in every):
        return False
    if not ctx.config.generalize.enabled:
        return True
    generalized = all(ctx.manifest.is_done(t.name, phase="generalized") for t in every)
    return generalized and (not ctx.config.output.vectorize or bool(ctx.manifest.state.get(POLYGONS_STATE)))


def _log_throughput(plan: RunPlan, computed: Sequence[str], seconds: float, client: Any) -> None:
    """Log the measured class-map pixels per second and worker (for the dry run's
    ``px_per_second``)."""
    if not computed or seconds <= 0:
        return
    workers = len(client.scheduler_info().get("workers", {})) if client is not None else 1
    pixels = sum(plan.estimates[name].pixels_predicted for name in computed)
    log.info("computed %d tile(s) (%.3g px) in %.1f s on %d worker(s): %.3g px/s per worker "
             "(px_per_second of the dry run)", len(computed), pixels, seconds, max(workers, 1),
             pixels / seconds / max(workers, 1))
