"""Labels: CLC polygons or rasters → CLC code rasters on a grid, chunked with dask."""

from __future__ import annotations

import warnings

import dask.array as da
import geopandas as gpd
import numpy as np
import pytest
import rasterio
import rasterio.features
import shapely
from affine import Affine
from odc.geo.geobox import GeoBox

from clc_dask import classes
from clc_dask.errors import ConfigError, GridMismatchError, InputError
from clc_dask.grid import assert_same_grid, grid_of_raster, snapped_geobox
from clc_dask.labels import label_raster, write_labels
from clc_dask.rasters import geobox_of, to_dataarray

pytestmark = pytest.mark.filterwarnings(
    "ignore::rasterio.errors.NotGeoreferencedWarning",  # rasterio's scratch warp datasets
    "ignore:'crs' was not provided:UserWarning",
)

LANJARON = "clc/lanjaron/clc.gpkg"


# --------------------------------------------------------------------------- real polygons


@pytest.fixture(scope="module")
def lanjaron(shared_data):
    """Path, polygons and a 10 m EPSG:25830 grid covering them."""
    path = shared_data / LANJARON
    gdf = gpd.read_file(path, layer="clc")
    geobox = snapped_geobox(tuple(gdf.total_bounds), 25830, 10)
    return path, gdf, geobox


@pytest.fixture(scope="module")
def lanjaron_l3(lanjaron):
    path, _, geobox = lanjaron
    return label_raster(path, geobox, level=3, layer="clc", chunk_size=512)


def _class_areas_ha(codes: np.ndarray, pixel_area_m2: float) -> dict[int, float]:
    values, counts = np.unique(codes, return_counts=True)
    return {int(v): c * pixel_area_m2 / 1e4 for v, c in zip(values, counts, strict=True) if v}


def _area_errors_pct(gdf: gpd.GeoDataFrame, codes: np.ndarray, level: int) -> dict[int, float]:
    truth = gdf.geometry.area.groupby(
        classes.to_level(gdf["CODE_18"].astype(int).to_numpy(), level)
    ).sum() / 1e4
    got = _class_areas_ha(codes, 100.0)
    assert set(got) == set(truth.index)
    return {int(c): 100 * (got[c] - a) / a for c, a in truth.items()}


def test_lanjaron_level3_is_lazy_chunked_and_class_areas_match(lanjaron, lanjaron_l3):
    _, gdf, geobox = lanjaron
    labels = lanjaron_l3
    assert isinstance(labels.data, da.Array)
    assert labels.dims == ("y", "x") and labels.dtype == np.uint16
    assert labels.data.chunksize == (512, 512) and labels.data.npartitions == 12
    assert geobox_of(labels) == geobox
    assert labels.attrs["clc_level"] == 3
    errors = _area_errors_pct(gdf, labels.values, 3)
    assert len(errors) == 20
    assert max(abs(e) for e in errors.values()) < 1.0, errors


def test_lanjaron_level2_class_areas_match(lanjaron, lanjaron_l3):
    path, gdf, geobox = lanjaron
    labels = label_raster(path, geobox, level=2, layer="clc", chunk_size=512)
    assert labels.dtype == np.uint8
    values = labels.values
    assert set(np.unique(values)) == {11, 12, 22, 23, 24, 31, 32, 33, 51}
    np.testing.assert_array_equal(values, classes.to_level(lanjaron_l3.values, 2))
    errors = _area_errors_pct(gdf, values, 2)
    assert max(abs(e) for e in errors.values()) < 1.0, errors


def test_chunked_result_equals_single_chunk_and_whole_rasterization(lanjaron, lanjaron_l3):
    path, gdf, geobox = lanjaron
    single = label_raster(path, geobox, level=3, chunk_size=2048)
    assert single.data.npartitions == 1
    small = label_raster(path, geobox, level=3, chunk_size=128)
    assert small.data.npartitions == 15 * 10
    whole = rasterio.features.rasterize(
        zip(gdf.geometry, gdf["CODE_18"].astype(int), strict=True), out_shape=geobox.shape.yx,
        transform=geobox.affine, all_touched=False, dtype="uint16",
    )
    np.testing.assert_array_equal(lanjaron_l3.values, single.values)
    np.testing.assert_array_equal(small.values, single.values)
    np.testing.assert_array_equal(single.values, whole)


