"""Loading and seasonal mosaics: the median of clear, harmonised observations, on synthetic
scenes (known truth), on the real 33TWM catalog, and written as COG or Zarr."""

from __future__ import annotations

import json
import shutil
import warnings

import dask
import dask.array as da
import numpy as np
import pystac
import pytest
import rasterio
import xarray as xr
from odc.geo.geobox import GeoBox
from odc.geo.geom import box

from clc_dask.errors import ConfigError, InputError, ReadError
from clc_dask.grid import geobox_for_aoi
from clc_dask.items import composite_bands
from clc_dask.load import load_scenes
from clc_dask.mosaic import (
    MASKED_SCL_CLASSES,
    median_of_clear,
    mosaic_paths,
    seasonal_mosaic,
    write_mosaic,
)
from clc_dask.search import search_items

TWM_CATALOG = "s2/earthsearch_v1_33TWM_2023-08/catalog.json"
TWM_BBOX = (15.6, 46.2, 16.2, 46.6)
READDIR = {"GDAL_DISABLE_READDIR_ON_OPEN": "NO"}
BANDS = ("B02", "B03", "B04", "B08", "SCL")


# --------------------------------------------------------------------------- median
def _reference_median(refl, clear, offsets):
    """float64 nanmedian of harmonised clear DN, rounded half up; 0 where nothing is clear."""
    work = refl.astype(np.float64) - offsets.reshape(-1, 1, 1)
    work = np.where(work < 1, 1, work)
    work[~clear | (refl == 0)] = np.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN pixels
        med = np.nanmedian(work, axis=0)
    return np.where(np.isnan(med), 0, np.floor(med + 0.5)).astype(np.uint16)


def test_median_of_clear_matches_float64_nanmedian():
    rng = np.random.default_rng(7)
    for n_dates in (1, 2, 5, 6, 9):
        refl = rng.integers(0, 12000, size=(n_dates, 40, 50), dtype=np.uint16)
        refl[rng.random(refl.shape) < 0.05] = 0  # no data
        clear = rng.random(refl.shape) < 0.6
        clear[:, :3, :3] = False  # never clear
        offsets = rng.choice([0, 1000], size=n_dates).astype(np.uint16)
        got = median_of_clear(refl, clear, offsets)
        assert got.dtype == np.uint16
        np.testing.assert_array_equal(got, _reference_median(refl, clear, offsets))
        assert (got[:3, :3] == 0).all()


def test_dark_pixels_below_the_offset_stay_valid():
    refl = np.array([[[900]], [[1000]], [[0]]], dtype=np.uint16)  # water, offset scene
    clear = np.ones_like(refl, dtype=bool)
    out = median_of_clear(refl, clear, np.array([1000, 1000, 1000], dtype=np.uint16))
    assert out[0, 0] == 1  # clipped at 1, not 0 (= no data) and not wrapped to 65436


# --------------------------------------------------------------------------- synthetic scenes
def _synthetic(n=64, chunk=32, seed=3):
    """Scenes with a known surface: every clear observation shows it (plus the date's offset);
    clouds are bright, shadows dark, no data 0."""
    rng = np.random.default_rng(seed)
    gbox = GeoBox.from_bbox((500000, 5000000, 500000 + n * 10, 5000000 + n * 10), "EPSG:32633",
                            resolution=10)
    surface = rng.integers(200, 5000, size=(4, n, n), dtype=np.uint16)  # B02, B03, B04, B08
    offsets = np.array([0, 1000, 1000, 0, 1000], dtype=np.uint16)
    scl = rng.choice([4, 5, 6, 8, 9, 3, 10, 0, 1], p=[.35, .1, .1, .1, .1, .1, .05, .05, .05],
                     size=(len(offsets), n, n)).astype(np.uint16)
    scl[:, :4, :4] = 9  # always cloudy
    scl[0, 4:8, :] = 11  # snow on the first date
    data = np.zeros((len(offsets), 5, n, n), dtype=np.uint16)
    for t, off in enumerate(offsets):
        refl = surface + off
        refl = np.where(np.isin(scl[t], [8, 9, 10]), 7000 + off, refl)
        refl = np.where(scl[t] == 3, (surface * 0.4).astype(np.uint16) + off, refl)
        refl = np.where(scl[t] == 0, 0, refl)
        data[t, :4] = refl
        data[t, 4] = scl[t]
    from odc.geo.xr import xr_coords

    scenes = xr.DataArray(
        da.from_array(data, chunks=(-1, 1, chunk, chunk)), dims=("time", "band", "y", "x"),
        coords={"time": np.arange(len(offsets)).astype("datetime64[D]"), "band": list(BANDS),
                "boa_offset": ("time", offsets), **xr_coords(gbox)},
    )
    return scenes, surface, scl


