"""A production run against its stages measured alone, on 1 and 2 workers.

On the demo region (served like the real thing: STAC API + COGs over HTTP), a run of 16 tiles
(1024 px tiles of the 4096 px region) with the ``cpu-demo`` network (seeded weights: the same
arithmetic as a trained model) is timed, and so is each of its stages alone, for the same
tiles, on the same cluster:

* **mosaic**: scenes → SCL-masked median of every tile (the run's tile grids, with context),
  computed and kept in the workers' memory;
* **predict**: the class maps of those mosaics (window grid of the run);
* **write**: the class tiles written as COGs by the workers;
* **generalize**: the whole class map generalized (tiled, exact) and the polygons written.

Each worker has 2 threads and one inference slot (``cluster.inference_slots: 1``, torch on one
thread): one thread runs inference, the other reads, composites and writes the next tiles
meanwhile — the layout of a GPU worker, whose GPU runs inference while its CPU threads read. The
COG/STAC servers run in their own process (the data lives elsewhere in a real run: they must
not share the client's interpreter with the scheduler).

Each worker process is pinned to a core of its own (all its threads; ``--no-pin`` to let them
share), as each worker of a cluster has a machine of its own: on this 2-core machine a worker
that may use both cores is the whole machine, and a second worker could add nothing. The client,
the scheduler and the servers are not pinned (with 1 worker they have the other core).

Reported for 1 and 2 workers: tiles per hour of the run and of each stage
alone, the run's throughput over its slowest stage's and over all stages done one after
another (what a run with barriers between stages takes), the client's CPU seconds per tile, the workers' idle fraction during
the run (1 − busy thread time / (wall time × threads), from the task stream), and the speed-up
of 2 workers over 1. Needs both cores free.

    python benchmarks/bench_run.py --workdir /tmp/bench-run [--size 4096] [--tile 1024] [--no-pin]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import shutil
import time
from pathlib import Path

import dask
import dask.array
import dask.distributed
import geopandas as gpd
import torch
import yaml
from distributed import Client, get_task_stream

from clc_dask.classes import ClassTable
from clc_dask.cluster import get_client
from clc_dask.config import load_run_config
from clc_dask.demo import build_region, serve_region
from clc_dask.generalize import TiledGeneralization, fixed_gpkg_date, vectorize_tiled
from clc_dask.load import load_scenes
from clc_dask.model import Checkpoint, Normalization, build_model, save_checkpoint
from clc_dask.mosaic import seasonal_mosaic
from clc_dask.predict import INFERENCE_LAYER, predict_region
from clc_dask.presets import get_preset
from clc_dask.rasters import to_dataarray
from clc_dask.run import execute_run, resolve_run
from clc_dask.run.tiles import TileProcessor

BANDS = ("B08", "B04", "B03")
THREADS_PER_WORKER = 2
INFERENCE_SLOTS = 1


def checkpoint(path: Path, codes: list[int]) -> Path:
    preset = get_preset("cpu-demo")
    torch.manual_seed(0)
    table = ClassTable(2, codes)
    model = build_model(preset.encoder, len(BANDS), len(table), None, decoder_channels=preset.decoder_channels)
    norm = Normalization((0.25, 0.08, 0.07), (0.03, 0.01, 0.01))
    return save_checkpoint(Checkpoint(preset.encoder, BANDS, table, norm, model.state_dict(),
                                      decoder_channels=preset.decoder_channels), path)


def write_config(root: Path, region, servers, store: Path, tile: int) -> Path:
    frame = gpd.GeoDataFrame({"name": ["demo"]}, geometry=[region.geobox.extent.geom], crs=region.crs)
    frame.to_file(root / "aoi.gpkg", driver="GPKG")
    raw = {
        "name": "bench",
        "aoi": {"path": str(root / "aoi.gpkg")},
        "grid": {"epsg": int(region.epsg), "resolution": 10, "tile_size": tile, "chunk_size": tile},
        "imagery": {"source": servers.stac_url, "collection": region.collection_id, "year": region.year,
                    "seasons": ["september"], "max_cloud": 90, "composite": "nrg"},
        "model": {"checkpoint": str(root / "model.pt"), "window": 512, "halo": 64, "batch_size": 8,
                  "device": "cpu"},
        "output": {"store": str(store), "formats": ["cog"], "vectorize": True},
        # the client is given to execute_run; its workers are started like this section says
        "cluster": {"kind": "local", "threads_per_worker": THREADS_PER_WORKER, "inference_slots": INFERENCE_SLOTS},
    }
    path = root / "run.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


def idle_fraction(stream: list[dict], seconds: float, threads: int, prefix: str = "") -> float:
    """1 − compute time of the tasks whose key starts with ``prefix`` / (wall time × threads)."""
    busy = sum(s["stop"] - s["start"] for task in stream if str(task["key"]).strip("('\"").startswith(prefix)
               for s in task["startstops"] if s["action"] == "compute")
    return max(0.0, 1.0 - busy / (seconds * threads))


def pin_this_process(core: int) -> None:
    """Run every thread of this process, and the threads they start, on ``core`` only."""
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), {core})
        except ProcessLookupError:  # a thread that ended meanwhile
            pass


def pin_workers(client: Client) -> list[int]:
    """Pin each worker process to a core of its own; the cores used (none if too few cores)."""
    cores = sorted(os.sched_getaffinity(0))
    workers = sorted(client.scheduler_info()["workers"])
    if len(workers) > len(cores):
        return []
    for address, core in zip(workers, cores, strict=False):
        client.run(pin_this_process, core, workers=[address])
    return cores[: len(workers)]


def stages(ctx, client: Client) -> dict[str, float]:
    """Each stage of the run alone, for the same tiles, on ``client``'s workers (seconds)."""
    processor = TileProcessor(ctx, client=client)
    layouts = [ctx.layout(t) for t in ctx.tiles]
    out: dict[str, float] = {}
    started = time.perf_counter()
    mosaics = []
    for layout in layouts:
        scenes = load_scenes(list(ctx.items), layout.load_geobox, bands=list(BANDS), chunk_size=layout.load_chunks)
        mosaics.append(seasonal_mosaic(scenes, "nrg")["reflectance"].sel(band=list(BANDS)))
    mosaics = client.persist(mosaics)
    dask.distributed.wait(mosaics)
    out["mosaic"] = time.perf_counter() - started
    started = time.perf_counter()
    maps = []
    model = ctx.config.model
    for layout, mosaic in zip(layouts, mosaics, strict=True):  # as the run predicts a tile: one task
        (ny, nx), (by, bx) = layout.shape, layout.before
        maps.append(predict_region(mosaic.data, ctx.checkpoint.path, origin=(by - layout.context, bx - layout.context),
                                   region=(by, by + ny, bx, bx + nx), halo=model.halo, window=model.window,
                                   batch_size=model.batch_size, device="cpu", client=client))
    maps = client.persist(maps, optimize_graph=False)  # keeps the inference slot annotation
    dask.distributed.wait(maps)
    out["predict"] = time.perf_counter() - started
    started = time.perf_counter()
    writes = [dask.delayed(processor.writer.write)(t, m, {}) for t, m in zip(ctx.tiles, maps, strict=True)]
    client.compute(writes, sync=True)
    out["write"] = time.perf_counter() - started
    started = time.perf_counter()
    rows, cols = ctx.grid.shape
    by_name = dict(zip((t.name for t in ctx.tiles), maps, strict=True))
    stitched = dask.array.block([[by_name[f"{r}_{c}"] for c in range(1, cols + 1)] for r in range(1, rows + 1)])
    codes = to_dataarray(stitched, ctx.grid.geobox, name="classes")
    tiled = TiledGeneralization(codes, ctx.store / "bench-generalize", mmu_ha=25, min_width_m=100)
    tiled.run()
    with fixed_gpkg_date(2018):
        vectorize_tiled(tiled.result(), ctx.store / "bench-polygons.gpkg", level=2)
    out["generalize"] = time.perf_counter() - started
    return out


