"""The offline demo region and its loopback servers (clc_dask.demo, `clc-dask demo`)."""

from __future__ import annotations

import json
import socket
import sys
import urllib.error
import urllib.request
import warnings
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import rasterio.features
from rasterio.windows import Window
from scipy import ndimage

from clc_dask.classes import to_level, validate_codes
from clc_dask.demo import DemoRegion, build_region, run_demo, serve_region
from clc_dask.demo.servers import parse_range
from clc_dask.errors import ConfigError, OutputError, ServerError

OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))
CLEAR_SCL = (4, 5, 6, 7)


def read_scene(scene, keys=("blue", "green", "red", "nir")):
    """Bands as float reflectance × 10 000 (offset removed, NaN outside the swath) and the
    SCL repeated onto the 10 m grid."""
    out = {}
    for key in keys:
        with rasterio.open(scene.assets[key]) as src:
            dn = src.read(1).astype(np.float32)
        out[key] = np.where(dn > 0, dn - scene.offset, np.nan)
    with rasterio.open(scene.assets["scl"]) as src:
        scl = src.read(1)
    out["scl20"] = scl
    out["scl"] = np.repeat(np.repeat(scl, 2, 0), 2, 1)
    return out


def clearest(region, season):
    return min(region.seasons[season], key=lambda s: s.cloud_cover + s.nodata_percentage)


def get(url, headers=None, method="GET"):
    req = urllib.request.Request(url, headers=headers or {}, method=method)
    with OPENER.open(req, timeout=10) as resp:
        return resp.status, dict(resp.headers), resp.read()


# --- the region ----------------------------------------------------------------------------------

def test_region_grid_manifest_and_reload(demo_region):
    r = demo_region
    assert r.crs == "EPSG:32633" and r.epsg == 32633
    assert r.geobox.shape == (512, 512) and r.resolution == 10.0
    left, bottom, right, top = r.bounds
    assert (right - left, top - bottom) == (5120.0, 5120.0)
    west, south, east, north = r.bbox_lonlat
    assert 12 < west < east < 14 and 42 < south < north < 44  # central Italy
    assert r.year == 2018 and r.dates_per_season == 4
    assert {s: len(v) for s, v in r.seasons.items()} == {"april": 4, "july": 4, "september": 4}
    for season, month in (("april", "04"), ("july", "07"), ("september", "09")):
        assert all(sc.datetime.startswith(f"2018-{month}-") for sc in r.seasons[season])
    again = DemoRegion.load(r.workdir)
    assert again == r
    manifest = json.loads(r.manifest_path.read_text())
    assert manifest["seed"] == 0 and manifest["size"] == 512 and manifest["epsg"] == 32633
    assert all(f.is_file() for f in r.files()) and len(r.files()) == 12 * 6 + 4


def test_clc_polygons_classes_and_areas(demo_region):
    frame = gpd.read_file(demo_region.clc_path, layer="clc")
    assert frame.crs.to_epsg() == 32633
    assert set(frame.columns) >= {"CODE_18", "AREA_HA", "geometry"}
    assert frame["CODE_18"].map(lambda c: isinstance(c, str) and len(c) == 3).all()
    codes = frame["CODE_18"].astype(int).to_numpy()
    validate_codes(codes, level=3)
    area_ha = frame.geometry.area / 1e4
    assert area_ha.min() >= 25.0
    np.testing.assert_allclose(frame["AREA_HA"], area_ha, rtol=1e-6)
    level2 = to_level(codes, 2)
    assert len(set(level2.tolist())) >= 10 and 41 in level2
    share = {c: area_ha[level2 == c].sum() / area_ha.sum() for c in set(level2.tolist())}
    assert share[21] > 0.12 and share[31] > 0.12  # arable land and forest dominate
    assert max(share, key=share.get) in (21, 31)
    assert share[41] < 0.03 and share[51] < 0.05 and share[11] < 0.1  # wetland rare, water/urban small


