"""Peak memory per worker and graph size of a seasonal mosaic of the demo region.

The demo region (default 4096² px at 10 m) is built (or reused), served on loopback exactly
like a cloud catalog (rustac STAC API + COGs over HTTP with range requests), searched, loaded
with :func:`clc_dask.load.load_scenes` and reduced with :func:`clc_dask.mosaic.seasonal_mosaic`
over a window of at least 9 dates; the COG (and clear-count raster) is written from a
LocalCluster. While it runs, the RSS of every worker process is sampled (psutil, 20 Hz).

Printed (one JSON object): dates, pixels, chunks, tasks (as built and after optimisation),
the task count of the naive stackstac recipe (float64, one date per chunk, ``.median("time")``)
as a ratio, peak RSS per worker, and that peak as a fraction of the 2 GiB budget and as a
multiple of one task's input (dates × chunk² × 2 bytes × (band + SCL)).

Run (builds the 4096² region once, ~2 min; the mosaic a few minutes on 2 cores):

    python benchmarks/bench_mosaic_memory.py --workdir /tmp/clc-demo-4096 --chunk-size 1024
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from pathlib import Path

import dask
import psutil
import stackstac
from distributed import Client, LocalCluster

from clc_dask.demo.region import build_region
from clc_dask.demo.servers import serve_region
from clc_dask.items import composite_bands, normalize_items
from clc_dask.load import load_scenes
from clc_dask.mosaic import seasonal_mosaic, write_mosaic
from clc_dask.search import search_items

BUDGET = 2 * 1024**3  # bytes per worker


class RssSampler:
    """Peak resident memory of each worker process, sampled in a background thread."""

    def __init__(self, pids: dict[str, int], interval: float = 0.05) -> None:
        self.procs = {addr: psutil.Process(pid) for addr, pid in pids.items()}
        self.baseline = {addr: p.memory_info().rss for addr, p in self.procs.items()}
        self.peak = dict(self.baseline)
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for addr, proc in self.procs.items():
                try:
                    self.peak[addr] = max(self.peak[addr], proc.memory_info().rss)
                except psutil.Error:
                    pass
            time.sleep(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def naive_task_count(items: list, gbox, bands: tuple[str, ...], chunk: int) -> int:
    """Tasks of the recipe stackstac's defaults lead to: float64, one date per chunk,
    rescale, then a median over time (which rechunks the whole cube)."""
    left, bottom, right, top = gbox.boundingbox
    cube = stackstac.stack([i.to_dict(transform_hrefs=False) for i in items],
                           assets=[*bands, "SCL"], epsg=gbox.crs.epsg,
                           resolution=abs(gbox.resolution.x), bounds=(left, bottom, right, top),
                           snap_bounds=False, chunksize=chunk)
    refl = cube.sel(band=list(bands)).where(~cube.sel(band="SCL").isin([0, 1, 3, 8, 9, 10]))
    (optimized,) = dask.optimize(refl.median("time"))
    return len(optimized.__dask_graph__())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "clc-demo-4096")
    parser.add_argument("--size", type=int, default=4096, help="region side in px (10 m)")
    parser.add_argument("--chunk-size", type=int, default=1024, help="dask chunk edge in px")
    parser.add_argument("--window", default="04-01/09-30",
                        help="MM-DD/MM-DD of the mosaic window (default: all 12 demo dates)")
    parser.add_argument("--composite", default="nrg")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2, help="threads per worker")
    parser.add_argument("--memory-limit", default="3GiB", help="per worker")
    args = parser.parse_args()

    region = build_region(args.workdir, size=args.size, seed=0)
    bands = composite_bands(args.composite)
    with serve_region(region) as servers:
        items = search_items(servers.stac_url, bbox=region.bbox_lonlat, season=args.window,
                             years=[region.year], collection=servers.collection_id)
        if len(items) < 9:
            raise SystemExit(f"only {len(items)} dates in {args.window}: widen --window")
        scenes = load_scenes(items, region.geobox, bands=bands, chunk_size=args.chunk_size)
        mosaic = seasonal_mosaic(scenes, composite=args.composite)
        tasks = len(mosaic.__dask_graph__())
        (optimized,) = dask.optimize(mosaic)
        tasks_optimized = len(optimized.__dask_graph__())
        naive = naive_task_count(normalize_items(items, bands), region.geobox, bands, args.chunk_size)
        n_chunks = scenes.data.numblocks[2] * scenes.data.numblocks[3]

        cluster = LocalCluster(n_workers=args.workers, threads_per_worker=args.threads,
                               memory_limit=args.memory_limit, processes=True,
                               dashboard_address=None)
        with cluster, Client(cluster) as client:
            pids = client.run(lambda: __import__("os").getpid())
            with tempfile.TemporaryDirectory() as out, RssSampler(pids) as sampler:
                started = time.perf_counter()
                write_mosaic(mosaic, Path(out) / "mosaic.tif")
                seconds = time.perf_counter() - started
    peaks = sorted(sampler.peak.values())
    per_task_input = len(items) * args.chunk_size**2 * 2 * 2  # dates × chunk² × uint16 × (band+SCL)
    print(json.dumps({
        "dates": len(items),
        "pixels": f"{region.size}x{region.size}",
        "chunk": args.chunk_size,
        "spatial_chunks": n_chunks,
        "workers": f"{args.workers}x{args.threads} threads, limit {args.memory_limit}",
        "tasks": tasks,
        "tasks_optimized": tasks_optimized,
        "tasks_naive_stackstac_defaults": naive,
        "naive_over_ours_tasks": round(naive / tasks_optimized, 1),
        "peak_rss_per_worker_MiB": [round(p / 2**20) for p in peaks],
        "baseline_rss_per_worker_MiB": sorted(round(b / 2**20) for b in sampler.baseline.values()),
        "peak_over_budget_2GiB": round(peaks[-1] / BUDGET, 3),
        "peak_over_one_task_input": round(peaks[-1] / per_task_input, 1),
        "seconds": round(seconds, 1),
    }, indent=1))


if __name__ == "__main__":
    main()