def _tasks_held(dask_scheduler) -> int:
    return len(dask_scheduler.tasks)


def wait_until_released(client: Client, timeout: float = 30.0) -> None:
    """Wait until the scheduler has forgotten every result (closing a cluster that still holds
    results logs that they are lost)."""
    deadline = time.monotonic() + timeout
    while client.run_on_scheduler(_tasks_held) and time.monotonic() < deadline:
        time.sleep(0.1)


def measure(args: argparse.Namespace, region, servers, workers: int) -> dict[str, float]:
    root = Path(args.workdir) / f"w{workers}"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    checkpoint(root / "model.pt", [11, 12, 13, 21, 22, 23, 24, 31, 32, 41, 51])
    store = root / "store"
    config = load_run_config(write_config(root, region, servers, store, args.tile))
    with get_client(kind="local", n_workers=workers, threads_per_worker=THREADS_PER_WORKER,
                    inference_slots=INFERENCE_SLOTS, dashboard_address=None) as client:
        client.run(lambda: torch.set_num_threads(1))
        pinned = pin_workers(client) if args.pin else []
        # warm the workers (model loads, imports) on a throw-away run of one tile
        warm = config.model_copy(update={"output": config.output.model_copy(update={"store": str(root / "warm")})})
        execute_run(warm, tile_names=["1_1"], client=client)
        cpu0 = resource.getrusage(resource.RUSAGE_SELF)
        started = time.perf_counter()
        with get_task_stream(client) as stream:
            result = execute_run(config, client=client)
        seconds = time.perf_counter() - started
        cpu1 = resource.getrusage(resource.RUSAGE_SELF)
        tiles = len(result.computed)
        run_idle = idle_fraction(stream.data, seconds, workers * THREADS_PER_WORKER)
        inference_idle = idle_fraction(stream.data, seconds, workers * INFERENCE_SLOTS, INFERENCE_LAYER)
        ctx = resolve_run(config.model_copy(update={"output": config.output.model_copy(
            update={"store": str(root / "stages")})}))
        alone = stages(ctx, client)
        wait_until_released(client)
        client.cluster.close()
    client_cpu = (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime)
    slowest = max(alone, key=alone.get)
    return {
        "workers": workers, "worker_cores": pinned or "shared", "tiles": tiles, "run_seconds": round(seconds, 1),
        "run_tiles_per_hour": round(tiles / seconds * 3600, 1),
        **{f"{k}_seconds_alone": round(v, 1) for k, v in alone.items()},
        **{f"{k}_tiles_per_hour_alone": round(tiles / v * 3600, 1) for k, v in alone.items()},
        "slowest_stage": slowest,
        "run_over_slowest_stage": round(alone[slowest] / seconds, 3),
        "sum_of_stages_over_run": round(sum(alone.values()) / seconds, 3),
        "client_cpu_seconds_per_tile": round(client_cpu / tiles, 3),
        "worker_idle_fraction": round(run_idle, 3),
        "inference_slot_idle_fraction": round(inference_idle, 3),
    }


