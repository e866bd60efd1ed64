"""Expiring credentials: asset URLs are signed where and when they are read, and re-signed.

The demo region's COGs are served as Azure blobs (``http://demoaccount.blob.core.windows.net/
demo/…``) by a loopback server that refuses, with 403, requests whose SAS token is missing,
unknown, revoked or expired; a loopback token service issues tokens that live
:data:`LIFETIME` seconds, and the ``planetary-computer`` package fetches them from it
(``PC_SDK_SAS_URL``). A mosaic and a production run that last several token lifetimes must
equal the ones read from local files, byte for byte; no token may appear in the task graph,
in any file written or in the logs, and neither search, the dry run nor the plan may ask for
one.
"""

from __future__ import annotations

import json
import logging
import pickle
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import quote

import cloudpickle
import dask
import geopandas as gpd
import numpy as np
import planetary_computer
import pytest
import shapely
import torch
import yaml
from faults.tokens import BlobServer, TokenService
from leakcheck import assert_no_leaks
from planetary_computer import sas
from rasterio.env import get_gdal_config

from clc_dask import run as R
from clc_dask import signing
from clc_dask.classes import ClassTable
from clc_dask.config import load_run_config
from clc_dask.errors import ConfigError, ReadError
from clc_dask.load import RetryingReader, load_scenes, public_text
from clc_dask.model import Checkpoint, Normalization, build_model, save_checkpoint
from clc_dask.mosaic import make_mosaic, write_mosaic
from clc_dask.search import PC_SIGNER, SIGNER_FIELD, save_item_collection, search_items
from clc_dask.signing import (
    PlanetaryComputerSigner,
    forget_tokens,
    mark_signer,
    register_signer,
    unsigned_url,
)

LIFETIME = 2.0  # seconds a token lives; renewed at half its life (the default margin is longer)
SEASON = "september"
#: GDAL options of the signed reads: quick timeouts and retries (the proxy is added per server).
FAST_GDAL = {"GDAL_HTTP_TIMEOUT": "10", "GDAL_HTTP_CONNECTTIMEOUT": "5",
             "GDAL_HTTP_RETRY_DELAY": "0.01", "GDAL_HTTP_MAX_RETRY": "1"}


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def local_items(demo_region, tmp_path_factory):
    """The region's scenes as an item collection on local files (the clean reference)."""
    items = search_items(demo_region.catalog_path)
    return save_item_collection(items, tmp_path_factory.mktemp("local") / "items.json")


@pytest.fixture(scope="module")
def blob_items(demo_region, local_items, tmp_path_factory):
    """The same scenes as Planetary Computer-style blobs, unsigned, naming their signer."""
    items = search_items(local_items, sign=False)
    for item in items:
        for asset in item.assets.values():
            asset.href = _blob_url(demo_region.workdir, asset.href)
    return save_item_collection(mark_signer(items, PC_SIGNER), tmp_path_factory.mktemp("blob") / "items.json")


def _blob_url(root: Path, href: str) -> str:
    rel = Path(href).resolve().relative_to(Path(root).resolve()).as_posix()
    return f"http://demoaccount.blob.core.windows.net/demo/{quote(rel)}"


@pytest.fixture
def tokens(monkeypatch):
    """A token service on loopback, used by the ``planetary-computer`` package in this process
    and in processes started from it; every cached token is forgotten before and after."""
    with TokenService(LIFETIME) as service:
        monkeypatch.setenv("PC_SDK_SAS_URL", service.sas_url)
        forget_tokens()
        try:
            yield service
        finally:
            forget_tokens()


@pytest.fixture
def blobs(demo_region, tokens):
    """The blob server in front of the demo COGs, accepting the service's tokens."""
    with BlobServer(demo_region.workdir, tokens) as server:
        yield server


def _gdal(server: BlobServer) -> dict[str, str]:
    return {**FAST_GDAL, "GDAL_HTTP_PROXY": server.proxy}


def _token_strings(service: TokenService) -> list[str]:
    """Every form in which an issued token could leak: the whole query, the signature as sent
    and as issued."""
    out = []
    for token in service.tokens:
        out += [token.query, token.sig, quote(token.sig, safe="")]
    return out


def _assert_no_token_in(text: str, service: TokenService, where: str) -> None:
    leaked = [t for t in _token_strings(service) if t in text]
    assert not leaked, f"{len(leaked)} token string(s) found in {where}"


