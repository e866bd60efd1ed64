"""A map stored as tiles, generalized globally tile by tile: equal to the whole map in memory.

Also: resuming from the saved state, refusing another map's state, and the package's
imports (no cycle, no import inside a function).
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import dask
import geopandas as gpd
import numpy as np
import pyogrio
import pytest
import rasterio.features
import scipy.ndimage as ndi
import shapely
from affine import Affine
from odc.geo.geobox import GeoBox

import clc_dask.generalize
from clc_dask.cli import main
from clc_dask.errors import InputError, OutputError
from clc_dask.generalize import count_patches, generalize, generalize_array, label_equal, vectorize
from clc_dask.generalize.layer import vectorize_tiled
from clc_dask.generalize.merge import decide_tables
from clc_dask.generalize.patchgraph import assemble, block_lut, block_patches, merge_small
from clc_dask.generalize.tiles import TiledGeneralization, generalize_tiled, load_reduction
from clc_dask.rasters import to_dataarray

LEVEL2 = np.array([11, 12, 21, 23, 24, 31, 32, 41, 51], dtype=np.uint8)


def blobby_map(shape, seed, n_classes=5, sigma=3.0, nodata=0.1):
    """Random Level-2 map with patches from specks to a few hundred pixels, and no data."""
    rng = np.random.default_rng(seed)
    fields = np.stack([ndi.gaussian_filter(rng.random(shape), sigma) for _ in range(n_classes)])
    codes = LEVEL2[:n_classes][np.argmax(fields, axis=0)]
    speckle = rng.random(shape) < 0.02
    codes[speckle] = rng.choice(LEVEL2[:n_classes], int(speckle.sum()))
    if nodata:
        mask = ndi.gaussian_filter(rng.random(shape), sigma * 3)
        codes[mask < np.quantile(mask, nodata)] = 0
    return codes


def as_tiles(codes, tile, pixel=10.0):
    gbox = GeoBox(codes.shape, Affine(pixel, 0, 600000, 0, -pixel, 4500000), "EPSG:32633")
    return to_dataarray(codes, gbox, name="classes").chunk({"y": tile, "x": tile})


@pytest.fixture(scope="module")
def big_patches_map():
    codes = blobby_map((110, 97), 3)
    labels, n = label_equal(codes)
    areas = np.bincount(labels.ravel())[1:]
    return codes, labels, areas


# 0.3 ha = 30 px at 10 m, width 50 m = 5 px (halo 9 px)
RULES = {"mmu_ha": 0.3, "min_width_m": 50}


@pytest.mark.parametrize("tile", [19, 23, 40, 110])
def test_tiled_equals_whole_map_in_memory(tmp_path, big_patches_map, tile):
    codes, labels, areas = big_patches_map
    # patches span 3+ tiles of 19 and 23 px; tiles of 19, 23 and 40 do not divide the map
    spans = [len({(y // tile, x // tile) for y, x in zip(*np.nonzero(labels == k), strict=True)})
             for k in np.argsort(areas)[-3:] + 1]
    assert tile > 40 or max(spans) >= 3
    expected = generalize_array(codes, 10.0, **RULES)
    assert (expected != codes).mean() > 0.05
    with dask.config.set(scheduler="synchronous"):
        out = generalize_tiled(as_tiles(codes, tile), tmp_path / "state", **RULES)
        assert out.chunks == as_tiles(codes, tile).chunks
        np.testing.assert_array_equal(out.values, expected)
    assert (out.values == 0).sum() == (codes == 0).sum()  # no data stays no data


@pytest.mark.parametrize(("rules", "steps"), [
    ({"mmu_ha": 0.3, "min_width_m": 0}, ["step1_mmu"]),
    ({"mmu_ha": 0, "min_width_m": 50}, ["step1_width"]),
    ({"mmu_ha": 0.3, "min_width_m": 50, "connectivity": 8}, ["step1_mmu", "step2_width", "step3_mmu"]),
])
def test_each_rule_alone_and_8_connectivity(tmp_path, big_patches_map, rules, steps):
    codes = big_patches_map[0]
    expected = generalize_array(codes, 10.0, **rules)
    with dask.config.set(scheduler="synchronous"):
        tiled = TiledGeneralization(as_tiles(codes, 21), tmp_path, **rules)
        assert [s.name for s in tiled.steps] == steps
        tiled.run()
        np.testing.assert_array_equal(tiled.result().values, expected)
        np.testing.assert_array_equal(tiled.tile(2, 3), expected[42:63, 63:84])


def test_width_rule_across_tile_edges(tmp_path):
    codes = np.full((60, 60), 31, dtype=np.uint8)
    codes[:, 18:21] = 51  # a 30 m river along a tile edge (tiles of 20 px): too narrow
    codes[39:42, :] = 12  # a 30 m road across the map, across three tiles
    codes[5:15, 45:57] = 21  # a 10 × 12 field inside one tile, wide and large enough
    expected = generalize_array(codes, 10.0, mmu_ha=0.5, min_width_m=50)
    assert (expected[:, 18:21] == 31).all() and (expected[39:42, :] == 31).all()
    with dask.config.set(scheduler="synchronous"):
        out = generalize_tiled(as_tiles(codes, 20), tmp_path, mmu_ha=0.5, min_width_m=50)
        np.testing.assert_array_equal(out.values, expected)
    assert (out.values[5:15, 45:57] == 21).all()


def test_resumes_from_saved_state_and_refuses_another_map(tmp_path, big_patches_map):
    codes = big_patches_map[0]
    expected = generalize_array(codes, 10.0, **RULES)
    with dask.config.set(scheduler="synchronous"):
        first = TiledGeneralization(as_tiles(codes, 30), tmp_path / "state", **RULES)
        first.measure(0)
        assert not first.finished()
        with pytest.raises(OutputError, match="not finished"):
            first.tile(0, 0)
        table_file = tmp_path / "state" / "step1_mmu" / "tables" / "1_2.npz"
        reduction, digest = load_reduction(table_file)
        assert len(digest) == 64
        assert reduction.code.size == label_equal(codes[30:60, 60:90])[1]
        assert 0 < reduction.table.n < reduction.code.size  # most patches are decided in the tile
        # an interrupted run: one table and one saved tile are missing
        first.run()
        table_file.unlink()
        (tmp_path / "state" / "step1_mmu" / "decision.json").unlink()
        (tmp_path / "state" / "step2_width" / "tiles" / "3_0.npy").unlink()
        stamp = (tmp_path / "state" / "step1_mmu" / "tables" / "0_0.npz").stat().st_mtime_ns
        resumed = TiledGeneralization(as_tiles(codes, 30), tmp_path / "state", **RULES)
        resumed.run()
        assert resumed.finished()
        assert (tmp_path / "state" / "step1_mmu" / "tables" / "0_0.npz").stat().st_mtime_ns == stamp  # kept
        np.testing.assert_array_equal(resumed.result().values, expected)
        summary = json.loads((tmp_path / "state" / "step3_mmu" / "decision.json").read_text())
        assert summary["tile_patches"] > summary["decided_in_tiles"] > 0
        assert summary["global_patches"] > summary["global_small"] > 0
    # no temporary file is left behind
    assert not [p for p in (tmp_path / "state").rglob(".*")]
    with pytest.raises(OutputError, match="another map.*chunks"):
        TiledGeneralization(as_tiles(codes, 25), tmp_path / "state", **RULES)
    with pytest.raises(OutputError, match="mmu_ha"):
        TiledGeneralization(as_tiles(codes, 30), tmp_path / "state", mmu_ha=1, min_width_m=50)
    with pytest.raises(InputError, match="dask-backed"):
        TiledGeneralization(as_tiles(codes, 30).compute(), tmp_path / "other")
    assert not (tmp_path / "other").exists()


@pytest.mark.parametrize("connectivity", [4, 8])
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_global_merge_with_tile_decisions_equals_the_whole_graph(seed, connectivity):
    rng = np.random.default_rng(seed)
    codes = blobby_map((96, 120), seed, n_classes=3, sigma=4.0)  # few classes: many border ties
    codes[rng.random(codes.shape) < 0.03] = 21
    tile = (17, 24, 32)[seed % 3]
    tables = [[block_patches(codes[y : y + tile, x : x + tile], (y, x), codes.shape[1], connectivity)[0]
               for x in range(0, codes.shape[1], tile)] for y in range(0, codes.shape[0], tile)]
    graph = assemble(tables, connectivity)
    final = merge_small(graph, 40)
    luts, summary = decide_tables(tables, 40, connectivity, np.uint8)
    assert summary["decided_in_tiles"] > summary["tile_patches"] // 3
    for index, lut in enumerate(luts):
        iy, ix = divmod(index, len(tables[0]))
        np.testing.assert_array_equal(lut, block_lut(graph, final, iy, ix, np.uint8))


def test_a_tie_counts_the_area_its_neighbours_absorbed_in_their_tiles(tmp_path):
    codes = np.full((12, 20), 31, dtype=np.uint8)
    codes[:, 10:] = 21
    codes[0, 19] = 0  # the right field: 117 px
    codes[5:7, 9:11] = 11  # a 4 px speck on the border: 4 edges with each field, a tie on borders
    codes[2, 2] = 12  # a 1 px speck in the left field (117 px), decided in its tile, merged first
    expected = generalize_array(codes, 10.0, mmu_ha=0.5, min_width_m=0)
    # the tie goes to the larger field: the left one, 118 px with the speck it absorbed
    # (without it, 117 against 117, the smaller code 21 would win)
    assert (expected[5:7, 9:11] == 31).all()
    with dask.config.set(scheduler="synchronous"):
        out = generalize_tiled(as_tiles(codes, 8), tmp_path, mmu_ha=0.5, min_width_m=0)
        np.testing.assert_array_equal(out.values, expected)
    summary = json.loads((tmp_path / "step1_mmu" / "decision.json").read_text())
    assert summary["decided_in_tiles"] == 1 and summary["global_small"] == 1


def test_a_changed_tile_is_refused(tmp_path, big_patches_map):
    codes = big_patches_map[0].copy()
    with dask.config.set(scheduler="synchronous"):
        TiledGeneralization(as_tiles(codes, 40), tmp_path, mmu_ha=0.3, min_width_m=0).run()
        codes[45, 45] = 12 if codes[45, 45] != 12 else 11  # the map changed after its tables were saved
        with pytest.raises(InputError, match="does not match its saved patch table"):
            TiledGeneralization(as_tiles(codes, 40), tmp_path, mmu_ha=0.3, min_width_m=0).tile(1, 1)


def test_tiled_equals_chunked_generalize_on_a_threaded_scheduler(tmp_path):
    codes = blobby_map((150, 130), 8, sigma=2.5)
    with dask.config.set(scheduler="threads", num_workers=2):
        chunked = generalize(as_tiles(codes, 64)).values
        tiled = generalize_tiled(as_tiles(codes, 64), tmp_path, batch_size=3).values
    np.testing.assert_array_equal(tiled, chunked)
    np.testing.assert_array_equal(tiled, generalize_array(codes, 10.0))


# ----------------------------------------------------------------------------- imports


def _package_imports() -> dict[str, set[str]]:
    root = Path(clc_dask.generalize.__file__).parent
    imports: dict[str, set[str]] = {}
    for path in root.glob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for func in (n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)):
            nested = [n for n in ast.walk(func) if isinstance(n, ast.Import | ast.ImportFrom)]
            assert not nested, f"{path.name}: import inside {func.name}()"
        deps = {n.module.rsplit(".", 1)[-1] for n in ast.walk(tree)
                if isinstance(n, ast.ImportFrom) and n.module and n.module.startswith("clc_dask.generalize.")}
        imports[path.stem] = deps
    return imports


def test_generalize_package_has_no_import_cycle():
    imports = _package_imports()
    assert {"rules", "patchgraph", "core", "merge", "tiles", "styles", "vector", "layer", "files"} <= set(imports)
    done: set[str] = set()

    def visit(module: str, path: tuple[str, ...]) -> None:
        assert module not in path, "import cycle: " + " → ".join((*path, module))
        for dep in imports.get(module, ()):
            if dep not in done:
                visit(dep, (*path, module))
        done.add(module)

    for module in imports:
        if module != "__init__":
            visit(module, ())
    assert "__init__" not in {d for deps in imports.values() for d in deps}


# ------------------------------------------------------------ one dissolved vector layer


def _shared_edges_within_classes(frame):
    """Pairs of same-class polygons whose intersection has a length (they share an edge)."""
    tree = shapely.STRtree(frame.geometry.values)
    left, right = tree.query(frame.geometry.values, predicate="intersects")
    pairs = [(i, j) for i, j in zip(left.tolist(), right.tolist(), strict=True) if i < j
             and frame["CODE_18"].iloc[i] == frame["CODE_18"].iloc[j]]
    return [(i, j) for i, j in pairs
            if frame.geometry.iloc[i].intersection(frame.geometry.iloc[j]).length > 0]


@pytest.fixture(scope="module")
def generalized_map():
    codes = generalize_array(blobby_map((90, 110), 5, n_classes=4), 10.0, mmu_ha=0.2, min_width_m=0)
    gbox = GeoBox(codes.shape, Affine(10, 0, 600000.5, 0, -10, 4500000.5), "EPSG:32633")
    return codes, gbox


@pytest.mark.parametrize("tile", [17, 32])
def test_one_layer_dissolved_across_tiles(tmp_path, generalized_map, tile):
    codes, gbox = generalized_map
    arr = to_dataarray(codes, gbox, name="generalized").chunk({"y": tile, "x": tile})
    with dask.config.set(scheduler="synchronous"):
        path = vectorize_tiled(arr, tmp_path / "polygons.gpkg", batch_size=5)
        whole = vectorize(to_dataarray(codes, gbox), tmp_path / "whole.gpkg", layer="clc")
    assert set(pyogrio.list_layers(path)[:, 0]) == {"clc", "layer_styles"}
    frame = gpd.read_file(path, layer="clc")
    assert list(frame.columns) == ["id", "CODE_18", "label", "area_ha", "geometry"]
    assert frame.crs.to_epsg() == 32633 and (frame.geom_type == "Polygon").all() and frame.geometry.is_valid.all()
    assert len(frame) == count_patches(codes) and frame["id"].is_unique
    # polygons cut by tile edges are whole again: no two polygons of one class share an edge
    crossing = [g for g in frame.geometry if len({(int((y - 4500000.5) // -10) // tile)
                                                     for _, y in g.exterior.coords}) > 2]
    assert crossing
    assert _shared_edges_within_classes(frame) == []
    # class areas are the raster's pixel areas
    per_class = frame.groupby("CODE_18")["area_ha"].sum()
    for code in np.unique(codes[codes > 0]):
        assert per_class[str(code)] == pytest.approx((codes == code).sum() * 0.01, abs=1e-9)
    np.testing.assert_allclose(frame["area_ha"], frame.geometry.area / 10_000)
    # the same polygons as the whole map's, whatever the tiling
    reference = gpd.read_file(whole, layer="clc")
    by_id = frame.sort_values("id").reset_index(drop=True)
    assert all(a.equals_exact(b, 0) for a, b in zip(by_id.geometry, reference.geometry, strict=True))
    assert (by_id["CODE_18"] == reference["CODE_18"]).all()
    back = rasterio.features.rasterize(zip(frame.geometry, frame["CODE_18"].astype(int), strict=True),
                                       out_shape=codes.shape, transform=gbox.affine, fill=0, dtype="uint8")
    np.testing.assert_array_equal(back, codes)
    assert (tmp_path / "polygons.qml").exists() and (tmp_path / "polygons.sld").exists()


def test_layer_ids_are_first_pixels_and_empty_maps_work(tmp_path, generalized_map):
    codes, gbox = generalized_map
    arr = to_dataarray(codes, gbox).chunk({"y": 30, "x": 30})
    with dask.config.set(scheduler="synchronous"):
        frame = gpd.read_file(vectorize_tiled(arr, tmp_path / "a.gpkg", styles=False), layer="clc")
        labels, _ = label_equal(codes)
        flat = labels.ravel()
        firsts = sorted(int(np.flatnonzero(flat == k)[0]) for k in range(1, flat.max() + 1))
        assert sorted(frame["id"]) == firsts
        assert not (tmp_path / "a.qml").exists()
        empty = to_dataarray(np.zeros((40, 40), np.uint8), gbox.crop((40, 40))).chunk({"y": 20, "x": 20})
        assert len(gpd.read_file(vectorize_tiled(empty, tmp_path / "empty.gpkg"), layer="clc")) == 0


def test_layer_refuses_bad_input_before_writing(tmp_path, generalized_map):
    codes, gbox = generalized_map
    arr = to_dataarray(codes, gbox).chunk({"y": 30, "x": 30})
    with pytest.raises(InputError, match="Level-3"):
        vectorize_tiled(arr, tmp_path / "x.gpkg", level=3)
    with pytest.raises(OutputError, match="GeoPackage"):
        vectorize_tiled(arr, tmp_path / "x.shp")
    with pytest.raises(InputError, match="integer"):
        vectorize_tiled(arr.astype("float32"), tmp_path / "x.gpkg")
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- CLI


def test_cli_errors_show_the_options_of_the_backticked_parameters(tmp_path, monkeypatch, capsys):
    codes = np.full((20, 20), 31, dtype=np.uint8)
    path = tmp_path / "classes.tif"
    with rasterio.open(path, "w", driver="GTiff", width=20, height=20, count=1, dtype="uint8", crs="EPSG:32633",
                       transform=Affine(10, 0, 500000, 0, -10, 4100000), nodata=0) as dst:
        dst.write(codes, 1)
    for option, value, shown in (("--mmu-ha", "-5", "--mmu-ha"), ("--chunk-size", "0", "--chunk-size"),
                                 ("--connectivity", "6", "--connectivity")):
        monkeypatch.setattr("sys.argv", ["clc-dask", "generalize", "--input", str(path),
                                         "--out", str(tmp_path / "out.tif"), option, value])
        with pytest.raises(SystemExit) as exit_info:
            main()
        assert exit_info.value.code == 1
        message = capsys.readouterr().err
        assert message.startswith("Error: ") and shown in message and "`" not in message, message
    assert not (tmp_path / "out.tif").exists()
