"""One observation per satellite pass: overlapping granules (neighbouring MGRS tiles, tiles of
two UTM zones) merge before the median, and ``clear_count`` counts passes, not granules."""

from __future__ import annotations

import json
import logging
import sys
import warnings

import dask.array as da
import numpy as np
import pystac
import pytest
import rasterio
import shapely
import shapely.geometry
import xarray as xr
from odc.geo.geobox import GeoBox
from odc.geo.geom import box
from odc.geo.xr import xr_coords

from clc_dask.demo import DemoRegion
from clc_dask.errors import ConfigError, OutputError
from clc_dask.grid import geobox_for_aoi
from clc_dask.load import load_scenes
from clc_dask.mosaic import MASKED_SCL_CLASSES, satellite_passes, seasonal_mosaic, solar_day

BANDS = ("B02", "B03", "B04", "B08", "SCL")
PC_ITEMS = "stac/item_collections/planetary_computer_sentinel-2-l2a_33items_2019-01-01.json"
ES_ITEMS = "stac/item_collections/earth_search_v1_sentinel-2-l2a_6items_2025-07-31.json"

#: The granules of :func:`_granules`: (id, pass, platform, time, centre lon, granule EPSG,
#: columns covered, BOA offset, datatake id).
GRANULES = (
    ("S2A_32TQN_20180703_0_L2A", 0, "sentinel-2a", "2018-07-03T10:05:11.2", 11.6, 32632, (0, 32), 0,
     "GS2A_20180703T100031_015834_N02.06"),
    ("S2A_33TTH_20180703_0_L2A", 0, "sentinel-2a", "2018-07-03T10:05:10.0", 12.4, 32633, (16, 48), 0,
     "GS2A_20180703T100031_015834_N02.06"),
    ("S2B_33TTH_20180708_0_L2A", 1, "sentinel-2b", "2018-07-08T10:04:59.5", 12.4, 32633, (0, 48), 1000,
     "GS2B_20180708T100019_006968_N04.00"),
    ("S2A_33TTJ_20180713_0_L2A", 2, "sentinel-2a", "2018-07-13T10:05:02.1", 12.5, 32633, (0, 48), 1000,
     ""),  # no datatake: grouped by the solar day
    ("S2A_33TTH_20180713_0_L2A", 2, "Sentinel-2A", "2018-07-13T10:05:04.3", 12.5, 32633, (0, 48), 0,
     ""),  # the neighbouring tile, another baseline, platform in capitals (Planetary Computer)
    ("S2B_33TTH_20180713_0_L2A", 3, "sentinel-2b", "2018-07-13T10:31:00.0", 12.5, 32633, (0, 48), 0,
     ""),  # another satellite on the same day: a pass of its own
)
#: Expected passes in merge order on an EPSG:32633 grid: the grid's CRS first, then by id.
PASSES_ON_33 = ((1, 0), (2,), (4, 3), (5,))


def _granules(n=48, chunk=16, seed=11, grid_epsg=32633):
    """Six granules of four passes over one n × n grid. Every clear pixel shows the surface
    plus a small granule-specific bias (each tile's own atmospheric correction) plus the
    granule's offset; clouds are bright; outside a granule's columns everything is 0."""
    rng = np.random.default_rng(seed)
    gbox = GeoBox.from_bbox((740000, 4790000, 740000 + n * 10, 4790000 + n * 10), f"EPSG:{grid_epsg}",
                            resolution=10)
    surface = rng.integers(200, 5000, size=(4, n, n), dtype=np.uint16)
    data = np.zeros((len(GRANULES), 5, n, n), dtype=np.uint16)
    for t, (_, _, _, _, _, _, (c0, c1), offset, _) in enumerate(GRANULES):
        scl = rng.choice([4, 5, 6, 7, 8, 9, 3, 10], p=[.3, .15, .1, .05, .15, .1, .1, .05],
                         size=(n, n)).astype(np.uint16)
        refl = surface + np.uint16(3 * t + offset)
        refl[:, np.isin(scl, [8, 9, 10])] = 7000 + offset
        outside = np.ones((n, n), dtype=bool)
        outside[:, c0:c1] = False
        scl[outside] = 0
        refl[:, outside] = 0
        data[t, :4], data[t, 4] = refl, scl
    coords = {
        "time": np.array([g[3] for g in GRANULES], dtype="datetime64[ns]"),
        "band": list(BANDS),
        "id": ("time", [g[0] for g in GRANULES]),
        "boa_offset": ("time", np.array([g[7] for g in GRANULES], dtype=np.uint16)),
        "platform": ("time", [g[2] for g in GRANULES]),
        "datatake_id": ("time", [g[8] for g in GRANULES]),
        "absolute_orbit": ("time", np.full(len(GRANULES), -1)),
        "granule_epsg": ("time", [g[5] for g in GRANULES]),
        "centre_lon": ("time", [g[4] for g in GRANULES]),
        **xr_coords(gbox),
    }
    return xr.DataArray(da.from_array(data, chunks=(-1, 1, chunk, chunk)),
                        dims=("time", "band", "y", "x"), coords=coords)