def _assert_no_token_in_files(folder: Path, service: TokenService) -> int:
    """No file under ``folder`` holds a token (bytes compared); returns the files checked."""
    needles = [t.encode() for t in _token_strings(service)]
    files = [p for p in folder.rglob("*") if p.is_file()]
    for path in files:
        data = path.read_bytes()
        assert not any(n in data for n in needles), f"a token is written in {path}"
    return len(files)


# --------------------------------------------------------------------------- signing


def test_the_signer_caches_tokens_renews_them_before_expiry_and_drops_refused_ones(tokens):
    url = "http://demoaccount.blob.core.windows.net/demo/a/B04.tif"
    signer = PlanetaryComputerSigner(renew_before=300)  # longer than the tokens: half their life
    first = signer(url)
    assert first.startswith(url + "?") and signer(url) == first and tokens.issued == 1
    assert first == url + "?" + tokens.tokens[0].query
    # another container needs its own token; other hosts and public blobs are left alone
    assert tokens.tokens[0].query not in signer("http://demoaccount.blob.core.windows.net/other/x.tif")
    assert tokens.issued == 2
    for plain in ("https://example.com/a.tif?x=1", "/data/a.tif",
                  "https://ai4edatasetspublicassets.blob.core.windows.net/c/a.tif"):
        assert signer(plain) == plain
    # a URL signed before (e.g. by planetary_computer.sign) is signed with the cached token
    assert signer(url + "?st=x&se=y&sp=rl&sig=OLD") == first
    time.sleep(LIFETIME / 2 + 0.05)  # inside the renewal margin: a new token, same cache entry
    second = signer(url)
    assert second != first and tokens.issued == 3
    # the server refused the older URL: the newer token is kept; refusing the newer drops it
    signer.invalidate(first)
    assert signer(url) == second and tokens.issued == 3
    signer.invalidate(second)
    assert signer(url) not in (first, second) and tokens.issued == 4
    # the signer pickles without a token: each process has its own cache
    state = pickle.dumps(signer)
    assert not any(t.encode() in state for t in _token_strings(tokens))
    assert pickle.loads(state) == signer


def test_search_graph_and_saved_collections_need_and_hold_no_token(tokens, blob_items, demo_region,
                                                                    tmp_path):
    items = search_items(blob_items)
    assert items.extra_fields[SIGNER_FIELD] == PC_SIGNER
    assert all(i.properties[SIGNER_FIELD] == PC_SIGNER for i in items)
    hrefs = [a.href for i in items for a in i.assets.values()]
    assert hrefs and all(h.startswith("http://demoaccount.blob.core.windows.net/demo/") and "?" not in h
                         for h in hrefs)
    # items signed the usual way (planetary_computer.sign, with this service's tokens) are
    # saved without their tokens, naming the signer that renews them
    signed = [planetary_computer.sign(i) for i in mark_signer(list(items), None)]
    assert all("sig=" in a.href for i in signed for a in i.assets.values())
    path = save_item_collection(signed, tmp_path / "signed.json")
    saved = json.loads(path.read_text())
    assert saved[SIGNER_FIELD] == PC_SIGNER
    assert all(unsigned_url(a["href"]) == a["href"] for f in saved["features"] for a in f["assets"].values())
    assert tokens.issued >= 1
    _assert_no_token_in(path.read_text(), tokens, "the saved collection")
    reread = search_items(path)
    assert [a.href for i in reread for a in i.assets.values()] == hrefs
    issued = tokens.issued
    # the graph is built without a token: it carries the signer, unsigned URLs
    scenes = load_scenes(reread, demo_region.geobox, bands=["B04"], gdal={"GDAL_HTTP_PROXY": "127.0.0.1:9"})
    graph = cloudpickle.dumps(dict(scenes.__dask_graph__()))
    assert b"PlanetaryComputerSigner" in graph and b"demoaccount.blob.core.windows.net/demo/" in graph
    assert b"sig=" not in graph and tokens.issued == issued


def _assert_renewed_and_recovered(service: TokenService, server: BlobServer) -> None:
    """Tokens were renewed as the reads went on (besides those replacing revoked ones: each
    revocation adds one token, so without renewals all tokens but one would be revoked), the
    renewed tokens were used, and refused (revoked) tokens were replaced."""
    revoked = sum(t.revoked for t in service.tokens)
    assert service.issued - revoked >= 3, (service.issued, revoked)
    assert len(server.served_by_token) >= 3, server.served_by_token
    assert server.refused["revoked"] >= 1 and server.refused["missing"] == 0, server.refused


