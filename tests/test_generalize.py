"""Generalization to CORINE rules: chunked == in memory, the rules' properties, polygons, CLI.

The pixel-level oracles below follow the definition in ``clc_dask.generalize`` literally
(relabel the whole map after every single merge; test every window placement), so the
library's graph-based and vectorised code is checked against something obviously correct.
"""

from __future__ import annotations

import json
import sqlite3
import xml.etree.ElementTree as ET

import dask
import geopandas as gpd
import numpy as np
import pyogrio
import pytest
import rasterio
import rasterio.features
import scipy.ndimage as ndi
from affine import Affine
from odc.geo.geobox import GeoBox
from typer.testing import CliRunner

from clc_dask.classes import label_of, official_codes, rgb_of, to_level
from clc_dask.cli import app
from clc_dask.errors import ConfigError, InputError, OutputError
from clc_dask.generalize import (
    Rules,
    compare_to_sieve,
    count_patches,
    footprint,
    generalize,
    generalize_array,
    label_equal,
    qml_style,
    rules_for,
    sld_style,
    vectorize,
    width_step,
)
from clc_dask.rasters import to_dataarray

LEVEL2 = np.array([11, 12, 21, 23, 24, 31, 32, 41, 51], dtype=np.uint8)


# ----------------------------------------------------------------------------- helpers


def random_map(shape, seed, n_classes=5, sigma=2.0, nodata=0.1):
    """Blobby random Level-2 map with a smooth no-data region."""
    rng = np.random.default_rng(seed)
    fields = np.stack([ndi.gaussian_filter(rng.random(shape), sigma) for _ in range(n_classes)])
    codes = LEVEL2[:n_classes][np.argmax(fields, axis=0)]
    if nodata:
        mask = ndi.gaussian_filter(rng.random(shape), sigma * 3)
        codes[mask < np.quantile(mask, nodata)] = 0
    return codes


def geobox(shape, pixel=10.0, x0=500000.0, y0=4100000.0, crs="EPSG:32633"):
    return GeoBox(shape, Affine(pixel, 0, x0, 0, -pixel, y0), crs)


def as_dataarray(codes, pixel=10.0, chunks=None):
    arr = to_dataarray(codes, geobox(codes.shape, pixel), name="classes")
    return arr.chunk({"y": chunks[0], "x": chunks[1]}) if chunks else arr


def oracle_mmu(codes, mmu_px, connectivity=4):
    """Rule A, one merge at a time, relabelling the whole map after each merge."""
    codes = codes.copy()
    height, width = codes.shape
    edges = [(0, 1), (1, 0), (0, -1), (-1, 0)]
    diagonals = [(1, 1), (1, -1), (-1, 1), (-1, -1)] if connectivity == 8 else []
    while True:
        labels, n = label_equal(codes, connectivity)
        area = np.bincount(labels.ravel(), minlength=n + 1)
        first = {}
        for index, label in enumerate(labels.ravel().tolist()):
            first.setdefault(label, index)
        best = None
        for label in range(1, n + 1):
            if area[label] >= mmu_px:
                continue
            border, neighbours = {}, set()
            for y, x in zip(*np.nonzero(labels == label), strict=True):
                for dy, dx in edges + diagonals:
                    yy, xx = y + dy, x + dx
                    if 0 <= yy < height and 0 <= xx < width and labels[yy, xx] not in (0, label):
                        neighbours.add(labels[yy, xx])
                        border[codes[yy, xx]] = border.get(codes[yy, xx], 0) + ((dy, dx) in edges)
            if neighbours and (best is None or (area[label], first[label]) < best[0]):
                total = {}
                for q in neighbours:
                    c = codes[labels == q][0]
                    total[c] = total.get(c, 0) + area[q]
                target = min(border, key=lambda c: (-border[c], -total[c], c))
                best = ((area[label], first[label]), label, target)
        if best is None:
            return codes
        codes[labels == best[1]] = best[2]


