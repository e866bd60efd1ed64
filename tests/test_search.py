"""STAC search: recorded real API responses replayed offline (vcrpy, no network), static
catalogs and item collections, seasons, retries, signing, saving, and the CLI."""

from __future__ import annotations

import json
import sys
import threading
import time
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pystac
import pytest
import vcr
import yaml
from vcr.errors import CannotOverwriteExistingCassetteException

from clc_dask.errors import ConfigError, InputError, SearchError
from clc_dask.search import (
    PC_SIGNER,
    SIGNER_FIELD,
    save_item_collection,
    search_items,
)
from clc_dask.seasons import format_interval, parse_interval, season_intervals

CASSETTES = "stac/recorded_api_responses"
ES_V1_FILTER = "EarthSearchV1_mixed_cql2_filter_TestCLISearch.test_filter.yaml"
ES_V1_MULTI = "EarthSearchV1_sentinel-2-l2a+landsat_test_multiple_collections.yaml"
ES_V0 = "EarthSearchV0_sentinel-s2-l2a-cogs_non_conformant.yaml"
PC = "PC_sentinel-2-l2a_TestItemSearch.test_datetime_results.yaml"
ITEM_COLLECTIONS = "stac/item_collections"
TWM_CATALOG = "s2/earthsearch_v1_33TWM_2023-08/catalog.json"
TWM_BBOX = (15.6, 46.2, 16.2, 46.6)

# Replay only: any request not recorded (other URL, other JSON body) fails the test.
REPLAY = vcr.VCR(record_mode="none", match_on=["method", "scheme", "host", "port", "path",
                                                "query", "body"])


@pytest.fixture
def cassette(shared_data):
    def use(name):
        return REPLAY.use_cassette(str(shared_data / CASSETTES / name), allow_playback_repeats=False)
    return use


def _recorded_items(shared_data, name, interactions):
    """The features the server sent in the given recorded interactions."""
    data = yaml.safe_load((shared_data / CASSETTES / name).read_text())
    out = []
    for i in interactions:
        out += json.loads(data["interactions"][i]["response"]["body"]["string"])["features"]
    return out


class _Signer:
    """Records every item it signs and appends a fake SAS token to blob hrefs."""

    def __init__(self):
        self.ids = []

    def __call__(self, item):
        self.ids.append(item.id)
        item = item.clone()
        for asset in item.assets.values():
            if ".blob.core.windows.net" in asset.href:
                asset.href += "?st=2025&se=2025&sp=rl&sig=FAKE"
        return item


# --------------------------------------------------------------------------- recorded APIs
def test_earth_search_v1_next_token_paging_and_cql2_cloud_filter(shared_data, cassette):
    """Two pages linked by a POST 'next' token; the CQL2 filter is sent, the server ignores
    it (items up to 56.8 % come back), and the client-side filter removes them."""
    with cassette(ES_V1_FILTER) as tape:
        items = search_items("https://earth-search.aws.element84.com/v1", max_cloud=40,
                             cloud_filter="filter", limit=None, max_items=20)
        assert tape.play_count == 3  # landing page + 2 search pages
    served = _recorded_items(shared_data, ES_V1_FILTER, [1, 2])
    assert len(served) == 20
    no_cloud = [f["id"] for f in served if f["properties"].get("eo:cloud_cover") is None]
    above = [f["id"] for f in served if (f["properties"].get("eo:cloud_cover") or 0) > 40]
    assert (len(no_cloud), len(above)) == (3, 5)  # Sentinel-1 scenes; 41.5 … 56.8 %
    too_cloudy = no_cloud + above
    expected = [f["id"] for f in served if f["id"] not in too_cloudy]
    assert [i.id for i in items] == expected
    assert all(i.properties["eo:cloud_cover"] <= 40 for i in items)
    # items from the second page are there
    assert "S2B_24MWV_20250731_0_L2A" in expected


