"""No secret leaves the process: credential GDAL options are refused (config, overrides, CLI),
credentials from the environment work but are never shown, signed URLs lose their query
strings in logs (CLI process and Dask workers), errors and saved item collections.

Every check plants unique strings where a user's credentials would be and greps what the
code wrote and printed for them (:mod:`leakcheck`)."""

from __future__ import annotations

import json
import logging
import sys
import threading
import traceback
import urllib.parse
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pystac
import pytest
import yaml
from leakcheck import assert_no_leaks, encoded_forms, find_leaks

from clc_dask.config import dump_run_config, load_run_config
from clc_dask.demo.servers import RangeRequestHandler, RequestStats
from clc_dask.errors import ConfigError, ReadError, SearchError
from clc_dask.gdalenv import gdal_env, gdal_options, parse_gdal_options
from clc_dask.redact import REDACTED, install_log_redaction, public_url, redact_text
from clc_dask.search import SIGNER_FIELD, save_item_collection, search_items

SECRET = "PLANTED-SECRET-7Qx3vK9m"  # a fake secret key / password
TOKEN = "PLANTEDTOKEN5Rz8wL2"  # a fake SAS signature / bearer token
SUBSCRIPTION_KEY = "PLANTEDSUBKEY4Hn6"  # a fake Planetary Computer subscription key
PLANTED = [SECRET, TOKEN, SUBSCRIPTION_KEY]
SAS = f"st=2025-01-01T00%3A00%3A00Z&se=2099-01-01T00%3A00%3A00Z&sp=rl&sv=2024-05-04&sr=c&sig={TOKEN}"
SIGNED = f"https://sentinel2l2a01.blob.core.windows.net/sentinel2-l2/33/T/WM/B04.tif?{SAS}"
PC_ITEMS = "stac/item_collections/planetary_computer_sentinel-2-l2a_33items_2019-01-01.json"

VALID = {
    "name": "secrets",
    "aoi": {"bbox": [12.0, 42.0, 12.5, 42.3]},
    "grid": {"epsg": 32633},
    "imagery": {"source": "earth-search"},
    "model": {"checkpoint": "model.pt"},
    "output": {"store": "out"},
}


@pytest.fixture
def redaction():
    """Log redaction installed for the test, and the process's logging restored after it."""
    factory = logging.getLogRecordFactory()
    filters = {h: list(h.filters) for h in logging.getLogger().handlers}
    yield install_log_redaction()
    logging.setLogRecordFactory(factory)
    for handler, kept in filters.items():
        handler.filters = kept


@pytest.fixture
def restore_logging():
    """Undo what an in-process CLI run does to logging (redaction, levels, warnings capture)."""
    factory = logging.getLogRecordFactory()
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    filters = {h: list(h.filters) for h in handlers}
    yield
    logging.setLogRecordFactory(factory)
    logging.captureWarnings(False)
    root.setLevel(level)
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
    for handler, kept in filters.items():
        handler.filters = kept


def _run_cli(args, capsys, monkeypatch):
    from clc_dask.cli import main

    monkeypatch.setattr(sys, "argv", ["clc-dask", *map(str, args)])
    with pytest.raises(SystemExit) as exit_info:
        main()
        raise SystemExit(0)
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


