"""Production runs leave no trace of how the country was cut: tiles, the order and number of tiles
in flight, workers and the scenes' UTM zones change no pixel.

On the two-zone demo region (EPSG:3035 grid over granules in EPSG:32632 and 32633, read through
the loopback STAC API and COG server), a run with tiles smaller than the region must equal the
same scenes mosaicked and predicted on the whole grid at once, and its generalized map must
equal ``generalize()`` of the stitched class map — with one tile in flight or several, on a
cluster of two workers.
"""

from __future__ import annotations

import json
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import torch
import yaml

from clc_dask.classes import ClassTable
from clc_dask.config import load_run_config
from clc_dask.errors import OutputError
from clc_dask.generalize import generalize_array
from clc_dask.grid import TileGrid
from clc_dask.load import load_scenes
from clc_dask.model import Checkpoint, Normalization, build_model, save_checkpoint
from clc_dask.mosaic import seasonal_mosaic
from clc_dask.predict import predict
from clc_dask.run import execute_run
from clc_dask.search import search_items

BANDS = ("B08", "B04", "B03")
CODES = [11, 21, 23, 31, 32, 51]
TILE, CHUNK, WINDOW, HALO = 128, 64, 64, 32
MMU_HA, WIDTH_M = 1.0, 30.0


@pytest.fixture(scope="module")
def region(two_zone_demo):
    return two_zone_demo


@pytest.fixture(scope="module")
def root(tmp_path_factory, region):
    """The checkpoint (a seeded, untrained U-Net: what matters is that tiles and whole grid
    agree) and the AOI: the region's footprint on its EPSG:3035 grid."""
    demo, _ = region
    folder = tmp_path_factory.mktemp("seamless")
    torch.manual_seed(1)
    table = ClassTable(2, CODES)
    model = build_model("resnet18", len(BANDS), len(table), None)
    norm = Normalization((0.25, 0.08, 0.07), (0.03, 0.01, 0.01))
    save_checkpoint(Checkpoint("resnet18", BANDS, table, norm, model.state_dict()), folder / "model.pt")
    frame = gpd.GeoDataFrame({"name": ["two-zone"]}, geometry=[demo.geobox.extent.geom], crs="EPSG:3035")
    frame.to_file(folder / "aoi.gpkg", driver="GPKG")
    return folder


def write_config(root: Path, region, store: str, **cluster) -> Path:
    demo, servers = region
    raw = {
        "name": "two-zone",
        "aoi": {"path": "aoi.gpkg"},
        "grid": {"epsg": 3035, "resolution": 10, "tile_size": TILE, "chunk_size": CHUNK},
        "imagery": {"source": servers.stac_url, "collection": servers.collection_id, "year": demo.year,
                    "seasons": ["july"], "max_cloud": 100, "composite": "nrg"},
        "model": {"checkpoint": "model.pt", "batch_size": 3, "window": WINDOW, "halo": HALO, "device": "cpu"},
        "generalize": {"mmu_ha": MMU_HA, "min_width_m": WIDTH_M},
        "output": {"store": store, "formats": ["cog"], "vectorize": True},
        "cluster": {"kind": "threads", **cluster},
    }
    path = root / f"{store}.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


def stitched(store: Path, layer: str, grid: TileGrid) -> np.ndarray:
    out = np.zeros(grid.geobox.shape, dtype=np.uint8)
    for tile in grid:
        with rasterio.open(store / "tiles" / tile.name / f"{layer}.tif") as src:
            out[tile.pixel_slices] = src.read(1)
    return out


@pytest.fixture(scope="module")
def cluster_client():
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        with Client(cluster) as client:
            yield client


@pytest.fixture(scope="module")
def runs(root, region, cluster_client):
    """The same run with one tile in flight and with five, on a two-worker cluster."""
    one = execute_run(load_run_config(write_config(root, region, "one", tiles_in_flight=1)), client=cluster_client)
    five = execute_run(load_run_config(write_config(root, region, "five", tiles_in_flight=5)), client=cluster_client)
    return one, five


