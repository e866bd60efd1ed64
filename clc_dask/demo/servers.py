"""Loopback servers for the demo region: a STAC API and an HTTP file server with ranges.

:func:`serve_region` starts, on a loopback address only,

- a threaded HTTP file server for the region's folder that answers ``HEAD`` and single
  ``Range: bytes=…`` requests (``206 Partial Content``), so GDAL reads the COGs through its
  ``/vsicurl/`` path exactly as it reads them from a cloud bucket;
- ``rustac serve`` (a real STAC API, in-memory backend) loaded with the region's collection
  and items, whose asset hrefs are rewritten to absolute URLs on the file server.

Both stop when the ``with`` block ends, also on errors and on stop signals turned into
exceptions (``clc-dask`` does that for SIGTERM, SIGINT and SIGHUP), and the served copies
of the catalog (a temporary folder) are removed. rustac's memory backend conforms
to STAC API core, collections, features and item-search, but not to the ``query`` or
``filter`` extensions: clients must filter ``eo:cloud_cover`` themselves.
"""

from __future__ import annotations

import email.utils
import errno
import ipaddress
import json
import logging
import mimetypes
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from clc_dask.demo.region import DemoRegion
from clc_dask.errors import ConfigError, ServerError

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
STARTUP_TIMEOUT = 30.0  # seconds to wait for the STAC API to answer

# Offline opener: never routes loopback requests through an environment proxy.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


# --- file server with byte ranges ---------------------------------------------------------------

@dataclass
class RequestStats:
    """Counters of the file server (thread-safe), e.g. to check that readers use ranges."""

    requests: int = 0
    head: int = 0
    partial: int = 0  # 206 answers
    bytes_sent: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, *, head: bool = False, partial: bool = False, nbytes: int = 0) -> None:
        with self._lock:
            self.requests += 1
            self.head += int(head)
            self.partial += int(partial)
            self.bytes_sent += nbytes

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return {"requests": self.requests, "head": self.head, "partial": self.partial,
                    "bytes_sent": self.bytes_sent}


class _Unsatisfiable(Exception):
    pass


def parse_range(header: str, size: int) -> tuple[int, int] | None:
    """Parse a single ``bytes=a-b`` / ``bytes=a-`` / ``bytes=-n`` range of a ``size``-byte file.

    Returns the inclusive (first, last) byte, or None to ignore the header and send the whole
    file (other units, several ranges). Raises ``_Unsatisfiable`` for a range past the end.
    """
    unit, _, spec = header.strip().partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    first_s, dash, last_s = spec.strip().partition("-")
    if not dash:
        return None
    try:
        if first_s == "":  # suffix: the last n bytes
            n = int(last_s)
            if n <= 0:
                raise _Unsatisfiable
            return max(size - n, 0), size - 1
        first = int(first_s)
        last = int(last_s) if last_s else size - 1
    except ValueError:
        return None
    if first >= size or first < 0:
        raise _Unsatisfiable
    if last < first:
        return None
    return first, min(last, size - 1)