def test_clc_raster_is_the_rasterized_vector(demo_region):
    codes = demo_region.read_codes()
    with rasterio.open(demo_region.codes_path) as src:
        assert src.dtypes[0] == "uint16" and src.nodata == 0 and src.crs.to_epsg() == 32633
        assert src.colormap(1)[411][:3] == (166, 166, 255)  # official CLC colour of 411
        transform = src.transform
    frame = gpd.read_file(demo_region.clc_path, layer="clc")
    burned = rasterio.features.rasterize(
        zip(frame.geometry, frame["CODE_18"].astype(int), strict=True), out_shape=codes.shape,
        transform=transform, dtype="uint16")
    assert (burned == codes).all() and (codes > 0).all()


def test_clc_patches_are_at_least_100m_wide(demo_region):
    codes = demo_region.read_codes()  # 10 m: 100 m = 10 px
    for code in np.unique(codes):
        mask = codes == code
        opened = ndimage.binary_opening(mask, structure=np.ones((10, 10), bool))
        assert (opened == mask).all(), f"class {code} has parts narrower than 100 m"


# --- the scenes ----------------------------------------------------------------------------------

def test_seasonal_spectra(demo_region):
    codes = demo_region.read_codes()
    stats = {}
    for season in ("april", "july", "september"):
        b = read_scene(clearest(demo_region, season))
        clear = np.isin(b["scl"], CLEAR_SCL) & ~np.isnan(b["red"])
        ndvi = (b["nir"] - b["red"]) / (b["nir"] + b["red"])
        visible = (b["blue"] + b["green"] + b["red"]) / 3
        local_sd = np.sqrt(np.maximum(ndimage.uniform_filter(b["red"] ** 2, 3)
                                      - ndimage.uniform_filter(b["red"], 3) ** 2, 0))
        for code in (211, 311, 512, 112):
            m = clear & (codes == code)
            assert m.sum() > 500, (season, code)
            stats[season, code] = {"ndvi": np.nanmean(ndvi[m]), "nir": np.nanmean(b["nir"][m]),
                                   "vis": np.nanmean(visible[m]), "sd": np.nanmedian(local_sd[m])}
    arable = [stats[s, 211]["ndvi"] for s in ("april", "july", "september")]
    assert arable[0] > 0.5 and arable[2] < 0.35 and arable[0] - arable[2] > 0.25
    for season in ("april", "july", "september"):
        forest, water, urban = stats[season, 311], stats[season, 512], stats[season, 112]
        assert forest["nir"] > 2500 and water["nir"] < 400 and forest["nir"] > 5 * water["nir"]
        assert urban["vis"] > 1.8 * forest["vis"] and urban["vis"] > 1000
        assert urban["sd"] > 2 * forest["sd"]  # textured


def test_scl_agrees_with_clouds_and_cloud_cover(demo_region):
    cover = []
    for scene in demo_region.scenes:
        b = read_scene(scene, keys=("blue", "nir"))
        item = json.loads(scene.item_path.read_text())
        scl20, scl = b["scl20"], b["scl"]
        valid = scl20 > 0
        cloudy = np.isin(scl20, (8, 9, 10)).sum() / valid.sum() * 100
        assert item["properties"]["eo:cloud_cover"] == pytest.approx(cloudy, abs=1e-4)
        assert scene.cloud_cover == item["properties"]["eo:cloud_cover"]
        # no data exactly where SCL is 0, in every band
        assert (np.isnan(b["blue"]) == (scl == 0)).all() and (np.isnan(b["nir"]) == (scl == 0)).all()
        if (scl == 9).sum() > 200:
            assert np.nanmean(b["blue"][scl == 9]) > 4500
        if np.isin(scl, (8, 9)).sum() > 200:
            assert np.nanmean(b["blue"][np.isin(scl, (8, 9))]) > 3500
        assert np.nanmean(b["blue"][np.isin(scl, (4, 5))]) < 1200
        cover.append((scene.season, scene.cloud_cover, scene.nodata_percentage))
    for season in ("april", "july", "september"):
        values = [c for s, c, _ in cover if s == season]
        assert max(values) > 55 and min(values) < 10  # cloud filtering matters
        assert any(nd > 5 for s, _, nd in cover if s == season)  # a swath edge per season