def test_a_reprojected_tiled_run_equals_the_whole_grid_at_once(runs, root, region):
    one, five = runs
    demo, servers = region
    grid = one.plan.grid
    assert str(grid.geobox.crs) == "EPSG:3035" and grid.geobox == demo.geobox
    assert len(grid) == 4 and one.plan.in_flight == 1 and five.plan.in_flight == 5
    classes = stitched(one.store, "classes", grid)
    np.testing.assert_array_equal(classes, stitched(five.store, "classes", grid))
    # the same scenes, mosaicked and predicted on the whole grid (padded so that its windows
    # are the run's: the run grid's origin lies on the window grid)
    items = search_items(servers.stac_url, season="july", years=[demo.year], max_cloud=100,
                         collection=servers.collection_id, bbox=demo.bbox_lonlat)
    assert sorted({str(i.properties["proj:code"]) for i in items}) == ["EPSG:32632", "EPSG:32633"]
    padded = demo.geobox.pad(WINDOW)
    mosaic = seasonal_mosaic(load_scenes(list(items), padded, bands=list(BANDS), chunk_size=CHUNK), "nrg")
    whole = predict(mosaic["reflectance"].sel(band=list(BANDS)), root / "model.pt", halo=HALO, window=WINDOW,
                    batch_size=3, device="cpu", chunk_size=2 * WINDOW).values[WINDOW:-WINDOW, WINDOW:-WINDOW]
    np.testing.assert_array_equal(classes, whole)
    assert len(set(np.unique(classes).tolist()) - {0}) >= 3  # a map, not one class

    generalized = stitched(one.store, "generalized", grid)
    np.testing.assert_array_equal(generalized, stitched(five.store, "generalized", grid))
    np.testing.assert_array_equal(generalized, generalize_array(classes, 10.0, MMU_HA, WIDTH_M))
    assert (generalized != classes).any()


def test_polygons_are_dissolved_across_tile_edges(runs):
    one, five = runs
    grid = one.plan.grid
    generalized = stitched(one.store, "generalized", grid)
    polygons = gpd.read_file(one.store / "polygons.gpkg", layer="clc")
    assert list(polygons.columns[:4]) == ["id", "CODE_18", "label", "area_ha"]
    assert (one.store / "polygons.gpkg").read_bytes() == (five.store / "polygons.gpkg").read_bytes()
    for code, area in polygons.groupby(polygons["CODE_18"].astype(int))["area_ha"].sum().items():
        assert area == pytest.approx((generalized == code).sum() / 100)
    for _, group in polygons.groupby("CODE_18"):
        geoms = list(group.geometry)
        touching = [(a, b) for a in range(len(geoms)) for b in range(a + 1, len(geoms))
                    if geoms[a].intersection(geoms[b]).length > 0]
        assert touching == []
    edges = [tile.geobox.extent.geom.boundary for tile in grid]
    assert sum(any(geom.crosses(edge) for edge in edges) for geom in polygons.geometry) >= 2
    collection = json.loads((one.store / "stac" / "collection.json").read_text())
    assert collection["assets"]["polygons"]["href"] == "../polygons.gpkg"


def test_a_store_of_another_grid_is_refused_before_writing(runs, root, region):
    one, _ = runs
    raw = yaml.safe_load((root / "one.yaml").read_text())
    raw["grid"]["tile_size"] = 2 * TILE
    path = root / "other-grid.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    before = sorted(p.relative_to(one.store) for p in one.store.rglob("*"))
    manifest = (one.store / "manifest.json").read_bytes()
    with pytest.raises(OutputError, match=r"class tiles of another grid.*tiles of 128 px.*tiles of 256 px"):
        execute_run(load_run_config(path), resume=True)
    assert sorted(p.relative_to(one.store) for p in one.store.rglob("*")) == before
    assert (one.store / "manifest.json").read_bytes() == manifest


def test_a_torn_journal_record_is_ignored_and_its_tile_computed_again(runs, root, region, tmp_path):
    """A run killed while appending a tile's record: the torn record is ignored on resume, the
    tile is computed again, and the store ends byte-identical."""
    import shutil

    one, _ = runs
    store = tmp_path / "store"
    shutil.copytree(one.store, store)
    snapshot = json.loads((store / "manifest.json").read_text())
    record = {"kind": "tile", "phase": "classes", "tile": "2_1", "entry": snapshot["tiles"].pop("2_1")}
    snapshot["complete"] = False
    (store / "manifest.json").write_text(json.dumps(snapshot))
    line = json.dumps(record).encode()
    (store / "manifest.journal").write_bytes(line[: len(line) // 2])  # killed mid-write
    raw = yaml.safe_load((root / "one.yaml").read_text())
    raw["output"]["store"] = str(store)
    path = root / "torn.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    result = execute_run(load_run_config(path), resume=True)
    assert result.computed == ["2_1"] and sorted(result.skipped) == ["1_1", "1_2", "2_2"]
    for rel in ("tiles/2_1/classes.tif", "tiles/2_1/generalized.tif", "polygons.gpkg"):
        assert (store / rel).read_bytes() == (one.store / rel).read_bytes(), rel