# --------------------------------------------------------------------------- a mosaic


@pytest.fixture(scope="module")
def clean_mosaic(demo_region, local_items, tmp_path_factory):
    """The mosaic read from local files: {file name: bytes}."""
    paths = write_mosaic(_mosaic(local_items, demo_region), tmp_path_factory.mktemp("clean") / "m.tif")
    return {p.name: p.read_bytes() for p in paths if p.suffix == ".tif"}


def _mosaic(items, region, **kwargs):
    """The lazy nrg mosaic of the season's scenes (of an item-collection file, or as given)."""
    if isinstance(items, Path):
        items = search_items(items, season=SEASON, years=[region.year])
    return make_mosaic(items=items, grid=region.geobox, composite="nrg", chunk_size=256, **kwargs)


def test_mosaic_outlasting_its_tokens_equals_the_clean_one(demo_region, blob_items, clean_mosaic, tokens,
                                                          blobs, tmp_path, caplog):
    # a slower server (> 100 answers, ≥ 2.5 s on two threads) whose every 50th token is revoked
    blobs.delay, blobs.revoke_every = 0.05, 50
    caplog.set_level(logging.INFO)
    with dask.config.set(scheduler="threads", num_workers=2):
        paths = write_mosaic(_mosaic(blob_items, demo_region, gdal=_gdal(blobs)), tmp_path / "m.tif")
    written = {p.name: p.read_bytes() for p in paths if p.suffix == ".tif"}
    assert written.keys() == clean_mosaic.keys()
    for name, data in clean_mosaic.items():
        assert written[name] == data, name
    _assert_renewed_and_recovered(tokens, blobs)
    assert "opening it again with a new signature" in caplog.text
    _assert_no_token_in(caplog.text, tokens, "the logs")
    assert _assert_no_token_in_files(tmp_path, tokens) == 3  # mosaic, clear count, items


def test_scenes_read_on_a_cluster_are_signed_on_the_worker(demo_region, local_items, blob_items, tokens,
                                                           blobs):
    from distributed import Client, LocalCluster

    def scenes(items_path, **kwargs):
        items = search_items(items_path, season=SEASON, years=[demo_region.year])
        return load_scenes(items, demo_region.geobox, bands=["B04"], chunk_size=256, **kwargs)

    expected = scenes(local_items).values
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=True, dashboard_address=":0") as cluster, \
            Client(cluster):
        read = scenes(blob_items, gdal=_gdal(blobs)).compute().values
    np.testing.assert_array_equal(read, expected)
    assert tokens.issued >= 1 and blobs.served > 0
    assert not sas.TOKEN_CACHE  # this process signed nothing: the worker did


def test_refused_signatures_give_up_with_an_error_naming_the_asset(demo_region, blob_items, tokens,
                                                                   blobs, tmp_path):
    blobs.revoke_every = 1  # every token is refused at its first use
    items = search_items(blob_items)[:1]
    out = tmp_path / "out" / "m.tif"
    with pytest.raises(ReadError) as raised:
        write_mosaic(_mosaic(items, demo_region, gdal=_gdal(blobs)), out)
    message = str(raised.value)
    assert re.match(r"Cannot read asset http://demoaccount\.blob\.core\.windows\.net/demo/\S+/"
                    r"(B0[348]|SCL)\.tif: the server refused its signature \(HTTP response code: 403\), "
                    r"also after 3 new signature\(s\) from planetary-computer\. Check that", message), message
    assert "?" not in message.split(":", 2)[1]
    _assert_no_token_in(message, tokens, "the error")
    assert tokens.issued >= 4 and blobs.refused["revoked"] >= 4
    assert not out.parent.exists() or not any(out.parent.iterdir())


def test_unsigned_reads_refused_by_the_server_say_to_sign(demo_region, blob_items, tokens, blobs):
    items = search_items(blob_items, sign=False)[:1]
    assert SIGNER_FIELD not in items[0].properties
    scenes = load_scenes(items, demo_region.geobox, bands=["B04"], gdal=_gdal(blobs))
    with pytest.raises(ReadError, match=r"the server refused access \(HTTP response code: 403\)\. If the "
                                        r"catalog's asset URLs must be signed, pass `sign`"):
        scenes.compute()
    assert tokens.issued == 0 and blobs.refused["missing"] > 0


