"""Faults injected between clc-dask and its servers: identical outputs, or a clear error.

The demo region is served on loopback (``demo_servers``) and read through a
:class:`~faults.proxy.FaultProxy` that answers, at set rates, with 429 (Retry-After), 500,
503, connection resets, bodies cut short and answers slower than the client's timeout. A
demo mosaic (search → load_scenes → seasonal_mosaic → write_mosaic) made through it must equal
the fault-free mosaic pixel for pixel; when retries run out, the error names the asset and
the cause and nothing is written. Timeouts and retry delays are made small (GDAL options are
overridable), so each test takes seconds.
"""

from __future__ import annotations

import http.client
import json
import logging
import re
import urllib.error
import urllib.request

import numpy as np
import pytest
import rasterio

from clc_dask.errors import ReadError, SearchError
from clc_dask.load import load_scenes
from clc_dask.mosaic import composite_bands, seasonal_mosaic, write_mosaic
from clc_dask.search import search_items
from faults.proxy import FAULT_KINDS, FaultProxy

SEASON = "july"
COMPOSITE = "nrg"
#: GDAL options that make faults cheap: 1 s timeouts, 10 ms between GDAL's own retries.
FAST_GDAL = {"GDAL_HTTP_TIMEOUT": "1", "GDAL_HTTP_CONNECTTIMEOUT": "1",
             "GDAL_HTTP_RETRY_DELAY": "0.01", "GDAL_HTTP_MAX_RETRY": "3"}
#: STAC client settings to match: (connect, read) timeouts in s, retries, backoff in s.
FAST_STAC = {"timeout": (1.0, 0.5), "retries": 8, "backoff": 0.001}
SLOW_SECONDS = 1.5  # a slow answer: longer than every timeout above
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never an env proxy


def _search(demo, region, season=SEASON, **kwargs):
    return search_items(demo.stac_url, bbox=region.bbox_lonlat, season=season,
                        years=[region.year], collection=demo.collection_id, **kwargs)


def _write_mosaic(items, region, out, **kwargs):
    scenes = load_scenes(items, region.geobox, bands=composite_bands(COMPOSITE), chunksize=256,
                         gdal=FAST_GDAL, retry_delay=0.01, **kwargs)
    return write_mosaic(seasonal_mosaic(scenes, COMPOSITE), out)


def _pixels(paths):
    arrays = {}
    for path in paths:
        with rasterio.open(path) as ds:
            arrays[path.name] = ds.read()
    return arrays


@pytest.fixture(scope="module")
def clean_mosaic(demo_region, demo_servers, tmp_path_factory):
    """The fault-free mosaic, straight from the demo servers: {file name: pixels}."""
    items = _search(demo_servers, demo_region)
    paths = _write_mosaic(items, demo_region, tmp_path_factory.mktemp("clean") / "m.tif")
    pixels = _pixels(paths)
    assert sorted(pixels) == ["m.tif", "m_clear_count.tif"]
    assert (pixels["m.tif"] > 0).mean() > 0.99
    return pixels


def _byte_range(record):
    first, last = re.fullmatch(r"bytes=(\d+)-(\d*)", record.range or "bytes=0-").groups()
    return int(first), int(last) if last else float("inf")


def _assert_retried_to_the_server(proxy, kind):
    """The bytes of every request that got a ``kind`` fault were asked for again, and this
    time answered in full (GDAL may ask only for the part it still misses)."""
    faulted = [r for r in proxy.records if r.fault == kind]
    for record in faulted:
        first, last = _byte_range(record)
        later = [r for r in proxy.records if r.seq > record.seq]
        assert any(r.path == record.path and r.method == record.method and r.fault is None
                   and _byte_range(r)[0] <= last and _byte_range(r)[1] >= first
                   for r in later), record