# --------------------------------------------------------------------------- the grep helper
def test_leakcheck_finds_every_form_in_files_archives_and_logs(tmp_path, monkeypatch):
    import base64
    import gzip
    import zipfile

    import leakcheck

    monkeypatch.setattr(leakcheck, "BLOCK", 7)  # matches across block edges too
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "run.yaml").write_text(f"gdal:\n  AWS_SECRET_ACCESS_KEY: {SECRET}\n")
    (tmp_path / "url.txt").write_text(f"href=https://x/B04.tif%3Fsig%3D{urllib.parse.quote('a/' + TOKEN, safe='')}")
    (tmp_path / "auth.log").write_bytes(b"Authorization: Basic " + base64.b64encode(f"user:{SECRET}".encode()))
    with gzip.open(tmp_path / "items.json.gz", "wt") as fh:
        fh.write(json.dumps({"href": f"https://x/B04.tif?sig={TOKEN}"}))
    with zipfile.ZipFile(tmp_path / "bundle.zip", "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("inner/report.txt", f"token {TOKEN}")
    (tmp_path / "clean.tif").write_bytes(np.arange(1000, dtype="uint16").tobytes())
    scan = find_leaks([SECRET, TOKEN], [tmp_path], {"stderr": f"… {TOKEN} …"})
    found = {(Path(leak.where.split("!")[0]).name if leak.where != "stderr" else "stderr", leak.planted, leak.form)
             for leak in scan.leaks}
    assert found == {
        ("run.yaml", SECRET, "as is"), ("url.txt", TOKEN, "as is"), ("auth.log", SECRET, "base64"),
        ("items.json.gz", TOKEN, "as is"), ("bundle.zip", TOKEN, "as is"), ("stderr", TOKEN, "as is"),
    }
    assert scan.files == 6 and scan.logs == 1
    assert "url-quoted" not in encoded_forms(SECRET)  # no form invented twice
    with pytest.raises(AssertionError, match="planted secrets found"):
        assert_no_leaks([SECRET], [tmp_path])
    with pytest.raises(AssertionError, match="nothing was scanned"):
        assert_no_leaks([SECRET], [tmp_path / "no-such-folder"])
    assert_no_leaks([SECRET], [tmp_path / "clean.tif"])


# --------------------------------------------------------------------------- GDAL options
CREDENTIAL_OPTIONS = {
    "AWS_SECRET_ACCESS_KEY": SECRET,
    "AWS_SESSION_TOKEN": SECRET,
    "AWS_ACCESS_KEY_ID": SECRET,
    "GDAL_HTTP_HEADERS": f"Authorization: Bearer {SECRET}",
    "GDAL_HTTP_USERPWD": f"user:{SECRET}",
    "GDAL_HTTP_PROXYUSERPWD": f"user:{SECRET}",
    "GDAL_HTTP_BEARER": SECRET,
    "GDAL_HTTP_COOKIE": f"session={SECRET}",
    "AZURE_STORAGE_CONNECTION_STRING": f"DefaultEndpointsProtocol=https;AccountKey={SECRET}",
    "AZURE_STORAGE_ACCESS_KEY": SECRET,
    "AZURE_SAS": SAS.replace(TOKEN, SECRET),
    "GS_SECRET_ACCESS_KEY": SECRET,
    "GS_OAUTH2_REFRESH_TOKEN": SECRET,
    "OSS_SECRET_ACCESS_KEY": SECRET,
    "SWIFT_AUTH_TOKEN": SECRET,
    # credentials in the value of an innocent-looking option
    "GDAL_HTTP_PROXY": f"http://user:{SECRET}@proxy.example:3128",
    "CPL_VSIL_CURL_CHUNK_HINT": f"Authorization: Basic {SECRET}",
}
ALLOWED_OPTIONS = {"GDAL_HTTP_MAX_RETRY": "10", "AWS_NO_SIGN_REQUEST": "YES", "GDAL_HTTP_AUTH": "BEARER",
                   "AWS_REGION": "eu-central-1", "AWS_S3_ENDPOINT": "minio.example:9000",
                   "GDAL_DISABLE_READDIR_ON_OPEN": "NO", "GDAL_HTTP_PROXY": "http://proxy.example:3128"}


@pytest.mark.parametrize("key", list(CREDENTIAL_OPTIONS))
def test_config_refuses_credential_gdal_options(tmp_path, key):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({**VALID, "imagery": {"gdal": {"GDAL_HTTP_MAX_RETRY": "10",
                                                                  key: CREDENTIAL_OPTIONS[key]}}}))
    with pytest.raises(ConfigError) as err:
        load_run_config(path)
    message = str(err.value)
    assert message.startswith(f"Invalid config {path}: imagery.gdal: {key} carries a credential")
    assert "set it as an environment variable" in message and f"export {key}=" in message
    assert "GDAL_HTTP_MAX_RETRY" not in message  # only the culprit is named
    assert_no_leaks(PLANTED, logs={"error": message, "traceback": "".join(traceback.format_exception(err.value))})
    assert list(tmp_path.iterdir()) == [path]  # nothing written


def test_config_keeps_ordinary_gdal_options_and_records_them(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({**VALID, "imagery": {"gdal": ALLOWED_OPTIONS}}))
    config = load_run_config(path)
    assert config.imagery.gdal == ALLOWED_OPTIONS
    assert yaml.safe_load(dump_run_config(config))["imagery"]["gdal"] == ALLOWED_OPTIONS