def test_mosaic_shows_the_surface_wherever_a_clear_date_exists():
    scenes, surface, scl = _synthetic()
    result = seasonal_mosaic(scenes, composite="all")
    refl, count = dask.compute(result["reflectance"], result["clear_count"])
    assert refl.dtype == np.uint16 and list(refl["band"].values) == ["B02", "B03", "B04", "B08"]
    expected_count = (~np.isin(scl, MASKED_SCL_CLASSES)).sum(0)
    np.testing.assert_array_equal(count.values, expected_count)
    assert count.dtype == np.uint8
    seen = expected_count > 0
    assert seen.mean() > 0.9 and not seen[:4, :4].any()
    # no cloud, shadow or cirrus value survives; offsets are gone: exactly the surface
    for b in range(4):
        np.testing.assert_array_equal(refl.values[b][seen], surface[b][seen])
    assert (refl.values[:, ~seen] == 0).all()
    assert result.odc.geobox == scenes.odc.geobox


def test_composites_and_snow_masking():
    scenes, surface, scl = _synthetic()
    nrg = seasonal_mosaic(scenes, composite="nrg")["reflectance"]
    rgb = seasonal_mosaic(scenes, composite="rgb")["reflectance"]
    assert list(nrg["band"].values) == ["B08", "B04", "B03"] == list(composite_bands("nrg"))
    assert list(rgb["band"].values) == ["B04", "B03", "B02"]
    all4 = seasonal_mosaic(scenes, composite="all")["reflectance"].compute()
    np.testing.assert_array_equal(nrg.values, all4.sel(band=["B08", "B04", "B03"]).values)
    # snow (SCL 11) counts as clear by default and is masked on request
    kept = seasonal_mosaic(scenes, composite="rgb")["clear_count"].values
    masked = seasonal_mosaic(scenes, composite="rgb", mask_snow=True)["clear_count"].values
    assert (kept[4:8] - masked[4:8] == (scl[0, 4:8] == 11)).all()
    assert (kept[8:] == masked[8:]).all()
    with pytest.raises(ConfigError, match="Unknown composite 'cir'"):
        seasonal_mosaic(scenes, composite="cir")  # type: ignore[arg-type]


def test_mosaic_does_not_depend_on_chunking():
    a, _, _ = _synthetic(chunk=16)
    b, _, _ = _synthetic(chunk=64)
    ma, mb = seasonal_mosaic(a), seasonal_mosaic(b)
    assert isinstance(ma["reflectance"].data, da.Array)  # lazy
    assert ma["reflectance"].data.chunksize == (1, 16, 16)
    np.testing.assert_array_equal(ma["reflectance"].values, mb["reflectance"].values)
    np.testing.assert_array_equal(ma["clear_count"].values, mb["clear_count"].values)