class _LoopbackSigner:
    """Another catalog's signer: one token per URL from the service, no cache."""

    def __init__(self, sas_url: str) -> None:
        self.sas_url = sas_url

    def __call__(self, url: str) -> str:
        import requests

        token = requests.get(f"{self.sas_url}/demoaccount/demo", timeout=5).json()["token"]
        return f"{unsigned_url(url)}?{token}"


@pytest.fixture
def loopback_catalog(tokens):
    """``loopback-catalog``: a signer registered for this test only."""
    register_signer("loopback-catalog", lambda: _LoopbackSigner(tokens.sas_url))
    yield "loopback-catalog"
    signing._SIGNERS.pop("loopback-catalog")


def test_other_catalogs_plug_in_their_signer(demo_region, local_items, blob_items, tokens, blobs,
                                             loopback_catalog):
    items = search_items(blob_items, sign=loopback_catalog, season=SEASON, years=[demo_region.year])
    assert {i.properties[SIGNER_FIELD] for i in items} == {loopback_catalog}
    local = search_items(local_items, season=SEASON, years=[demo_region.year])
    read = load_scenes(items, demo_region.geobox, bands=["B04"], chunk_size=512, gdal=_gdal(blobs))
    expected = load_scenes(local, demo_region.geobox, bands=["B04"], chunk_size=512)
    np.testing.assert_array_equal(read.values, expected.values)
    assert tokens.issued >= len(items) * 2 and blobs.refused == {}  # each asset (B04, SCL) signed


def test_gdal_options_of_a_read_do_not_stay_in_the_threads_that_read(demo_region, local_items):
    """A read through a proxy must not leave the proxy (or any option, e.g. credentials) set in
    dask's pooled threads for the reads that follow."""
    items = search_items(local_items, season=SEASON, years=[demo_region.year])[:1]
    pool = ThreadPoolExecutor(2)
    scenes = load_scenes(items, demo_region.geobox, bands=["B04"], chunk_size=128,
                         gdal={"GDAL_HTTP_PROXY": "127.0.0.1:9", "GDAL_HTTP_TIMEOUT": "7"})
    with dask.config.set(scheduler="threads", pool=pool):
        assert scenes.compute().values.any()
    both = threading.Barrier(2)

    def options(_):
        both.wait(timeout=10)  # one call on each thread of the pool
        return get_gdal_config("GDAL_HTTP_PROXY"), get_gdal_config("GDAL_HTTP_TIMEOUT")

    assert list(pool.map(options, range(2))) == [(None, None), (None, None)]
    pool.shutdown()


def test_gdal_messages_lose_the_query_strings_of_bare_file_names():
    text = ("B04.tif?st=2025-01-01T00%3A00Z&se=x&sig=AbC%2B%3D, band 1: IReadBlock failed; "
            "'/vsicurl/http://h/B04.tif?sig=AbC' not recognized")
    assert public_text(text) == ("B04.tif?<redacted> band 1: IReadBlock failed; "
                                 "'/vsicurl/http://h/B04.tif?<redacted>' not recognized")


def test_the_reader_pickles_with_its_signer_and_without_a_token(tokens):
    signer = PlanetaryComputerSigner(renew_before=60)
    reader = RetryingReader(url="http://demoaccount.blob.core.windows.net/demo/a.tif", spec=None,
                            resampling=None, dtype=np.dtype("uint16"), fill_value=0, scale_offset=(1, 0),
                            signer=signer, sign_retries=2)
    assert reader._sign().startswith(reader.url + "?")  # a token is cached in this process
    copy = pickle.loads(pickle.dumps(reader))
    assert (copy.signer, copy.sign_retries, copy.url) == (signer, 2, reader.url)
    assert not any(t.encode() in pickle.dumps(reader) for t in _token_strings(tokens))


# --------------------------------------------------------------------------- a production run

TILE = 256


@pytest.fixture(scope="module")
def run_root(tmp_path_factory, demo_region):
    folder = tmp_path_factory.mktemp("runs")
    left, bottom, right, top = demo_region.bounds
    aoi = shapely.box(left + 1, bottom + 1, right - 1, top - 1)
    gpd.GeoDataFrame(geometry=[aoi], crs=demo_region.crs).to_file(folder / "aoi.gpkg", driver="GPKG")
    torch.manual_seed(1)
    table = ClassTable(2, [11, 21, 23, 31, 32, 51])
    model = build_model("resnet18", 3, len(table), None)
    norm = Normalization((0.25, 0.08, 0.07), (0.03, 0.01, 0.01))
    save_checkpoint(Checkpoint("resnet18", ("B08", "B04", "B03"), table, norm, model.state_dict()),
                    folder / "model.pt")
    return folder