def test_auto_filter_follows_conformance_so_the_recorded_cql2_body_does_not_match(cassette):
    """Earth Search v1 advertises only `query`: in auto mode that is what is sent, which is
    not the recorded request: the replay refuses it (body matching is active)."""
    with cassette(ES_V1_FILTER):
        with pytest.raises(SearchError, match="search at https://earth-search.aws.element84.com/v1/search failed"):
            search_items("https://earth-search.aws.element84.com/v1", max_cloud=40, limit=None,
                         max_items=20)


def test_earth_search_preset_follows_next_link_to_the_empty_last_page(cassette):
    with cassette(ES_V1_MULTI) as tape:
        items = search_items("earth-search", aoi={"type": "Point", "coordinates": [-105.1019, 40.1672]},
                             datetime="2023-10-08", collection=["sentinel-2-l2a", "landsat-c2-l2"],
                             limit=None)
        assert tape.play_count == 2  # first page + the empty page behind its next link
    assert [i.id for i in items] == ["S2A_13TDE_20231008_0_L2A", "LC08_L2SP_033032_20231008_02_T1"]
    assert sorted(items[0].assets)[:3] == ["aot", "aot-jp2", "blue"]  # Earth Search key scheme


def test_planetary_computer_items_are_signed_one_by_one(cassette):
    signer = _Signer()
    with cassette(PC):
        items = search_items("planetary-computer",
                             datetime="2019-01-01T00:00:01Z/2019-01-01T00:00:10Z", limit=None,
                             sign=signer)
    assert len(items) == 33
    assert signer.ids == [i.id for i in items]  # once per item, in order
    assert "B04" in items[0].assets and "SCL" in items[0].assets  # PC key scheme
    assert all(i.assets["B04"].href.endswith("&sig=FAKE") for i in items)
    assert items.extra_fields[SIGNER_FIELD] == PC_SIGNER


def test_planetary_computer_items_stay_unsigned_and_name_their_signer(cassette, monkeypatch):
    """Search asks for no token: URLs are signed when they are read (clc_dask.signing)."""
    from planetary_computer import sas

    def no_token(*args, **kwargs):
        raise AssertionError("a token was fetched during the search")

    monkeypatch.setattr(sas, "get_token", no_token)
    with cassette(PC):
        items = search_items("planetary-computer",
                             datetime="2019-01-01T00:00:01Z/2019-01-01T00:00:10Z", limit=None)
    assert len(items) == 33 and items.extra_fields[SIGNER_FIELD] == PC_SIGNER
    assert all(i.properties[SIGNER_FIELD] == PC_SIGNER for i in items)
    hrefs = [a.href for i in items for a in i.assets.values()]
    blobs = [h for h in hrefs if ".blob.core.windows.net/" in h]
    assert len(blobs) > 33 * 10 and not any("?" in h for h in blobs)


def test_planetary_computer_without_the_package_is_a_clear_error(cassette, monkeypatch):
    monkeypatch.setitem(sys.modules, "planetary_computer", None)
    with cassette(PC):
        with pytest.raises(ConfigError, match=r"pip install 'clc-dask\[pc\]'"):
            search_items("planetary-computer",
                         datetime="2019-01-01T00:00:01Z/2019-01-01T00:00:10Z", limit=None)


def test_client_side_cloud_filter_on_planetary_computer(shared_data, cassette):
    """cloud_filter='client' sends no filter (the recorded body has none) and filters here."""
    served = _recorded_items(shared_data, PC, [0])
    expected = [f["id"] for f in served if f["properties"]["eo:cloud_cover"] <= 50]
    assert 0 < len(expected) < 33
    with cassette(PC):
        items = search_items("planetary-computer", max_cloud=50, cloud_filter="client",
                             datetime="2019-01-01T00:00:01Z/2019-01-01T00:00:10Z", limit=None,
                             sign=False)
    assert [i.id for i in items] == expected


def test_non_conformant_earth_search_v0(cassette):
    with cassette(ES_V0):
        items = search_items("https://earth-search.aws.element84.com/v0",
                             collection="sentinel-s2-l2a-cogs", limit=1, max_items=1)
    [item] = items
    assert item.id == "S2B_20EPT_20250731_0_L2A"
    assert {"B02", "B03", "B04", "B08", "SCL"} <= set(item.assets)


