"""Benchmark: chunked vs in-memory generalization, and distance to GDAL's sieve.

Builds a prediction-like 4096² Level-2 class map at 10 m (smooth class regions from
upsampled noise, plus speckle blobs and thin linear features like roads and rivers),
generalizes it in memory (:func:`generalize_array`) and chunk by chunk on dask
(:func:`generalize`, threads), checks both are identical, and reports the time ratio and
how far the result is from ``rasterio.features.sieve`` with the same MMU.

    python benchmarks/bench_generalize.py [--size 4096] [--chunk 1024] [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import time

import dask
import numpy as np
import rasterio.features
import scipy.ndimage as ndi
import xarray as xr
from odc.geo.geobox import GeoBox

from clc_dask.generalize import compare_to_sieve, generalize, generalize_array, rules_for
from clc_dask.rasters import to_dataarray

CODES = np.array([11, 12, 21, 23, 24, 31, 32, 41, 51], dtype=np.uint8)


def prediction_like(size: int, seed: int = 0) -> np.ndarray:
    """Smooth regions (mostly 10–500 ha) + speckle blobs + 2–4 px wide line segments + no data."""
    rng = np.random.default_rng(seed)
    coarse = rng.standard_normal((len(CODES), size // 128 + 2, size // 128 + 2)).astype(np.float32)
    fields = np.stack([ndi.zoom(c, 128, order=3)[:size, :size] for c in coarse])
    fields += 0.15 * np.stack([ndi.zoom(c, 16, order=1)[:size, :size] for c in
                               rng.standard_normal((len(CODES), size // 16 + 1, size // 16 + 1)).astype(np.float32)])
    codes = CODES[np.argmax(fields, axis=0)]
    # speckle: small blobs of random classes (what a U-Net leaves on class borders)
    seeds = rng.random((size, size)) < 0.004
    blobs = ndi.binary_dilation(seeds, iterations=1) & (rng.random((size, size)) < 0.7)
    lab, n = ndi.label(blobs)
    codes[blobs] = rng.choice(CODES, n + 1)[lab[blobs]]
    # linear features: road/river segments 2–4 px wide (under the 100 m minimum width)
    for _ in range(60):
        pos, start, width = rng.integers(0, size - 4), rng.integers(0, size), rng.integers(2, 5)
        stop = start + rng.integers(300, 1500)
        if rng.random() < 0.5:
            codes[pos : pos + width, start:stop] = rng.choice([12, 51])
        else:
            codes[start:stop, pos : pos + width] = rng.choice([12, 51])
    yy, xx = np.ogrid[:size, :size]
    codes[(yy + xx) < size // 6] = 0  # a no-data corner (outside the AOI)
    return codes


def timed(func, repeat: int):
    """Run ``func`` ``repeat`` times: (result, best wall seconds, CPU seconds of that run).

    CPU seconds (all threads of this process) measure the work regardless of how busy the
    machine is; wall seconds show what parallel chunks gain.
    """
    best = None
    for _ in range(repeat):
        wall, cpu = time.perf_counter(), time.process_time()
        result = func()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        if best is None or wall < best[1]:
            best = (result, wall, cpu)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--chunk", type=int, default=1024)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--mmu-ha", type=float, default=25.0)
    parser.add_argument("--min-width-m", type=float, default=100.0)
    parser.add_argument("--repeat", type=int, default=1, help="best wall time of this many runs")
    args = parser.parse_args()

    codes = prediction_like(args.size)
    rules = rules_for(10.0, args.mmu_ha, args.min_width_m)
    gbox = GeoBox.from_bbox((500000, 4000000, 500000 + 10 * args.size, 4000000 + 10 * args.size),
                            "EPSG:32633", resolution=10)
    arr: xr.DataArray = to_dataarray(codes, gbox, name="classes")

    in_memory, t_mem, c_mem = timed(lambda: generalize_array(codes, 10.0, args.mmu_ha, args.min_width_m), args.repeat)
    chunked_arr = arr.chunk({"y": args.chunk, "x": args.chunk})
    with dask.config.set(scheduler="threads", num_workers=args.workers):
        chunked, t_chunk, c_chunk = timed(lambda: generalize(
            chunked_arr, mmu_ha=args.mmu_ha, min_width_m=args.min_width_m).values, args.repeat)
        lazy, t_lazy, c_lazy = timed(lambda: generalize(
            chunked_arr, mmu_ha=args.mmu_ha, min_width_m=args.min_width_m, persist=False).values, args.repeat)
    mmu_only, t_mmu, _ = timed(lambda: generalize_array(codes, 10.0, args.mmu_ha, 0), 1)
    _, t_sieve, _ = timed(lambda: rasterio.features.sieve(codes, rules.mmu_px, mask=codes != 0), 1)
    t0 = time.perf_counter()
    vs_sieve = compare_to_sieve(codes, in_memory, rules.mmu_px)
    vs_sieve_mmu_only = compare_to_sieve(codes, mmu_only, rules.mmu_px)
    t_cmp = time.perf_counter() - t0

    report = {
        "size_px": args.size, "chunk_px": args.chunk, "threads": args.workers,
        "mmu_px": rules.mmu_px, "min_width_px": list(rules.width_px),
        "identical_chunked_vs_in_memory": bool(np.array_equal(chunked, in_memory) and np.array_equal(lazy, in_memory)),
        "seconds_in_memory": round(t_mem, 2),
        "seconds_chunked_persist": round(t_chunk, 2),
        "seconds_chunked_no_persist": round(t_lazy, 2),
        "ratio_chunked_over_in_memory": round(t_chunk / t_mem, 2),
        "ratio_no_persist_over_in_memory": round(t_lazy / t_mem, 2),
        "cpu_seconds_in_memory": round(c_mem, 2),
        "cpu_seconds_chunked_persist": round(c_chunk, 2),
        "cpu_seconds_chunked_no_persist": round(c_lazy, 2),
        "cpu_ratio_chunked_over_in_memory": round(c_chunk / c_mem, 2),
        "cpu_ratio_no_persist_over_in_memory": round(c_lazy / c_mem, 2),
        "seconds_mmu_only_in_memory": round(t_mmu, 2),
        "seconds_gdal_sieve": round(t_sieve, 2),
        "seconds_compare_to_sieve_x2": round(t_cmp, 2),
        "vs_sieve_full_rules": vs_sieve,
        "vs_sieve_mmu_only": vs_sieve_mmu_only,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
