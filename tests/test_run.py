"""Production runs: plan, seamless tiles, resume after SIGKILL, worker loss, STAC, bad input.

Everything runs on a 512 × 512 px demo region (4 tiles of 256 px, 4 September scenes) with
a ResNet18 U-Net of random seeded weights (deterministic given the weights), 1–2 threads.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import dask
import geopandas as gpd
import numpy as np
import pytest
import rasterio
import torch
import xarray as xr
import yaml
from typer.testing import CliRunner

from clc_dask import run as R
from clc_dask.classes import ClassTable, colormap
from clc_dask.config import load_run_config
from clc_dask.errors import CheckpointError, ConfigError, InputError, OutputError
from clc_dask.generalize import generalize_array
from clc_dask.grid import TileGrid, snapped_geobox
from clc_dask.load import load_scenes
from clc_dask.model import Checkpoint, Normalization, build_model, save_checkpoint
from clc_dask.mosaic import seasonal_mosaic
from clc_dask.predict import INFERENCE_LAYER, predict
from clc_dask.run import Manifest
from clc_dask.run import plan as run_plan
from clc_dask.run.layout import TileLayout
from clc_dask.run.tiles import TileProcessor
from clc_dask.search import search_items
from clc_dask.stores import file_sha256

CODES = [11, 21, 23, 31, 32, 51]
BANDS = ("B08", "B04", "B03")
TILES = ["1_1", "1_2", "2_1", "2_2"]
TILE, WINDOW, HALO = 256, 128, 32
MMU_HA, WIDTH_M = 1.0, 30.0  # small rules, so that 256 px tiles keep several patches


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def region(demo_region):
    assert demo_region.size == 512 and len(demo_region.seasons["september"]) == 4
    return demo_region


def _checkpoint(path: Path, level: int = 2, codes=CODES, bands=BANDS, seed: int = 1) -> Path:
    torch.manual_seed(seed)  # seed 1 predicts five classes on the demo region
    table = ClassTable(level, codes)
    model = build_model("resnet18", len(bands), len(table), None)
    norm = Normalization((0.25, 0.08, 0.07), (0.03, 0.01, 0.01))
    return save_checkpoint(Checkpoint("resnet18", tuple(bands), table, norm, model.state_dict()), path)


@pytest.fixture(scope="module")
def root(tmp_path_factory, region):
    """A folder holding the checkpoint and the AOI; every config is written here (so the
    resolved configs of different runs differ only in their store)."""
    folder = tmp_path_factory.mktemp("runs")
    _checkpoint(folder / "model.pt")
    left, bottom, right, top = region.bounds
    ring = [[left + 1, bottom + 1], [right - 1, bottom + 1], [right - 1, top - 1], [left + 1, top - 1],
            [left + 1, bottom + 1]]
    aoi = {"type": "FeatureCollection", "features": [
        {"type": "Feature", "properties": {}, "geometry": {"type": "Polygon", "coordinates": [ring]}}]}
    frame = gpd.GeoDataFrame.from_features(aoi["features"], crs=region.crs)
    frame.to_file(folder / "aoi.gpkg", driver="GPKG")
    return folder


def write_config(root: Path, region, store: str, name: str = "demo-run", **patch) -> Path:
    raw = {
        "name": name,
        "aoi": {"path": "aoi.gpkg"},
        "grid": {"epsg": region.epsg, "resolution": 10, "tile_size": TILE, "chunk_size": 128},
        "imagery": {"source": str(region.catalog_path), "year": 2018, "seasons": ["september"],
                    "max_cloud": 80, "composite": "nrg"},
        "model": {"checkpoint": "model.pt", "batch_size": 4, "window": WINDOW, "halo": HALO, "device": "cpu"},
        "classes": {"level": 2},
        "generalize": {"mmu_ha": MMU_HA, "min_width_m": WIDTH_M},
        "output": {"store": store, "formats": ["cog", "zarr"], "vectorize": True},
        "cluster": {"kind": "threads", "tiles_per_batch": 1},
    }
    for section, values in patch.items():
        raw[section] = {**raw[section], **values} if isinstance(values, dict) else values
    path = root / f"{store}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture(scope="module")
def reference(root, region):
    """An uninterrupted run in this process (dask's threaded scheduler)."""
    return R.execute_run(load_run_config(write_config(root, region, "reference")))


def store_files(store: Path) -> dict[str, bytes]:
    """Every output file of a store (the manifest, run.yaml and the lock, which names its last
    holder, excepted), by relative path."""
    out = {}
    for path in sorted(store.rglob("*")):
        rel = path.relative_to(store).as_posix()
        if path.is_file() and rel not in ("manifest.json", "manifest.journal", "run.yaml", ".lock") \
                and not rel.startswith("performance"):
            out[rel] = path.read_bytes()
    return out


def manifest_without_times(store: Path) -> dict:
    data = json.loads((store / "manifest.json").read_text())
    for phase in ("tiles", "generalized"):
        for entry in data[phase].values():
            entry.pop("finished")
            for record in entry["files"].values():
                record.pop("mtime_ns")
    data["state"]["polygons"].pop("mtime_ns", None)
    return data


def assert_same_outputs(a: Path, b: Path) -> None:
    files_a, files_b = store_files(a), store_files(b)
    assert sorted(files_a) == sorted(files_b)
    different = [k for k in files_a if files_a[k] != files_b[k]]
    assert not different, f"files differ: {different}"
    assert manifest_without_times(a) == manifest_without_times(b)


def stitched(store: Path, name: str, grid: TileGrid) -> np.ndarray:
    out = np.zeros(grid.geobox.shape, dtype=np.uint8)
    for tile in grid:
        with rasterio.open(store / "tiles" / tile.name / f"{name}.tif") as src:
            out[tile.pixel_slices] = src.read(1)
    return out


# ----------------------------------------------------------------------------- layout and plan


def test_tile_layout_puts_the_array_origin_on_the_window_grid(root, region):
    config = load_run_config(write_config(root, region, "layout"))
    grid = TileGrid(snapped_geobox((0, 0, 10 * 1000, 10 * 700), region.epsg, 10), TILE)
    for tile in grid:
        layout = TileLayout.for_tile(tile, config)
        assert layout.context == HALO and min(layout.before) >= layout.context and layout.after >= HALO
        arr = layout.array_geobox
        col, row = (~grid.geobox.affine) * (arr.affine * (0, 0))
        assert round(row) % WINDOW == 0 and round(col) % WINDOW == 0, tile.name  # same windows as one big map
        ys, xs = layout.array_chunks()
        assert (sum(ys), sum(xs)) == (arr.shape.y, arr.shape.x)
        # the scenes are loaded in as many chunks as the tile has: no chunk of context alone
        load = layout.load_geobox.shape
        for n, loaded, chunk in zip(tile.geobox.shape, load, layout.load_chunks, strict=True):
            assert math.ceil(loaded / chunk) == math.ceil(n / 128), tile.name  # config chunk_size: 128
            assert chunk <= 128 + 2 * HALO
        assert layout.load_geobox.shape.x == tile.geobox.shape.x + 2 * HALO
        by, bx = layout.before
        assert arr[by:by + tile.geobox.shape.y, bx:bx + tile.geobox.shape.x] == tile.geobox


def test_tile_margin_is_deprecated_and_ignored(root, region):
    with pytest.warns(DeprecationWarning, match="tile_margin_px is deprecated"):
        config = load_run_config(write_config(root, region, "margin", generalize={"tile_margin_px": 100}))
    plain = load_run_config(write_config(root, region, "margin"))
    assert R.context.settings_fingerprint(config) == R.context.settings_fingerprint(plain)


def test_dry_run_turkey_offline(root, tmp_path):
    """A Türkiye-sized AOI on EPSG:3035 with an unreachable catalog: scenes from the revisit."""
    raw = {"name": "turkey-2018", "aoi": {"bbox": [26, 36, 45, 42]},
           "grid": {"epsg": 3035, "resolution": 10, "tile_size": 2048, "chunk_size": 2048},
           "imagery": {"source": "http://127.0.0.1:9/stac", "year": 2018, "seasons": ["september"]},
           "model": {"checkpoint": str(root / "model.pt"), "window": 512, "halo": 64},
           "output": {"store": str(tmp_path / "turkey")}, "cluster": {"tiles_per_batch": 64}}
    path = tmp_path / "turkey.yaml"
    path.write_text(yaml.safe_dump(raw))
    from clc_dask.cli import app

    result = CliRunner().invoke(app, ["run", "--config", str(path), "--dry-run", "--json"])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout[result.stdout.index("{"):])
    assert not (tmp_path / "turkey").exists()  # a dry run writes nothing
    assert plan["crs"] == "EPSG:3035" and plan["scenes_source"].startswith("revisit estimate")
    # tiles × tile area ≈ area (edge tiles are cut by the grid), ≥ the AOI's own area
    from odc.geo.geom import box

    aoi_km2 = box(26, 36, 45, 42, "EPSG:4326").to_crs("EPSG:3035", resolution=0.01).area / 1e6
    tile_km2 = plan["tile_area_km2"]
    assert tile_km2 == pytest.approx(2048**2 * 100 / 1e6)
    assert plan["area_km2"] <= plan["tiles_to_process"] * tile_km2
    assert plan["area_km2"] >= 0.97 * plan["tiles_to_process"] * tile_km2
    assert aoi_km2 <= plan["area_km2"] <= 1.1 * aoi_km2
    assert plan["tiles_to_process"] == plan["tiles_in_aoi"] < plan["tiles_in_grid"]
    # scenes: September (30 days) at ~39° N, every 5·cos(lat) days, on ~1.7 granules per tile
    assert 10 < plan["scenes_per_tile_mean"] < 16
    assert plan["scenes_total"] == pytest.approx(plan["scenes_per_tile_mean"] * plan["tiles_to_process"], rel=1e-3)
    full_tile_px = (2048 + 2 * 64) ** 2  # tile + network context
    assert plan["pixels_read_per_scene_and_tile"] == full_tile_px
    upper = plan["scenes_total"] * full_tile_px * plan["bytes_per_pixel"]
    assert 0.97 * upper <= plan["bytes_to_read"] <= upper
    assert plan["bytes_per_pixel"] == 3 * 2 + 0.25  # NRG uint16 + SCL uint8 at 20 m
    # graphs: batches of ≤ 64 tiles, each far below 500k tasks
    assert plan["batches"] == -(-plan["tiles_to_process"] // 64)
    assert plan["tasks_per_batch_max"] <= 64 * plan["tasks_per_tile_max"] < R.MAX_TASKS_PER_GRAPH
    assert plan["tasks_total"] <= plan["tiles_to_process"] * plan["tasks_per_tile_max"]
    hours = (plan["pixels_predicted"] / 1e6 + plan["bytes_to_read"] / 100e6) / 3600
    assert plan["worker_hours"] == pytest.approx(hours, abs=0.01)


def test_dry_run_counts_catalog_scenes_and_estimates_the_real_graph(root, region):
    config = load_run_config(write_config(root, region, "plan"))
    plan = R.dry_run(config)
    summary = plan.summary()
    assert not Path(config.output.store).exists()
    assert summary["tiles_to_process"] == 4 and summary["batches"] == 4
    assert summary["scenes_source"].startswith("catalog search")
    assert summary["scenes_total"] == 16  # the 4 September scenes cover every tile
    assert summary["bytes_to_read"] == 16 * (TILE + 2 * HALO) ** 2 * 6.25
    # the estimate against the graph the pipeline builds, as the scheduler receives it
    prepared = R.prepare_run(config)
    pipeline = TileProcessor(prepared)
    for tile in R.plan_run(prepared).tiles[:2]:
        task = pipeline.build(tile)
        real = len(task.result.__dask_graph__())  # submitted unoptimized (it keeps the inference annotation)
        estimate = plan.estimates[tile.name].tasks
        assert real / 2 <= estimate <= real * 2, (tile.name, real, estimate)
        assert task.task_count() == real
    assert not Path(config.output.store).exists()


def test_run_from_a_stac_api_over_http(root, region, reference, demo_servers):
    """The catalog as a STAC API URL and the scenes as COGs over HTTP: the same tile bytes."""
    config = load_run_config(write_config(root, region, "http", imagery={"source": demo_servers.stac_url}))
    plan = R.dry_run(config)
    assert plan.scenes_source.startswith("catalog search (http") and plan.summary()["scenes_total"] == 16
    result = R.execute_run(config, tile_names=["2_2"])
    assert result.computed == ["2_2"]
    saved = json.loads((result.store / "items.json").read_text())
    assert all(a["href"].startswith("http") for f in saved["features"] for a in f["assets"].values())
    assert (result.store / "tiles" / "2_2" / "classes.tif").read_bytes() == \
        (reference.store / "tiles" / "2_2" / "classes.tif").read_bytes()
    # the generalization waits for the whole map: a patch cut by a tile edge is judged whole
    assert not (result.store / "tiles" / "2_2" / "generalized.tif").exists() and result.generalized == []


def test_batches_keep_graphs_under_the_task_limit(root, region, monkeypatch):
    config = load_run_config(write_config(root, region, "batches", cluster={"tiles_per_batch": 4}))
    plan = R.plan_run(R.resolve_run(config, scenes="none"))
    per_tile = max(e.tasks for e in plan.estimates.values())
    assert [len(b) for b in plan.batches] == [4]
    monkeypatch.setattr(run_plan, "MAX_TASKS_PER_GRAPH", 2 * per_tile + 1)
    plan = R.plan_run(R.resolve_run(config, scenes="none"))
    assert [len(b) for b in plan.batches] == [2, 2]
    assert all(sum(plan.estimates[t.name].tasks for t in b) <= run_plan.MAX_TASKS_PER_GRAPH for b in plan.batches)


# ----------------------------------------------------------------------------- outputs


def test_run_outputs_are_seamless_generalized_and_published(reference, root, region):
    store = reference.store
    assert reference.computed == TILES and reference.skipped == []
    grid = reference.plan.grid
    assert grid.geobox == region.geobox and grid.shape == (2, 2)
    classes = stitched(store, "classes", grid)

    # the tiles stitch into the map one prediction over the whole grid gives (no seams)
    items = search_items(str(region.catalog_path), season="september", years=[2018], max_cloud=80)
    padded = region.geobox.pad(WINDOW)  # origin on the window grid, context beyond the edges
    mosaic = seasonal_mosaic(load_scenes(list(items), padded, bands=list(BANDS), chunk_size=256), "nrg")
    whole = predict(mosaic["reflectance"].sel(band=list(BANDS)), root / "model.pt", halo=HALO, window=WINDOW,
                    batch_size=4, device="cpu", chunk_size=256).values[WINDOW:-WINDOW, WINDOW:-WINDOW]
    np.testing.assert_array_equal(classes, whole)
    present = set(np.unique(classes).tolist())
    assert len(present) >= 3 and present <= set(CODES) | {0}

    # the whole map generalized at once: patches cut by tile edges are judged whole
    generalized = stitched(store, "generalized", grid)
    np.testing.assert_array_equal(generalized, generalize_array(classes, 10.0, MMU_HA, WIDTH_M))
    assert (generalized != classes).any()

    # COGs: tile grid, nodata 0, official colours; Zarr chunks are the tiles
    with rasterio.open(store / "tiles" / "2_1" / "generalized.tif") as src:
        tile = grid.tile("2_1")
        assert src.crs.to_epsg() == region.epsg and src.transform == tile.geobox.affine
        assert src.nodata == 0 and src.dtypes[0] == "uint8"
        assert src.colormap(1)[31] == colormap(2)[31]
        assert src.tags()["checkpoint_sha256"] == file_sha256(root / "model.pt")
    zarr_map = xr.open_zarr(store / "map.zarr")
    assert zarr_map["classes"].encoding["chunks"] == (TILE, TILE)
    np.testing.assert_array_equal(zarr_map["classes"].values, classes)
    np.testing.assert_array_equal(zarr_map["generalized"].values, generalized)

    # one vector layer, dissolved across tile edges, with the raster's class areas
    polygons = gpd.read_file(store / "polygons.gpkg", layer="clc")
    assert set(polygons["CODE_18"].astype(int)) == set(np.unique(generalized)) - {0}
    for code, area in polygons.groupby(polygons["CODE_18"].astype(int))["area_ha"].sum().items():
        assert area == pytest.approx((generalized == code).sum() / 100)
    for code, group in polygons.groupby("CODE_18"):
        shared = [(a, b) for a in range(len(group)) for b in range(a + 1, len(group))
                  if group.geometry.iloc[a].intersection(group.geometry.iloc[b]).length > 0]
        assert shared == [], f"class {code}: polygons sharing an edge were not dissolved"
    edges = [tile.geobox.extent.geom.boundary for tile in grid]
    assert any(geom.crosses(edge) for geom in polygons.geometry for edge in edges)  # across tiles
    assert (store / "polygons.qml").exists() and (store / "polygons.sld").exists()

    # STAC: a Collection and an Item per tile, pointing at the files with their checksums
    collection = json.loads((store / "stac" / "collection.json").read_text())
    assert collection["id"] == "demo-run" and collection["assets"]["zarr"]["href"] == "../map.zarr"
    assert collection["assets"]["polygons"]["href"] == "../polygons.gpkg"
    assert [link["href"] for link in collection["links"] if link["rel"] == "item"] == [
        f"./demo-run-{t}/demo-run-{t}.json" for t in TILES]
    item_path = store / "stac" / "demo-run-1_2" / "demo-run-1_2.json"
    item = json.loads(item_path.read_text())
    props = item["properties"]
    assert props["proj:code"] == f"EPSG:{region.epsg}" and props["proj:shape"] == [TILE, TILE]
    assert props["clc_dask:checkpoint_sha256"] == file_sha256(root / "model.pt")
    assert sorted(props["clc_dask:input_items"]) == sorted(i.id for i in items) and len(items) == 4
    assert props["clc_dask:config"]["generalize"]["mmu_ha"] == MMU_HA
    assert props["clc_dask:config"]["output"]["store"] == "."
    assert props["clc_dask:version"] and props["start_datetime"] == "2018-09-01T00:00:00Z"
    for key in ("classes", "generalized"):
        asset = item["assets"][key]
        target = (item_path.parent / asset["href"]).resolve()
        assert target == (store / "tiles" / "1_2" / Path(asset["href"]).name).resolve()
        assert asset["file:checksum"] == "1220" + file_sha256(target)
    codes = [c["value"] for c in item["assets"]["classes"]["classification:classes"]]
    assert 0 in codes and set(CODES) <= set(codes)
    assert "created" not in props and "updated" not in props  # deterministic metadata


def test_run_refuses_bad_input_before_writing(root, region, tmp_path):
    # config errors name the field
    from clc_dask.cli import app

    bad = write_config(root, region, "bad", grid={"epsg": 4326})
    with pytest.raises(ConfigError, match=r"grid\.epsg"):
        load_run_config(bad)
    result = CliRunner().invoke(app, ["run", "--config", str(bad), "--dry-run"])
    assert isinstance(result.exception, ConfigError) and "grid.epsg" in str(result.exception)
    # a checkpoint of another class level than the config
    _checkpoint(root / "level3.pt", level=3, codes=[111, 211, 311, 512])
    cfg = load_run_config(write_config(root, region, "level3", model={"checkpoint": "level3.pt"}))
    with pytest.raises(CheckpointError, match=r"Level-3 classes.*classes\.level 2"):
        R.execute_run(cfg)
    assert not Path(cfg.output.store).exists()
    # bands of another composite than imagery.composite
    cfg = load_run_config(write_config(root, region, "rgb", imagery={"composite": "rgb"}))
    with pytest.raises(CheckpointError, match=r"B08.*imagery\.composite is 'rgb'"):
        R.execute_run(cfg)
    # a tile outside the grid
    cfg = load_run_config(write_config(root, region, "tiles"))
    with pytest.raises(InputError, match="3_1"):
        R.execute_run(cfg, tile_names=["3_1"])
    assert not Path(cfg.output.store).exists()


def test_store_of_another_run_refused_unless_overwrite(root, region, reference, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(reference.store, store)
    before = (store / "manifest.json").read_bytes()
    other = load_run_config(write_config(root, region, "other", name="other-run", output={"store": str(store)},
                                         generalize={"enabled": False}))
    with pytest.raises(OutputError, match="run 'demo-run'.*`overwrite`"):
        R.execute_run(other)
    with pytest.raises(OutputError, match="run 'demo-run'"):
        R.dry_run(other)
    # the same run again without --resume
    same = load_run_config(write_config(root, region, "same", output={"store": str(store)}))
    with pytest.raises(OutputError, match="`resume`"):
        R.execute_run(same)
    assert (store / "manifest.json").read_bytes() == before
    # a folder with tiles but no manifest
    (store / "manifest.json").unlink()
    with pytest.raises(OutputError, match="no run manifest"):
        R.execute_run(same)
    # --overwrite replaces the other run's outputs
    result = R.execute_run(other, tile_names=["1_1"], overwrite=True)
    assert result.computed == ["1_1"]
    assert sorted(p.name for p in (store / "tiles").iterdir()) == ["1_1"]
    assert Manifest.read(store).run_name == "other-run"
    assert not (store / "tiles" / "1_1" / "generalized.tif").exists()  # generalize disabled
    items = sorted(p.name for p in (store / "stac").iterdir())
    assert items == ["collection.json", "other-run-1_1"]


def test_no_item_points_at_missing_or_partial_files(root, region, reference, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(reference.store, store)
    path = write_config(root, region, "republish", output={"store": str(store)})
    config = load_run_config(path)
    with open(store / "tiles" / "1_2" / "generalized.tif", "r+b") as fh:  # a partial/corrupt file
        fh.truncate(100)
    (store / "tiles" / "2_1" / "classes.tif").unlink()  # a missing file
    from clc_dask.cli import app

    published = CliRunner().invoke(app, ["run", "--config", str(path), "--publish-only"])
    assert published.exit_code == 0, published.output
    items = sorted(p.name for p in (store / "stac").iterdir() if p.is_dir())
    assert items == ["demo-run-1_1", "demo-run-1_2", "demo-run-2_2"]
    item = json.loads((store / "stac" / "demo-run-1_2" / "demo-run-1_2.json").read_text())
    assert sorted(item["assets"]) == ["classes"]  # its broken generalized map is not published
    collection = json.loads((store / "stac" / "collection.json").read_text())
    assert len([link for link in collection["links"] if link["rel"] == "item"]) == 3
    # resuming recomputes exactly those files, and the outputs are whole again
    result = R.execute_run(config, resume=True)
    assert result.computed == ["2_1"] and sorted(result.skipped) == ["1_1", "1_2", "2_2"]
    assert sorted(result.generalized) == ["1_2", "2_1"]
    assert_same_outputs(store, reference.store)


# ----------------------------------------------------------------------------- kill and resume


def _cli(args: list[str], log: Path) -> subprocess.Popen:
    code = "from clc_dask.cli import main; main()"
    with open(log, "wb") as out:
        return subprocess.Popen([sys.executable, "-c", code, *args], stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def test_resume_after_sigkill_is_byte_identical(root, region, reference, tmp_path):
    config = write_config(root, region, "killed")
    store = root / "killed"
    run = _cli(["run", "--config", str(config), "--no-progress"], tmp_path / "first.log")
    recorded: list[str] = []
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and run.poll() is None:
            manifest = Manifest.read(store) if (store / "manifest.json").exists() else None
            if manifest is not None and manifest.tiles:
                os.killpg(run.pid, signal.SIGSTOP)  # freeze it at once, then look
                recorded = sorted(Manifest.read(store).tiles)
                break
            time.sleep(0.02)
    finally:
        os.killpg(run.pid, signal.SIGKILL)
        run.wait(timeout=30)
    assert run.returncode == -signal.SIGKILL, (tmp_path / "first.log").read_text()[-2000:]
    assert 1 <= len(recorded) < len(TILES), f"kill came too late: {recorded}"
    assert not (store / "stac").exists()  # nothing was published by the killed run

    from clc_dask.cli import app

    resumed = CliRunner().invoke(app, ["run", "--config", str(config), "--resume", "--no-progress"])
    assert resumed.exit_code == 0, resumed.output[-3000:]
    summary = json.loads(resumed.stdout.strip().splitlines()[-1])
    assert summary["skipped"] == recorded
    assert sorted(summary["computed"]) == sorted(set(TILES) - set(recorded))
    assert_same_outputs(store, reference.store)
    assert Manifest.read(store).complete


# ----------------------------------------------------------------------------- on a cluster


@pytest.fixture(scope="module")
def client():
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster:
        with Client(cluster) as c:
            yield c


def test_worker_loss_mid_run_gives_identical_output(root, region, reference, client):
    import psutil

    config = load_run_config(write_config(root, region, "worker-loss", cluster={"tiles_per_batch": 4}))
    pids_before = set(client.run(os.getpid).values())
    killed: list[int] = []

    def kill_a_busy_worker(tile_name: str) -> None:
        if killed:
            return
        busy = [w for w, keys in client.processing().items() if keys] or list(client.processing())
        pid = client.run(os.getpid, workers=busy[:1])[busy[0]]
        os.kill(pid, signal.SIGKILL)  # a worker process this test's cluster started
        killed.append(pid)

    result = R.execute_run(config, client=client, progress=kill_a_busy_worker)
    assert killed and not psutil.pid_exists(killed[0])
    assert sorted(result.computed) == TILES
    deadline = time.monotonic() + 60
    while len(client.scheduler_info()["workers"]) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    pids_after = set(client.run(os.getpid).values())
    assert killed[0] in pids_before and killed[0] not in pids_after  # the nanny started a new worker
    assert_same_outputs(result.store, reference.store)  # same bytes as the run without a cluster


def _busy_intervals(stream: list[dict], inference: bool) -> list[tuple[float, float]]:
    return [(s["start"], s["stop"]) for task in stream if (INFERENCE_LAYER in str(task["key"])) == inference
            for s in task["startstops"] if s["action"] == "compute"]


def _most_at_once(intervals: list[tuple[float, float]], handover: float = 0.01) -> int:
    """Most intervals running at once; a task stamped as starting within ``handover`` seconds
    before the previous one's stop stamp is a hand-over (each thread stamps its own times)."""
    events = sorted([(start + handover, 1) for start, _ in intervals] + [(stop, -1) for _, stop in intervals])
    running = most = 0
    for _, step in events:
        running += step
        most = max(most, running)
    return most


def test_a_worker_reads_the_next_tiles_while_its_inference_slot_runs(root, region, reference):
    """threads_per_worker 2 + inference_slots 1: one inference task at a time (its resource
    reaches the scheduler), reads and mosaics beside it, tiles finished in the order they were
    submitted (all four in flight at once), and the same bytes as without a cluster."""
    from distributed import get_task_stream

    from clc_dask.cluster import INFERENCE_RESOURCE, connect_for_run

    config = load_run_config(write_config(root, region, "inference-slot", cluster={
        "kind": "local", "n_workers": 1, "threads_per_worker": 2, "inference_slots": 1, "tiles_per_batch": None}))
    with connect_for_run(config.cluster) as client:
        (worker,) = client.scheduler_info()["workers"].values()
        assert worker["resources"] == {INFERENCE_RESOURCE: 1} and worker["nthreads"] == 2
        with get_task_stream(client) as stream:
            result = R.execute_run(config, client=client)
    assert result.computed == TILES  # first in, first out: the first tile does not wait for every read
    inference = _busy_intervals(stream.data, inference=True)
    assert len(inference) == len(TILES)  # one inference task per tile
    assert _most_at_once(inference) == 1  # the slot: never two at once, though two threads were free
    others = _busy_intervals(stream.data, inference=False)
    assert any(start < i_stop and i_start < stop for start, stop in others for i_start, i_stop in inference)
    assert_same_outputs(result.store, reference.store)


def test_cli_progress_dashboard_and_performance_report(root, region, client):
    from clc_dask.cli import app

    config = write_config(root, region, "cli-report")
    result = CliRunner().invoke(app, ["run", "--config", str(config), "--tiles", "1_2",
                                      "--scheduler", client.scheduler.address, "--performance-report"])
    assert result.exit_code == 0, result.output
    assert "Dask dashboard: http" in result.stderr
    assert "1/1" in result.stderr  # the tqdm bar over tiles
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["computed"] == ["1_2"]
    report = root / "cli-report" / "performance-report.html"
    assert report.exists() and "Dask Performance Report" in report.read_text()
    again = CliRunner().invoke(app, ["run", "--config", str(config), "--tiles", "1_2"])
    assert isinstance(again.exception, OutputError)  # finished tiles need --resume or --overwrite


def test_class_maps_of_two_stores_read_together_keep_their_own_tiles(tmp_path):
    """The whole-map read of phase 2 names each task after its file: two runs' maps in one
    graph (or two runs on one cluster) never share a task."""
    from clc_dask.run.generalized import tile_map
    from clc_dask.run.store import TILE_FILES, tile_dir

    grid = TileGrid(snapped_geobox((0, 0, 10 * 40, 10 * 30), 32633, 10), 20)
    tiles = [grid.tile(f"{r}_{c}") for r in (1, 2) for c in (1, 2)]
    expected = {}
    for store, base in ((tmp_path / "a", 10), (tmp_path / "b", 50)):
        whole = np.zeros(grid.geobox.shape, dtype=np.uint8)
        for i, tile in enumerate(tiles):
            ny, nx = tile.geobox.shape
            codes = np.full((ny, nx), base + i, dtype=np.uint8)
            path = tile_dir(store, tile) / TILE_FILES["classes"]
            path.parent.mkdir(parents=True)
            with rasterio.open(path, "w", driver="GTiff", width=nx, height=ny, count=1, dtype="uint8") as dst:
                dst.write(codes, 1)
            (row, col), size = (tile.row - 1, tile.col - 1), grid.tile_size
            whole[row * size:row * size + ny, col * size:col * size + nx] = codes
        expected[store] = whole
    a, b = (tile_map(store, grid, tiles, "classes", np.dtype(np.uint8)) for store in expected)
    assert not set(a.__dask_graph__()) & set(b.__dask_graph__())
    got_a, got_b = dask.compute(a, b)
    np.testing.assert_array_equal(got_a, expected[tmp_path / "a"])
    np.testing.assert_array_equal(got_b, expected[tmp_path / "b"])