def test_api_failure_is_a_search_error_naming_the_url(cassette):
    with cassette(PC):  # the cassette holds no landing page for this URL
        with pytest.raises(SearchError, match="Cannot open the STAC API at https://example.invalid"):
            search_items("https://example.invalid/stac", bbox=(0, 0, 1, 1), retries=0)


def test_replay_never_reaches_the_network(cassette):
    with cassette(PC) as tape:
        with pytest.raises(CannotOverwriteExistingCassetteException):
            import requests

            requests.get("https://planetarycomputer.microsoft.com/api/stac/v1", timeout=1)
        assert tape.play_count == 0


# --------------------------------------------------------------------------- retries
class _ScriptedAPI:
    """A loopback STAC API answering /search with a script of (status, headers) first."""

    def __init__(self, script):
        self.script = list(script)
        self.posts = []
        api = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, status, body, headers=()):
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in headers:
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self._send(200, {
                    "type": "Catalog", "id": "t", "description": "t", "stac_version": "1.0.0",
                    "conformsTo": ["https://api.stacspec.org/v1.0.0/core",
                                   "https://api.stacspec.org/v1.0.0/item-search",
                                   "https://api.stacspec.org/v1.0.0/item-search#query"],
                    "links": [{"rel": "search", "href": f"{api.url}/search", "method": "POST"}],
                })

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                api.posts.append((time.monotonic(), body))
                if api.script:
                    status, headers = api.script.pop(0)
                    self._send(status, {"code": status}, headers)
                else:
                    self._send(200, {"type": "FeatureCollection", "features": [api.item], "links": []})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.item = {
            "type": "Feature", "stac_version": "1.0.0", "id": "scene-1", "collection": "s2",
            "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [1, 0], [1, 1], [0, 1], [0, 0]]]},
            "bbox": [0, 0, 1, 1], "links": [], "assets": {},
            "properties": {"datetime": "2021-07-10T10:00:00Z", "eo:cloud_cover": 5.0},
        }

    def __enter__(self):
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def test_429_and_5xx_are_retried_honouring_retry_after():
    with _ScriptedAPI([(429, [("Retry-After", "1")]), (503, [])]) as api:
        items = search_items(api.url, bbox=(0.2, 0.2, 0.8, 0.8), max_cloud=10,
                             datetime="2021-07", backoff=0.01)
    assert [i.id for i in items] == ["scene-1"]
    assert len(api.posts) == 3  # the same POST, three times
    assert api.posts[0][1] == api.posts[2][1]
    assert api.posts[0][1]["query"] == {"eo:cloud_cover": {"lte": 10}}  # conforms to query
    assert api.posts[0][1]["datetime"] == "2021-07-01T00:00:00Z/2021-07-31T23:59:59Z"
    assert api.posts[1][0] - api.posts[0][0] >= 0.9  # waited as long as Retry-After asked


def test_exhausted_retries_raise_search_error():
    with _ScriptedAPI([(503, [])] * 10) as api:
        with pytest.raises(SearchError, match=r"failed: .*503"):
            search_items(api.url, bbox=(0.2, 0.2, 0.8, 0.8), retries=2, backoff=0.01)
        assert len(api.posts) == 3  # first try + 2 retries


def test_api_empty_result_says_what_to_relax():
    with _ScriptedAPI([]) as api:
        with pytest.raises(SearchError, match=r"raise `max_cloud` \(now 1\)"):
            search_items(api.url, bbox=(0.2, 0.2, 0.8, 0.8), max_cloud=1)  # the item has 5 %


# --------------------------------------------------------------------------- files
def test_static_catalog_with_relative_hrefs(shared_data):
    items = search_items(shared_data / TWM_CATALOG, bbox=TWM_BBOX, datetime="2023-08-01/2023-08-31",
                         max_cloud=2)
    assert sorted(i.id for i in items) == ["S2A_33TWM_20230815_0_L2A", "S2B_33TWM_20230813_0_L2A",
                                           "S2B_33TWM_20230820_0_L2A"]
    for item in items:
        href = item.assets["red"].href
        assert href.startswith(str(shared_data.resolve())) and href.endswith(f"{item.id}/B04.tif")
        # remote assets keep their URLs
        assert item.assets["thumbnail"].href.startswith("https://")