def test_cloud_shadows_are_dark(demo_region):
    checked = 0
    for season in ("april", "july", "september"):
        ref_scene = clearest(demo_region, season)
        ref = read_scene(ref_scene, keys=("nir",))
        for scene in demo_region.seasons[season]:
            if scene is ref_scene:
                continue
            b = read_scene(scene, keys=("nir",))
            both = (b["scl"] == 3) & np.isin(ref["scl"], CLEAR_SCL)
            if both.sum() < 100:
                continue
            ratio = np.nanmedian(b["nir"][both] / ref["nir"][both])
            assert ratio < 0.5
            checked += 1
    assert checked >= 3


def test_every_pixel_has_a_clear_date_per_season(demo_region):
    for season, season_scenes in demo_region.seasons.items():
        seen = None
        for scene in season_scenes:
            with rasterio.open(scene.assets["scl"]) as src:
                clear = np.isin(src.read(1), CLEAR_SCL)
            seen = clear if seen is None else seen | clear
        assert seen.all(), season


def test_boa_offset_in_dn_and_metadata(demo_region):
    kinds = {True: 0, False: 0}
    for scene in demo_region.scenes:
        item = json.loads(scene.item_path.read_text())
        props = item["properties"]
        new = float(props["s2:processing_baseline"]) >= 4.0
        assert new is scene.carries_boa_offset
        # as ESA delivers them: the offset is still in the DN, not removed by the catalog
        assert props["earthsearch:boa_offset_applied"] is False
        rb = item["assets"]["red"]["raster:bands"][0]
        assert rb["scale"] == 0.0001 and rb["offset"] == (-0.1 if new else 0)
        kinds[new] += 1
    assert kinds[True] >= 3 and kinds[False] >= 3
    # Same surface, same season: an offset scene's DN are ~1000 higher than a plain one's.
    for season, season_scenes in demo_region.seasons.items():
        with_offset = [s for s in season_scenes if s.carries_boa_offset]
        without = [s for s in season_scenes if not s.carries_boa_offset]
        assert with_offset and without, season
        a, b = min(with_offset, key=lambda s: s.cloud_cover), min(without, key=lambda s: s.cloud_cover)
        raw = {}
        for scene in (a, b):  # blue: dark surfaces, so the dates' atmosphere differs little
            with rasterio.open(scene.assets["blue"]) as src:
                raw[scene.id] = src.read(1).astype(np.float64)
            with rasterio.open(scene.assets["scl"]) as src:
                raw[scene.id + "scl"] = np.repeat(np.repeat(src.read(1), 2, 0), 2, 1)
        both = np.isin(raw[a.id + "scl"], CLEAR_SCL) & np.isin(raw[b.id + "scl"], CLEAR_SCL)
        diff = np.median(raw[a.id][both] - raw[b.id][both])
        assert 920 < diff < 1080, (season, diff)
        assert raw[a.id][raw[a.id] > 0].min() > 1000  # even the darkest pixels carry the offset


def test_cogs_are_valid_and_match_item_metadata(demo_region):
    scene = demo_region.scenes[0]
    item = json.loads(scene.item_path.read_text())
    for key, path in scene.assets.items():
        asset = item["assets"][key]
        with rasterio.open(path) as src:
            assert src.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG"
            assert src.block_shapes[0] == (256, 256)  # internal tiles (COG driver, BLOCKSIZE)
            assert src.profile["tiled"] or src.shape == (256, 256)  # one-tile SCL: "not tiled" in rasterio
            assert src.overviews(1), "overviews expected"
            assert src.nodata == 0 and src.crs.to_epsg() == 32633 and src.compression.name == "deflate"
            assert src.dtypes[0] == ("uint8" if key == "scl" else "uint16")
            assert list(src.shape) == asset["proj:shape"]
            assert list(src.transform)[:6] == asset["proj:transform"]
        assert asset["type"] == "image/tiff; application=geotiff; profile=cloud-optimized"


