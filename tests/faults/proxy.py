"""A loopback HTTP proxy that injects faults, for testing what clc-dask does when servers fail.

:class:`FaultProxy` listens on one loopback port per upstream server (e.g. the demo's STAC API
and its COG file server) and forwards every request to it. At the rates it is given, it
answers instead with

* ``429`` Too Many Requests, with a ``Retry-After`` header,
* ``500`` Internal Server Error or ``503`` Service Unavailable,
* a connection reset (TCP RST before any answer),
* a short body: the upstream's status and headers with the full ``Content-Length``, then only
  half of the body before the connection is closed,
* a slow answer: nothing for ``slow_seconds`` (longer than the client's timeout), then the
  upstream's answer.

Whether a request gets a fault is decided from the seed, the request (upstream, method,
path, ``Range``, a digest of its body) and how many times that same request was seen before,
so a run injects the same faults whichever thread sends which request first; a retried
request draws again. Every injected fault is counted per kind (:attr:`FaultProxy.injected`)
and every request is recorded (:attr:`FaultProxy.records`, in the order answered; ``seq``
is the order of arrival), so a test can check that faults
did happen and that retries reached the server.

Upstream URLs in text answers (JSON, HTML, XML) and ``Location`` headers are rewritten to
the proxy's URLs, and proxy URLs in request bodies back to the upstreams': STAC items served
by the API through the proxy point at the file server *through the proxy*, so every byte a
client reads passes through it. :func:`proxied_demo` puts a proxy in front of the demo
servers (``clc_dask.demo.serve_region``) and gives URLs to use in their place::

    with proxied_demo(demo_servers, {"429": 0.05, "503": 0.05, "short": 0.02}, seed=3) as demo:
        items = search_items(demo.stac_url, ...)   # assets on demo.data_url
        ...
        assert demo.proxy.injected["short"] > 0
"""

from __future__ import annotations

import hashlib
import http.client
import random
import re
import socket
import struct
import threading
from collections import Counter
from collections.abc import Collection, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

#: Kinds of fault, in the order their rates are stacked on one uniform draw.
FAULT_KINDS: tuple[str, ...] = ("429", "500", "503", "reset", "short", "slow")
#: Headers that belong to one connection, not to the message (never forwarded).
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization",
                        "te", "trailer", "trailers", "transfer-encoding", "upgrade"})
_TEXT_TYPES = ("json", "html", "xml", "text/")
_UPSTREAM_TIMEOUT = 30.0  # seconds
_POLL_SECONDS = 0.05  # how often a server checks whether it should stop


@dataclass(frozen=True)
class Record:
    """One request the proxy received and what it did with it."""

    seq: int  # arrival order at the proxy (0, 1, …)
    upstream: str  # name of the upstream server
    method: str
    path: str  # path and query
    range: str | None  # the Range header
    fault: str | None  # the kind injected, or None (forwarded as is)