def test_each_chunk_task_carries_only_its_own_polygons(lanjaron, lanjaron_l3):
    _, gdf, geobox = lanjaron
    graph = dict(lanjaron_l3.data.__dask_graph__())
    parts = {k: v for k, v in graph.items() if k[0].startswith("clc-label-shapes-")}
    assert len(parts) == 12
    counts = []
    for (_, iy, ix), cell in parts.items():
        geoms, codes = cell[0, 0]
        chunk = geobox[iy * 512:(iy + 1) * 512, ix * 512:(ix + 1) * 512]
        box = shapely.box(*chunk.boundingbox)
        expected = int(gdf.intersects(box).sum())
        assert len(geoms) == len(codes) == expected
        # clipped to the chunk plus one pixel: no task holds whole country-sized polygons
        left, bottom, right, top = chunk.boundingbox
        padded = shapely.box(left - 10.001, bottom - 10.001, right + 10.001, top + 10.001)
        assert padded.contains(geoms).all()
        counts.append(expected)
    assert max(counts) < len(gdf) and sum(counts) >= len(gdf)
    # one data node and one rasterize task per chunk, nothing else
    assert len(graph) == 2 * 12


@pytest.mark.parametrize("epsg", [32630, 3035])  # WGS 84 UTM 30N; ETRS89-LAEA (a real warp)
def test_reprojected_to_another_crs(lanjaron, epsg):
    path, gdf, _ = lanjaron
    moved = gdf.to_crs(epsg)
    geobox = snapped_geobox(tuple(moved.total_bounds), epsg, 10)
    labels = label_raster(path, geobox, level=3, chunk_size=1024)
    assert labels.odc.geobox.crs.epsg == epsg
    errors = _area_errors_pct(moved, labels.values, 3)
    assert max(abs(e) for e in errors.values()) < 1.0, errors
    whole = rasterio.features.rasterize(
        zip(moved.geometry, moved["CODE_18"].astype(int), strict=True),
        out_shape=geobox.shape.yx, transform=geobox.affine, dtype="uint16")
    np.testing.assert_array_equal(labels.values, whole)


def test_integer_code_field_gives_the_same_raster(lanjaron, lanjaron_l3, tmp_path):
    _, gdf, geobox = lanjaron
    ints = gdf.assign(CODE_18=gdf["CODE_18"].astype(int))
    ints.to_file(tmp_path / "ints.gpkg", layer="clc")
    labels = label_raster(tmp_path / "ints.gpkg", geobox, level=3, chunk_size=512)
    np.testing.assert_array_equal(labels.values, lanjaron_l3.values)


def test_overlapping_polygons_later_wins_whatever_the_chunking(tmp_path):
    geobox = snapped_geobox((0, 0, 640, 640), 32631, 10)  # 64×64 px
    rng = np.random.default_rng(11)
    corners = rng.uniform(0, 560, size=(60, 2))
    squares = [shapely.box(x, y, x + 80, y + 80).buffer(7) for x, y in corners]
    codes = rng.choice(classes.official_codes(3), size=len(squares))
    gdf = gpd.GeoDataFrame({"CODE_18": codes}, geometry=squares, crs="EPSG:32631")
    gdf.to_file(tmp_path / "overlaps.gpkg", layer="clc")
    whole = rasterio.features.rasterize(zip(squares, codes, strict=True), out_shape=(64, 64),
                                        transform=geobox.affine, dtype="uint16")
    for chunk in (8, 16, 64):
        labels = label_raster(tmp_path / "overlaps.gpkg", geobox, level=3, chunk_size=chunk)
        np.testing.assert_array_equal(labels.values, whole)


def test_runs_on_a_distributed_cluster(lanjaron, lanjaron_l3, grid_code_raster):
    from distributed import Client, LocalCluster

    path, _, geobox = lanjaron
    raster, grid, src_box = grid_code_raster
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=True,
                      dashboard_address=":0") as cluster, Client(cluster):
        vector = label_raster(path, geobox, level=3, chunk_size=512).values
        warped = label_raster(raster, src_box, level=3, chunk_size=16).values
    np.testing.assert_array_equal(vector, lanjaron_l3.compute(scheduler="sync").values)
    np.testing.assert_array_equal(warped, classes.grid_code_to_code(grid))


# --------------------------------------------------------------------------- alignment