def test_items_have_the_earth_search_v1_layout(demo_region, shared_data):
    real_path = next((shared_data / "s2" / "earthsearch_v1_33TWM_2023-08" / "sentinel-2-l2a").glob("*/*_L2A.json"))
    real = json.loads(real_path.read_text())
    ours = json.loads(demo_region.scenes[0].item_path.read_text())
    assert ours["collection"] == real["collection"] == "sentinel-2-l2a"
    for key in ("blue", "green", "red", "nir", "scl"):
        assert set(ours["assets"][key]) == set(real["assets"][key]), key
        assert ours["assets"][key]["roles"] == real["assets"][key]["roles"]
        assert ours["assets"][key]["raster:bands"][0].keys() == real["assets"][key]["raster:bands"][0].keys()
    missing = set(real["properties"]) - set(ours["properties"]) - {"earthsearch:s3_path", "earthsearch:payload_id"}
    assert not missing
    assert ours["properties"]["proj:code"] == "EPSG:32633" and ours["properties"]["proj:epsg"] == 32633
    assert set(ours["stac_extensions"]) == set(real["stac_extensions"])
    items = demo_region.items()
    assert [i.id for i in items] == [s.id for s in demo_region.scenes]
    assert all(Path(i.assets["red"].href).is_file() for i in items)


def test_build_is_deterministic_and_seeded(tmp_path):
    a = build_region(tmp_path / "a", size=256, seed=7, dates_per_season=3)
    b = build_region(tmp_path / "b", size=256, seed=7, dates_per_season=3)
    files_a = sorted(p.relative_to(a.workdir) for p in a.workdir.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b.workdir) for p in b.workdir.rglob("*") if p.is_file())
    assert files_a == files_b and len(files_a) == 9 * 6 + 5
    for rel in files_a:
        assert (a.workdir / rel).read_bytes() == (b.workdir / rel).read_bytes(), rel
    c = build_region(tmp_path / "c", size=256, seed=8, dates_per_season=3)
    assert (c.read_codes() != a.read_codes()).mean() > 0.2
    # same parameters: reused; other parameters in the same workdir: refused
    assert build_region(a.workdir, size=256, seed=7, dates_per_season=3) == a
    with pytest.raises(OutputError, match="seed 7"):
        build_region(a.workdir, size=256, seed=9, dates_per_season=3)