@pytest.mark.parametrize(("patch", "field"), [
    ({"imagery": {"source": f"https://stac.example/items.json?{SAS}"}}, "imagery.source"),
    ({"imagery": {"source": f"https://stac.example/api?token={SECRET}"}}, "imagery.source"),
    ({"model": {"checkpoint": f"https://user:{SECRET}@models.example/unet.pt"}}, "model.checkpoint"),
    ({"aoi": {"path": f"https://data.example/aoi.gpkg?X-Amz-Signature={TOKEN}&X-Amz-Credential=a"}},
     "aoi.path"),
])
def test_config_refuses_urls_with_credentials(patch, field):
    from clc_dask.config import parse_run_config

    with pytest.raises(ConfigError) as err:
        parse_run_config({**VALID, **patch})
    message = str(err.value)
    assert f": {field}: the URL carries a credential" in message
    assert "environment variables" in message
    assert_no_leaks(PLANTED, logs={"error": message})


def test_config_keeps_urls_whose_query_is_no_credential():
    from clc_dask.config import parse_run_config

    config = parse_run_config({**VALID, "imagery": {"source": "https://stac.example/api?version=2"}})
    assert config.imagery.source == "https://stac.example/api?version=2"


@pytest.mark.parametrize("key", list(CREDENTIAL_OPTIONS))
def test_gdal_overrides_refuse_credentials(key):
    value = CREDENTIAL_OPTIONS[key]
    for call in (lambda: gdal_options({key: value}), lambda: gdal_env({key: value}),
                 lambda: parse_gdal_options([f"{key}={value}"])):
        with pytest.raises(ConfigError) as err:
            call()
        message = str(err.value)
        assert f"GDAL option(s) in `gdal`: {key} carries a credential" in message
        assert f"export {key}=" in message
        assert_no_leaks(PLANTED, logs={"error": message,
                                       "traceback": "".join(traceback.format_exception(err.value))})
    assert gdal_options(ALLOWED_OPTIONS)["AWS_NO_SIGN_REQUEST"] == "YES"


def test_malformed_gdal_pair_does_not_echo_what_may_be_a_secret():
    with pytest.raises(ConfigError) as err:
        parse_gdal_options(["GDAL_HTTP_MAX_RETRY=3", f"AWS_SECRET_ACCESS_KEY:{SECRET}"])
    assert "GDAL option number 2 in `gdal` is not KEY=VALUE" in str(err.value)
    assert SECRET not in str(err.value)


def test_cli_gdal_option_with_a_credential_is_refused_before_anything_is_written(
        tmp_path, capsys, monkeypatch, restore_logging):
    out = tmp_path / "mosaic.tif"
    code, stdout, stderr = _run_cli(
        ["mosaic", "--source", "earth-search", "--bbox", "12.0,42.0,12.1,42.1", "--season", "july",
         "--year", "2023", "--out", out, "--gdal", f"AWS_SECRET_ACCESS_KEY={SECRET}"], capsys, monkeypatch)
    assert code == 1
    assert "GDAL option(s) in --gdal: AWS_SECRET_ACCESS_KEY carries a credential" in stderr
    assert "export AWS_SECRET_ACCESS_KEY=" in stderr
    assert list(tmp_path.iterdir()) == []
    assert_no_leaks(PLANTED, logs={"stdout": stdout, "stderr": stderr})


@pytest.mark.parametrize("error", [ReadError(f"Cannot read asset {SIGNED}: HTTP 403"),
                                   RuntimeError(f"unexpected answer from {SIGNED}")], ids=type)
def test_cli_errors_and_tracebacks_show_no_token(error, tmp_path, capsys, monkeypatch, restore_logging):
    import clc_dask.search

    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(clc_dask.search, "search_items", fail)
    code, stdout, stderr = _run_cli(["search", "--source", "earth-search", "--bbox", "12.0,42.0,12.1,42.1",
                                     "--out", tmp_path / "items.json"], capsys, monkeypatch)
    assert code == 1
    shown = "Error: Cannot read asset" if isinstance(error, ReadError) else "RuntimeError: unexpected answer"
    assert shown in stderr
    assert f"{SIGNED.split('?')[0]}?{REDACTED}" in stderr
    assert_no_leaks(PLANTED, logs={"stdout": stdout, "stderr": stderr})