def _synthetic_truth() -> tuple[np.ndarray, GeoBox]:
    """A 48×48 px map of 8×8 px blocks of random Level-3 codes on a 10 m UTM grid."""
    rng = np.random.default_rng(42)
    codes = np.array(classes.official_codes(3))
    blocks = rng.choice(codes, size=(6, 6))
    truth = np.kron(blocks, np.ones((8, 8), dtype=int)).astype(np.uint16)
    geobox = snapped_geobox((500_000, 4_000_000, 500_480, 4_000_480), 32633, 10)
    return truth, geobox


def _polygons_of(truth: np.ndarray, geobox: GeoBox, shift_m: float = 0.0) -> gpd.GeoDataFrame:
    shapes = rasterio.features.shapes(truth, transform=geobox.affine)
    records = [(shapely.geometry.shape(g), str(int(v))) for g, v in shapes]
    gdf = gpd.GeoDataFrame({"CODE_18": [c for _, c in records]},
                           geometry=[g for g, _ in records], crs="EPSG:32633")
    return gdf.set_geometry(gdf.translate(xoff=shift_m)) if shift_m else gdf


def _write_imagery(path, truth: np.ndarray, geobox: GeoBox) -> None:
    """A 3-band 'image' whose pixels encode their class (DN = code * 10 + band)."""
    bands = np.stack([truth * 10 + b for b in (1, 2, 3)]).astype(np.uint16)
    with rasterio.open(path, "w", driver="GTiff", width=geobox.shape.x, height=geobox.shape.y,
                       count=3, dtype="uint16", crs=geobox.crs.to_wkt(),
                       transform=geobox.affine, nodata=0) as dst:
        dst.write(bands)


def _lines_up(labels, image_path) -> bool:
    """The check: same grid as the image, and every label equals the class the image encodes."""
    with rasterio.open(image_path) as src:
        decoded = src.read(1) // 10
        image_grid = GeoBox(decoded.shape, src.transform, geobox_of(labels).crs)
    assert_same_grid(geobox_of(labels), image_grid, "label", "image")
    return bool(np.array_equal(np.asarray(labels.values), decoded))


def test_labels_line_up_with_imagery_and_the_check_catches_shifts(tmp_path):
    truth, geobox = _synthetic_truth()
    image = tmp_path / "image.tif"
    _write_imagery(image, truth, geobox)
    _polygons_of(truth, geobox).to_file(tmp_path / "clc.gpkg", layer="clc")

    labels = label_raster(tmp_path / "clc.gpkg", grid_of_raster(image), level=3, chunk_size=16)
    assert labels.data.npartitions == 9
    np.testing.assert_array_equal(labels.values, truth)
    assert _lines_up(labels, image)

    # the same check fails for a one-pixel shift of the values, in x or y …
    assert not _lines_up(labels.copy(data=np.roll(labels.values, 1, axis=1)), image)
    assert not _lines_up(labels.copy(data=np.roll(labels.values, 1, axis=0)), image)
    # … for transposed axes (square grid, so only the values can tell) …
    assert not _lines_up(labels.copy(data=labels.values.T), image)
    # … for labels whose georeference is one pixel off …
    moved = GeoBox(geobox.shape, Affine.translation(10, 0) * geobox.affine, geobox.crs)
    with pytest.raises(GridMismatchError):
        _lines_up(to_dataarray(labels.values, moved), image)
    # … and for polygons one pixel (10 m) east of where they belong.
    _polygons_of(truth, geobox, shift_m=10).to_file(tmp_path / "shifted.gpkg", layer="clc")
    shifted = label_raster(tmp_path / "shifted.gpkg", grid_of_raster(image), level=3, chunk_size=16)
    assert not _lines_up(shifted, image)
    np.testing.assert_array_equal(shifted.values[:, 1:], truth[:, :-1])


# --------------------------------------------------------------------------- raster input


def _write_raster(path, data: np.ndarray, geobox: GeoBox, nodata: float | None = 0) -> None:
    with rasterio.open(path, "w", driver="GTiff", width=data.shape[1], height=data.shape[0],
                       count=1, dtype=data.dtype.name, crs=geobox.crs.to_wkt(),
                       transform=geobox.affine, nodata=nodata) as dst:
        dst.write(data, 1)


@pytest.fixture
def grid_code_raster(tmp_path):
    """A 100 m EPSG:3035 GRID_CODE raster holding every class and every no-data value."""
    rng = np.random.default_rng(7)
    geobox = snapped_geobox((3_000_000, 2_000_000, 3_004_000, 2_003_000), 3035, 100)
    grid = rng.integers(1, 45, size=geobox.shape.yx).astype(np.uint8)
    grid.ravel()[:44] = np.arange(1, 45)
    grid[-1, :5] = [0, 48, 49, 50, 255]
    path = tmp_path / "grid_code.tif"
    _write_raster(path, grid, geobox, nodata=None)
    return path, grid, geobox


