"""Benchmark: the global MMU merge of a map stored as tiles, at country size.

Builds a prediction-like Level-2 class map at 10 m tile by tile (never whole: smooth class
regions from interpolated coarse noise — seamless across tiles —, speckle blobs of random
classes, 2–4 px wide road and river segments; the mix of ``bench_generalize.py``), then:

1. per tile, in ``--workers`` processes: the tile's patch table and its local decisions
   (:class:`~clc_dask.generalize.tiles.TiledGeneralization` ``.measure``, saved in ``--workdir``,
   reused when the script runs again);
2. in a fresh process: the global decision (``.decide``: the reduced tables joined across
   tiles, the merge, one lookup table per tile written) — seconds and peak memory above
   the process's baseline (``VmHWM`` − ``VmRSS`` before reading anything);
3. for comparison, in a fresh process, the whole-graph client merge (``assemble`` +
   ``merge_small`` on every tile's full table, as ``generalize()`` does) on the first
   ``--full-size``² pixels.

Figures are per 10⁶ patches (patches counted per tile), and extrapolated to Türkiye
(7.8·10⁹ px at 10 m) with the map's patch density.

    python benchmarks/bench_generalize_merge.py [--size 32768] [--tile 2048] [--workers 2] \\
        [--full-size 8192] [--workdir /tmp/clc-bench-merge]
"""

from __future__ import annotations

import argparse
import functools
import json
import multiprocessing
import shutil
import time
from pathlib import Path

import dask
import dask.array as da
import numpy as np
import scipy.ndimage as ndi
from odc.geo.geobox import GeoBox

from clc_dask.generalize.patchgraph import assemble, block_patches, merge_small
from clc_dask.generalize.tiles import TiledGeneralization, load_reduction
from clc_dask.rasters import to_dataarray

CODES = np.array([11, 12, 21, 23, 24, 31, 32, 41, 51], dtype=np.uint8)
TURKIYE_PX = 7.8e9
COARSE, MEDIUM = 128, 16  # pixels per cell of the region and boundary-roughness noise