def test_failed_build_leaves_nothing_that_looks_complete(tmp_path, monkeypatch):
    import clc_dask.demo.scenes as scenes

    calls = {"n": 0}
    real = scenes.render_band

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 6:
            raise OSError(28, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(scenes, "render_band", failing)
    with pytest.raises(OutputError, match="No space left"):
        build_region(tmp_path / "w", size=256, seed=0, dates_per_season=3)
    assert list((tmp_path / "w").iterdir()) == []


@pytest.mark.parametrize("size", [0, -64, 100, 300, 128])
def test_bad_size_is_a_config_error_before_writing(tmp_path, size):
    with pytest.raises(ConfigError, match="multiple of 64"):
        build_region(tmp_path / "w", size=size)
    assert not (tmp_path / "w").exists()


# --- the servers ---------------------------------------------------------------------------------

def test_stac_api_search_by_bbox_datetime_and_cloud_cover(demo_region, demo_servers):
    from pystac_client import Client

    client = Client.open(demo_servers.stac_url)
    conforms = client.get_conforms_to()
    assert any("item-search" in c for c in conforms)
    assert not any("query" in c or "filter" in c for c in conforms)  # memory backend
    west, south, east, north = demo_region.bbox_lonlat
    april = list(client.search(collections=["sentinel-2-l2a"], bbox=[west, south, east, north],
                               datetime="2018-04-01/2018-04-30").items())
    assert sorted(i.id for i in april) == sorted(s.id for s in demo_region.seasons["april"])
    assert all(i.datetime.month == 4 for i in april)
    assert list(client.search(collections=["sentinel-2-l2a"], bbox=[west, south, east, north],
                              datetime="2018-06-01/2018-06-30").items()) == []
    assert list(client.search(collections=["sentinel-2-l2a"], bbox=[-4.0, 36.9, -3.9, 37.0],
                              datetime="2018").items()) == []
    everything = list(client.search(collections=["sentinel-2-l2a"], bbox=[west, south, east, north],
                                    datetime="2018", limit=5).items())  # paging: 5 per page
    assert len(everything) == len(demo_region.scenes)
    # a small box inside the no-data part of a swath-cut scene does not return that scene
    cut = max(demo_region.scenes, key=lambda s: s.nodata_percentage)
    item = json.loads(cut.item_path.read_text())
    side_west = item["bbox"][0] > west + 1e-6
    lon = west + 0.002 if side_west else east - 0.002
    lat = south + 0.002 if side_west else north - 0.002
    corner = [i.id for i in client.search(collections=["sentinel-2-l2a"],
                                          bbox=[lon - 0.001, lat - 0.001, lon + 0.001, lat + 0.001],
                                          datetime="2018").items()]
    assert cut.id not in corner and len(corner) >= len(demo_region.scenes) - 3
    # cloud cover: the server cannot filter it (no query/filter extension) — filter on the client
    clear = [i for i in everything if i.properties["eo:cloud_cover"] < 20]
    assert sorted(i.id for i in clear) == sorted(s.id for s in demo_region.scenes if s.cloud_cover < 20)
    assert 0 < len(clear) < len(everything)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        queried = list(client.search(collections=["sentinel-2-l2a"], datetime="2018",
                                     query={"eo:cloud_cover": {"lt": 20}}).items())
    assert any("QUERY" in str(w.message) for w in caught)
    assert sorted(i.id for i in queried) != sorted(i.id for i in clear)  # not honoured


def test_served_items_point_to_the_data_server(demo_region, demo_servers):
    status, _, body = get(f"{demo_servers.stac_url}/collections/sentinel-2-l2a/items?limit=100")
    items = json.loads(body)["features"]
    assert status == 200 and len(items) == len(demo_region.scenes)
    for item in items:
        for key in ("blue", "green", "red", "nir", "scl"):
            assert item["assets"][key]["href"].startswith(demo_servers.data_url + "/stac/sentinel-2-l2a/")
        assert item["properties"]["proj:epsg"] == 32633


def test_cog_window_read_over_http_uses_range_requests(demo_region, demo_servers):
    scene = demo_region.scenes[1]
    url = demo_servers.data_href(scene.assets["red"], demo_region)
    before = demo_servers.data_stats.snapshot()
    with rasterio.Env(GDAL_DISABLE_READDIR_ON_OPEN="EMPTY_DIR"), rasterio.open(url) as src:
        remote = src.read(1, window=Window(300, 200, 64, 48))
        assert src.overviews(1)
    with rasterio.open(scene.assets["red"]) as src:
        local = src.read(1, window=Window(300, 200, 64, 48))
    after = demo_servers.data_stats.snapshot()
    assert (remote == local).all() and remote.any()
    assert after["partial"] - before["partial"] >= 1
    assert after["bytes_sent"] - before["bytes_sent"] < scene.assets["red"].stat().st_size


def test_file_server_ranges_head_and_errors(demo_region, demo_servers):
    path = demo_region.scenes[0].assets["scl"]
    data = path.read_bytes()
    url = demo_servers.data_href(path, demo_region)
    status, headers, body = get(url, {"Range": "bytes=100-199"})
    assert status == 206 and body == data[100:200]
    assert headers["Content-Range"] == f"bytes 100-199/{len(data)}" and headers["Content-Length"] == "100"
    status, headers, body = get(url, {"Range": "bytes=-10"})
    assert status == 206 and body == data[-10:]
    status, headers, body = get(url, method="HEAD")
    assert status == 200 and body == b"" and headers["Content-Length"] == str(len(data))
    assert headers["Accept-Ranges"] == "bytes"
    status, _, body = get(url)
    assert status == 200 and body == data
    with pytest.raises(urllib.error.HTTPError) as err:
        get(url, {"Range": f"bytes={len(data)}-"})
    assert err.value.code == 416
    for bad in ("/stac/no-such.tif", "/../../etc/passwd", "/stac/"):
        with pytest.raises(urllib.error.HTTPError) as err:
            get(demo_servers.data_url + bad)
        assert err.value.code == 404


def test_parse_range():
    assert parse_range("bytes=0-9", 100) == (0, 9)
    assert parse_range("bytes=90-", 100) == (90, 99)
    assert parse_range("bytes=95-200", 100) == (95, 99)
    assert parse_range("bytes=-5", 100) == (95, 99)
    assert parse_range("bytes=0-1,5-6", 100) is None  # several ranges: whole file
    assert parse_range("items=0-1", 100) is None


def test_port_in_use_is_a_server_error(demo_region):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(ServerError, match=rf"Port {port} .*`stac_port`"):
            with serve_region(demo_region, stac_port=port):
                pass
        with pytest.raises(ServerError, match=rf"Port {port} .*`data_port`"):
            with serve_region(demo_region, data_port=port):
                pass
    with pytest.raises(ConfigError, match="loopback"):
        with serve_region(demo_region, host="0.0.0.0"):
            pass


def test_servers_stop_on_exit_and_on_errors(demo_region):
    with pytest.raises(RuntimeError, match="boom"):
        with serve_region(demo_region) as servers:
            assert get(servers.stac_url + "/")[0] == 200
            assert get(servers.data_url + "/region.json")[0] == 200
            served = servers.served_dir
            raise RuntimeError("boom")
    for url in (servers.stac_url, servers.data_url):
        with pytest.raises((urllib.error.URLError, ConnectionError)):
            get(url + "/", method="HEAD")
    assert not served.exists()


def test_rustac_failure_is_a_server_error_with_its_stderr(demo_region, monkeypatch):
    import clc_dask.demo.servers as servers_mod

    fake = [sys.executable, "-c", "import sys; sys.stderr.write('cannot read items.json'); sys.exit(3)"]
    monkeypatch.setattr(servers_mod, "rustac_command", lambda: fake)
    with pytest.raises(ServerError, match="exited with code 3.*cannot read items.json"):
        with serve_region(demo_region, timeout=10):
            pass


def test_keep_serving_until_interrupted(demo_region, monkeypatch):
    import clc_dask.demo as demo_mod

    seen = {"steps": []}

    def capture(ctx):
        seen["servers"] = ctx.servers

    def interrupted():
        seen["answer"] = get(seen["servers"].stac_url + "/")[0]
        raise KeyboardInterrupt

    monkeypatch.setattr(demo_mod, "_wait_until_interrupted", interrupted)
    steps = [("region", demo_mod.step_region), ("serve", demo_mod.step_serve), ("capture", capture)]
    run_demo(demo_region.workdir, size=512, seed=0, keep_serving=True, steps=steps,
             on_step=lambda name, result: seen["steps"].append(name))
    assert seen["steps"] == ["region", "serve", "capture", "keep_serving"] and seen["answer"] == 200
    with pytest.raises((urllib.error.URLError, ConnectionError)):
        get(seen["servers"].stac_url + "/")


def test_run_demo_steps(tmp_path):
    seen = []
    ctx = run_demo(tmp_path / "run", size=256, seed=1, on_step=lambda name, result: seen.append(name),
                   until="search")
    assert seen == ["region", "serve", "search"]
    assert ctx.results["search"]["items"] == 12 and not ctx.results["region"]["reused"]
    assert ctx.results["serve"]["stac_url"].startswith("http://127.0.0.1:")
    again = run_demo(tmp_path / "run", size=256, seed=1, until="search")
    assert again.results["region"]["reused"]


# --- the command line ----------------------------------------------------------------------------

def test_cli_demo_builds_serves_and_searches(tmp_path, run_cli):
    code, out, err = run_cli("demo", "--workdir", str(tmp_path / "w"),
                             "--size", "256", "--seed", "3", "--until", "search")
    assert code == 0, err
    assert "Region built" in out and "found 12 items" in out and "STAC API: http://127.0.0.1:" in out
    assert (tmp_path / "w" / "region.json").is_file()


def test_cli_demo_errors(tmp_path, run_cli):
    code, _, err = run_cli("demo", "--no-such-option")
    assert code == 2 and "No such option" in err
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    code, out, err = run_cli("demo", "--workdir", str(blocker / "w"), "--size", "256")
    assert code == 1 and err.startswith("Error: ") and len(err.strip().splitlines()) == 1
    assert "workdir" in err and blocker.read_text() == "not a folder"
    code, _, err = run_cli("demo", "--workdir", str(tmp_path / "s"), "--size", "1000")
    assert code == 1 and "multiple of 64" in err and not (tmp_path / "s").exists()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code, _, err = run_cli("demo", "--workdir", str(tmp_path / "p"),
                               "--size", "256", "--data-port", str(port))
    assert code == 1 and f"Port {port}" in err and "--data-port" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "p").exists()


def test_cli_default_size_matches_library():
    from clc_dask.cli import demo as cli_demo
    from clc_dask.demo import region

    assert cli_demo.DEFAULT_SIZE == region.DEFAULT_SIZE