def test_mosaics_of_different_scenes_computed_together_keep_their_own_values():
    """Graph keys are named after their inputs: two tiles' mosaics (or two seasons) in one
    compute — or two tiles in flight on one cluster — never share a task."""
    a, surface_a, scl_a = _synthetic(seed=3)
    b, surface_b, scl_b = _synthetic(seed=4)
    ma, mb = seasonal_mosaic(a, composite="all"), seasonal_mosaic(b, composite="all")
    assert ma["reflectance"].data.name != mb["reflectance"].data.name
    assert ma["clear_count"].data.name != mb["clear_count"].data.name
    refl_a, refl_b, count_a, count_b = dask.compute(ma["reflectance"], mb["reflectance"],
                                                    ma["clear_count"], mb["clear_count"])
    for refl, count, surface, scl in [(refl_a, count_a, surface_a, scl_a), (refl_b, count_b, surface_b, scl_b)]:
        seen = (~np.isin(scl, MASKED_SCL_CLASSES)).sum(0)
        np.testing.assert_array_equal(count.values, seen)
        np.testing.assert_array_equal(refl.values[:, seen > 0], surface[:, seen > 0])
    # the same inputs give the same graph (dask computes shared work once)
    assert seasonal_mosaic(a, composite="all")["reflectance"].data.name == ma["reflectance"].data.name

def test_bad_scenes_are_refused():
    scenes, _, _ = _synthetic()
    with pytest.raises(InputError, match="uint16"):
        seasonal_mosaic(scenes.astype("float64"))
    with pytest.raises(InputError, match=r"lack band\(s\) \['SCL'\]"):
        seasonal_mosaic(scenes.sel(band=["B02", "B03", "B04", "B08"]))
    with pytest.raises(InputError, match="boa_offset"):
        seasonal_mosaic(scenes.drop_vars("boa_offset"))