def test_static_catalog_time_filter_and_season(shared_data):
    items = search_items(shared_data / TWM_CATALOG, season="08-12/08-16", years=[2023])
    assert sorted(i.id for i in items) == ["S2A_33TWM_20230815_0_L2A", "S2B_33TWM_20230813_0_L2A"]


def test_aoi_outside_the_catalog(shared_data):
    with pytest.raises(SearchError, match=r"lies outside .*catalog.json: its items cover lon 14\.9"):
        search_items(shared_data / TWM_CATALOG, bbox=(2.0, 41.0, 2.2, 41.2))


def test_empty_result_names_the_filters_to_relax(shared_data):
    with pytest.raises(SearchError, match=r"5 item\(s\) came back, removed 5 by cloud.*raise `max_cloud` \(now 0\.1\)"):
        search_items(shared_data / TWM_CATALOG, bbox=TWM_BBOX, max_cloud=0.1)
    with pytest.raises(SearchError, match=r"removed 5 by time.*widen `season`"):
        search_items(shared_data / TWM_CATALOG, season="april", years=[2023])


def test_item_collection_files(shared_data):
    c1 = search_items(shared_data / ITEM_COLLECTIONS / "earth_search_v1_sentinel-2-c1-l2a_items_2025-07-31.json",
                      max_cloud=30)
    assert sorted(i.id for i in c1) == ["S2B_T20EPT_20250731T131905_L2A", "S2B_T24MWV_20250731T130245_L2A",
                                        "S2B_T24MXV_20250731T130245_L2A"]
    # a point in tile 13TDE (Colorado)
    one = search_items(shared_data / ITEM_COLLECTIONS / "earth_search_v1_sentinel-2-l2a_1item_S2A_13TDE_20231008.json",
                       aoi={"type": "Point", "coordinates": [-105.1019, 40.1672]}, datetime="2023-10-08")
    assert [i.id for i in one] == ["S2A_13TDE_20231008_0_L2A"]
    with pytest.raises(SearchError, match="outside"):
        search_items(shared_data / ITEM_COLLECTIONS / "earth_search_v1_sentinel-2-l2a_1item_S2A_13TDE_20231008.json",
                     bbox=(10, 45, 11, 46))


def test_unknown_source_and_bad_filters(tmp_path):
    with pytest.raises(InputError, match="neither a catalog preset"):
        search_items(tmp_path / "missing.json")
    with pytest.raises(ConfigError, match="either a bbox or an AOI"):
        search_items("earth-search", bbox=(0, 0, 1, 1), aoi={"type": "Point", "coordinates": [0, 0]})
    with pytest.raises(ConfigError, match="not a lon/lat box"):
        search_items("earth-search", bbox=(500000, 4000000, 510000, 4010000))
    with pytest.raises(ConfigError, match="either a datetime range or a season"):
        search_items("earth-search", datetime="2020", season="april", years=[2020])
    with pytest.raises(ConfigError, match="percentage"):
        search_items("earth-search", max_cloud=120)


def test_saved_collection_round_trip_strips_and_restores_signatures(tmp_path, cassette):
    signer = _Signer()
    with cassette(PC):
        items = search_items("planetary-computer",
                             datetime="2019-01-01T00:00:01Z/2019-01-01T00:00:10Z", limit=None,
                             sign=signer)
    path = save_item_collection(items, tmp_path / "run" / "items.json")
    saved = json.loads(path.read_text())
    assert saved["type"] == "FeatureCollection" and saved[SIGNER_FIELD] == PC_SIGNER
    hrefs = [f["assets"]["B04"]["href"] for f in saved["features"]]
    assert len(hrefs) == 33 and not any("sig=" in h for h in hrefs)  # expired tokens not kept
    assert [p.name for p in path.parent.iterdir()] == ["items.json"]  # no temp files left
    again = _Signer()
    reread = search_items(path, sign=again)  # offline; signed afresh
    assert again.ids == [i.id for i in items]
    assert all(i.assets["B04"].href.endswith("&sig=FAKE") for i in reread)