def oracle_width(codes, wy, wx):
    """Rule B: try every placement of the disk, then grow round by round."""
    height, width = codes.shape
    valid = codes != 0
    wide = np.zeros_like(valid)
    dy, dx = np.nonzero(footprint((wy, wx)))
    for top in range(-wy + 1, height):
        for left in range(-wx + 1, width):
            ys, xs = top + dy, left + dx
            inside = (ys >= 0) & (ys < height) & (xs >= 0) & (xs < width)
            ys, xs = ys[inside], xs[inside]
            if len(np.unique(codes[ys, xs][codes[ys, xs] != 0])) <= 1:
                wide[ys, xs] = True
    wide &= valid
    thin = valid & ~wide
    state = np.where(wide, codes, 0)
    for _ in range(max(wy, wx)):
        new = state.copy()
        for y, x in zip(*np.nonzero(thin & (state == 0)), strict=True):
            votes = {}
            for dy, dx in ((0, 1), (1, 0), (0, -1), (-1, 0)):
                yy, xx = y + dy, x + dx
                if 0 <= yy < height and 0 <= xx < width and state[yy, xx]:
                    votes[state[yy, xx]] = votes.get(state[yy, xx], 0) + 1
            if votes:
                top_votes = max(votes.values())
                tied = [c for c, v in votes.items() if v == top_votes]
                new[y, x] = codes[y, x] if codes[y, x] in tied else min(tied)
        state = new
    return np.where(thin & (state == 0), codes, state)


def small_with_neighbours(codes, mmu_px, connectivity=4):
    """Patches under the MMU that touch another patch (the rule allows none)."""
    labels, n = label_equal(codes, connectivity)
    area = np.bincount(labels.ravel(), minlength=n + 1)
    structure = ndi.generate_binary_structure(2, 1 if connectivity == 4 else 2)
    offenders = []
    for label in np.flatnonzero(area[1:] < mmu_px) + 1:
        region = labels == label
        ring = ndi.binary_dilation(region, structure) & ~region
        if (labels[ring] > 0).any():
            offenders.append(int(label))
    return offenders


# ------------------------------------------------------------------------------- rules


def test_rules_in_pixels():
    r10 = rules_for(10.0)
    assert (r10.mmu_px, r10.width_px, r10.rounds, r10.halo) == (2500, (10, 10), 10, (19, 19))
    assert rules_for(20.0).mmu_px == 625 and rules_for(20.0).width_px == (5, 5)
    r30 = rules_for(30.0)
    assert r30.mmu_px == 278 and r30.width_px == (3, 3)  # ceil(277.8); round(3.33)
    assert rules_for(120.0).width_px == (1, 1) and not rules_for(120.0).width_enabled
    assert rules_for((10.0, 20.0)).mmu_px == 1250 and rules_for((10.0, 20.0)).width_px == (10, 5)
    assert rules_for((-10.0, 10.0)).mmu_px == 2500  # north-up grids have negative y steps
    assert rules_for(10.0, mmu_ha=0).mmu_px == 0
    with pytest.raises(ConfigError, match="mmu_ha"):
        rules_for(10.0, mmu_ha=-1)
    with pytest.raises(ConfigError, match="min_width_m"):
        rules_for(10.0, min_width_m=float("nan"))
    with pytest.raises(ConfigError, match="connectivity"):
        rules_for(10.0, connectivity=6)
    with pytest.raises(InputError, match="Pixel size"):
        rules_for(0.0)


# ---------------------------------------------------------- exactness against oracles


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("window", [(3, 3), (4, 4), (5, 3), (2, 6), (7, 7)])
def test_width_step_matches_definition(seed, window):
    codes = random_map((28, 33), seed, sigma=1.2)
    rules = Rules(mmu_px=0, width_px=window)
    hy, hx = rules.halo
    padded = np.pad(codes, ((hy, hy), (hx, hx)))
    got = width_step(padded, rules)[hy:-hy, hx:-hx]
    expected = oracle_width(codes, *window)
    assert (expected != codes).any()  # the case is not trivial
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("connectivity", [4, 8])
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_mmu_matches_pixel_oracle(seed, connectivity):
    codes = random_map((30, 37), seed, sigma=1.2)
    got = generalize_array(codes, 10.0, mmu_ha=0.12, min_width_m=0, connectivity=connectivity)
    expected = oracle_mmu(codes, 12, connectivity)
    assert (expected != codes).sum() > 20
    np.testing.assert_array_equal(got, expected)


