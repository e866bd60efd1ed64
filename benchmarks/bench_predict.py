"""Class-map throughput of `clc_dask.predict` on a LocalCluster vs a plain PyTorch loop.

What is compared (same machine, same model, same window grid, same batch size):

* **plain**: the mosaic already in memory as one numpy array, a for-loop over the windows,
  batched forward passes, argmax — the ideal this machine can do. It produces the *same* map as
  `predict` (asserted), so the ratio is the cost of Dask, I/O (the COG is read by the workers) and
  the block halos.
* **plain, no context**: the same loop with windows side by side and no context (a seamy map):
  what the window context (halo) itself costs.
* **dask**: `predict(open_raster(cog))` computed on a LocalCluster of 1 or 2 single-threaded
  worker processes; the model is loaded by a warm-up run first (once per worker), so the timing is
  the steady state a large area sees.

Fair threads: plain with ``torch.set_num_threads(1)`` vs 1 worker × 1 thread, and plain with 2
threads vs 2 workers × 1 thread. Also printed: FLOP per pixel of each encoder's U-Net
(`torch.utils.flop_counter.FlopCounterMode`) and the graph's task count per km².

Run (a few minutes on 2 cores; needs both cores free for the 2-worker figure):

    python benchmarks/bench_predict.py --size 2048 --chunk 1024 --window 512 --halo 64 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import dask
import numpy as np
import torch
from distributed import Client, LocalCluster
from torch.utils.flop_counter import FlopCounterMode

from clc_dask import predict as P
from clc_dask.classes import ClassTable
from clc_dask.grid import snapped_geobox
from clc_dask.model import (
    ENCODERS,
    Checkpoint,
    Normalization,
    build_model,
    load_checkpoint,
    save_checkpoint,
)
from clc_dask.rasters import open_raster, to_dataarray, write_geotiff

BANDS = ("B04", "B03", "B02")
CODES = [11, 12, 13, 14, 21, 22, 23, 24, 31, 32, 33, 41, 51, 52]  # Level 2 minus 42
RES = 10.0  # m


def make_inputs(root: Path, size: int, encoder: str) -> tuple[Path, Path]:
    rng = np.random.default_rng(0)
    coarse = rng.uniform(300, 3500, (3, size // 64 + 1, size // 64 + 1))
    arr = np.kron(coarse, np.ones((64, 64)))[:, :size, :size] + rng.normal(0, 200, (3, size, size))
    arr = arr.clip(1, 10000).astype(np.uint16)
    gbox = snapped_geobox((500000, 4000000, 500000 + size * RES, 4000000 + size * RES), 32633, RES)
    mosaic = write_geotiff(to_dataarray(arr, gbox, band_names=list(BANDS)), root / "mosaic.tif")
    torch.manual_seed(0)
    table = ClassTable(2, CODES)
    model = build_model(encoder, 3, len(table), None)
    ckpt = Checkpoint(encoder, BANDS, table, Normalization((0.08,) * 3, (0.04,) * 3), model.state_dict())
    return mosaic, save_checkpoint(ckpt, root / "model.pt")


def plain_loop(dn: np.ndarray, ckpt_path: Path, window: int, halo: int, batch_size: int,
               context: bool = True) -> np.ndarray:
    """Windows on the global grid over an in-memory array; returns CLC codes."""
    ckpt = load_checkpoint(ckpt_path)
    model = ckpt.build_model("cpu")
    grid = P.WindowGrid.from_options(window, halo if context else 0)
    _, h, w = dn.shape
    ny, nx = -(-h // window), -(-w // window)
    padded = np.pad(dn, ((0, 0), (grid.before, ny * window - h + grid.after), (grid.before, nx * window - w + grid.after)))
    side = grid.input_size
    out = np.zeros((ny * window, nx * window), dtype=np.uint8)
    jobs = [(i, j) for i in range(ny) for j in range(nx)]
    with torch.inference_mode():
        for start in range(0, len(jobs), batch_size):
            batch = jobs[start:start + batch_size]
            x = np.stack([padded[:, i * window:i * window + side, j * window:j * window + side] for i, j in batch])
            logits = model(ckpt.normalization.apply(torch.from_numpy(x.astype(np.int32))))
            idx = logits.argmax(1).to(torch.uint8).numpy()
            for n, (i, j) in enumerate(batch):
                core = idx[n, grid.before:grid.before + window, grid.before:grid.before + window]
                out[i * window:(i + 1) * window, j * window:(j + 1) * window] = core
    codes = ckpt.classes.to_code(out[:h, :w]).astype(np.uint8)
    codes[(dn == 0).all(axis=0)] = 0
    return codes


class DaskRun:
    """A LocalCluster of ``workers`` single-threaded processes, warm (model loaded once per worker)."""

    def __init__(self, mosaic: Path, ckpt: Path, args, workers: int) -> None:
        self.cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=":0")
        self.client = Client(self.cluster, set_as_default=False)
        self.client.run(torch.set_num_threads, 1)
        self.client.run(P.load_model, str(ckpt.resolve()), P.file_sha256(ckpt), "cpu")  # warm-up
        arr = open_raster(mosaic, chunks=args.chunk)
        self.class_map = P.predict(arr, ckpt, window=args.window, halo=args.halo, batch_size=args.batch_size,
                                   chunk_size=args.chunk, client=self.client)
        self.n_tasks = len(self.class_map.data.__dask_graph__())

    def __call__(self) -> np.ndarray:
        return self.client.compute(self.class_map.data, sync=True)

    def cpu(self) -> float:
        """CPU seconds of all worker processes and this one."""
        return sum(self.client.run(time.process_time).values()) + time.process_time()

    def close(self) -> dict[str, int]:
        loads = self.client.run(P.load_count)
        self.client.close()
        self.cluster.close()
        return loads


def measure(runs: dict, repeats: int) -> dict[str, tuple]:
    """Interleave the runs (A B C … A B C …) so each meets the machine's load alike; keep each
    run's fastest repeat as (result, wall s, CPU s, 1-min load average at its start)."""
    best: dict[str, tuple] = {}
    for _ in range(repeats):
        for name, (fn, cpu_clock, threads) in runs.items():
            torch.set_num_threads(threads)
            load = os.getloadavg()[0]
            cpu, start = cpu_clock(), time.perf_counter()
            result = fn()
            wall, used = time.perf_counter() - start, cpu_clock() - cpu
            if name not in best or wall < best[name][1]:
                best[name] = (result, wall, used, load)
    return best