def serve(workdir: str, size: int, urls, stop) -> None:
    """Serve the demo region from this (separate) process until ``stop`` is set."""
    region = build_region(Path(workdir) / "region", size=size, seed=0)
    with serve_region(region) as servers:
        urls.send(servers.stac_url)
        stop.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="/tmp/bench-run")
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--tile", type=int, default=1024)
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--no-pin", dest="pin", action="store_false",
                        help="let the workers share every core (default: one core per worker)")
    args = parser.parse_args()
    region = build_region(Path(args.workdir) / "region", size=args.size, seed=0)
    results = []
    spawn = multiprocessing.get_context("spawn")
    urls, sent = spawn.Pipe(duplex=False)
    stop = spawn.Event()
    server = spawn.Process(target=serve, args=(args.workdir, args.size, sent, stop), daemon=True)
    server.start()
    try:
        servers = argparse.Namespace(stac_url=urls.recv())
        for workers in [int(w) for w in args.workers.split(",")]:
            results.append(measure(args, region, servers, workers))
            print(json.dumps(results[-1], indent=1), flush=True)
    finally:
        stop.set()
        server.join(30)
    if len(results) == 2:
        speedup = results[1]["run_tiles_per_hour"] / results[0]["run_tiles_per_hour"]
        print(json.dumps({"two_workers_over_one": round(speedup, 3)}, indent=1))


if __name__ == "__main__":
    main()