def test_full_rules_are_mmu_then_width_then_mmu():
    codes = random_map((34, 40), 5, sigma=1.5)
    got = generalize_array(codes, 10.0, mmu_ha=0.1, min_width_m=30)
    expected = oracle_mmu(oracle_width(oracle_mmu(codes, 10), 3, 3), 10)
    assert (expected != oracle_mmu(codes, 10)).any()  # the width step did something
    np.testing.assert_array_equal(got, expected)


# ------------------------------------------------------------------ chunked == in memory


CHUNKINGS = [(50, 50), (37, 61), (150, 23), ((10, 60, 80), (100, 70))]


@pytest.mark.parametrize("connectivity", [4, 8])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_chunked_equals_in_memory(seed, connectivity):
    codes = random_map((150, 170), seed)
    expected = generalize_array(codes, 10.0, mmu_ha=0.3, min_width_m=50, connectivity=connectivity)
    assert count_patches(codes, connectivity) > 3 * count_patches(expected, connectivity)
    with dask.config.set(scheduler="synchronous"):
        for chunks in CHUNKINGS:
            out = generalize(as_dataarray(codes, chunks=chunks), mmu_ha=0.3, min_width_m=50,
                             connectivity=connectivity, persist=chunks != (37, 61))
            assert out.chunks == as_dataarray(codes, chunks=chunks).chunks
            np.testing.assert_array_equal(out.values, expected, err_msg=f"chunks {chunks}")


def test_chunks_smaller_than_the_halo():
    codes = random_map((48, 57), 9)
    expected = generalize_array(codes, 10.0, mmu_ha=0.2, min_width_m=50)  # halo 9 px
    with dask.config.set(scheduler="synchronous"):
        out = generalize(as_dataarray(codes, chunks=(5, 7)), mmu_ha=0.2, min_width_m=50)
        assert out.chunks == as_dataarray(codes, chunks=(5, 7)).chunks
        np.testing.assert_array_equal(out.values, expected)


def test_generalize_keeps_grid_dtype_and_records_rules():
    codes = random_map((64, 80), 3).astype(np.uint16)
    arr = as_dataarray(codes, pixel=20.0, chunks=(32, 40))
    out = generalize(arr, mmu_ha=2, min_width_m=60)
    assert out.dtype == np.uint16 and out.shape == codes.shape
    assert out.odc.geobox == arr.odc.geobox and out.rio.nodata == 0
    assert out.attrs["mmu_px"] == 50 and out.attrs["min_width_px"] == [3, 3]
    np.testing.assert_array_equal(out.values, generalize_array(codes, 20.0, 2, 60))
    in_memory = generalize(as_dataarray(codes, pixel=20.0), mmu_ha=2, min_width_m=60)  # NumPy-backed
    np.testing.assert_array_equal(in_memory.values, out.values)
    with pytest.raises(InputError, match="integer"):
        generalize(arr.astype("float32"))


# ------------------------------------------------------------------------- properties


@pytest.mark.parametrize("connectivity", [4, 8])
def test_properties_of_the_result(connectivity):
    codes = random_map((200, 220), 11, n_classes=6, sigma=2.5)
    out = generalize_array(codes, 10.0, mmu_ha=0.5, min_width_m=40, connectivity=connectivity)
    np.testing.assert_array_equal(out == 0, codes == 0)  # no data unchanged, area conserved
    assert small_with_neighbours(out, 50, connectivity) == []
    assert set(np.unique(out)) <= set(np.unique(codes))
    labels, n = label_equal(out, connectivity)
    for label in range(1, n + 1):  # every patch holds an input pixel of its own class
        region = labels == label
        assert (codes[region] == out[region][0]).any()


def test_islets_in_no_data_and_single_class_rasters_stay():
    codes = np.zeros((40, 40), dtype=np.uint8)
    codes[5:25, 5:25] = 31  # 400 px, big enough
    codes[30:32, 30:33] = 21  # 6 px islet: no class neighbour at all
    codes[10:12, 10:12] = 11  # 4 px speck inside the forest
    out = generalize_array(codes, 10.0, mmu_ha=0.1, min_width_m=0)
    assert (out[30:32, 30:33] == 21).all()
    assert (out[10:12, 10:12] == 31).all()
    single = np.full((30, 30), 23, dtype=np.uint8)
    np.testing.assert_array_equal(generalize_array(single, 10.0), single)