# --------------------------------------------------------------------------- log records


def test_log_records_are_redacted_whatever_carries_the_url(caplog, monkeypatch, redaction):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)  # as a user sets it for GDAL
    gdal_log = logging.getLogger("rasterio._env")
    with caplog.at_level(logging.DEBUG):
        gdal_log.debug("GDAL signalled: VSICURL: GetFileSize(%s)=1024", f"/vsicurl/{SIGNED}")
        logging.getLogger("clc_dask.load").warning("reading %s failed (%s)", SIGNED, "HTTP 503")
        logging.getLogger("stackstac").info("headers %s", {"Authorization": f"Bearer {TOKEN}"})
        logging.getLogger("boto").debug("credentials: %s / %s", "AKIAEXAMPLE", SECRET)
        try:
            raise RuntimeError(f"HTTP response code: 403 on {SIGNED}")
        except RuntimeError:
            logging.getLogger("distributed.worker").exception("task failed")
    texts = {"caplog": caplog.text, "messages": "\n".join(r.getMessage() for r in caplog.records)}
    assert_no_leaks(PLANTED, logs=texts)
    assert f"GetFileSize(/vsicurl/{public_url(SIGNED)})=1024" in caplog.text
    # by logger, not position: a test before this one in the process may still log from a thread
    (load_record,) = [r for r in caplog.records if r.name == "clc_dask.load"]
    assert load_record.getMessage() == f"reading {SIGNED.split('?')[0]}?{REDACTED} failed (HTTP 503)"
    assert "Traceback" in caplog.text and "RuntimeError: HTTP response code: 403 on" in caplog.text
    assert "credentials: AKIAEXAMPLE / <redacted>" in caplog.text


def test_redaction_changes_nothing_else(redaction, caplog):
    message = "mosaic of 4 date(s) at 10 m, GDAL_HTTP_MAX_RETRY=5, see https://stac.example/api/search"
    with caplog.at_level(logging.INFO):
        logging.getLogger("clc_dask.mosaic").info("%s", message)
    assert caplog.records[0].getMessage() == message
    assert redact_text(redact_text(SIGNED)) == redact_text(SIGNED)


def _log_on_worker(url: str) -> tuple[list[str], bool]:
    """Log a signed URL on a worker through a fresh handler; return what the handler wrote."""
    import logging
    import os

    from clc_dask.redact import RedactingFilter

    records: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(self.format(record))

    logger = logging.getLogger("rasterio._base")
    handler = Collect(logging.DEBUG)
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.DEBUG)
    try:
        logger.debug("Opening %s", url)
        try:
            raise OSError(f"{url}: HTTP response code: 403 (secret {os.environ.get('AWS_SECRET_ACCESS_KEY')})")
        except OSError:
            logger.exception("read failed")
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    factory = logging.getLogRecordFactory()
    return records, any(isinstance(getattr(factory, name, None), RedactingFilter) for name in dir(factory))


def test_dask_workers_redact_their_log_records(monkeypatch):
    from clc_dask import cluster

    monkeypatch.delenv("DASK_SCHEDULER_ADDRESS", raising=False)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)  # workers inherit the environment
    with cluster.connect(kind="local", n_workers=1, threads_per_worker=1, dashboard_address=None) as client:
        records, installed = client.submit(_log_on_worker, SIGNED, pure=False).result()
        plugins = client.run(lambda dask_worker: list(dask_worker.plugins))
    assert installed
    assert all(cluster.LogRedactionPlugin.name in names for names in plugins.values())
    text = "\n".join(records)
    assert f"Opening {public_url(SIGNED)}" in text and "OSError:" in text
    assert_no_leaks(PLANTED, logs={"worker": text})


# --------------------------------------------------------------------------- signing and saving
class _TokenService(BaseHTTPRequestHandler):
    """A loopback Planetary Computer SAS token endpoint (``/{account}/{container}``)."""

    def do_GET(self) -> None:  # noqa: N802 - http.server naming
        self.server.keys.append(self.headers.get("Ocp-Apim-Subscription-Key"))  # type: ignore[attr-defined]
        body = {"msft:expiry": "2099-01-01T00:00:00Z", "token": SAS}
        if self.server.mode == "malformed":  # type: ignore[attr-defined]
            body.pop("msft:expiry")  # planetary-computer's error then quotes the token
        data = json.dumps(body).encode()
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format, *args):  # noqa: A002
        pass