def test_mosaic_under_throttling_server_errors_and_short_bodies_equals_the_clean_one(
        faulty_demo, demo_region, clean_mosaic, tmp_path):
    rates = {"429": 0.05, "503": 0.05, "short": 0.02}
    with faulty_demo(rates, seed=2, slow_seconds=SLOW_SECONDS) as demo:
        items = _search(demo, demo_region, **FAST_STAC)
        assert all(i.assets["red"].href.startswith(demo.data_url) for i in items)
        paths = _write_mosaic(items, demo_region, tmp_path / "m.tif")
        counts = demo.proxy.counts()
        assert counts["429"] > 0 and counts["503"] > 0 and counts["short"] > 0, counts
        assert sum(counts.values()) == counts["429"] + counts["503"] + counts["short"]
        _assert_retried_to_the_server(demo.proxy, "short")
    pixels = _pixels(paths)
    for name, expected in clean_mosaic.items():
        np.testing.assert_array_equal(pixels[name], expected, err_msg=name)


def test_mosaic_under_resets_and_slow_answers_equals_the_clean_one(
        faulty_demo, demo_region, clean_mosaic, tmp_path):
    rates = {"reset": 0.05, "slow": 0.03}
    with faulty_demo(rates, seed=0, slow_seconds=SLOW_SECONDS) as demo:
        items = _search(demo, demo_region, **FAST_STAC)
        paths = _write_mosaic(items, demo_region, tmp_path / "m.tif")
        counts = demo.proxy.counts()
        assert counts["reset"] > 0 and counts["slow"] > 0, counts
        _assert_retried_to_the_server(demo.proxy, "reset")
        _assert_retried_to_the_server(demo.proxy, "slow")
    pixels = _pixels(paths)
    for name, expected in clean_mosaic.items():
        np.testing.assert_array_equal(pixels[name], expected, err_msg=name)


def test_search_under_every_fault_returns_the_clean_items(faulty_demo, demo_region, demo_servers):
    """One item per page, so that every page (a POST with a paging token) can be faulted."""
    seasons = ("april", "july", "september")
    clean = {s: [i.id for i in _search(demo_servers, demo_region, s)] for s in seasons}
    rates = dict.fromkeys(FAULT_KINDS, 0.08)
    with faulty_demo(rates, seed=4, faulty=("stac",),
                      slow_seconds=SLOW_SECONDS) as demo:
        for season in seasons:
            found = _search(demo, demo_region, season, limit=1, **FAST_STAC)
            assert [i.id for i in found] == clean[season]
            assert all(i.assets["red"].href.startswith(demo.data_url) for i in found)
        counts = demo.proxy.counts()
    assert all(counts[kind] > 0 for kind in FAULT_KINDS), counts


def test_exhausted_read_retries_name_the_asset_and_cause_and_write_nothing(
        faulty_demo, demo_region, tmp_path, caplog):
    """Every body cut short: each retry re-opens the asset and really reaches the server (GDAL's
    cache for the URL is cleared), then a ReadError names the asset without its query string."""
    out = tmp_path / "out" / "m.tif"
    with faulty_demo({"short": 1.0}, faulty=("data",)) as demo:
        items = _search(demo, demo_region, **FAST_STAC)[:1]
        for asset in items[0].assets.values():
            asset.href += "?sig=SECRET-TOKEN"  # as a signed URL: its query is a credential
        with caplog.at_level(logging.WARNING, logger="clc_dask.load"), \
                pytest.raises(ReadError) as raised:
            _write_mosaic(items, demo_region, out, retries=2)
        message = str(raised.value)
        match = re.match(r"Cannot read asset (http://127\.0\.0\.1:\d+/\S+/(B0[348]|SCL)\.tif)"
                         r"\?<redacted> after 3 attempts: .*got \d+ bytes, expected \d+", message)
        assert match, message
        asset_path = match[1].removeprefix(demo.data_url)
        heads = [r for r in demo.proxy.requests_for(asset_path) if r.method == "HEAD"]
        assert len(heads) == 3  # the first attempt and two retries each opened the asset anew
        assert demo.proxy.counts()["short"] >= 3
    assert "SECRET" not in message and "SECRET" not in caplog.text
    assert "retry 2/2" in caplog.text
    assert not out.parent.exists() or list(out.parent.iterdir()) == []


