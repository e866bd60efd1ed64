"""What merging granules into satellite passes costs: the mosaic reduction and the demo build.

1. The per-block reduction of :func:`clc_dask.mosaic.seasonal_mosaic` on one block of
   ``--dates`` granules × 4 bands × ``--block``² px (random DN and SCL, seeded): the
   per-granule median (every granule its own pass, as before passes were merged) against
   the reduction with one granule per pass (the default demo: nothing to merge), with the
   merge forced on one-granule passes (its cost alone), and with two granules per pass
   (the two-zone demo). Best of ``--repeat`` runs each.
2. Building the demo region of ``--build-size`` px in one UTM zone and across two zones
   (``two_zone=True``: twice the granules, each about two thirds of the region), in fresh
   temporary folders.

Printed (one JSON object): seconds of each and the ratios to the first of its group.

Run (about a minute on 2 cores):

    python benchmarks/bench_pass_merge.py --block 1024 --dates 8 --build-size 1024
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable

import numpy as np

from clc_dask.demo.region import build_region
from clc_dask.mosaic import _median_block, clear_mask, masked_classes, median_of_clear, merge_passes


def best_of(repeat: int, run: Callable[[], object]) -> float:
    """The fastest of ``repeat`` runs, in seconds."""
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return min(times)


def reduction(block: int, dates: int, repeat: int) -> dict[str, float]:
    rng = np.random.default_rng(0)
    refl = rng.integers(1, 9000, size=(dates, 4, block, block), dtype=np.uint16)
    scl = rng.choice(np.arange(12, dtype=np.uint16), size=(dates, 1, block, block))
    offsets = np.resize(np.array([0, 1000], dtype=np.uint16), dates)
    classes = np.asarray(masked_classes(), dtype=np.uint16)

    def per_granule() -> np.ndarray:
        clear = clear_mask(scl[:, 0], classes)
        return np.stack([median_of_clear(refl[:, j], clear, offsets) for j in range(refl.shape[1])])

    singles = tuple((t,) for t in range(dates))
    pairs = tuple(tuple(range(t, min(t + 2, dates))) for t in range(0, dates, 2))

    def merged_singles() -> np.ndarray:
        clear = clear_mask(scl[:, 0], classes)
        no_offset = np.zeros(dates, dtype=np.uint16)
        return np.stack([median_of_clear(*merge_passes(refl[:, j], clear, offsets, singles), no_offset)
                         for j in range(refl.shape[1])])

    expected = per_granule()
    for candidate in (_median_block(refl, scl, offsets, classes, singles), merged_singles()):
        if not np.array_equal(candidate, expected):
            raise AssertionError("one granule per pass must give the per-granule median")
    base = best_of(repeat, per_granule)
    one = best_of(repeat, lambda: _median_block(refl, scl, offsets, classes, singles))
    forced = best_of(repeat, merged_singles)
    two = best_of(repeat, lambda: _median_block(refl, scl, offsets, classes, pairs))
    return {"per_granule_s": round(base, 3), "one_granule_per_pass_s": round(one, 3),
            "merge_forced_s": round(forced, 3), "two_granules_per_pass_s": round(two, 3),
            "one_per_pass_ratio": round(one / base, 2), "merge_forced_ratio": round(forced / base, 2),
            "two_per_pass_ratio": round(two / base, 2)}


def build(size: int) -> dict[str, float]:
    seconds = {}
    for two_zone in (False, True):
        with tempfile.TemporaryDirectory(prefix="bench-pass-merge-") as workdir:
            started = time.perf_counter()
            build_region(workdir, size=size, seed=0, two_zone=two_zone)
            seconds[two_zone] = time.perf_counter() - started
    return {"one_zone_build_s": round(seconds[False], 1), "two_zone_build_s": round(seconds[True], 1),
            "two_zone_build_ratio": round(seconds[True] / seconds[False], 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--block", type=int, default=1024, help="block side, px")
    parser.add_argument("--dates", type=int, default=8, help="granules in the block")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--build-size", type=int, default=1024, help="demo region side, px (0: skip)")
    args = parser.parse_args()
    result = {"block": args.block, "dates": args.dates, **reduction(args.block, args.dates, args.repeat)}
    if args.build_size:
        result.update(build_size=args.build_size, **build(args.build_size))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