def test_large_wide_patches_keep_every_pixel():
    codes = random_map((160, 160), 4, sigma=1.0, nodata=0)  # speckle everywhere
    rng = np.random.default_rng(4)
    smooth = ndi.gaussian_filter(rng.random((160, 160)), 12)
    blob = smooth > np.quantile(smooth, 0.4)
    blob[:, 95:] = False
    # a union of placements of the 30-px disk: wide everywhere, whatever its outline
    region = ndi.binary_opening(blob, structure=footprint((30, 30)))
    assert region.sum() > 3000 and ndi.label(region)[1] > 1
    codes[region] = 31
    codes[20:70, 100:150] = 24  # a 50 × 50 square: only its 4 outermost corner pixels are thin
    out = generalize_array(codes, 10.0, mmu_ha=5, min_width_m=300)
    assert (out[region] == 31).all()
    square = out[20:70, 100:150]
    assert (square == 24).sum() >= 2500 - 4
    assert (square[1:-1, :] == 24).all() and (square[:, 1:-1] == 24).all()


def test_narrow_strips_go_and_wide_ones_stay():
    codes = np.full((120, 160), 31, dtype=np.uint8)
    codes[:, 40:43] = 51  # a 30 m river across a forest: narrower than 100 m
    codes[:, 100:112] = 51  # a 120 m river: wide enough
    codes[:, 60:70] = 21  # a 100 m wide field strip: exactly wide enough
    diagonal = np.abs(np.subtract.outer(np.arange(120), np.arange(160)) - 20) <= 4  # 9 px along rows
    codes[diagonal & (codes == 31)] = 12  # a diagonal strip ~64 m across: too narrow
    out = generalize_array(codes, 10.0, mmu_ha=0.25, min_width_m=100)
    assert (out[:, 40:43] == 31).all()
    assert (out[:, 100:112] == 51).all() and (out[:, 60:70] == 21).all()
    # it survives only where it meets the raster edge: beyond the edge is a wildcard
    ys, xs = np.nonzero(out == 12)
    assert 0 < len(xs) < 40 and xs.max() < 10
    wide_diagonal = np.abs(np.subtract.outer(np.arange(120), np.arange(160)) + 30) <= 7  # ~106 m across
    codes = np.full((120, 160), 31, dtype=np.uint8)
    codes[wide_diagonal] = 51
    out = generalize_array(codes, 10.0, mmu_ha=0.25, min_width_m=100)
    assert (out[wide_diagonal] == 51).mean() > 0.97  # only the strip's sharp ends are trimmed


def test_ties_are_broken_as_documented():
    # longest border tied (3 edges each): the class whose neighbouring patch is larger wins
    row = [21, 21, 21, 11, 31, 31, 31, 31, 31]
    codes = np.array([row] * 3, dtype=np.uint8)
    out = generalize_array(codes, 10.0, mmu_ha=0.05, min_width_m=0)
    assert (out[:, 3] == 31).all()
    # border and neighbour area tied: the smaller code wins
    codes = np.array([[21, 21, 21, 11, 31, 31, 31]] * 3, dtype=np.uint8)
    assert (generalize_array(codes, 10.0, mmu_ha=0.05, min_width_m=0)[:, 3] == 21).all()
    # smallest patch first: 11 (2 px) joins 31, which then outweighs 21 for 12 (3 px)
    codes = np.array([[31] * 5 + [11] * 2 + [12] * 3 + [21] * 5], dtype=np.uint8)
    out = generalize_array(codes, 10.0, mmu_ha=0.04, min_width_m=0)
    np.testing.assert_array_equal(out, [[31] * 10 + [21] * 5])
    # equally small patches: the one whose first pixel comes first (row-major) goes first
    codes = np.array([[31, 31, 31, 11, 11, 12, 12, 21, 21, 21]], dtype=np.uint8)
    out = generalize_array(codes, 10.0, mmu_ha=0.03, min_width_m=0)
    np.testing.assert_array_equal(out, [[31] * 7 + [21] * 3])


