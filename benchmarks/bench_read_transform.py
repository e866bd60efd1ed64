"""What GDAL's exact warp transformer costs in read time, and the seams it prevents.

:func:`clc_dask.load.load_scenes` reprojects with the exact transformer (``warp_tolerance=0``)
so that a tile loaded on its own grid equals the same pixels of the whole grid. This script
reads the same grid with the exact transformer and with GDAL's default approximation
(``warp_tolerance=0.125`` source pixels), interleaved, ``--repeats`` times each after one
warm-up read of each, and prints the best time of each and their ratio (measured in this one
run). It also cuts the grid into ``--tiles``² tiles, loads each tile on its own grid and counts
the pixels (pixel × date) that differ from the whole-grid read, for both transformers.

Workloads (local files, threaded dask scheduler, so the warp is not hidden behind the network):

* ``twm``: the real 33TWM catalog (5 dates, JPEG2000 at 120 m, georeference in sidecars) on
  an EPSG:3035 grid covering most of the tile;
* ``demo``: the demo region's COGs (GeoTIFF, 10 m, built into ``--workdir``) on EPSG:3035.

Run:

    python benchmarks/bench_read_transform.py --workload twm --repeats 5
    python benchmarks/bench_read_transform.py --workload demo --size 1024 --repeats 5
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
from odc.geo.geobox import GeoBox, GeoboxTiles
from odc.geo.geom import box

from clc_dask.grid import geobox_for_aoi
from clc_dask.load import load_scenes
from clc_dask.search import search_items

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("CLC_DASK_SHARED_DATA", ROOT.parent / "shared" / "data"))
TWM_CATALOG = "s2/earthsearch_v1_33TWM_2023-08/catalog.json"
TWM_AOI = (15.05, 46.0, 16.35, 46.9)  # lon/lat, inside the 33TWM tile
EXACT, APPROXIMATE = 0.0, 0.125  # warp_tolerance, source pixels


def twm_workload(args: argparse.Namespace) -> tuple[list, GeoBox, dict]:
    items = list(search_items(SHARED_DATA / TWM_CATALOG, datetime="2023-08"))
    gbox = geobox_for_aoi(box(*TWM_AOI, "EPSG:4326"), args.epsg, 120)
    return items, gbox, {"GDAL_DISABLE_READDIR_ON_OPEN": "NO"}


def demo_workload(args: argparse.Namespace) -> tuple[list, GeoBox, dict]:
    from clc_dask.demo.region import build_region

    region = build_region(args.workdir, size=args.size, seed=0)
    items = [i for i in region.items() if i.datetime.month == 7]
    inner = region.geobox.extent.buffer(-100)  # metres: stay inside the scenes once reprojected
    return items, geobox_for_aoi(inner, args.epsg, region.resolution), {}


def read(items: list, gbox: GeoBox, gdal: dict, tolerance: float, chunk: int) -> np.ndarray:
    return load_scenes(items, gbox, bands=("B04",), gdal=gdal, chunksize=chunk,
                       warp_tolerance=tolerance).values


def timed(items: list, gbox: GeoBox, gdal: dict, tolerance: float, chunk: int) -> float:
    started = time.perf_counter()
    read(items, gbox, gdal, tolerance, chunk)
    return time.perf_counter() - started


def differing_in_tiles(items: list, gbox: GeoBox, gdal: dict, tolerance: float, tiles: int,
                       whole: np.ndarray) -> tuple[int, int]:
    """(pixel × date values that differ, values compared) over all tiles read on their own."""
    grid = GeoboxTiles(gbox, (-(-gbox.shape.y // tiles), -(-gbox.shape.x // tiles)))
    differing = compared = 0
    for index in np.ndindex(grid.shape.yx):
        tile = grid[index]
        rows, cols = grid.roi[index]
        part = read(items, tile, gdal, tolerance, 1024)
        expected = whole[:, :, rows, cols]
        differing += int((part != expected).any(axis=1).sum())
        compared += expected[:, 0].size
    return differing, compared


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workload", choices=("twm", "demo"), default="twm")
    parser.add_argument("--epsg", type=int, default=3035, help="CRS of the grid read onto")
    parser.add_argument("--repeats", type=int, default=5, help="timed reads per transformer")
    parser.add_argument("--chunk-size", type=int, default=512, help="dask chunk edge in px")
    parser.add_argument("--tiles", type=int, default=3, help="tiles per side for the seam count")
    parser.add_argument("--threads", type=int, default=2, help="dask threads")
    parser.add_argument("--workdir", type=Path,
                        default=Path(tempfile.gettempdir()) / "clc-demo-bench-read")
    parser.add_argument("--size", type=int, default=1024, help="demo region side in px (10 m)")
    args = parser.parse_args()

    items, gbox, gdal = (twm_workload if args.workload == "twm" else demo_workload)(args)
    with dask.config.set(scheduler="threads", num_workers=args.threads):
        whole = {t: read(items, gbox, gdal, t, args.chunk_size) for t in (EXACT, APPROXIMATE)}
        best = {EXACT: float("inf"), APPROXIMATE: float("inf")}
        for _ in range(args.repeats):
            for tolerance in (EXACT, APPROXIMATE):
                best[tolerance] = min(best[tolerance],
                                      timed(items, gbox, gdal, tolerance, args.chunk_size))
        seams = {t: differing_in_tiles(items, gbox, gdal, t, args.tiles, whole[t])
                 for t in (EXACT, APPROXIMATE)}
    print(json.dumps({
        "workload": args.workload,
        "grid": f"EPSG:{args.epsg}, {gbox.shape.y}x{gbox.shape.x} px at {abs(gbox.resolution.x):g} m",
        "dates": len(items),
        "bands_read": ["B04", "SCL"],
        "repeats": args.repeats,
        "best_seconds_exact": round(best[EXACT], 3),
        "best_seconds_approximate": round(best[APPROXIMATE], 3),
        "exact_over_approximate_time": round(best[EXACT] / best[APPROXIMATE], 3),
        "tiles": f"{args.tiles}x{args.tiles}, each loaded on its own grid",
        "tile_values_differing_from_whole_exact": seams[EXACT][0],
        "tile_values_differing_from_whole_approximate": seams[APPROXIMATE][0],
        "tile_values_compared": seams[EXACT][1],
        "approximate_whole_values_differing_from_exact": int(
            (whole[EXACT] != whole[APPROXIMATE]).any(axis=1).sum()),
    }, indent=1))


if __name__ == "__main__":
    main()