# --------------------------------------------------------------------------- writing
def test_write_cog_and_zarr(tmp_path):
    scenes, _, _ = _synthetic()
    result = seasonal_mosaic(scenes, composite="nrg")
    expected = result["reflectance"].values
    written = write_mosaic(result, tmp_path / "m.tif")
    assert written == list(mosaic_paths(tmp_path / "m.tif"))
    with rasterio.open(written[0]) as src:
        assert src.descriptions == ("B08", "B04", "B03")
        assert (src.count, src.dtypes[0], src.nodata) == (3, "uint16", 0)
        assert src.crs.to_epsg() == 32633 and src.transform == scenes.odc.geobox.affine
        np.testing.assert_array_equal(src.read(), expected)
    with rasterio.open(written[1]) as src:
        assert src.count == 1 and src.dtypes[0] == "uint8"
        np.testing.assert_array_equal(src.read(1), result["clear_count"].values)
    store = write_mosaic(result, tmp_path / "m.zarr", format="zarr")[0]
    back = xr.open_zarr(store, decode_coords="all")
    assert back["reflectance"].dtype == np.uint16
    assert back["reflectance"].encoding["chunks"] == result["reflectance"].data.chunksize
    np.testing.assert_array_equal(back["reflectance"].values, expected)
    assert back.odc.geobox == scenes.odc.geobox
    assert list(back["band"].values) == ["B08", "B04", "B03"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.tif", "m.zarr", "m_clear_count.tif"]


def test_failed_write_leaves_nothing(tmp_path):
    scenes, _, _ = _synthetic()

    def fail(block):
        raise ReadError("Cannot read asset https://example/B04.tif: HTTP response code: 404")

    broken = scenes.copy(data=scenes.data.map_blocks(lambda b: b, dtype=np.uint16))
    broken.data = da.map_blocks(fail, broken.data, dtype=np.uint16)
    for fmt, name in (("cog", "m.tif"), ("zarr", "m.zarr")):
        with pytest.raises(ReadError, match="B04.tif"):
            write_mosaic(seasonal_mosaic(broken), tmp_path / name, format=fmt)
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- real 33TWM
@pytest.fixture(scope="module")
def twm(shared_data):
    items = search_items(shared_data / TWM_CATALOG, bbox=TWM_BBOX, datetime="2023-08")
    gbox = geobox_for_aoi(box(*TWM_BBOX, "EPSG:4326"), 32633, 120)
    scenes = load_scenes(items, gbox, gdal=READDIR, chunk_size=512, bands=("B02", "B03", "B04"))
    return items, gbox, scenes


def test_load_33TWM_on_an_explicit_grid(twm, shared_data):
    items, gbox, scenes = twm
    assert scenes.dims == ("time", "band", "y", "x") and scenes.dtype == np.uint16
    assert list(scenes["band"].values) == ["B02", "B03", "B04", "SCL"]
    assert scenes.shape == (5, 4, 375, 390)  # 120 m, not the items' 10 m proj:shape
    assert scenes.data.chunks[0] == (5,) and scenes.data.chunks[1] == (1, 1, 1, 1)
    assert scenes.odc.geobox == gbox
    assert list(scenes["boa_offset"].values) == [0] * 5  # boa_offset_applied: true
    assert str(scenes["time"].values[0]).startswith("2023-08-10")
    scl = scenes.sel(band="SCL").values
    assert set(np.unique(scl)) <= set(range(12)) and (scl == 9).any()
    # one task per band and 128² chunk to read all dates (not one per date), a few to reduce
    small = load_scenes(items, gbox, gdal=READDIR, chunk_size=128, bands=("B04", "B03", "B02"))
    n_chunks = small.data.numblocks[2] * small.data.numblocks[3]
    assert small.data.numblocks[:2] == (1, 4) and n_chunks == 12
    (optimized,) = dask.optimize(seasonal_mosaic(small, "rgb"))
    assert len(optimized.__dask_graph__()) <= 20 * n_chunks


def test_august_mosaic_follows_the_clear_dates_not_the_cloudy_one(twm):
    _, _, scenes = twm
    red = scenes.sel(band="B04").values.astype(np.float64)
    scl = scenes.sel(band="SCL").values
    mosaic = seasonal_mosaic(scenes, composite="rgb")["reflectance"].sel(band="B04").values
    clear = ~np.isin(scl, MASKED_SCL_CLASSES) & (red > 0)
    assert str(scenes["id"].values[0]) == "S2B_33TWM_20230810_0_L2A"
    cloudy_0810 = np.isin(scl[0], [8, 9, 10]) & (clear[1:].sum(0) >= 2)
    assert cloudy_0810.mean() > 0.5  # the 70 % cloud scene covers most of the area
    # where 2023-08-10 is cloudy the mosaic is the median of the clear dates ...
    ref = np.where(clear, red, np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        expected = np.floor(np.nanmedian(ref[1:], axis=0) + 0.5)
    np.testing.assert_array_equal(mosaic[cloudy_0810], expected[cloudy_0810])
    # ... and nowhere near the cloud's brightness
    assert red[0][cloudy_0810].mean() > 1500
    assert mosaic[cloudy_0810].mean() < 800
    bright = cloudy_0810 & (red[0] > 1500)
    assert bright.sum() > 50_000
    assert np.mean(np.abs(mosaic[bright] - red[0][bright]) < 200) < 0.01
    # the clearest date (08-15) and the mosaic agree closely everywhere it is clear
    both = clear[2] & (mosaic > 0)
    assert np.corrcoef(mosaic[both], red[2][both])[0, 1] > 0.9


def test_33TWM_without_the_readdir_override_names_the_cause(shared_data, twm):
    items, gbox, _ = twm
    scenes = load_scenes(items[:1], gbox, bands=("B04",), retries=0)
    with pytest.raises(ReadError, match=r"Cannot read asset .*/B04\.tif: the raster has no CRS .*"
                                        r"GDAL_DISABLE_READDIR_ON_OPEN=NO"):
        scenes.sel(band="B04").compute()


def test_unreadable_asset_is_named_after_retries(shared_data, tmp_path, caplog):
    catalog = tmp_path / "catalog"
    shutil.copytree(shared_data / TWM_CATALOG.rsplit("/", 1)[0], catalog)
    bad = catalog / "sentinel-2-l2a" / "S2A_33TWM_20230815_0_L2A" / "B04.tif"
    bad.chmod(0o644)
    bad.write_bytes(b"\x00garbage" * 512)
    items = search_items(catalog / "catalog.json", bbox=TWM_BBOX)
    gbox = geobox_for_aoi(box(*TWM_BBOX, "EPSG:4326"), 32633, 120)
    scenes = load_scenes(items, gbox, gdal=READDIR, chunk_size=512, bands=("B04", "B03", "B02"),
                         retries=1, retry_delay=0.0)
    out = tmp_path / "out" / "m.tif"
    with pytest.raises(ReadError, match=rf"Cannot read asset {bad} after 2 attempts: .*not "
                                        r"recognized as being in a supported file format"):
        write_mosaic(seasonal_mosaic(scenes, "rgb"), out)
    assert "retry 1/1" in caplog.text
    assert not out.parent.exists() or list(out.parent.iterdir()) == []


# --------------------------------------------------------------------------- CLI
def test_cli_defaults_mirror_the_library():
    from clc_dask import load
    from clc_dask.cli import mosaic as cli_mosaic

    assert cli_mosaic.DEFAULT_CHUNK_SIZE == load.DEFAULT_CHUNK_SIZE


def _twm_cli_args(shared_data, out, *extra):
    return ["mosaic", "--source", shared_data / TWM_CATALOG, "--bbox", ",".join(map(str, TWM_BBOX)),
            "--season", "08-01/08-31", "--year", "2023", "--composite", "rgb", "--epsg", "32633",
            "--resolution", "120", "--out", out, "--chunk-size", "512", *extra]


def test_cli_mosaic_writes_cog_count_and_items(shared_data, tmp_path, twm, run_cli):
    out = tmp_path / "aug" / "mosaic.tif"
    code, stdout, stderr = run_cli(*_twm_cli_args(shared_data, out, "--gdal",
                                                  "GDAL_DISABLE_READDIR_ON_OPEN=NO"))
    assert code == 0, stderr
    assert "rgb mosaic (B04, B03, B02) of 5 date(s), 375×390 px, EPSG:32633, 120 m" in stdout
    assert sorted(p.name for p in out.parent.iterdir()) == ["mosaic.items.json", "mosaic.tif",
                                                           "mosaic_clear_count.tif"]
    _, _, scenes = twm
    expected = seasonal_mosaic(scenes, "rgb")["reflectance"].values
    with rasterio.open(out) as src:
        assert src.descriptions == ("B04", "B03", "B02") and src.nodata == 0
        np.testing.assert_array_equal(src.read(), expected)
    saved = pystac.ItemCollection.from_file(str(out.parent / "mosaic.items.json"))
    assert len(saved) == 5
    # the saved collection repeats the run offline
    again = tmp_path / "again.zarr"
    code, _, stderr = run_cli("mosaic", "--items", out.parent / "mosaic.items.json", "--bbox",
                              ",".join(map(str, TWM_BBOX)), "--composite", "rgb", "--epsg", "32633",
                              "--resolution", "120", "--out", again, "--format", "zarr",
                              "--gdal", "GDAL_DISABLE_READDIR_ON_OPEN=NO", "--chunk-size", "512")
    assert code == 0, stderr
    np.testing.assert_array_equal(xr.open_zarr(again)["reflectance"].values, expected)


def test_cli_mosaic_bad_input_writes_nothing(shared_data, tmp_path, run_cli):
    out = tmp_path / "m.tif"
    # an item without SCL
    collection = json.loads(json.dumps(
        search_items(shared_data / TWM_CATALOG, bbox=TWM_BBOX).to_dict(transform_hrefs=False)))
    del collection["features"][1]["assets"]["scl"]
    (tmp_path / "in").mkdir()
    items_file = tmp_path / "in" / "items.json"
    items_file.write_text(json.dumps(collection))
    code, _, stderr = run_cli("mosaic", "--items", items_file, "--bbox", ",".join(map(str, TWM_BBOX)),
                              "--composite", "rgb", "--resolution", "120", "--out", out)
    assert code == 1
    assert "has no SCL asset" in stderr and collection["features"][1]["id"] in stderr
    # nothing found
    code, _, stderr = run_cli(*_twm_cli_args(shared_data, out, "--max-cloud", "0.1"))
    assert code == 1 and "No scenes found" in stderr
    # area outside the catalog
    code, _, stderr = run_cli("mosaic", "--source", shared_data / TWM_CATALOG, "--bbox",
                              "2.0,41.0,2.2,41.2", "--out", out, "--resolution", "120",
                              "--season", "july", "--year", "2023")
    assert code == 1 and "lies outside" in stderr
    # no time window
    code, _, stderr = run_cli("mosaic", "--source", shared_data / TWM_CATALOG, "--bbox",
                              ",".join(map(str, TWM_BBOX)), "--out", out)
    assert code == 1 and "needs a time window" in stderr
    # unreadable (no readdir override): the asset and the reason are named
    code, _, stderr = run_cli(*_twm_cli_args(shared_data, out, "--gdal",
                                             "GDAL_HTTP_MAX_RETRY=0"))
    assert code == 1 and "Cannot read asset" in stderr and "no CRS" in stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]
    assert sorted(p.name for p in (tmp_path / "in").iterdir()) == ["items.json"]


# --------------------------------------------------------------------------- demo region
def _harmonised_truth(region, scene, band_key):
    """A demo scene's band with its true offset removed (what reflectance × 10000 is), and its
    10 m SCL, read straight from the files."""
    with rasterio.open(scene.assets[band_key]) as src:
        dn = src.read(1).astype(np.int32)
    with rasterio.open(scene.assets["scl"]) as src:
        scl = np.repeat(np.repeat(src.read(1), 2, axis=0), 2, axis=1)
    harmonised = np.where(dn > 0, np.maximum(dn - scene.offset, 1), 0)
    return harmonised, scl


def test_demo_search_filters_clouds_on_the_client(demo_region, demo_servers):
    july = [s for s in demo_region.scenes if s.season == "july"]
    items = search_items(demo_servers.stac_url, bbox=demo_region.bbox_lonlat, season="july",
                         years=[demo_region.year], max_cloud=50,
                         collection=demo_servers.collection_id)
    # rustac's memory backend ignores query/filter: the 50 % limit is applied here
    assert sorted(i.id for i in items) == sorted(s.id for s in july if s.cloud_cover <= 50)
    assert any(s.cloud_cover > 50 for s in july)
    assert all(i.assets["red"].href.startswith(demo_servers.data_url) for i in items)


def test_demo_mosaic_uses_only_clear_harmonised_observations(demo_region, demo_servers):
    """Over HTTP from the loopback API: every pixel with a clear date shows the median of the
    clear dates' reflectance (truth from the files, minus each scene's true offset); no cloud,
    shadow or cirrus value gets in, and scenes of both baselines agree."""
    season = "july"
    scenes_meta = {s.id: s for s in demo_region.scenes if s.season == season}
    items = search_items(demo_servers.stac_url, bbox=demo_region.bbox_lonlat, season=season,
                         years=[demo_region.year], collection=demo_servers.collection_id)
    scenes = load_scenes(items, demo_region.geobox, bands=("B08", "B04", "B03"), chunk_size=256)
    assert scenes.odc.geobox == demo_region.geobox
    result = seasonal_mosaic(scenes, composite="nrg")
    red = result["reflectance"].sel(band="B04").values
    count = result["clear_count"].values
    truth, clear = [], []
    for scene_id in scenes["id"].values:
        values, scl = _harmonised_truth(demo_region, scenes_meta[str(scene_id)], "red")
        truth.append(values.astype(np.float64))
        clear.append(~np.isin(scl, MASKED_SCL_CLASSES) & (values > 0))
    truth, clear = np.stack(truth), np.stack(clear)
    assert (count >= clear.sum(0)).all() and (count <= len(truth)).all()
    seen = clear.any(0)
    assert seen.mean() > 0.99  # the demo guarantees a clear view almost everywhere
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        expected = np.floor(np.nanmedian(np.where(clear, truth, np.nan), axis=0) + 0.5)
    np.testing.assert_array_equal(red[seen], expected[seen])
    assert (red[~seen] == 0).all()
    # same surface, same value across baselines: one date with the +1000 offset, one without
    offset_ids = [i for i, s in enumerate(scenes["id"].values) if scenes_meta[str(s)].offset]
    plain_ids = [i for i, s in enumerate(scenes["id"].values) if not scenes_meta[str(s)].offset]
    assert offset_ids and plain_ids
    single = {i: seasonal_mosaic(scenes.isel(time=[i]), "nrg")["reflectance"].sel(band="B04").values
              for i in offset_ids + plain_ids}
    a, b = max(((a, b) for a in offset_ids for b in plain_ids),
               key=lambda ab: ((single[ab[0]] > 0) & (single[ab[1]] > 0)).sum())
    both = (single[a] > 0) & (single[b] > 0)
    assert both.sum() > 5000  # pixels clear on both dates
    difference = single[a][both].astype(np.int32) - single[b][both]
    assert abs(np.median(difference)) < 40  # within the demo's per-date gain/noise, not 1000


def test_missing_remote_asset_is_an_error_not_nodata(demo_region, demo_servers):
    """stackstac's default turns HTTP 404 into silent no data; here it is a ReadError."""
    items = search_items(demo_servers.stac_url, bbox=demo_region.bbox_lonlat, season="april",
                         years=[demo_region.year], collection=demo_servers.collection_id)
    broken = items[0].clone()
    broken.assets["red"].href = broken.assets["red"].href.replace("B04.tif", "B04-missing.tif")
    scenes = load_scenes([broken], demo_region.geobox, bands=("B04",), chunk_size=512, retries=0)
    with pytest.raises(ReadError, match=r"Cannot read asset http://127\.0\.0\.1:\d+/.*/B04-missing\.tif: .*404"):
        scenes.sel(band="B04").compute()


# --------------------------------------------------------------------------- reader and GDAL
def test_transient_read_errors_are_retried(monkeypatch):
    from rasterio.errors import RasterioIOError
    from stackstac.rio_reader import AutoParallelRioReader

    from clc_dask.load import RetryingReader

    calls = []

    def flaky(self, window, **kwargs):
        calls.append(window)
        if len(calls) < 3:
            raise RuntimeError(f"Error reading {window} from {self.url!r}") from RasterioIOError(
                "TIFFReadEncodedTile() failed. IReadBlock failed at X offset 0, Y offset 0")
        return np.ones((2, 2), dtype=np.uint16)

    monkeypatch.setattr(AutoParallelRioReader, "read", flaky)
    closed = []
    monkeypatch.setattr(AutoParallelRioReader, "close", lambda self: closed.append(1))
    reader = RetryingReader(url="https://bucket/B04.tif", spec=None, resampling=None,
                            dtype=np.dtype("uint16"), fill_value=0, scale_offset=(1, 0),
                            gdal_env=None, retries=3, retry_delay=0.0)
    assert reader.read("w").tolist() == [[1, 1], [1, 1]]
    assert len(calls) == 3 and len(closed) >= 2  # re-opened before each retry
    # settings survive pickling (readers travel to dask workers)
    state = reader.__getstate__()
    assert (state["retries"], state["retry_delay"]) == (3, 0.0)
    def forbidden(self, window, **kwargs):
        calls.append(window)
        raise RuntimeError("Error reading") from RasterioIOError("HTTP response code: 403")

    calls.clear()
    monkeypatch.setattr(AutoParallelRioReader, "read", forbidden)
    with pytest.raises(ReadError, match=r"Cannot read asset https://bucket/B04\.tif: the server refused access "
                                        r"\(HTTP response code: 403\)\. If the catalog's asset URLs must be "
                                        r"signed, pass `sign`"):
        reader.read("w")  # not transient, no signer to sign again: no retry, the reason is named
    assert len(calls) == 1


def test_gdal_options_defaults_environment_and_overrides(monkeypatch):
    from clc_dask.gdalenv import DEFAULT_GDAL_OPTIONS, gdal_env, gdal_options, parse_gdal_options

    monkeypatch.delenv("GDAL_DISABLE_READDIR_ON_OPEN", raising=False)
    monkeypatch.delenv("VSI_CACHE", raising=False)
    assert gdal_options()["GDAL_DISABLE_READDIR_ON_OPEN"] == "EMPTY_DIR"
    assert int(DEFAULT_GDAL_OPTIONS["GDAL_HTTP_MAX_RETRY"]) > 0
    monkeypatch.setenv("GDAL_DISABLE_READDIR_ON_OPEN", "NO")  # the environment beats defaults
    assert gdal_options()["GDAL_DISABLE_READDIR_ON_OPEN"] == "NO"
    opts = gdal_options({"GDAL_DISABLE_READDIR_ON_OPEN": "TRUE", "GDAL_HTTP_MULTIRANGE": False})
    assert opts["GDAL_DISABLE_READDIR_ON_OPEN"] == "TRUE" and opts["GDAL_HTTP_MULTIRANGE"] == "NO"
    env = gdal_env({"GDAL_HTTP_TIMEOUT": "5"})
    assert env._always["GDAL_HTTP_TIMEOUT"] == "5"
    assert (env._open, env._read) == ({"VSI_CACHE": "TRUE"}, {"VSI_CACHE": "FALSE"})
    assert gdal_env({"VSI_CACHE": "FALSE"})._open == {}  # explicit: applies to open and read
    assert parse_gdal_options(["GDAL_DISABLE_READDIR_ON_OPEN=NO", "CPL_DEBUG = ON"]) == {
        "GDAL_DISABLE_READDIR_ON_OPEN": "NO", "CPL_DEBUG": "ON"}
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_gdal_options(["gdal_http_timeout"])


def test_mosaic_like_a_raster_is_on_exactly_its_grid(shared_data, tmp_path, twm, run_cli):
    """``like=`` (``--like``): another mosaic on exactly an existing raster's pixels, here a
    grid in EPSG:3035 that the scenes (EPSG:32633) are reprojected onto."""
    from clc_dask.grid import grid_of_raster, snapped_geobox
    from clc_dask.mosaic import make_mosaic
    from clc_dask.rasters import to_dataarray, write_geotiff

    items, _, _ = twm
    target = snapped_geobox((4_760_040, 2_590_080, 4_790_040, 2_620_080), 3035, 120)
    reference = write_geotiff(to_dataarray(np.ones(target.shape, dtype=np.uint8), target), tmp_path / "ref.tif")
    lazy = make_mosaic(items=items, like=reference, composite="rgb", gdal=READDIR, chunk_size=128)
    assert lazy.odc.geobox == grid_of_raster(reference) == target
    direct = seasonal_mosaic(load_scenes(items, target, gdal=READDIR, chunk_size=128,
                                         bands=("B04", "B03", "B02")), "rgb")
    out = tmp_path / "like" / "m.tif"
    code, stdout, stderr = run_cli("mosaic", "--items", shared_data / TWM_CATALOG, "--like", reference,
                                   "--composite", "rgb", "--gdal", "GDAL_DISABLE_READDIR_ON_OPEN=NO",
                                   "--chunk-size", "128", "--out", out)
    assert code == 0, stderr
    assert "EPSG:3035, 120 m" in stdout
    with rasterio.open(out) as src:
        assert src.crs.to_epsg() == 3035 and src.transform == target.affine
        assert (src.height, src.width) == target.shape
        np.testing.assert_array_equal(src.read(), direct["reflectance"].values)


def test_mosaic_like_needs_a_raster_with_a_crs(shared_data, tmp_path, run_cli):
    nocrs = tmp_path / "nocrs.tif"
    with rasterio.open(nocrs, "w", driver="GTiff", width=4, height=4, count=1, dtype="uint8") as dst:
        dst.write(np.ones((1, 4, 4), dtype=np.uint8))
    out = tmp_path / "out" / "m.tif"
    code, _, stderr = run_cli("mosaic", "--items", shared_data / TWM_CATALOG, "--like", nocrs, "--out", out)
    assert code == 1 and "has no CRS" in stderr and "--epsg" in stderr
    assert not out.parent.exists() or list(out.parent.iterdir()) == []
    # a grid and an area at once
    code, _, stderr = run_cli("mosaic", "--items", shared_data / TWM_CATALOG, "--like", nocrs,
                              "--bbox", ",".join(map(str, TWM_BBOX)), "--out", out)
    assert code == 1 and "either an area (--bbox/--aoi) or a grid" in stderr