def test_exhausted_stac_retries_name_the_url_and_cause(faulty_demo, demo_region):
    with faulty_demo({"short": 1.0}, faulty=("stac",)) as demo:
        with pytest.raises(SearchError, match=r"Cannot open the STAC API at http://127\.0\.0\.1:\d+: "
                                              r"the answer of http://127\.0\.0\.1:\d+ was cut short "
                                              r"after 3 attempts: .*IncompleteRead"):
            _search(demo, demo_region, timeout=(1.0, 0.5), retries=2, backoff=0.001)
        assert [r.path for r in demo.proxy.records] == ["/"] * 3  # each retry reached the server


# --------------------------------------------------------------------------- the proxy itself
def _get(url, headers=None):
    with OPENER.open(urllib.request.Request(url, headers=headers or {}), timeout=5) as resp:
        return resp.status, dict(resp.headers), resp.read()


def test_the_proxy_forwards_and_rewrites_upstream_urls(faulty_demo, demo_servers):
    with faulty_demo() as demo:
        _, _, body = _get(f"{demo.stac_url}/search?collections={demo.collection_id}&limit=50")
        item = json.loads(body)["features"][0]
        assert item["assets"]["red"]["href"].startswith(demo.data_url + "/")
        assert demo_servers.data_url not in body.decode()
        status, headers, part = _get(item["assets"]["red"]["href"], {"Range": "bytes=0-99"})
        _, _, direct = _get(item["assets"]["red"]["href"].replace(demo.data_url, demo_servers.data_url),
                            {"Range": "bytes=0-99"})
        assert status == 206 and headers["Content-Range"].startswith("bytes 0-99/")
        assert part == direct and len(part) == 100
        assert demo.proxy.counts() == dict.fromkeys(FAULT_KINDS, 0)
        assert [r.upstream for r in demo.proxy.records] == ["stac", "data"]


def test_the_proxy_injects_each_kind_and_counts_it(demo_servers):
    url = "/"
    with FaultProxy({"stac": demo_servers.stac_url}, {"429": 1.0}, retry_after=7) as proxy:
        with pytest.raises(urllib.error.HTTPError) as raised:
            _get(proxy.url("stac") + url)
        assert raised.value.code == 429 and raised.value.headers["Retry-After"] == "7"
    for kind, status in (("500", 500), ("503", 503)):
        with FaultProxy({"stac": demo_servers.stac_url}, {kind: 1.0}) as proxy:
            with pytest.raises(urllib.error.HTTPError) as raised:
                _get(proxy.url("stac") + url)
            assert raised.value.code == status and proxy.counts()[kind] == 1
    with FaultProxy({"stac": demo_servers.stac_url}, {"reset": 1.0}) as proxy:
        with pytest.raises(ConnectionResetError):
            _get(proxy.url("stac") + url)
        assert proxy.counts()["reset"] == 1
    with FaultProxy({"stac": demo_servers.stac_url}, {"short": 1.0}) as proxy:
        with pytest.raises(http.client.IncompleteRead) as raised:
            _get(proxy.url("stac") + url)
        assert raised.value.expected == len(raised.value.partial)  # half of it came
        assert proxy.counts()["short"] == 1
    with FaultProxy({"stac": demo_servers.stac_url}, {"slow": 1.0}, slow_seconds=2) as proxy:
        with pytest.raises((TimeoutError, urllib.error.URLError)):
            OPENER.open(proxy.url("stac") + url, timeout=0.3).read()
        assert _get(proxy.url("stac") + url)[0] == 200  # a slow answer still comes, late
        assert proxy.counts()["slow"] == 2


def test_the_proxy_draws_the_same_faults_for_the_same_seed(demo_servers):
    def draws(seed):
        proxy = FaultProxy({"stac": demo_servers.stac_url}, {"503": 0.3, "short": 0.2}, seed)
        return [proxy.draw("stac", "GET", f"/tile/{i}", None, b"") for i in range(200)]

    first = draws(1)
    assert first == draws(1) and first != draws(2)
    assert 0.4 < sum(f is not None for f in first) / len(first) < 0.6
    with pytest.raises(ValueError, match="add up to ≤ 1"):
        FaultProxy({"stac": demo_servers.stac_url}, {"429": 0.6, "503": 0.6})
    with pytest.raises(ValueError, match="unknown fault kind"):
        FaultProxy({"stac": demo_servers.stac_url}, {"teapot": 0.1})