def flop_per_pixel(encoder: str, side: int = 256) -> float:
    model = build_model(encoder, 3, len(CODES), None).eval()
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 3, side, side))
    return counter.get_total_flops() / side**2


def task_counts(ckpt: Path, args) -> dict[str, float]:
    """Tasks per km² of a lazily built prediction over an 8192² px (6,711 km²) mosaic."""
    import dask.array as da

    n = 8192
    gbox = snapped_geobox((500000, 4000000, 500000 + n * RES, 4000000 + n * RES), 32633, RES)
    km2 = n * n * RES * RES / 1e6
    out = {}
    for chunk in (512, 1024, 2048):
        arr = to_dataarray(da.ones((3, n, n), dtype=np.uint16, chunks=(3, chunk, chunk)), gbox, band_names=list(BANDS))
        class_map = P.predict(arr, ckpt, window=args.window, halo=args.halo, chunk_size=chunk)
        (optimized,) = dask.optimize(class_map.data)
        out[f"chunk {chunk}: tasks/km² (graph, optimized)"] = (
            round(len(class_map.data.__dask_graph__()) / km2, 4), round(len(optimized.__dask_graph__()) / km2, 4))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=2048, help="mosaic edge (px)")
    parser.add_argument("--chunk", type=int, default=1024, help="dask chunk edge (px)")
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--halo", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--encoder", default="resnet18", choices=ENCODERS)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds; each run's fastest counts")
    parser.add_argument("--skip-flops", action="store_true")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    figures: dict[str, object] = {"config": vars(args) | {"json": str(args.json) if args.json else None}}
    with tempfile.TemporaryDirectory() as tmp:
        mosaic, ckpt = make_inputs(Path(tmp), args.size, args.encoder)
        dn = open_raster(mosaic, chunks=None).values  # in memory for the plain loop (not timed)
        px = dn.shape[1] * dn.shape[2]

        dask_runs = {n: DaskRun(mosaic, ckpt, args, n) for n in (1, 2)}
        plain = lambda context: lambda: plain_loop(dn, ckpt, args.window, args.halo, args.batch_size, context)  # noqa: E731
        runs = {
            "plain 1 thread": (plain(True), time.process_time, 1),
            "dask 1 worker": (dask_runs[1], dask_runs[1].cpu, 1),
            "plain 2 threads": (plain(True), time.process_time, 2),
            "dask 2 workers": (dask_runs[2], dask_runs[2].cpu, 1),
            "plain 1 thread, no context": (plain(False), time.process_time, 1),
        }
        try:
            best = measure(runs, args.repeats)
        finally:
            n_tasks = dask_runs[1].n_tasks
            loads1, loads2 = dask_runs[1].close(), dask_runs[2].close()
        (plain1, t_plain1, c_plain1, l1), (dask1, t_dask1, c_dask1, l3), (plain2, t_plain2, c_plain2, l4), \
            (dask2, t_dask2, c_dask2, l5), (_, t_noctx1, c_noctx1, l2) = best.values()
        # same work: the maps agree (float reductions may differ with thread counts on near-ties)
        figures["agreement with plain 1 thread"] = {
            name: float((arr == plain1).mean()) for name, arr in
            (("dask 1 worker", dask1), ("dask 2 workers", dask2), ("plain 2 threads", plain2))}
        if min(figures["agreement with plain 1 thread"].values()) < 0.999:
            raise SystemExit(f"maps differ: {figures['agreement with plain 1 thread']}")

        grid = P.WindowGrid.from_options(args.window, args.halo)
        figures["throughput px/s (best of repeats)"] = {
            "plain 1 thread": round(px / t_plain1), "plain 1 thread, no context (seamy)": round(px / t_noctx1),
            "dask 1 worker x 1 thread": round(px / t_dask1),
            "plain 2 threads": round(px / t_plain2), "dask 2 workers x 1 thread": round(px / t_dask2),
        }
        figures["wall s / CPU s"] = {k: [round(w, 2), round(c, 2)] for k, w, c in (
            ("plain 1 thread", t_plain1, c_plain1), ("plain 1 thread, no context", t_noctx1, c_noctx1),
            ("dask 1 worker", t_dask1, c_dask1), ("plain 2 threads", t_plain2, c_plain2),
            ("dask 2 workers", t_dask2, c_dask2))}
        figures["1-min load average at the start of each best run (2 cores)"] = {
            k: round(v[3], 2) for k, v in best.items()}
        figures["ratios"] = {
            "dask 1 worker / plain 1 thread (target >= 0.8)": round(t_plain1 / t_dask1, 3),
            "dask 2 workers / plain 2 threads (target >= 0.8)": round(t_plain2 / t_dask2, 3),
            "dask 2 workers / dask 1 worker (target >= 1.6)": round(t_dask1 / t_dask2, 3),
            "plain 2 threads / plain 1 thread": round(t_plain1 / t_plain2, 3),
            "CPU efficiency dask 1 worker vs plain 1 thread": round(c_plain1 / c_dask1, 3),
            "CPU efficiency dask 2 workers vs plain 1 thread": round(c_plain1 / c_dask2, 3),
            "dask 1 worker / plain no context (dask + halo cost)": round(t_noctx1 / t_dask1, 3),
            "predicted context cost ((w+2h)/w)^2": round((grid.input_size / grid.window) ** 2, 3),
            "measured context cost (plain / plain no context)": round(t_plain1 / t_noctx1, 3),
        }
        figures["graph tasks (this run)"] = n_tasks
        figures["model loads per worker"] = {"1 worker": list(loads1.values()), "2 workers": list(loads2.values())}
        figures["tasks per km2"] = task_counts(ckpt, args)
    if not args.skip_flops:
        figures["GFLOP per Mpx (forward, 256 px input)"] = {e: round(flop_per_pixel(e) / 1e3, 1) for e in ENCODERS}
        figures["FLOP per output px incl. context, window/halo"] = {
            e: round(flop_per_pixel(e) * (grid.input_size / grid.window) ** 2) for e in ENCODERS}
    print(json.dumps(figures, indent=2, ensure_ascii=False))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