class RangeRequestHandler(BaseHTTPRequestHandler):
    """Serve files under ``server.root`` with HEAD, single byte ranges and keep-alive."""

    protocol_version = "HTTP/1.1"
    server_version = "clc-dask-demo"

    def do_HEAD(self) -> None:  # noqa: N802 - http.server naming
        self._serve(head=True)

    def do_GET(self) -> None:  # noqa: N802 - http.server naming
        self._serve(head=False)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - base class signature
        log.debug("data server: " + format, *args)

    def _resolve(self) -> Path | None:
        root: Path = self.server.root  # type: ignore[attr-defined]
        rel = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path).lstrip("/")
        try:
            path = (root / rel).resolve()
            path.relative_to(root)
        except (ValueError, OSError):
            return None
        return path if path.is_file() else None

    def _serve(self, head: bool) -> None:
        stats: RequestStats = self.server.stats  # type: ignore[attr-defined]
        path = self._resolve()
        if path is None:
            stats.add(head=head)
            self.send_error(HTTPStatus.NOT_FOUND, "File not found")
            return
        size = path.stat().st_size
        first, last, partial = 0, size - 1, False
        header = self.headers.get("Range")
        if header:
            try:
                parsed = parse_range(header, size)
            except _Unsatisfiable:
                stats.add(head=head)
                self.send_response(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            if parsed is not None:
                first, last = parsed
                partial = True
        length = max(last - first + 1, 0)
        self.send_response(HTTPStatus.PARTIAL_CONTENT if partial else HTTPStatus.OK)
        self.send_header("Content-Type", _content_type(path))
        self.send_header("Content-Length", str(length))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Last-Modified", email.utils.formatdate(path.stat().st_mtime, usegmt=True))
        if partial:
            self.send_header("Content-Range", f"bytes {first}-{last}/{size}")
        self.end_headers()
        sent = 0
        if not head and length:
            try:
                with open(path, "rb") as fh:  # the kernel copies file → socket (os.sendfile)
                    sent = self.connection.sendfile(fh, offset=first, count=length)
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True
        stats.add(head=head, partial=partial, nbytes=sent)


def _content_type(path: Path) -> str:
    if path.suffix.lower() in (".tif", ".tiff"):
        return "image/tiff; application=geotiff; profile=cloud-optimized"
    if path.suffix.lower() == ".json":
        return "application/json"
    if path.suffix.lower() == ".gpkg":
        return "application/geopackage+sqlite3"
    return mimetypes.guess_type(path.name)[0] or "application/octet-stream"


class FileServer(ThreadingHTTPServer):
    """A threaded HTTP server for the files under ``root`` (see :class:`RangeRequestHandler`)."""

    daemon_threads = True

    def __init__(self, root: Path, host: str, port: int) -> None:
        self.root = Path(root).resolve()
        self.stats = RequestStats()
        super().__init__((host, port), RangeRequestHandler)


# --- helpers -------------------------------------------------------------------------------------

def check_loopback(host: str) -> str:
    """Return ``host`` if it is a loopback address; the demo never listens elsewhere."""
    if host == "localhost":
        return host
    try:
        if ipaddress.ip_address(host).is_loopback:
            return host
    except ValueError:
        pass
    raise ConfigError(f"host {host!r} is not a loopback address: the demo servers only listen on "
                      "127.0.0.1 (or ::1 / localhost).")


def check_port(port: int, option: str) -> int:
    """Validate a port number (0 = pick a free one)."""
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ConfigError(f"{option} must be a port number 0…65535 (0 picks a free port), not {port!r}.")
    return port


def _in_use_error(host: str, port: int, what: str, option: str) -> ServerError:
    return ServerError(
        f"Port {port} on {host} is already in use, so the {what} cannot start: pass another "
        f"{option} (or {option} 0 to pick a free port)."
    )


def ensure_port_free(host: str, port: int, what: str, option: str) -> None:
    """Raise :class:`ServerError` if ``port`` (non-zero) cannot be bound on ``host``."""
    if port == 0:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                raise _in_use_error(host, port, what, option) from exc
            raise ServerError(f"Cannot listen on {host}:{port} for the {what}: {exc.strerror}. "
                              f"Pass another {option}.") from exc


def free_port(host: str) -> int:
    """A port that is free on ``host`` right now."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _get_json(url: str, timeout: float = 5.0) -> Any:
    with _OPENER.open(url, timeout=timeout) as resp:
        return json.loads(resp.read())


def rustac_command() -> list[str]:
    """The ``rustac`` command of this Python environment."""
    exe = Path(sys.executable).parent / "rustac"
    if exe.is_file():
        return [str(exe)]
    found = shutil.which("rustac")
    if found:
        return [found]
    try:
        import rustac  # noqa: F401
    except ImportError as exc:
        raise ServerError("rustac is not installed, so the demo STAC API cannot start: "
                          "pip install rustac.") from exc
    return [sys.executable, "-c", "import sys, rustac; sys.argv[0] = 'rustac'; sys.exit(rustac.main())"]


# --- served copies of the catalog -----------------------------------------------------------------

def write_served_catalog(region: DemoRegion, data_url: str, folder: Path) -> tuple[Path, Path]:
    """Write the collection and an item collection whose asset hrefs are absolute URLs on the
    data server (``data_url`` + path of the file in the region folder). Returns their paths."""
    collection = json.loads(region.collection_path.read_text())
    collection["links"] = []
    features = []
    for scene in region.scenes:
        # the item JSON as written (not round-tripped through pystac, which would migrate
        # proj:epsg away): served exactly like Earth Search serves its items
        d = json.loads(scene.item_path.read_text())
        for asset in d["assets"].values():
            rel = (scene.item_path.parent / asset["href"]).resolve().relative_to(region.workdir)
            asset["href"] = f"{data_url}/{urllib.parse.quote(rel.as_posix())}"
        d["links"] = []
        features.append(d)
    folder.mkdir(parents=True, exist_ok=True)
    coll_path = folder / "collection.json"
    items_path = folder / "items.json"
    coll_path.write_text(json.dumps(collection))
    items_path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    return coll_path, items_path


# --- the context manager ---------------------------------------------------------------------------

@dataclass(frozen=True)
class DemoServers:
    """URLs of the running demo servers."""

    stac_url: str  # STAC API root, e.g. http://127.0.0.1:7822
    data_url: str  # file server root (the region folder), e.g. http://127.0.0.1:8001
    host: str
    stac_port: int
    data_port: int
    collection_id: str
    served_dir: Path  # the served copies of collection and items
    data_stats: RequestStats

    def data_href(self, path: str | Path, region: DemoRegion) -> str:
        """The URL of a file of ``region`` on the data server."""
        rel = Path(path).resolve().relative_to(region.workdir)
        return f"{self.data_url}/{urllib.parse.quote(rel.as_posix())}"


@contextmanager
def serve_region(
    region: DemoRegion,
    host: str = DEFAULT_HOST,
    stac_port: int = 0,
    data_port: int = 0,
    timeout: float = STARTUP_TIMEOUT,
) -> Iterator[DemoServers]:
    """Serve ``region`` on loopback: its files over HTTP (with ranges) and its items through
    ``rustac serve``; both stop when the block ends.

    Args:
        region: a built :class:`DemoRegion`.
        host: loopback address to listen on.
        stac_port: port of the STAC API (0: a free port).
        data_port: port of the file server (0: a free port).
        timeout: seconds to wait for the STAC API to answer before giving up.

    Raises:
        ServerError: a port is in use, or rustac did not start (its stderr is included).
    """
    check_loopback(host)
    check_port(stac_port, "`stac_port`")
    check_port(data_port, "`data_port`")
    ensure_port_free(host, data_port, "data server", "`data_port`")
    ensure_port_free(host, stac_port, "STAC API", "`stac_port`")
    with ExitStack() as stack:
        httpd = _start_file_server(region.workdir, host, data_port)
        stack.callback(_stop_file_server, httpd)
        data_url = _url(host, httpd.server_address[1])
        served = Path(tempfile.mkdtemp(prefix="clc-dask-served-"))
        stack.callback(shutil.rmtree, served, True)
        coll_path, items_path = write_served_catalog(region, data_url, served)
        proc, port = _start_rustac(host, stac_port, coll_path, items_path, served, timeout,
                                   len(region.scenes), region.collection_id)
        stack.callback(_stop_process, proc)
        servers = DemoServers(
            stac_url=_url(host, port), data_url=data_url, host=host, stac_port=port,
            data_port=httpd.server_address[1], collection_id=region.collection_id,
            served_dir=served, data_stats=httpd.stats,
        )
        log.info("STAC API at %s, data at %s", servers.stac_url, servers.data_url)
        yield servers
        log.info("stopping the demo servers")


def _start_file_server(root: Path, host: str, port: int) -> FileServer:
    try:
        httpd = FileServer(root, host, port)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise _in_use_error(host, port, "data server", "`data_port`") from exc
        raise ServerError(f"Cannot start the data server on {host}:{port}: {exc.strerror}. "
                          "Pass another `data_port`.") from exc
    thread = threading.Thread(target=httpd.serve_forever, name="clc-dask-data-server", daemon=True)
    thread.start()
    httpd.thread = thread  # type: ignore[attr-defined]
    return httpd


def _stop_file_server(httpd: FileServer) -> None:
    httpd.shutdown()
    httpd.server_close()
    httpd.thread.join(timeout=5)  # type: ignore[attr-defined]


def _stop_process(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
    for stream in (proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()


def _stderr_tail(path: Path, limit: int = 800) -> str:
    try:
        text = path.read_text(errors="replace").strip()
    except OSError:
        return ""
    return " ".join(text[-limit:].split())


def _start_rustac(host: str, port: int, coll_path: Path, items_path: Path, folder: Path,
                  timeout: float, n_items: int, collection_id: str) -> tuple[subprocess.Popen[bytes], int]:
    """Start ``rustac serve``; return (process, port) once /search answers with every item."""
    attempts = 3 if port == 0 else 1  # a port picked by us may be taken in between: retry
    for attempt in range(attempts):
        use_port = port or free_port(host)
        addr = f"[{host}]:{use_port}" if ":" in host else f"{host}:{use_port}"
        err_path = folder / f"rustac-{use_port}.stderr"
        cmd = [*rustac_command(), "serve", "--addr", addr, str(coll_path), str(items_path)]
        log.debug("starting %s", " ".join(cmd))
        with open(err_path, "wb") as err, open(folder / f"rustac-{use_port}.stdout", "wb") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=err, stdin=subprocess.DEVNULL)
        url = _url(host, use_port)
        try:
            _wait_for_api(proc, url, timeout, n_items, collection_id)
            return proc, use_port
        except BaseException as exc:  # an error, or a stop signal while waiting: never orphan it
            _stop_process(proc)
            if not isinstance(exc, ServerError):
                raise
            stderr = _stderr_tail(err_path)
            if "in use" in stderr.lower():
                if attempt + 1 < attempts:
                    continue
                raise _in_use_error(host, use_port, "STAC API", "`stac_port`") from exc
            raise ServerError(f"{exc} rustac said: {stderr or '(nothing)'}") from exc
    raise AssertionError("unreachable")  # pragma: no cover


def _wait_for_api(proc: subprocess.Popen[bytes], url: str, timeout: float, n_items: int,
                  collection_id: str) -> None:
    """Poll ``url`` until the landing page and a search answer, or fail clearly."""
    deadline = time.monotonic() + timeout
    last_error = "no answer"
    search = f"{url}/search?collections={collection_id}&limit={max(n_items, 1)}"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServerError(f"`rustac serve` exited with code {proc.returncode} before answering on {url}.")
        try:
            landing = _get_json(f"{url}/", timeout=2)
            found = _get_json(search, timeout=5)
            if landing.get("type") == "Catalog" and len(found.get("features", [])) == n_items:
                return
            last_error = f"search returned {len(found.get('features', []))} of {n_items} items"
        except (urllib.error.URLError, ConnectionError, TimeoutError, ValueError, OSError) as exc:
            last_error = str(exc)
        time.sleep(0.1)
    raise ServerError(f"The STAC API (`rustac serve`) did not answer on {url} within {timeout:g} s "
                      f"({last_error}). Check that rustac works (`rustac serve --help`).")