@functools.lru_cache(maxsize=4)
def _noise(size: int, cell: int, seed: int) -> np.ndarray:
    """Per-class noise on a grid of ``cell``-pixel cells covering the map (+3 cells; cached per process)."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((len(CODES), size // cell + 3, size // cell + 3)).astype(np.float32)


def _linear_weights(positions: np.ndarray, cells: int) -> np.ndarray:
    """(len(positions), cells) matrix of linear interpolation weights."""
    low = np.floor(positions).astype(int)
    frac = (positions - low).astype(np.float32)
    weights = np.zeros((positions.size, cells), dtype=np.float32)
    rows = np.arange(positions.size)
    weights[rows, low] = 1 - frac
    weights[rows, np.minimum(low + 1, cells - 1)] += frac
    return weights


def country_tile(size: int, tile: int, iy: int, ix: int, seed: int = 0) -> np.ndarray:
    """Tile (iy, ix) of the synthetic map (deterministic; seamless regions across tiles)."""
    ys = np.arange(iy * tile, min((iy + 1) * tile, size), dtype=np.float32)
    xs = np.arange(ix * tile, min((ix + 1) * tile, size), dtype=np.float32)
    fields = np.zeros((len(CODES), ys.size, xs.size), dtype=np.float32)
    for cell, weight, salt in ((COARSE, 1.0, 0), (MEDIUM, 0.15, 1)):
        noise = _noise(size, cell, seed * 10 + salt)
        y0, x0 = int(ys[0]) // cell, int(xs[0]) // cell  # bilinear: the window's cells suffice
        window = noise[:, y0 : int(ys[-1]) // cell + 2, x0 : int(xs[-1]) // cell + 2]
        wy, wx = _linear_weights(ys / cell - y0, window.shape[1]), _linear_weights(xs / cell - x0, window.shape[2])
        fields += weight * np.einsum("ij,kjl,ml->kim", wy, window, wx, optimize=True)
    codes = CODES[np.argmax(fields, axis=0)]
    rng = np.random.default_rng([seed, iy, ix])
    seeds = rng.random(codes.shape) < 0.004
    blobs = ndi.binary_dilation(seeds, iterations=1) & (rng.random(codes.shape) < 0.7)
    lab, n = ndi.label(blobs)
    codes[blobs] = rng.choice(CODES, n + 1)[lab[blobs]]
    h, w = codes.shape
    for _ in range(max(1, round(15 * h * w / 2048**2))):
        pos, start, width = rng.integers(0, max(h, w) - 4), rng.integers(0, max(h, w)), rng.integers(2, 5)
        stop, value = start + rng.integers(300, 1500), rng.choice([12, 51])
        if rng.random() < 0.5:
            codes[pos : pos + width, start:stop] = value
        else:
            codes[start:stop, pos : pos + width] = value
    return codes


def country_map(size: int, tile: int, seed: int = 0) -> da.Array:
    """The synthetic map as a lazy dask array, chunks = tiles."""
    n = -(-size // tile)
    make = dask.delayed(country_tile, pure=True)
    rows = []
    for iy in range(n):
        row = []
        for ix in range(n):
            shape = (min(tile, size - iy * tile), min(tile, size - ix * tile))
            row.append(da.from_delayed(make(size, tile, iy, ix, seed), shape=shape, dtype=np.uint8))
        rows.append(row)
    return da.block(rows)


def _status(field: str) -> float:
    """A ``/proc/self/status`` memory figure in MiB."""
    with open("/proc/self/status", encoding="ascii") as fh:
        line = next(x for x in fh if x.startswith(field))
    return int(line.split()[1]) / 1024


def _as_dataarray(size: int, tile: int) -> object:
    gbox = GeoBox.from_bbox((500000, 4000000, 500000 + 10 * size, 4000000 + 10 * size), "EPSG:32633", resolution=10)
    return to_dataarray(country_map(size, tile), gbox, name="classes")


def _decide_in_fresh_process(size: int, tile: int, workdir: str, queue: multiprocessing.Queue) -> None:
    base = _status("VmRSS")
    tiled = TiledGeneralization(_as_dataarray(size, tile), workdir, mmu_ha=25, min_width_m=0)
    start = time.perf_counter()
    summary = tiled.decide(0)
    queue.put({"seconds": time.perf_counter() - start, "peak_mib": _status("VmHWM") - base, **summary})


def _full_merge_in_fresh_process(tables_file: str, queue: multiprocessing.Queue) -> None:
    base = _status("VmRSS")
    import pickle

    with open(tables_file, "rb") as fh:
        tables = pickle.load(fh)
    start = time.perf_counter()
    graph = assemble(tables, 4)
    final = merge_small(graph, 2500)
    seconds = time.perf_counter() - start
    queue.put({"seconds": seconds, "peak_mib": _status("VmHWM") - base, "patches": int(graph.code.size),
               "changed": int((final != graph.code).sum())})


def _in_fresh_process(target, *args) -> dict:  # noqa: ANN001
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=target, args=(*args, queue))
    process.start()
    result = queue.get()
    process.join()
    return result


def _full_tables(size: int, tile: int, full_size: int, path: Path) -> int:
    import pickle

    n = -(-full_size // tile)
    tables = [[block_patches(country_tile(size, tile, iy, ix)[: full_size - iy * tile, : full_size - ix * tile],
                             (iy * tile, ix * tile), full_size, 4)[0] for ix in range(n)] for iy in range(n)]
    with open(path, "wb") as fh:
        pickle.dump(tables, fh)
    return sum(t.n for row in tables for t in row)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=32768, help="map edge in pixels")
    parser.add_argument("--tile", type=int, default=2048, help="tile edge in pixels")
    parser.add_argument("--workers", type=int, default=2, help="processes measuring tiles")
    parser.add_argument("--full-size", type=int, default=8192, help="edge of the whole-graph comparison (0: skip)")
    parser.add_argument("--workdir", default="/tmp/clc-bench-merge", help="saved tile tables (reused)")
    parser.add_argument("--fresh", action="store_true", help="remove the work directory first")
    args = parser.parse_args()
    workdir = Path(args.workdir) / f"{args.size}_{args.tile}"
    if args.fresh:
        shutil.rmtree(workdir, ignore_errors=True)
    for stale in ("step1_mmu/decision.json",):
        (workdir / stale).unlink(missing_ok=True)  # always measure the decision

    tiled = TiledGeneralization(_as_dataarray(args.size, args.tile), workdir, mmu_ha=25, min_width_m=0)
    start = time.perf_counter()
    with dask.config.set(scheduler="processes", num_workers=args.workers):
        tiled.measure(0)
    measure_seconds = time.perf_counter() - start
    decision = _in_fresh_process(_decide_in_fresh_process, args.size, args.tile, str(workdir))
    tables = sorted((workdir / "step1_mmu" / "tables").glob("*.npz"))
    per_tile = [load_reduction(p, merge_only=True)[0].table.n for p in tables]

    patches = decision["tile_patches"]
    density = patches / (args.size**2 / 1e6)
    millions = patches / 1e6
    turkiye = density * TURKIYE_PX / 1e12  # millions of patches
    report: dict[str, object] = {
        "size_px": args.size, "tile_px": args.tile, "tiles": len(tables), "workers": args.workers,
        "patches": patches, "patches_per_megapixel": round(density, 1),
        "decided_in_tiles": decision["decided_in_tiles"], "global_graph_patches": decision["global_patches"],
        "global_graph_fraction": round(decision["global_patches"] / patches, 3),
        "largest_reduced_tile_table": max(per_tile),
        "seconds_measure_tiles": round(measure_seconds, 1),
        "seconds_decide": round(decision["seconds"], 1),
        "peak_client_mib_decide": round(decision["peak_mib"], 1),
        "decide_seconds_per_million_patches": round(decision["seconds"] / millions, 2),
        "decide_peak_mib_per_million_patches": round(decision["peak_mib"] / millions, 1),
        "turkiye_patches_estimate": round(turkiye * 1e6),
        "turkiye_decide_seconds_estimate": round(decision["seconds"] / millions * turkiye),
        "turkiye_decide_peak_gib_estimate": round(decision["peak_mib"] / millions * turkiye / 1024, 2),
    }
    if args.full_size:
        tables_file = workdir / f"full_tables_{args.full_size}.pkl"
        full_patches = _full_tables(args.size, args.tile, args.full_size, tables_file)
        full = _in_fresh_process(_full_merge_in_fresh_process, str(tables_file))
        tables_file.unlink()
        per_million = full_patches / 1e6
        report.update({
            "whole_graph_size_px": args.full_size, "whole_graph_patches": full_patches,
            "whole_graph_seconds": round(full["seconds"], 1), "whole_graph_peak_mib": round(full["peak_mib"], 1),
            "whole_graph_seconds_per_million_patches": round(full["seconds"] / per_million, 2),
            "whole_graph_peak_mib_per_million_patches": round(full["peak_mib"] / per_million, 1),
            "turkiye_whole_graph_seconds_estimate": round(full["seconds"] / per_million * turkiye),
            "turkiye_whole_graph_peak_gib_estimate": round(full["peak_mib"] / per_million * turkiye / 1024, 2),
            "ratio_peak_memory_whole_graph_over_decide": round(
                (full["peak_mib"] / per_million) / (decision["peak_mib"] / millions), 1),
            "ratio_seconds_whole_graph_over_decide": round(
                (full["seconds"] / per_million) / (decision["seconds"] / millions), 1),
        })
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
