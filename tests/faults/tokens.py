"""Expiring credentials on loopback: a SAS token service and a blob server that checks tokens.

:class:`TokenService` answers like Planetary Computer's SAS endpoint
(``GET {sas_url}/{account}/{container}`` → ``{"msft:expiry": …, "token": "st=…&se=…&sig=…"}``)
with tokens that expire after ``lifetime`` seconds; it counts and remembers every token it
issued. Point the ``planetary-computer`` package at it with ``PC_SDK_SAS_URL`` (its
settings are cached: clear ``Settings.get``).

:class:`BlobServer` stands for ``http://{account}.blob.core.windows.net/{container}/…``: it is
an HTTP proxy (GDAL's ``GDAL_HTTP_PROXY``) that serves a local folder (the demo region's
COGs, with HEAD and byte ranges) only to requests carrying a token the service issued for
that container and that has not expired; others get Azure's ``403 AuthenticationFailed``.
Every refusal is counted by reason (``missing``, ``unknown``, ``expired``, ``revoked``), every
authorised request by token;
``revoke_every=n`` revokes the token of every n-th authorised request (that request is
refused), so that a refused, not yet expired token happens at a known point; ``delay``
slows every answer, so that a short run outlasts a token.
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

from clc_dask.demo.servers import RangeRequestHandler, RequestStats

_POLL_SECONDS = 0.05
_SIG_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


@dataclass
class Token:
    """One issued token."""

    account: str
    container: str
    sig: str
    query: str  # the whole token, as appended to URLs
    expires: float  # time.time() seconds
    revoked: bool = False


class TokenService:
    """A loopback SAS token endpoint issuing tokens that expire after ``lifetime`` seconds.

    Args:
        lifetime: seconds each token is valid.
        seed: seed of the token signatures (the same seed issues the same signatures).
    """

    def __init__(self, lifetime: float, seed: int = 0) -> None:
        self.lifetime = lifetime
        self.tokens: list[Token] = []
        self._by_sig: dict[str, Token] = {}
        self._random = random.Random(seed)
        self._lock = threading.Lock()
        self._server = _Server(("127.0.0.1", 0), _TokenHandler)
        self._server.service = self  # type: ignore[attr-defined]
        self._thread = threading.Thread(target=self._server.serve_forever, args=(_POLL_SECONDS,),
                                        name="token-service", daemon=True)

    @property
    def sas_url(self) -> str:
        """The endpoint to give as ``PC_SDK_SAS_URL``."""
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/api/sas/v1/token"

    @property
    def issued(self) -> int:
        with self._lock:
            return len(self.tokens)

    def issue(self, account: str, container: str) -> Token:
        """A new token for ``container`` of ``account``."""
        now = time.time()
        with self._lock:
            sig = "".join(self._random.choice(_SIG_ALPHABET) for _ in range(43)) + "="
            start, expiry = _iso(now - 1), _iso(now + self.lifetime)
            query = (f"st={quote(start)}&se={quote(expiry)}&sp=rl&sv=2024-05-04&sr=c"
                     f"&skoid={len(self.tokens):08d}&sig={quote(sig, safe='')}")
            token = Token(account, container, sig, query, now + self.lifetime)
            self.tokens.append(token)
            self._by_sig[sig] = token
        return token

    def token_of(self, query: str) -> Token | None:
        """The issued token a query string carries (None: none of ours)."""
        sig = parse_qs(query).get("sig", [None])[0]
        with self._lock:
            return None if sig is None else self._by_sig.get(sig)

    def check(self, query: str, account: str, container: str) -> str | None:
        """Why a request with this query is refused (None: it may be served)."""
        if "sig" not in parse_qs(query):
            return "missing"
        token = self.token_of(query)
        if token is None or (token.account, token.container) != (account, container):
            return "unknown"
        if token.revoked:
            return "revoked"
        if time.time() >= token.expires:
            return "expired"
        return None

    def revoke(self, query: str) -> None:
        sig = parse_qs(query).get("sig", [None])[0]
        with self._lock:
            if sig in self._by_sig:
                self._by_sig[sig].revoked = True

    def start(self) -> TokenService:
        self._thread.start()
        return self

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> TokenService:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False


class _TokenHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802 - http.server naming
        service: TokenService = self.server.service  # type: ignore[attr-defined]
        parts = urlsplit(self.path).path.strip("/").split("/")
        if len(parts) != 6 or parts[:4] != ["api", "sas", "v1", "token"]:
            self._send(404, {"detail": "not found"})
            return
        token = service.issue(parts[4], parts[5])
        self._send(200, {"msft:expiry": _iso(token.expires), "token": token.query})

    def _send(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - base class signature
        pass


class BlobServer:
    """``http://{account}.blob.core.windows.net/{container}/PATH`` served from ``root/PATH``
    to requests with a valid token of ``service`` (an HTTP proxy: set ``GDAL_HTTP_PROXY``).

    Args:
        root: the folder served.
        service: the token service whose tokens are accepted.
        account, container: the blob URL's storage account and container.
        delay: seconds each authorised answer waits before it comes.
        revoke_every: revoke the token of every n-th authorised request, which is refused.
    """

    def __init__(self, root: Path, service: TokenService, account: str = "demoaccount",
                 container: str = "demo", *, delay: float = 0.0, revoke_every: int | None = None) -> None:
        self.service = service
        self.account = account
        self.container = container
        self.delay = delay
        self.revoke_every = revoke_every
        self.refused: Counter[str] = Counter()
        self.served = 0
        self.served_by_token: Counter[str] = Counter()  # authorised requests per token signature
        self._lock = threading.Lock()
        self._server = _Server(("127.0.0.1", 0), _BlobHandler)
        self._server.root = Path(root).resolve()  # type: ignore[attr-defined]
        self._server.stats = RequestStats()  # type: ignore[attr-defined]
        self._server.blob = self  # type: ignore[attr-defined]
        self._thread = threading.Thread(target=self._server.serve_forever, args=(_POLL_SECONDS,),
                                        name="blob-server", daemon=True)

    @property
    def host(self) -> str:
        return f"{self.account}.blob.core.windows.net"

    @property
    def proxy(self) -> str:
        """``host:port`` to give GDAL as ``GDAL_HTTP_PROXY``."""
        host, port = self._server.server_address[:2]
        return f"{host}:{port}"

    def url_for(self, path: Path) -> str:
        """The blob URL of a file under ``root``."""
        rel = Path(path).resolve().relative_to(self._server.root).as_posix()  # type: ignore[attr-defined]
        return f"http://{self.host}/{self.container}/{quote(rel)}"

    def authorise(self, url: str) -> str | None:
        """Why the request for ``url`` is refused (None: serve it); counts the outcome."""
        parts = urlsplit(url)
        if parts.netloc != self.host or not parts.path.startswith(f"/{self.container}/"):
            reason: str | None = "unknown"
        else:
            reason = self.service.check(parts.query, self.account, self.container)
        with self._lock:
            if reason is None:
                self.served += 1
                self.served_by_token[self.service.token_of(parts.query).sig] += 1  # type: ignore[union-attr]
                if self.revoke_every and self.served % self.revoke_every == 0:
                    self.service.revoke(parts.query)
                    reason = "revoked"
            if reason is not None:
                self.refused[reason] += 1
        return reason

    def start(self) -> BlobServer:
        self._thread.start()
        return self

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> BlobServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


_AUTH_FAILED = ('<?xml version="1.0" encoding="utf-8"?><Error><Code>AuthenticationFailed</Code>'
                "<Message>Server failed to authenticate the request. Make sure the value of "
                "Authorization header is formed correctly including the signature.</Message>"
                "<AuthenticationErrorDetail>{detail}</AuthenticationErrorDetail></Error>")
_DETAILS = {"missing": "Signature not present", "unknown": "Signature did not match",
            "expired": "Signature not valid in the specified time frame",
            "revoked": "Signature was revoked"}


class _BlobHandler(RangeRequestHandler):
    def _serve(self, head: bool) -> None:
        blob: BlobServer = self.server.blob  # type: ignore[attr-defined]
        reason = blob.authorise(self.path)
        if reason is not None:
            body = _AUTH_FAILED.format(detail=_DETAILS[reason]).encode()
            self.send_response(403, "Server failed to authenticate the request")
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not head:
                self.wfile.write(body)
            return
        if blob.delay:
            time.sleep(blob.delay)
        self.path = urlsplit(self.path).path.removeprefix(f"/{blob.container}")
        super()._serve(head)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - base class signature
        pass