@pytest.fixture
def token_service(monkeypatch):
    import planetary_computer.sas
    import planetary_computer.settings

    server = ThreadingHTTPServer(("127.0.0.1", 0), _TokenService)
    server.mode, server.keys = "ok", []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    settings = planetary_computer.settings.Settings.get()
    monkeypatch.setattr(settings, "sas_url", f"http://127.0.0.1:{server.server_address[1]}")
    monkeypatch.setattr(settings, "subscription_key", SUBSCRIPTION_KEY)
    monkeypatch.setenv("PC_SDK_SUBSCRIPTION_KEY", SUBSCRIPTION_KEY)
    monkeypatch.setattr(planetary_computer.sas, "TOKEN_CACHE", {})
    yield server
    server.shutdown()
    server.server_close()


def test_signing_failure_message_has_no_token(shared_data, token_service, caplog, redaction):
    import planetary_computer

    token_service.mode = "malformed"
    item = pystac.ItemCollection.from_file(str(shared_data / PC_ITEMS)).items[0]
    with pytest.raises(Exception) as raw:  # what planetary-computer itself says
        planetary_computer.sign(item)
    assert TOKEN in str(raw.value)
    with caplog.at_level(logging.DEBUG), pytest.raises(SearchError) as err:
        search_items(str(shared_data / PC_ITEMS), sign=planetary_computer.sign)
    message = str(err.value)
    assert message.startswith(f"Signing the asset URLs of item {item.id} failed (ValidationError: ")
    assert "msft:expiry" in message and "PC_SDK_SUBSCRIPTION_KEY" in message
    assert token_service.keys and set(token_service.keys) == {SUBSCRIPTION_KEY}
    assert_no_leaks(PLANTED, logs={"error": message, "caplog": caplog.text,
                                   "traceback": "".join(traceback.format_exception(err.value))})


def test_saved_item_collections_hold_no_token(shared_data, token_service, tmp_path, caplog):
    """Real planetary_computer.sign against a loopback token service: the signed items read,
    and neither a saved search result, its normalised items nor other signed hrefs keep a
    credential; a planetary-computer search stays marked so that reading it signs again."""
    import planetary_computer

    from clc_dask.items import normalize_items

    signed = search_items(str(shared_data / PC_ITEMS), sign=planetary_computer.sign)
    hrefs = [a.href for i in signed for a in i.assets.values()]
    assert len(signed) == 33 and all(h.endswith(f"sig={TOKEN}") for h in hrefs if ".blob." in h)
    marked = pystac.ItemCollection(signed.items, extra_fields={SIGNER_FIELD: "planetary-computer"})
    other = [_with_href(signed.items[0], "https://bucket.s3.amazonaws.com/B04.tif?X-Amz-Algorithm=AWS4"
                        f"-HMAC-SHA256&X-Amz-Credential=AKIA%2F{SECRET}&X-Amz-Signature={TOKEN}"),
             _with_href(signed.items[1], f"https://data.example/B04.tif?token={TOKEN}"),
             _with_href(signed.items[2], f"https://user:{SECRET}@data.example/B04.tif"),
             _with_href(signed.items[3], "https://data.example/B04.tif?version=3")]
    with caplog.at_level(logging.WARNING, logger="clc_dask.search"):
        paths = [save_item_collection(signed, tmp_path / "signed.json"),
                 save_item_collection(marked, tmp_path / "marked.json"),
                 save_item_collection(normalize_items(signed), tmp_path / "normalized.json"),
                 save_item_collection(other, tmp_path / "other.json")]
    assert_no_leaks(PLANTED, [tmp_path], {"caplog": caplog.text})
    # Planetary Computer blob URLs that were signed name its signer when saved: read back, they are
    # signed again (no warning)
    assert json.loads(paths[0].read_text())[SIGNER_FIELD] == "planetary-computer"
    assert str(paths[0]) not in caplog.text and str(paths[1]) not in caplog.text
    saved = json.loads(paths[0].read_text())
    assert saved["features"][0]["assets"]["B04"]["href"] == signed.items[0].assets["B04"].href.split("?")[0]
    assert [f["assets"]["B04"]["href"] for f in json.loads(paths[3].read_text())["features"]] == [
        "https://bucket.s3.amazonaws.com/B04.tif", "https://data.example/B04.tif",
        "https://data.example/B04.tif", "https://data.example/B04.tif?version=3"]
    assert json.loads(paths[1].read_text())[SIGNER_FIELD] == "planetary-computer"
    again = search_items(str(paths[1]), sign=planetary_computer.sign)
    assert all(a.href.endswith(f"sig={TOKEN}") for i in again for a in i.assets.values() if ".blob." in a.href)