class FaultProxy:
    """Forward loopback HTTP requests to upstream servers, injecting faults at set rates.

    Args:
        upstreams: name → base URL of each upstream (``{"stac": "http://127.0.0.1:7822"}``).
        rates: probability per request of each fault kind (see :data:`FAULT_KINDS`); their sum
            must not exceed 1. Kinds left out never happen.
        seed: seed of the fault draws (same seed and requests: same faults).
        faulty: names of the upstreams whose answers may be faulted (default: all).
        retry_after: seconds sent in the ``Retry-After`` header of 429 answers.
        slow_seconds: how long a slow answer waits before it comes; make it longer than the
            client's timeout.
        host: loopback address to listen on.
    """

    def __init__(self, upstreams: Mapping[str, str], rates: Mapping[str, float] | None = None,
                 seed: int = 0, *, faulty: Collection[str] | None = None, retry_after: int = 0,
                 slow_seconds: float = 3.0, host: str = "127.0.0.1") -> None:
        unknown = set(rates or {}) - set(FAULT_KINDS)
        if unknown:
            raise ValueError(f"unknown fault kind(s) {sorted(unknown)}: use {FAULT_KINDS}")
        if any(r < 0 for r in (rates or {}).values()) or sum((rates or {}).values()) > 1:
            raise ValueError(f"fault rates {dict(rates or {})} must be ≥ 0 and add up to ≤ 1")
        self.upstreams = {name: url.rstrip("/") for name, url in upstreams.items()}
        self.rates = {kind: float((rates or {}).get(kind, 0.0)) for kind in FAULT_KINDS}
        self.seed = seed
        self.faulty = set(self.upstreams if faulty is None else faulty)
        self.retry_after = retry_after
        self.slow_seconds = slow_seconds
        self.host = host
        self.injected: Counter[str] = Counter()
        self.records: list[Record] = []
        self._seen: Counter[tuple[str, ...]] = Counter()
        self._arrivals = 0
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._servers: dict[str, _ProxyServer] = {}
        self._threads: list[threading.Thread] = []

    # --- lifecycle ------------------------------------------------------------------------
    def start(self) -> FaultProxy:
        """Listen on a free loopback port per upstream (threads serve the requests)."""
        for name in self.upstreams:
            server = _ProxyServer((self.host, 0), _ProxyHandler, self, name)
            thread = threading.Thread(target=server.serve_forever, args=(_POLL_SECONDS,),
                                      name=f"fault-proxy-{name}", daemon=True)
            thread.start()
            self._servers[name] = server
            self._threads.append(thread)
        return self

    def close(self) -> None:
        """Stop listening; answers waiting to be slow are cut short."""
        self._stopping.set()
        for server in self._servers.values():
            server.shutdown()
            server.server_close()
        for thread in self._threads:
            thread.join(timeout=5)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- what tests use -------------------------------------------------------------------
    def url(self, name: str) -> str:
        """The proxy's base URL standing for upstream ``name``."""
        host, port = self._servers[name].server_address[:2]
        return f"http://{host}:{port}"

    def counts(self) -> dict[str, int]:
        """Injected faults per kind (every kind listed, 0 where none happened)."""
        with self._lock:
            return {kind: self.injected[kind] for kind in FAULT_KINDS}

    def requests_for(self, path_end: str, upstream: str | None = None) -> list[Record]:
        """The recorded requests whose path (without query) ends with ``path_end``."""
        with self._lock:
            found = [r for r in self.records if r.path.split("?", 1)[0].endswith(path_end)
                     and (upstream is None or r.upstream == upstream)]
        return sorted(found, key=lambda r: r.seq)

    # --- used by the handler ----------------------------------------------------------------
    def draw(self, name: str, method: str, path: str, range_: str | None, body: bytes) -> str | None:
        """The fault for this request (None: forward it), from the seed and the request."""
        key = (name, method, path, range_ or "", hashlib.sha256(body).hexdigest()[:16])
        with self._lock:
            occurrence = self._seen[key]
            self._seen[key] += 1
        if name not in self.faulty:
            return None
        u = random.Random(f"{self.seed}|{'|'.join(key)}|{occurrence}").random()
        for kind in FAULT_KINDS:
            u -= self.rates[kind]
            if u < 0:
                return kind
        return None

    def arrival(self) -> int:
        """The arrival number of a new request."""
        with self._lock:
            self._arrivals += 1
            return self._arrivals - 1

    def record(self, record: Record) -> None:
        with self._lock:
            self.records.append(record)
            if record.fault is not None:
                self.injected[record.fault] += 1

    def to_upstream(self, data: bytes) -> bytes:
        """``data`` with proxy URLs replaced by the upstreams' URLs."""
        return _replace_urls(data, {self.url(name): url for name, url in self.upstreams.items()})

    def to_proxy(self, data: bytes) -> bytes:
        """``data`` with upstream URLs replaced by the proxy's URLs."""
        return _replace_urls(data, {url: self.url(name) for name, url in self.upstreams.items()})

    def wait_slow(self) -> None:
        self._stopping.wait(self.slow_seconds)


def _replace_urls(data: bytes, mapping: Mapping[str, str]) -> bytes:
    """``data`` with each base URL of ``mapping`` replaced (``…:80`` never matches ``…:8000``)."""
    for old, new in mapping.items():
        data = re.sub(re.escape(old.encode()) + rb"(?![0-9])", new.encode(), data)
    return data


class _ProxyServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self, address: tuple[str, int], handler: type, proxy: FaultProxy, name: str) -> None:
        self.proxy = proxy
        self.upstream_name = name
        self.resetting: set[int] = set()  # sockets (ids) to close with a reset
        super().__init__(address, handler)

    def shutdown_request(self, request: Any) -> None:
        if id(request) in self.resetting:
            self.resetting.discard(id(request))
            request.close()  # SO_LINGER 0: the close sends RST instead of FIN
            return
        super().shutdown_request(request)


@dataclass
class _Answer:
    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes


class _ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _ProxyServer

    def do_GET(self) -> None:  # noqa: N802 - http.server naming
        self._handle()

    def do_HEAD(self) -> None:  # noqa: N802 - http.server naming
        self._handle()

    def do_POST(self) -> None:  # noqa: N802 - http.server naming
        self._handle()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - base class signature
        pass

    def _handle(self) -> None:
        proxy, name = self.server.proxy, self.server.upstream_name
        seq = proxy.arrival()
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        range_ = self.headers.get("Range")
        fault = proxy.draw(name, self.command, self.path, range_, body)
        if fault == "short" and self.command == "HEAD":
            fault = None  # no body to cut short
        if fault in ("429", "500", "503", "reset"):
            proxy.record(Record(seq, name, self.command, self.path, range_, fault))
            self._reset() if fault == "reset" else self._send_status(int(fault))  # type: ignore[arg-type]
            return
        if fault == "slow":
            proxy.wait_slow()
        try:
            answer = self._forward(proxy.upstreams[name], body)
        except OSError as exc:
            proxy.record(Record(seq, name, self.command, self.path, range_, fault))
            self._send_status(502, f"upstream {name} failed: {exc}")
            return
        if fault == "short" and len(answer.body) < 2:
            fault = None
        # recorded before answering: a client that has its answer finds it counted
        proxy.record(Record(seq, name, self.command, self.path, range_, fault))
        self._send_answer(answer, short=fault == "short")

    def _forward(self, base: str, body: bytes) -> _Answer:
        proxy = self.server.proxy
        target = urlsplit(base)
        conn = http.client.HTTPConnection(target.hostname, target.port, timeout=_UPSTREAM_TIMEOUT)
        try:
            headers = {k: v for k, v in self.headers.items()
                       if k.lower() not in HOP_BY_HOP | {"host", "accept-encoding", "content-length"}}
            headers["Host"] = target.netloc
            headers["Accept-Encoding"] = "identity"  # bodies are rewritten: no compression
            data = proxy.to_upstream(body)
            if data or self.command == "POST":
                headers["Content-Length"] = str(len(data))
            conn.request(self.command, target.path + self.path, body=data or None, headers=headers)
            resp = conn.getresponse()
            payload = resp.read()
            out = [(k, v) for k, v in resp.getheaders() if k.lower() not in HOP_BY_HOP]
        finally:
            conn.close()
        content_type = resp.getheader("Content-Type", "")
        if any(t in content_type for t in _TEXT_TYPES):
            payload = proxy.to_proxy(payload)
        out = [(k, proxy.to_proxy(v.encode()).decode() if k.lower() == "location" else v)
               for k, v in out]
        if self.command != "HEAD":  # a HEAD answer keeps the upstream's Content-Length
            out = [(k, v) for k, v in out if k.lower() != "content-length"]
            out.append(("Content-Length", str(len(payload))))
        return _Answer(resp.status, resp.reason, out, payload)

    def _send_answer(self, answer: _Answer, short: bool) -> None:
        try:
            self.send_response(answer.status, answer.reason)
            for key, value in answer.headers:
                self.send_header(key, value)
            self.end_headers()
            if self.command == "HEAD":
                return
            if short:  # the full length was promised; send half, then hang up
                self.wfile.write(answer.body[: len(answer.body) // 2])
                self.wfile.flush()
                self.close_connection = True
                return
            self.wfile.write(answer.body)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (slow answers)
            self.close_connection = True

    def _send_status(self, status: int, text: str | None = None) -> None:
        body = (text or http.client.responses.get(status, "error")).encode()
        try:
            self.send_response(status)
            if status == 429:
                self.send_header("Retry-After", str(self.server.proxy.retry_after))
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _reset(self) -> None:
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.server.resetting.add(id(self.connection))
        self.close_connection = True


# --- in front of the demo servers ---------------------------------------------------------------

@dataclass(frozen=True)
class ProxiedDemo:
    """The demo servers seen through a :class:`FaultProxy`: use these URLs in their place."""

    stac_url: str
    data_url: str
    collection_id: str
    proxy: FaultProxy


@contextmanager
def proxied_demo(servers: Any, rates: Mapping[str, float] | None = None, seed: int = 0,
                 **options: Any) -> Iterator[ProxiedDemo]:
    """A :class:`FaultProxy` in front of running demo servers (``serve_region``'s
    ``DemoServers``: ``.stac_url``, ``.data_url``, ``.collection_id``).

    The STAC API's answers come back with the file server's URL rewritten to the proxy's,
    so items found through :attr:`ProxiedDemo.stac_url` are read through the proxy too.
    ``options`` go to :class:`FaultProxy` (``faulty=("data",)``, ``slow_seconds`` …).
    """
    upstreams = {"stac": servers.stac_url, "data": servers.data_url}
    with FaultProxy(upstreams, rates, seed, **options) as proxy:
        yield ProxiedDemo(proxy.url("stac"), proxy.url("data"), servers.collection_id, proxy)