def test_grid_code_raster_gives_clc_codes(grid_code_raster):
    path, grid, src_box = grid_code_raster
    target = snapped_geobox(tuple(src_box.boundingbox), 3035, 50)  # nearest, 2× finer
    expected3 = np.kron(classes.grid_code_to_code(grid), np.ones((2, 2), dtype=np.uint16))
    assert expected3[-1, :10].tolist() == [0] * 10  # the no-data values
    labels3 = label_raster(path, target, level=3, chunk_size=16)
    assert labels3.dtype == np.uint16 and labels3.data.npartitions == 4 * 5
    np.testing.assert_array_equal(labels3.values, expected3)
    labels2 = label_raster(path, target, level=2, grid_code=True)
    assert labels2.dtype == np.uint8
    np.testing.assert_array_equal(labels2.values, classes.to_level(expected3, 2))


def test_signed_grid_code_raster_with_negative_nodata(tmp_path):
    geobox = snapped_geobox((3_000_000, 2_000_000, 3_000_400, 2_000_200), 3035, 100)
    grid = np.array([[1, 12, 44, -128], [23, -128, 41, 2]], dtype=np.int8)
    _write_raster(tmp_path / "s.tif", grid, geobox, nodata=-128)
    labels = label_raster(tmp_path / "s.tif", geobox, level=3)
    assert labels.values.tolist() == [[111, 211, 523, 0], [311, 0, 512, 112]]


def test_downsampling_takes_the_majority_class(tmp_path):
    src_box = snapped_geobox((0, 0, 600, 300), 32631, 10)  # 30×60 px
    target = snapped_geobox((0, 0, 600, 300), 32631, 30)  # 10×20 px, 3×3 source px each
    rng = np.random.default_rng(3)
    majority = rng.choice([311, 312, 231, 512], size=target.shape.yx)
    minority = np.where(majority == 311, 512, 311)
    data = np.kron(majority, np.ones((3, 3), dtype=int))
    # 5 of 9 source pixels hold the majority class; the centre one does not
    pattern = np.tile(np.array([[1, 1, 1], [1, 0, 0], [1, 0, 0]], dtype=bool), target.shape.yx)
    data = np.where(pattern, data, np.kron(minority, np.ones((3, 3), dtype=int))).astype(np.uint16)
    _write_raster(tmp_path / "codes.tif", data, src_box)
    labels = label_raster(tmp_path / "codes.tif", target, level=3)  # auto → mode
    np.testing.assert_array_equal(labels.values, majority)
    nearest = label_raster(tmp_path / "codes.tif", target, level=3, resampling="nearest")
    assert not np.array_equal(nearest.values, majority)  # centre pixel is the minority class


def test_code_raster_reprojected_to_another_crs(tmp_path):
    src_box = snapped_geobox((440_000, 4_080_000, 446_000, 4_086_000), 25830, 100)
    rng = np.random.default_rng(5)
    blocks = rng.choice([111, 211, 311, 999, 512], size=(6, 6))
    data = np.kron(blocks, np.ones((10, 10), dtype=int)).astype(np.uint16)
    _write_raster(tmp_path / "codes.tif", data, src_box)
    target = snapped_geobox((441_000, 4_081_000, 445_000, 4_085_000), 32630, 20)
    labels = label_raster(tmp_path / "codes.tif", target, level=2, chunk_size=64)
    assert labels.odc.geobox.crs.epsg == 32630 and labels.dtype == np.uint8
    # each target pixel centre, looked up in the source: nearest neighbour by hand
    ys, xs = np.meshgrid(np.arange(target.shape.y) + 0.5, np.arange(target.shape.x) + 0.5,
                         indexing="ij")
    ex, ny = target.affine * (xs, ys)
    from pyproj import Transformer

    sx, sy = Transformer.from_crs(32630, 25830, always_xy=True).transform(ex, ny)
    col, row = ~src_box.affine * (sx, sy)
    expected = classes.to_level(np.where(data == 999, 0, data)[row.astype(int), col.astype(int)], 2)
    agree = (labels.values == expected).mean()
    assert agree > 0.995  # only pixels on block borders may differ by sub-pixel rounding
    assert set(np.unique(labels.values)) == {0, 11, 21, 31, 51}