def _per_pass_reference(scenes, passes):
    """Straight numpy: per pass, each pixel takes the first granule (in the given order) that
    is clear and has data; then the float64 median of those observations, rounded half up,
    and the number of passes with a clear granule."""
    values = scenes.values.astype(np.float64)
    offsets = scenes["boa_offset"].values.astype(np.float64)
    clear = ~np.isin(scenes.values[:, -1], MASKED_SCL_CLASSES)
    n_bands = values.shape[1] - 1
    observations = np.full((len(passes), n_bands, *values.shape[2:]), np.nan)
    for p, members in enumerate(passes):
        for b in range(n_bands):
            for t in reversed(members):
                use = clear[t] & (values[t, b] > 0)
                observations[p, b][use] = np.maximum(values[t, b][use] - offsets[t], 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # pixels without a clear pass
        median = np.nanmedian(observations, axis=0)
    reflectance = np.where(np.isnan(median), 0, np.floor(median + 0.5)).astype(np.uint16)
    count = sum(clear[list(members)].any(axis=0) for members in passes)
    return reflectance, count


# --------------------------------------------------------------------------- grouping
def test_granules_of_one_pass_are_grouped_and_ordered():
    scenes = _granules()
    assert satellite_passes(scenes) == PASSES_ON_33
    # on a zone-32 grid the zone-32 granule of the first pass comes first
    on_32 = _granules(grid_epsg=32632)
    assert satellite_passes(on_32)[0] == (0, 1)
    # without pass coordinates every time step is its own pass (passes in time order)
    bare = scenes.drop_vars(["platform", "datatake_id", "absolute_orbit", "granule_epsg", "centre_lon"])
    assert satellite_passes(bare) == ((1,), (0,), (2,), (3,), (4,), (5,))


def test_solar_day_keeps_a_pass_together_where_the_utc_date_changes():
    # east of 150° E Sentinel-2 passes near 00:00 UTC: one pass, two UTC dates, one solar day
    times = np.array(["2018-12-31T23:59:58", "2019-01-01T00:00:03"], dtype="datetime64[ns]")
    days = solar_day(times, np.array([172.0, 171.5]))
    assert days[0] == days[1] == (np.datetime64("2019-01-01") - np.datetime64("1970-01-01")).astype(int)
    assert solar_day(times[:1], np.array([np.nan]))[0] == -1
    # 10:30 solar time in Central Europe is the UTC date
    assert solar_day(np.array(["2018-07-03T10:05"], dtype="datetime64[ns]"), np.array([12.0]))[0] == \
        (np.datetime64("2018-07-03") - np.datetime64("1970-01-01")).astype(int)


def _coords_only(platforms, times, lons, datatakes=None, orbits=None):
    n = len(platforms)
    gbox = GeoBox.from_bbox((0, 0, 20, 20), "EPSG:32601", resolution=10)
    return xr.DataArray(
        np.zeros((n, 1, 2, 2), dtype=np.uint16), dims=("time", "band", "y", "x"),
        coords={"time": np.array(times, dtype="datetime64[ns]"), "band": ["SCL"],
                "id": ("time", [f"item{i}" for i in range(n)]), "platform": ("time", platforms),
                "centre_lon": ("time", lons),
                "datatake_id": ("time", datatakes or [""] * n),
                "absolute_orbit": ("time", orbits or [-1] * n), **xr_coords(gbox)})


def test_the_antimeridian_needs_the_orbit(caplog):
    times = ["2019-01-01T22:41:10", "2019-01-01T22:41:10"]
    lons = [179.6, -179.6]  # UTM zones 60 and 1: solar dates 2019-01-02 and 2019-01-01
    assert satellite_passes(_coords_only(["sentinel-2a"] * 2, times, lons)) == ((0,), (1,))
    datatakes = ["GS2A_20190101T223101_018431_N02.12"] * 2
    assert satellite_passes(_coords_only(["sentinel-2a"] * 2, times, lons, datatakes)) == ((0, 1),)
    assert satellite_passes(_coords_only(["sentinel-2a"] * 2, times, lons, orbits=[18431, 18431])) == ((0, 1),)
    # the platform comes from the datatake id where the item does not name it
    assert satellite_passes(_coords_only(["", ""], times, lons, datatakes)) == ((0, 1),)
    # nothing names the platform: nothing is merged, and the log says why
    with caplog.at_level(logging.WARNING, logger="clc_dask.mosaic"):
        assert satellite_passes(_coords_only(["", ""], times, [12.0, 12.1])) == ((0,), (1,))
    assert "2 granule(s) name no platform" in caplog.text


# --------------------------------------------------------------------------- mosaic
def test_clear_count_counts_passes_and_the_median_is_the_median_of_passes():
    scenes = _granules()
    result = seasonal_mosaic(scenes, composite="all")
    expected, expected_count = _per_pass_reference(scenes, PASSES_ON_33)
    np.testing.assert_array_equal(result["clear_count"].values, expected_count)
    np.testing.assert_array_equal(result["reflectance"].values, expected)
    assert result.attrs["n_dates"] == 4 and result.attrs["n_granules"] == 6
    assert result["clear_count"].attrs["units"] == "passes"
    # counting granules would differ exactly where two granules of a pass are both clear
    clear = ~np.isin(scenes.sel(band="SCL").values, MASKED_SCL_CLASSES)
    granules = clear.sum(axis=0)
    doubled = (clear[0] & clear[1]) | (clear[3] & clear[4])
    assert doubled.mean() > 0.2
    np.testing.assert_array_equal(granules - result["clear_count"].values,
                                  (clear[0] & clear[1]).astype(int) + (clear[3] & clear[4]))
    # ... and a per-granule median differs from the per-pass one
    per_granule, _ = _per_pass_reference(scenes, tuple((t,) for t in range(len(GRANULES))))
    assert (per_granule != expected).mean() > 0.1


def test_the_first_granule_wins_where_both_copies_are_clear():
    """Within a pass the granule in the grid's CRS wins, whatever the catalog's order; where it
    is cloudy the other copy fills in (the pass stays clear)."""
    first_pass = _granules().isel(time=[0, 1])  # zone 32 (id sorts first) and zone 33
    red = seasonal_mosaic(first_pass, "rgb")["reflectance"].sel(band="B04").values
    data = first_pass.sel(band=["B04", "SCL"]).values
    clear = ~np.isin(data[:, 1], MASKED_SCL_CLASSES)
    both = clear[0] & clear[1]
    assert both.sum() > 100
    np.testing.assert_array_equal(red[both], data[1, 0][both])  # zone 33 on the zone-33 grid
    only_32 = clear[0] & ~clear[1]
    np.testing.assert_array_equal(red[only_32], data[0, 0][only_32])
    on_32 = _granules(grid_epsg=32632).isel(time=[0, 1])
    red_32 = seasonal_mosaic(on_32, "rgb")["reflectance"].sel(band="B04").values
    np.testing.assert_array_equal(red_32[both], data[0, 0][both])


def test_mosaic_does_not_depend_on_item_order_or_chunks():
    scenes = _granules(chunk=16)
    reference = seasonal_mosaic(scenes, "nrg")
    rng = np.random.default_rng(0)
    for chunk in (8, 48):
        shuffled = _granules(chunk=chunk).isel(time=rng.permutation(len(GRANULES)))
        again = seasonal_mosaic(shuffled, "nrg")
        assert again["reflectance"].data.chunksize == (1, chunk, chunk)
        np.testing.assert_array_equal(again["reflectance"].values, reference["reflectance"].values)
        np.testing.assert_array_equal(again["clear_count"].values, reference["clear_count"].values)


# --------------------------------------------------------------------------- real catalogs
def test_load_carries_pass_coordinates_of_a_real_pass_over_three_utm_zones(shared_data):
    """33 real Planetary Computer items of one datatake over UTM zones 58, 59 and 60 (Kamchatka,
    00:00 UTC) are one pass; nothing is read to find out."""
    items = list(pystac.ItemCollection.from_file(str(shared_data / PC_ITEMS)))
    gbox = geobox_for_aoi(box(166.5, 53.0, 174.5, 59.2, "EPSG:4326"), 32659, 4000)
    scenes = load_scenes(items, gbox, bands=("B04",))
    assert scenes.sizes["time"] == 33
    assert set(scenes["granule_epsg"].values) == {32658, 32659, 32660}
    assert set(scenes["platform"].values) == {"Sentinel-2A"}
    assert set(scenes["datatake_id"].values) == {"GS2A_20190101T000001_018417_N02.12"}
    assert (scenes["absolute_orbit"].values == -1).all()
    lons = scenes["centre_lon"].values
    assert np.isfinite(lons).all() and 167 < lons.min() < lons.max() < 174
    passes = satellite_passes(scenes)
    assert len(passes) == 1 and sorted(passes[0]) == list(range(33))
    ids = scenes["id"].values
    in_grid_crs = [str(ids[t]) for t in passes[0] if scenes["granule_epsg"].values[t] == 32659]
    assert [str(ids[t]) for t in passes[0][:len(in_grid_crs)]] == sorted(in_grid_crs)


def test_side_by_side_earth_search_granules_are_one_pass(shared_data):
    """Five real Earth Search granules of one datatake (tiles 24MUV … 24MXV, 24MUA), acquired
    seconds apart: one pass, merged in id order."""
    items = [i for i in pystac.ItemCollection.from_file(str(shared_data / ES_ITEMS)) if "_24M" in i.id]
    gbox = geobox_for_aoi(box(-40.3, -5.2, -37.7, -3.7, "EPSG:4326"), 32724, 2000)
    scenes = load_scenes(items, gbox, bands=("B04",))
    assert len(set(scenes["time"].values)) == 5 and set(scenes["platform"].values) == {"sentinel-2b"}
    (members,) = satellite_passes(scenes)
    assert [str(scenes["id"].values[t]) for t in members] == sorted(i.id for i in items)


# --------------------------------------------------------------------------- two-zone demo
TWO_ZONE_SIZE = 256  # px at 10 m: 2.56 km, the smallest demo region


@pytest.fixture(scope="module")
def two_zone(two_zone_demo):
    """The session's two-zone demo region (256 px, seed 0) and its servers."""
    assert two_zone_demo[0].size == TWO_ZONE_SIZE
    return two_zone_demo


def _footprint(scene):
    return shapely.geometry.shape(json.loads(scene.item_path.read_text())["geometry"])


def test_two_zone_region_has_overlapping_granules_in_two_utm_zones(two_zone):
    region, _ = two_zone
    assert region.two_zone and region.crs == "EPSG:3035" and region.geobox.shape == (256, 256)
    west, south, east, north = region.bbox_lonlat
    assert west < 12.0 < east and 43.0 < south < north < 43.2  # across the zone border at 12° E
    assert DemoRegion.load(region.workdir) == region
    assert len(region.scenes) == 24  # 4 passes per season, each as two granules
    by_pass = {}
    for scene in region.scenes:
        by_pass.setdefault((scene.platform, scene.datetime[:10]), []).append(scene)
    assert len(by_pass) == 12 and all(len(g) == 2 for g in by_pass.values())
    area = shapely.geometry.shape(region.geobox.extent.to_crs("EPSG:4326").json)
    covered = []
    for (platform, _day), (west_granule, east_granule) in by_pass.items():
        assert (west_granule.epsg, east_granule.epsg) == (32632, 32633)
        assert (west_granule.mgrs_tile, east_granule.mgrs_tile) == ("32TQN", "33TTH")
        items = [json.loads(s.item_path.read_text()) for s in (west_granule, east_granule)]
        for scene, item in zip((west_granule, east_granule), items, strict=True):
            assert item["properties"]["proj:epsg"] == scene.epsg
            assert item["properties"]["proj:code"] == f"EPSG:{scene.epsg}"
            assert item["properties"]["grid:code"] == f"MGRS-{scene.mgrs_tile}"
            assert item["properties"]["platform"] == platform
            with rasterio.open(scene.assets["red"]) as red, rasterio.open(scene.assets["scl"]) as scl:
                assert red.crs.to_epsg() == scl.crs.to_epsg() == scene.epsg
                assert list(red.transform)[:6] == item["assets"]["red"]["proj:transform"]
                assert [red.height, red.width] == item["assets"]["red"]["proj:shape"]
                assert (scl.res, red.res) == ((20.0, 20.0), (10.0, 10.0))
        # one pass: one datatake, sensed seconds apart
        assert len({i["properties"]["s2:datatake_id"] for i in items}) == 1
        times = [np.datetime64(i["properties"]["datetime"].rstrip("Z")) for i in items]
        assert 0 < abs(times[0] - times[1]) < np.timedelta64(2, "s")
        # each granule reaches past 12° E into the other zone; they overlap in the middle third
        a, b = _footprint(west_granule), _footprint(east_granule)
        assert a.bounds[2] > 12.0 > b.bounds[0]
        assert 0.25 < a.intersection(b).area / area.area < 0.4
        covered.append(a.union(b).intersection(area).area / area.area)
    # together they cover the region, except where a pass's swath ends (one pass per season)
    assert sorted(covered)[3] > 0.999 and min(covered) > 0.5


def test_two_zone_mosaic_on_the_3035_grid_counts_passes(two_zone):
    """Through the loopback STAC API and COG server, on the region's EPSG:3035 grid: eight
    granules in four passes per season; the mosaic is the median of the per-pass
    observations, every pixel has a clear pass, and neither the order of the items nor the
    chunks change a pixel."""
    from clc_dask.search import search_items

    region, servers = two_zone
    items = search_items(servers.stac_url, bbox=region.bbox_lonlat, season="july", years=[region.year],
                         collection=servers.collection_id)
    assert len(items) == 8
    bands = ("B08", "B04", "B03")
    scenes = load_scenes(items, region.geobox, bands=bands, chunksize=128)
    assert scenes.odc.geobox == region.geobox
    assert sorted(set(scenes["granule_epsg"].values)) == [32632, 32633]
    passes = satellite_passes(scenes)
    ids = scenes["id"].values
    assert len(passes) == 4 and all(len(p) == 2 for p in passes)
    for members in passes:  # the two granules of one date, zone 32 first (id order off-grid)
        assert [str(ids[t])[4:9] for t in members] == ["32TQN", "33TTH"]
        assert len({str(ids[t])[10:18] for t in members}) == 1
    loaded = scenes.compute()
    result = seasonal_mosaic(scenes, "nrg")
    expected, expected_count = _per_pass_reference(loaded, passes)
    count = result["clear_count"].values
    np.testing.assert_array_equal(count, expected_count)
    np.testing.assert_array_equal(result["reflectance"].values, expected)
    assert count.min() >= 1 and count.max() <= 4
    # granules double-count only where both zones see the region (its middle third)
    clear = ~np.isin(loaded.sel(band="SCL").values, MASKED_SCL_CLASSES)
    doubled = clear.sum(axis=0) - count
    columns = np.flatnonzero(doubled.any(axis=0))
    assert doubled.sum() > 1000 and 0.2 < columns.min() / 256 and columns.max() / 256 < 0.8
    # the catalog's order and the chunking change nothing
    shuffled = [items[i] for i in np.random.default_rng(1).permutation(len(items))]
    again = seasonal_mosaic(load_scenes(shuffled, region.geobox, bands=bands, chunksize=256), "nrg")
    np.testing.assert_array_equal(again["reflectance"].values, result["reflectance"].values)
    np.testing.assert_array_equal(again["clear_count"].values, count)


def test_two_zone_demo_command_and_reuse(two_zone, tmp_path, monkeypatch, capsys):
    from clc_dask.cli import main
    from clc_dask.demo import build_region

    region, _ = two_zone
    monkeypatch.setattr(sys, "argv", ["clc-dask", "demo", "--workdir", str(region.workdir), "--size",
                                      str(TWO_ZONE_SIZE), "--two-zone", "--until", "search"])
    with pytest.raises(SystemExit) as done:
        main()
        raise SystemExit(0)
    out = capsys.readouterr().out
    assert done.value.code == 0
    assert "Region reused" in out and "24 scenes" in out
    assert "Two UTM zones: region grid EPSG:3035, granules in EPSG:32632 and EPSG:32633" in out
    assert "found 24 items" in out
    # the one-zone region is another region: not silently swapped in the same workdir
    with pytest.raises(OutputError, match=r"across UTM zones 32/33 \(--two-zone\)"):
        build_region(region.workdir, size=TWO_ZONE_SIZE, seed=0)
    with pytest.raises(ConfigError, match="two_zone must be True or False"):
        build_region(tmp_path / "w", size=TWO_ZONE_SIZE, two_zone="yes")
    assert not (tmp_path / "w").exists()