def _run_config(root: Path, region, store: str, source: Path, gdal: dict[str, str] | None = None):
    raw = {
        "name": "creds-run",
        "aoi": {"path": "aoi.gpkg"},
        "grid": {"epsg": region.epsg, "resolution": 10, "tile_size": TILE, "chunk_size": 128},
        "imagery": {"source": str(source), "year": region.year, "seasons": [SEASON], "max_cloud": 80,
                    "composite": "nrg", "gdal": gdal or {}},
        "model": {"checkpoint": "model.pt", "batch_size": 4, "window": 128, "halo": 32, "device": "cpu"},
        "classes": {"level": 2},
        "generalize": {"mmu_ha": 1.0, "min_width_m": 30.0},
        "output": {"store": store, "formats": ["cog", "zarr"], "vectorize": True},
        "cluster": {"kind": "threads", "tiles_per_batch": 1},
    }
    path = root / f"{store}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return load_run_config(path)


def _tile_files(store: Path) -> dict[str, bytes]:
    return {p.relative_to(store).as_posix(): p.read_bytes()
            for p in sorted(store.rglob("*")) if p.is_file() and p.relative_to(store).parts[0] in ("tiles", "clc.zarr")}


def test_run_outlasting_its_tokens_equals_the_clean_run(run_root, demo_region, local_items, blob_items,
                                                       tokens, blobs, caplog, monkeypatch):
    # a secret GDAL reads from the environment (where credentials belong): used, never written
    secret = "planted-Secret-9f3c1d7e0b2a4c6e8f1a3b5d"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    clean = R.execute_run(_run_config(run_root, demo_region, "clean", local_items))
    config = _run_config(run_root, demo_region, "signed", blob_items, _gdal(blobs))
    plan = R.dry_run(config)
    assert plan.summary()["scenes_total"] > 0 and tokens.issued == 0  # the plan needs no token
    blobs.delay, blobs.revoke_every = 0.02, 100
    caplog.set_level(logging.INFO)
    with dask.config.set(num_workers=2):
        result = R.execute_run(config)
    assert sorted(result.computed) == sorted(clean.computed) and len(result.computed) >= 4
    files, expected = _tile_files(result.store), _tile_files(clean.store)
    assert files.keys() == expected.keys() and any(k.endswith("classes.tif") for k in files)
    assert [k for k in files if files[k] != expected[k]] == []
    _assert_renewed_and_recovered(tokens, blobs)
    saved = json.loads((result.store / "items.json").read_text())
    assert saved[SIGNER_FIELD] == PC_SIGNER
    assert _assert_no_token_in_files(result.store, tokens) > 10
    _assert_no_token_in(caplog.text, tokens, "the logs")
    # every file the run wrote, and the logs: neither the planted secret nor any token
    scan = assert_no_leaks([secret, *_token_strings(tokens)], paths=[result.store], logs={"caplog": caplog.text})
    assert scan.files > 10


def test_rasterio_debug_logs_show_no_token(tokens, blobs, demo_region, blob_items, caplog):
    """rasterio logs dataset names (signed URLs) at DEBUG and GDAL's messages at INFO."""
    items = search_items(blob_items)[:1]
    caplog.set_level(logging.DEBUG)
    load_scenes(items, demo_region.geobox, bands=["B04"], gdal=_gdal(blobs), chunk_size=512).compute()
    assert tokens.issued >= 1 and "sig=" not in caplog.text
    assert "demoaccount.blob.core.windows.net" in caplog.text  # the names are there, not their tokens
    _assert_no_token_in(caplog.text, tokens, "the logs")


def test_items_naming_another_signer_are_refused_clearly(blob_items, demo_region):
    items = list(search_items(blob_items))
    items[0].properties[SIGNER_FIELD] = "elsewhere"
    with pytest.raises(ConfigError, match=r"The items name different URL signers \(elsewhere, "
                                          r"planetary-computer\)"):
        load_scenes(items, demo_region.geobox, bands=["B04"])
    with pytest.raises(ConfigError, match=r"Unknown URL signer 'elsewhere': use one of planetary-computer"):
        search_items(blob_items, sign="elsewhere")