def _with_href(item, href):
    new = item.clone()
    new.assets["B04"].href = href
    return new


# --------------------------------------------------------------------------- end to end
class _BearerOnly(RangeRequestHandler):
    """The demo file server, answering only requests that carry the expected bearer token."""

    def _serve(self, head: bool) -> None:
        if self.headers.get("Authorization") != f"Bearer {TOKEN}":
            self.server.refused += 1  # type: ignore[attr-defined]
            self.send_error(HTTPStatus.UNAUTHORIZED, "Unauthorized")
            return
        super()._serve(head)


@pytest.fixture
def bearer_server(demo_region):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _BearerOnly)
    server.daemon_threads = True
    server.root, server.stats, server.refused = demo_region.workdir.resolve(), RequestStats(), 0
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _signed_items(region, base_url, season, folder):
    """The region's items of one season, assets on ``base_url`` with a SAS query, as a file."""
    features = []
    for scene in region.seasons[season]:
        item = pystac.Item.from_file(str(scene.item_path))
        for asset in item.assets.values():
            path = (scene.item_path.parent / asset.href).resolve()
            rel = urllib.parse.quote(path.relative_to(region.workdir).as_posix())
            asset.href = f"{base_url}/{rel}?{SAS}"
        item.clear_links()
        features.append(item.to_dict(transform_hrefs=False))
    path = folder / f"signed-{season}.json"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    return path


def test_environment_credential_reaches_gdal_and_nothing_leaks_end_to_end(
        demo_region, bearer_server, tmp_path, capsys, caplog, monkeypatch, restore_logging):
    """``clc-dask -vv mosaic`` over signed hrefs from a server that needs a bearer token given
    only in the environment (GDAL_HTTP_HEADERS), with GDAL debug messages on: the mosaic is
    made, and no output file, log record or printed line holds the token or the signature."""
    server, base_url = bearer_server
    caplog.set_level(logging.DEBUG)  # what -vv asks for (the CLI's basicConfig defers to pytest's)
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    items = _signed_items(demo_region, base_url, "july", inputs)
    west, south, east, north = demo_region.bbox_lonlat
    out = tmp_path / "out" / "july.tif"
    args = ["-vv", "mosaic", "--items", items, "--bbox", f"{west + 0.005},{south + 0.005},{east - 0.005},"
            f"{north - 0.005}", "--epsg", demo_region.epsg, "--composite", "rgb", "--out", out]

    # without the credential in the environment the server refuses to serve
    import rasterio
    from rasterio.errors import RasterioIOError

    first = json.loads(items.read_text())["features"][0]["assets"]["red"]["href"]
    with pytest.raises(RasterioIOError, match="401"), rasterio.Env(CPL_VSIL_CURL_NON_CACHED="/vsicurl/"):
        rasterio.open(first)
    assert server.refused > 0
    caplog.clear()  # rasterio logged the signed URL: outside the CLI nothing installed redaction

    monkeypatch.setenv("GDAL_HTTP_HEADERS", f"Authorization: Bearer {TOKEN}")
    monkeypatch.setenv("CPL_DEBUG", "ON")
    code, stdout, stderr = _run_cli(args, capsys, monkeypatch)
    assert code == 0, stderr
    assert out.exists() and server.stats.snapshot()["partial"] > 0
    logs = {"stdout": stdout, "stderr": stderr, "caplog": caplog.text}
    assert_no_leaks(PLANTED, [tmp_path / "out"], logs)
    assert f"?{REDACTED}" in caplog.text + stderr  # the signed URLs were logged, redacted
    saved = json.loads(next((tmp_path / "out").glob("*.json")).read_text())
    assert all("?" not in a["href"] for f in saved["features"] for a in f["assets"].values())