def test_real_clc_polygons_follow_the_rules_already(shared_data):
    frame = gpd.read_file(shared_data / "clc" / "lanjaron" / "clc.gpkg", layer="clc")
    x0, y0, x1, y1 = frame.total_bounds
    shape = (int((y1 - y0) // 40), int((x1 - x0) // 40))
    transform = Affine(40, 0, x0, 0, -40, y1)
    codes = rasterio.features.rasterize(
        zip(frame.geometry, frame["CODE_18"].astype(int) // 10, strict=True),
        out_shape=shape, transform=transform, fill=0, dtype="uint8",
    )
    arr = to_dataarray(codes, GeoBox(shape, transform, frame.crs), name="clc")
    with dask.config.set(scheduler="synchronous"):
        out = generalize(arr.chunk({"y": 101, "x": 77})).values
    np.testing.assert_array_equal(out, generalize_array(codes, 40.0))
    # rasterized polygon edges and clipped border polygons make some small or narrow parts
    assert 0 < (generalize_array(codes, 40.0, min_width_m=0) != codes).mean() < 0.025
    assert 0 < (out != codes).mean() < 0.06
    assert small_with_neighbours(out, 157) == []


def test_demo_land_cover_is_kept_and_its_speckled_copy_restored():
    from clc_dask.demo.landcover import synthesize_landcover

    clean = to_level(synthesize_landcover(7, (256, 320)).codes, 2).astype(np.uint8)
    assert count_patches(clean) > 10
    np.testing.assert_array_equal(generalize_array(clean, 20.0), clean)
    rng = np.random.default_rng(0)
    noisy = clean.copy()
    blobs = ndi.binary_dilation(rng.random(clean.shape) < 0.02) & (rng.random(clean.shape) < 0.6)
    noisy[blobs] = rng.choice(np.unique(clean), int(blobs.sum()))
    assert (noisy != clean).mean() > 0.04
    with dask.config.set(scheduler="synchronous"):
        out = generalize(as_dataarray(noisy, pixel=20.0, chunks=(100, 130))).values
    np.testing.assert_array_equal(out, generalize_array(noisy, 20.0))
    assert (out != clean).mean() < 0.002


# -------------------------------------------------------------------- GDAL comparison


def test_compare_to_sieve():
    codes = np.full((60, 60), 31, dtype=np.uint8)
    codes[:, 30:] = 21
    codes[10, 10] = codes[40, 45] = 11  # specks inside one class each: both tools agree
    codes[:5, :5] = 0
    ours = generalize_array(codes, 10.0, mmu_ha=0.05, min_width_m=0)
    report = compare_to_sieve(codes, ours, 5)
    assert report["differ_from_sieve"] == 0.0
    assert report["changed_by_generalize"] == report["changed_by_sieve"] == 2 / report["valid_pixels"]
    assert report["valid_pixels"] == 3600 - 25
    assert (report["patches_input"], report["patches_generalized"], report["patches_sieve"]) == (4, 2, 2)
    # a speck on a border: longest border (ours) vs largest neighbour (GDAL) disagree
    codes = np.full((20, 20), 21, dtype=np.uint8)
    codes[:, 12:] = 31  # 31 is smaller than 21
    codes[5:8, 12] = 11  # 3 px: borders 21 on one side (3 edges), 31 on 5 edges
    ours = generalize_array(codes, 10.0, mmu_ha=0.05, min_width_m=0)
    assert (ours[5:8, 12] == 31).all()
    report = compare_to_sieve(codes, ours, 5)
    assert report["differ_from_sieve"] == 3 / 400 and report["small_patches_sieve"] == 0
    with pytest.raises(InputError, match="shapes"):
        compare_to_sieve(codes, ours[:10], 5)


# ------------------------------------------------------------------------ vectorize


def test_vectorize_one_feature_per_patch_across_chunks(tmp_path):
    codes = generalize_array(random_map((120, 150), 8, n_classes=4, sigma=3), 10.0, 0.2, 0)
    gbox = GeoBox(codes.shape, Affine(10, 0, 500000.3, 0, -10, 4001200.7), "EPSG:32633")
    arr = to_dataarray(codes, gbox)
    whole = vectorize(arr, tmp_path / "whole.gpkg")
    with dask.config.set(scheduler="synchronous"):
        chunked = vectorize(arr.chunk({"y": 37, "x": 41}), tmp_path / "chunked.gpkg")
    a = gpd.read_file(whole, layer="whole")
    b = gpd.read_file(chunked, layer="chunked")
    assert len(a) == count_patches(codes) == len(b)
    assert list(a.columns) == ["CODE_18", "label", "area_ha", "geometry"]
    assert a.crs.to_epsg() == 32633 and a.geometry.is_valid.all() and (a.geom_type == "Polygon").all()
    assert all(x.equals_exact(y, 0) for x, y in zip(a.geometry, b.geometry, strict=True))
    assert (a["CODE_18"] == b["CODE_18"]).all()
    assert set(a["CODE_18"]) == {str(c) for c in np.unique(codes[codes > 0])}
    assert (a["label"] == [label_of(int(c)) for c in a["CODE_18"]]).all()
    np.testing.assert_allclose(a["area_ha"], a.geometry.area / 10_000)
    assert a["area_ha"].sum() == pytest.approx((codes > 0).sum() * 0.01)
    back = rasterio.features.rasterize(zip(b.geometry, b["CODE_18"].astype(int), strict=True),
                                       out_shape=codes.shape, transform=gbox.affine, fill=0, dtype="uint8")
    np.testing.assert_array_equal(back, codes)


def test_vectorize_writes_styles_beside_and_inside(tmp_path):
    codes = np.full((20, 30), 31, dtype=np.uint8)
    codes[:, 15:] = 21
    path = vectorize(to_dataarray(codes, geobox(codes.shape)), tmp_path / "clc.gpkg", level=2)
    assert {"clc", "layer_styles"} <= set(pyogrio.list_layers(path)[:, 0])
    qml = ET.parse(tmp_path / "clc.qml").getroot()
    renderer = qml.find("renderer-v2")
    assert renderer.get("type") == "categorizedSymbol" and renderer.get("attr") == "CODE_18"
    categories = renderer.findall("categories/category")
    assert [c.get("value") for c in categories] == [str(c) for c in official_codes(2)]
    forest = next(c for c in categories if c.get("value") == "31")
    symbol = renderer.find(f"symbols/symbol[@name='{forest.get('symbol')}']")
    colour = symbol.find("layer/Option/Option[@name='color']").get("value")
    assert colour == "{},{},{},255".format(*rgb_of(31))
    sld = ET.parse(tmp_path / "clc.sld").getroot()
    ns = {"sld": "http://www.opengis.net/sld", "ogc": "http://www.opengis.net/ogc"}
    rules = sld.findall(".//sld:Rule", ns)
    assert len(rules) == len(official_codes(2))
    rule = next(r for r in rules if r.find("ogc:Filter//ogc:Literal", ns).text == "21")
    assert rule.find(".//sld:CssParameter[@name='fill']", ns).text == "#{:02x}{:02x}{:02x}".format(*rgb_of(21))
    with sqlite3.connect(path) as db:
        rows = db.execute("SELECT f_table_name, f_geometry_column, useAsDefault, styleQML FROM layer_styles").fetchall()
    assert rows[0][:3] == ("clc", "geom", 1) and "categorizedSymbol" in rows[0][3]
    assert qml_style(3).count("<category ") == 44 and sld_style(1).count("<Rule>") == 5


def test_vectorize_refuses_bad_input_before_writing(tmp_path):
    codes = np.full((10, 10), 31, dtype=np.uint8)
    arr = to_dataarray(codes, geobox(codes.shape))
    with pytest.raises(InputError, match="Level-3"):
        vectorize(arr, tmp_path / "x.gpkg", level=3)
    with pytest.raises(OutputError, match="gpkg"):
        vectorize(arr, tmp_path / "x.shp")
    assert list(tmp_path.iterdir()) == []
    vectorize(arr, tmp_path / "x.gpkg")
    with pytest.raises(OutputError, match="overwrite"):
        vectorize(arr, tmp_path / "x.gpkg", overwrite=False)


# ------------------------------------------------------------------------------- CLI


def write_map(path, codes, pixel=10.0, nodata=0, count=1):
    with rasterio.open(path, "w", driver="GTiff", width=codes.shape[1], height=codes.shape[0], count=count,
                       dtype=codes.dtype, crs="EPSG:32633", transform=Affine(pixel, 0, 500000, 0, -pixel, 4100000),
                       nodata=nodata) as dst:
        for band in range(1, count + 1):
            dst.write(codes, band)


def test_cli_generalize(tmp_path):
    codes = random_map((130, 110), 6, sigma=2.5)
    write_map(tmp_path / "classes.tif", codes)
    runner = CliRunner()
    result = runner.invoke(app, [
        "generalize", "--input", str(tmp_path / "classes.tif"), "--out", str(tmp_path / "gen.tif"),
        "--mmu-ha", "0.5", "--min-width-m", "40", "--chunk-size", "64",
        "--vector", str(tmp_path / "gen.gpkg"), "--compare-sieve",
    ])
    assert result.exit_code == 0, result.output
    expected = generalize_array(codes, 10.0, 0.5, 40)
    with rasterio.open(tmp_path / "gen.tif") as src:
        np.testing.assert_array_equal(src.read(1), expected)
        assert src.nodata == 0 and src.crs.to_epsg() == 32633
        assert src.colormap(1)[31][:3] == rgb_of(31)
        assert src.tags()["GENERALIZE_MMU_HA"] == "0.5"
    polygons = gpd.read_file(tmp_path / "gen.gpkg", layer="gen")
    assert len(polygons) == count_patches(expected)
    assert (tmp_path / "gen.qml").exists() and (tmp_path / "gen.sld").exists()
    report = json.loads(result.output[result.output.index("{"):])
    assert report["mmu_px"] == 50 and report["small_patches_generalized"] == 0
    assert 0 < report["differ_from_sieve"] < 0.2


def test_cli_refuses_bad_input_before_writing(tmp_path):
    codes = random_map((40, 40), 1)
    write_map(tmp_path / "classes.tif", codes)
    write_map(tmp_path / "two.tif", codes, count=2)
    write_map(tmp_path / "float.tif", codes.astype("float32"))
    level3 = np.where(codes > 0, codes.astype("uint16") * 10 + 1, 0).astype("uint16")
    level3[level3 == 111] = 999  # not a CLC code
    write_map(tmp_path / "level3.tif", level3)
    runner = CliRunner()
    base = ["generalize", "--out", str(tmp_path / "out" / "gen.tif")]
    cases = [
        ([*base, "--input", str(tmp_path / "classes.tif"), "--mmu-ha", "-5"], ConfigError, "--mmu-ha"),
        ([*base, "--input", str(tmp_path / "classes.tif"), "--connectivity", "6"], ConfigError, "connectivity"),
        ([*base, "--input", str(tmp_path / "two.tif")], InputError, "2 bands"),
        ([*base, "--input", str(tmp_path / "float.tif")], InputError, "integer"),
        ([*base, "--input", str(tmp_path / "missing.tif")], InputError, "does not exist"),
        ([*base, "--input", str(tmp_path / "level3.tif")], InputError, "Unknown Level-3"),
        ([*base, "--input", str(tmp_path / "classes.tif"), "--vector", str(tmp_path / "out" / "p.shp")],
         OutputError, "GeoPackage"),
    ]
    for args, error, message in cases:
        result = runner.invoke(app, args)
        assert isinstance(result.exception, error), (args, result.exception)
        assert message in str(result.exception)
    assert not (tmp_path / "out" / "gen.tif").exists()
    ok = runner.invoke(app, [*base, "--input", str(tmp_path / "classes.tif"), "--mmu-ha", "0.1"])
    assert ok.exit_code == 0, ok.output
    again = runner.invoke(app, [*base, "--input", str(tmp_path / "classes.tif")])
    assert isinstance(again.exception, OutputError) and "--overwrite" in str(again.exception)