def test_ambiguous_raster_needs_a_flag_and_our_own_labels_are_recognised(tmp_path):
    geobox = snapped_geobox((0, 0, 20, 20), 32631, 10)
    data = np.array([[11, 21], [31, 41]], dtype=np.uint8)  # GRID_CODE or Level-2 codes?
    _write_raster(tmp_path / "amb.tif", data, geobox)
    with pytest.raises(InputError, match="`grid_code`"):
        label_raster(tmp_path / "amb.tif", geobox)
    assert label_raster(tmp_path / "amb.tif", geobox, grid_code=False).values.tolist() == [
        [11, 21], [31, 41]]
    assert label_raster(tmp_path / "amb.tif", geobox, grid_code=True, level=3).values.tolist() == [
        [142, 243], [332, 512]]
    with pytest.raises(InputError, match="Level-2 codes into Level 3"):
        label_raster(tmp_path / "amb.tif", geobox, grid_code=False, level=3)
    # a Level-2 label raster written by write_labels reads back as codes, unchanged
    written = write_labels(to_dataarray(data, geobox), tmp_path / "ours.tif", level=2)
    assert label_raster(written, geobox).values.tolist() == [[11, 21], [31, 41]]


# --------------------------------------------------------------------------- output file


def test_written_file_has_codes_nodata_colour_table_crs_and_transform(lanjaron, tmp_path):
    path, _, geobox = lanjaron
    for level in (2, 3):
        labels = label_raster(path, geobox, level=level, layer="clc", chunk_size=1024)
        out = write_labels(labels, tmp_path / f"l{level}.tif")
        with rasterio.open(out) as src:
            assert src.count == 1 and src.dtypes[0] == ("uint8" if level == 2 else "uint16")
            assert src.nodata == 0
            assert src.crs.to_epsg() == 25830
            assert src.transform.almost_equals(geobox.affine)
            assert (src.height, src.width) == geobox.shape.yx
            assert src.tags()["CLC_LEVEL"] == str(level)
            np.testing.assert_array_equal(src.read(1), labels.values)
            cmap = src.colormap(1)
        assert cmap[0] == (0, 0, 0, 0)
        for code in classes.official_codes(level):
            assert cmap[code] == (*classes.rgb_of(code), 255)
        assert cmap[323 if level == 3 else 32] == (
            (166, 230, 77, 255) if level == 3 else (204, 242, 77, 255))


# --------------------------------------------------------------------------- CLI


def _cli(run_cli, *args: str) -> tuple[int, str]:
    """``clc-dask -q labels ARGS…``: exit code and everything it printed."""
    code, out, err = run_cli("-q", "labels", *args)
    return code, out + err


def test_cli_writes_labels_on_an_explicit_grid_and_like_a_raster(lanjaron, tmp_path, run_cli):
    path, gdf, _ = lanjaron
    out = tmp_path / "l2.tif"
    code, text = _cli(run_cli, "--source", str(path), "--layer", "clc", "--epsg",
                      "25830", "--resolution", "50", "--bounds", "455000,4085000,460000,4090000",
                      "--chunk-size", "64", "--out", str(out))
    assert code == 0, text
    assert "Level-2" in text and "EPSG:25830" in text
    with rasterio.open(out) as src:
        assert src.transform == Affine(50, 0, 455000, 0, -50, 4090000)
        assert src.shape == (100, 100)
        l2 = src.read(1)
    clipped = gdf.clip(shapely.box(455000, 4085000, 460000, 4090000))
    expected = rasterio.features.rasterize(
        zip(clipped.geometry, classes.to_level(clipped["CODE_18"].astype(int).to_numpy(), 2),
            strict=True), out_shape=(100, 100), transform=src.transform, dtype="uint8")
    np.testing.assert_array_equal(l2, expected)

    again = tmp_path / "l3.tif"
    code, text = _cli(run_cli, "--source", str(path), "--like", str(out), "--level",
                      "3", "--out", str(again))
    assert code == 0, text
    with rasterio.open(again) as src:
        assert src.transform == Affine(50, 0, 455000, 0, -50, 4090000)
        np.testing.assert_array_equal(classes.to_level(src.read(1), 2), l2)