# --------------------------------------------------------------------------- seasons
def test_seasons():
    assert season_intervals("april", [2019, 2018]) == [
        (datetime(2018, 4, 1, tzinfo=UTC), datetime(2018, 4, 30, 23, 59, 59, tzinfo=UTC)),
        (datetime(2019, 4, 1, tzinfo=UTC), datetime(2019, 4, 30, 23, 59, 59, tzinfo=UTC)),
    ]
    [sep] = season_intervals("September", [2018])
    assert format_interval(sep) == "2018-09-01T00:00:00Z/2018-09-30T23:59:59Z"
    [july] = season_intervals("july", [2020])
    assert july[1] == datetime(2020, 7, 31, 23, 59, 59, tzinfo=UTC)
    [window] = season_intervals("07-15/08-15", [2021])
    assert format_interval(window) == "2021-07-15T00:00:00Z/2021-08-15T23:59:59Z"
    [winter] = season_intervals("12-01/02-28", [2021])
    assert format_interval(winter) == "2021-12-01T00:00:00Z/2022-02-28T23:59:59Z"
    [iso] = season_intervals("2023-08-10/2023-08-20")
    assert format_interval(iso) == "2023-08-10T00:00:00Z/2023-08-20T23:59:59Z"
    assert parse_interval("2023-08-10T09:57:57Z/..") == (datetime(2023, 8, 10, 9, 57, 57, tzinfo=UTC), None)
    with pytest.raises(ConfigError, match="needs at least one year"):
        season_intervals("july")
    with pytest.raises(ConfigError, match="drop `years`"):
        season_intervals("2023-08-10/2023-08-20", [2023])
    with pytest.raises(ConfigError, match="Unknown season 'summer'"):
        season_intervals("summer", [2020])
    with pytest.raises(ConfigError, match="invalid date"):
        season_intervals("02-30/03-10", [2021])
    with pytest.raises(ConfigError, match="ends before it starts"):
        parse_interval("2023-08-20/2023-08-10")


# --------------------------------------------------------------------------- CLI
def test_cli_search_writes_an_item_collection(shared_data, tmp_path, run_cli):
    out = tmp_path / "items.json"
    code, stdout, _ = run_cli("search", "--source", shared_data / TWM_CATALOG, "--bbox",
                              ",".join(map(str, TWM_BBOX)), "--season", "08-01/08-31",
                              "--year", "2023", "--max-cloud", "2", "--out", out)
    assert code == 0
    assert "3 item(s), 2023-08-13 … 2023-08-20" in stdout
    saved = pystac.ItemCollection.from_file(str(out))
    assert sorted(round(i.properties["eo:cloud_cover"], 2) for i in saved) == [0.21, 1.11, 1.34]


def test_cli_search_empty_result_writes_nothing(shared_data, tmp_path, run_cli):
    out = tmp_path / "items.json"
    code, _, stderr = run_cli("search", "--source", shared_data / TWM_CATALOG, "--bbox",
                              ",".join(map(str, TWM_BBOX)), "--max-cloud", "0.1", "--out", out)
    assert code == 1
    assert stderr.startswith("Error: No scenes found") and "--max-cloud" in stderr
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_aoi_files_in_any_crs(shared_data, tmp_path):
    import geopandas as gpd
    from shapely.geometry import box as shapely_box

    frame = gpd.GeoDataFrame(geometry=[shapely_box(*TWM_BBOX)], crs="EPSG:4326")
    frame.to_crs("EPSG:3857").to_file(tmp_path / "aoi.gpkg")
    items = search_items(shared_data / TWM_CATALOG, aoi=tmp_path / "aoi.gpkg", max_cloud=50)
    assert len(items) == 4  # all but the 70 % cloud scene
    frame.to_file(tmp_path / "aoi.geojson")
    assert len(search_items(shared_data / TWM_CATALOG, aoi=tmp_path / "aoi.geojson")) == 5
    with pytest.raises(InputError, match="does not exist"):
        search_items(shared_data / TWM_CATALOG, aoi=tmp_path / "nope.geojson")