def _write_bad_vectors(gdf: gpd.GeoDataFrame, tmp_path) -> dict[str, object]:
    few = gdf.iloc[:5].copy()
    unknown = few.assign(CODE_18=["311", "311", "315", "222", "999x"])
    unknown.to_file(tmp_path / "unknown.gpkg", layer="clc")
    few.rename(columns={"CODE_18": "CLC"}).to_file(tmp_path / "nofield.gpkg", layer="clc")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        few.set_crs(None, allow_override=True).to_file(tmp_path / "nocrs.shp")
    return {
        "unknown": (tmp_path / "unknown.gpkg", ["315", "999x", "CODE_18"]),
        "nofield": (tmp_path / "nofield.gpkg", ["no field 'CODE_18'", "CLC", "AREA_HA"]),
        "nocrs": (tmp_path / "nocrs.shp", ["has no CRS", "ogr2ogr -a_srs"]),
    }


def test_cli_bad_input_fails_clearly_and_writes_nothing(lanjaron, tmp_path, run_cli):
    path, gdf, _ = lanjaron
    grid = ["--epsg", "25830", "--resolution", "100", "--bounds", "453000,4081000,466000,4100000"]
    cases = _write_bad_vectors(gdf, tmp_path)
    cases["no overlap"] = (path, ["No CLC data", "overlaps the grid"])
    bad_raster = np.array([[311, 777], [0, 312]], dtype=np.uint16)
    _write_raster(tmp_path / "bad.tif", bad_raster, GeoBox((2, 2), Affine(100, 0, 455000, 0, -100,
                                                                           4090000), "EPSG:25830"))
    cases["unknown raster code"] = (tmp_path / "bad.tif", ["[777]", "not CLC codes"])
    for name, (source, needles) in cases.items():
        out = tmp_path / "out" / f"{name}.tif"
        args = grid if name != "no overlap" else [
            "--epsg", "25830", "--bounds", "100000,4081000,101000,4082000"]
        code, text = _cli(run_cli, "--source", str(source), *args, "--out", str(out))
        assert code == 1, (name, text)
        assert text.startswith("Error: "), text
        for needle in needles:
            assert needle in text, (name, needle, text)
        assert not out.exists()
        assert not out.parent.exists() or not any(out.parent.iterdir()), name


def test_api_errors_for_grid_options_and_existing_output(lanjaron, tmp_path, run_cli):
    path, _, geobox = lanjaron
    with pytest.raises(InputError, match="does not exist"):
        label_raster(tmp_path / "missing.gpkg", geobox)
    with pytest.raises(InputError, match="no layer 'nope'.*'clc', 'lanjaron'"):
        label_raster(path, geobox, layer="nope")
    with pytest.raises(InputError, match="layers and their fields: clc: .*CODE_18"):
        label_raster(path, geobox, field="CODE_12")
    with pytest.raises(ConfigError, match="CLC level"):
        label_raster(path, geobox, level=4)
    with pytest.raises(ConfigError, match="raster sources only"):
        label_raster(path, geobox, grid_code=True)
    with rasterio.open(tmp_path / "nocrs.tif", "w", driver="GTiff", width=4, height=4, count=1,
                       dtype="uint16", transform=geobox.affine) as dst:
        dst.write(np.full((1, 4, 4), 311, dtype=np.uint16))
    with pytest.raises(InputError, match="has no CRS.*gdal_edit.py -a_srs"):
        label_raster(tmp_path / "nocrs.tif", geobox)
    with pytest.raises(InputError, match="has no CRS.*`epsg`"):
        grid_of_raster(tmp_path / "nocrs.tif")
    out = tmp_path / "exists.tif"
    out.write_bytes(b"keep me")
    code, text = _cli(run_cli, "--source", str(path), "--epsg", "25830",
                      "--bounds", "455000,4085000,456000,4086000", "--out", str(out))
    assert code == 1 and "--overwrite" in text and out.read_bytes() == b"keep me"
    code, text = _cli(run_cli, "--source", str(path), "--out", str(tmp_path / "a.tif"))
    assert code == 1 and "No target grid" in text
    code, text = _cli(run_cli, "--source", str(path), "--like", str(path), "--epsg",
                      "25830", "--out", str(tmp_path / "a.tif"))
    assert code == 1 and "either --like or --epsg" in text
    code, text = _cli(run_cli, "--source", str(path), "--epsg", "25830", "--bounds",
                      "1,2,3", "--out", str(tmp_path / "a.tif"))
    assert code == 1 and "LEFT,BOTTOM,RIGHT,TOP" in text
    assert not (tmp_path / "a.tif").exists()
