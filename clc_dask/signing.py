"""Signing asset URLs where and when they are read, with tokens renewed before they expire.

Some catalogs hand out asset URLs that must be signed before they can be read: Planetary
Computer's blobs need a SAS token (about an hour long) in the query string. A token put on
the items when a search runs has expired long before the last tile of a country run is
read, so clc-dask never stores signed URLs:

* items keep their **unsigned** hrefs and name their signer in the property
  :data:`SIGNER_FIELD` (``"planetary-computer"``); :func:`clc_dask.search.search_items` sets
  it, saved item collections keep it;
* the reader (:class:`clc_dask.load.RetryingReader`, on the Dask worker) signs the URL each
  time it opens the asset, with a per-process token cache that renews a token
  ``renew_before`` seconds before it expires;
* a signature the server refuses (HTTP 403: expired, revoked) is dropped, the URL signed
  again and the read retried (a bounded number of times).

A signer is any picklable callable that returns ``url`` signed (:class:`UrlSigner`); it
travels to the workers inside the task graph, so it must hold no token itself — tokens live
in the worker's cache. It may also have ``invalidate(signed_url)``, called when the server
refused that URL, to forget the cached credential it carries. Signers are found by name
(:func:`named_signer`); :func:`register_signer` adds one for another catalog.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol, runtime_checkable
from urllib.parse import urlparse, urlsplit

import pystac

from clc_dask.errors import ConfigError
from clc_dask.redact import unsigned_url

log = logging.getLogger(__name__)

#: Item property (and item-collection field) naming the signer of an item's asset URLs.
SIGNER_FIELD = "clc_dask:signer"
PC_SIGNER = "planetary-computer"
#: Seconds before a token's expiry at which it is renewed (at most half its lifetime).
DEFAULT_RENEW_BEFORE = 300.0
#: Query parameters that make a URL signed (Azure SAS, S3 and GCS presigned URLs).
BLOB_STORAGE_DOMAIN = ".blob.core.windows.net"


@runtime_checkable
class UrlSigner(Protocol):
    """Returns a URL signed for reading (unchanged when it needs no signature)."""

    def __call__(self, url: str) -> str: ...


# --------------------------------------------------------------------------- URLs


def is_blob_url(href: str) -> bool:
    """True for an Azure Blob Storage URL (the kind Planetary Computer signs)."""
    return urlsplit(href).netloc.endswith(BLOB_STORAGE_DOMAIN)


# --------------------------------------------------------------------------- items


def item_signer_name(item: pystac.Item) -> str | None:
    """The name of the signer ``item``'s asset URLs need (None: read them as they are)."""
    name = item.properties.get(SIGNER_FIELD)
    return str(name) if name else None


def mark_signer(items: Iterable[pystac.Item], name: str | None) -> list[pystac.Item]:
    """``items`` (changed in place) with their signer named, or unnamed for ``None``."""
    out = list(items)
    for item in out:
        if name:
            item.properties[SIGNER_FIELD] = name
        else:
            item.properties.pop(SIGNER_FIELD, None)
    return out


def signer_name_of(items: Sequence[pystac.Item]) -> str | None:
    """The one signer named by ``items`` (None when none is).

    Raises:
        ConfigError: the items name different signers.
    """
    names = sorted({n for n in (item_signer_name(i) for i in items) if n})
    if len(names) > 1:
        raise ConfigError(
            f"The items name different URL signers ({', '.join(names)}): load the scenes of one "
            "catalog at a time, or pass `sign`."
        )
    return names[0] if names else None


# --------------------------------------------------------------------------- registry


def planetary_computer_signer(renew_before: float = DEFAULT_RENEW_BEFORE) -> PlanetaryComputerSigner:
    """The Planetary Computer signer (needs the optional ``planetary-computer`` package)."""
    return PlanetaryComputerSigner(renew_before)


_SIGNERS: dict[str, Callable[[], UrlSigner]] = {PC_SIGNER: planetary_computer_signer}


def register_signer(name: str, factory: Callable[[], UrlSigner]) -> None:
    """Make ``factory()`` the signer of items naming ``name`` (e.g. another catalog's).

    The signer it returns is pickled into the task graph: make it a module-level class or
    function that holds no token (cache tokens per process, as :class:`PlanetaryComputerSigner`
    does).
    """
    _SIGNERS[name] = factory


def named_signer(name: str) -> UrlSigner:
    """The signer registered as ``name``.

    Raises:
        ConfigError: no signer has that name, or its package is missing.
    """
    factory = _SIGNERS.get(name)
    if factory is None:
        raise ConfigError(
            f"Unknown URL signer {name!r}: use one of {', '.join(sorted(_SIGNERS))} for `sign`, "
            "or register it with clc_dask.signing.register_signer."
        )
    return factory()


def resolve_signer(sign: UrlSigner | str | bool | None, items: Sequence[pystac.Item]) -> UrlSigner | None:
    """The signer to read ``items`` with.

    Args:
        sign: None or True: the signer the items name (True: they must name one); False: none
            (URLs are read as they are); a name; or a :class:`UrlSigner`.
        items: the items to read.
    """
    if sign is False:
        return None
    if callable(sign):
        return sign  # type: ignore[return-value]
    if isinstance(sign, str):
        return named_signer(sign)
    name = signer_name_of(items)
    if name is None and sign is True:
        raise ConfigError("`sign` is True but the items name no URL signer: pass its name "
                          f"(e.g. {PC_SIGNER!r}).")
    return None if name is None else named_signer(name)


def invalidate(signer: UrlSigner, signed_url: str) -> None:
    """Tell ``signer`` that the server refused ``signed_url`` (if it can forget tokens)."""
    forget = getattr(signer, "invalidate", None)
    if callable(forget):
        forget(signed_url)


def signer_label(signer: UrlSigner) -> str:
    """A name for ``signer`` in messages."""
    return str(getattr(signer, "name", None) or getattr(signer, "__name__", None) or type(signer).__name__)


# --------------------------------------------------------------------------- Planetary Computer


class PlanetaryComputerSigner:
    """Signs Azure Blob URLs with Planetary Computer SAS tokens, cached per process.

    The ``planetary-computer`` package fetches the tokens (its SAS endpoint and subscription
    key come from its settings: ``PC_SDK_SAS_URL``, ``PC_SDK_SUBSCRIPTION_KEY``) and holds
    them in its token cache (one per storage container); this signer decides when to renew
    one: ``renew_before`` seconds before it expires, or at half its lifetime for tokens
    shorter than twice that. URLs outside Azure Blob Storage are returned unchanged, like
    ``planetary_computer.sign`` does. The signer holds no token, so it can travel to Dask
    workers in the task graph; each worker process keeps its own cache.

    Args:
        renew_before: seconds before expiry at which a cached token is replaced (default 5
            minutes: longer than a slow read, shorter than a token's life).
    """

    name = PC_SIGNER

    def __init__(self, renew_before: float = DEFAULT_RENEW_BEFORE) -> None:
        if not renew_before >= 0:
            raise ConfigError(f"`renew_before` must be a number of seconds ≥ 0, not {renew_before}.")
        _planetary_computer()  # a missing package is a clear error before anything is read
        self.renew_before = float(renew_before)

    def __call__(self, url: str) -> str:
        """``url`` signed with a token valid for at least the renewal margin."""
        if not _signable(url):
            return url
        base = unsigned_url(url)
        token = self._token(*_account_container(base))
        return str(token.sign(base).href)

    def invalidate(self, signed_url: str) -> None:
        """Forget the cached token ``signed_url`` carries (the server refused it); a newer
        token already in the cache is kept."""
        if not _signable(signed_url):
            return
        key = _token_url(*_account_container(signed_url))
        sas = _planetary_computer().sas
        with _TOKEN_LOCK:
            cached = sas.TOKEN_CACHE.get(key)
            if cached is not None and cached.token == urlsplit(signed_url).query:
                del sas.TOKEN_CACHE[key]
                log.info("dropped the refused SAS token of %s", key)

    def _token(self, account: str, container: str) -> Any:
        sas = _planetary_computer().sas
        key = _token_url(account, container)
        with _TOKEN_LOCK:
            token = sas.TOKEN_CACHE.get(key)
            margin = min(self.renew_before, _LIFETIMES.get(key, math.inf) / 2)
            if token is None or token.ttl() <= margin:
                sas.TOKEN_CACHE.pop(key, None)  # so that get_token asks the service
                token = sas.get_token(account, container)
                _LIFETIMES[key] = token.ttl()
                log.info("new SAS token for %s/%s, valid for %.0f s", account, container, token.ttl())
            return token

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PlanetaryComputerSigner) and other.renew_before == self.renew_before

    def __hash__(self) -> int:
        return hash((PC_SIGNER, self.renew_before))

    def __repr__(self) -> str:
        return f"PlanetaryComputerSigner(renew_before={self.renew_before:g})"

    def __dask_tokenize__(self) -> tuple[str, float]:
        return (PC_SIGNER, self.renew_before)


def forget_tokens() -> None:
    """Forget every Planetary Computer token cached in this process (and the SAS endpoint
    read from the settings), e.g. after changing ``PC_SDK_SAS_URL`` or the subscription key."""
    pc = _planetary_computer()
    with _TOKEN_LOCK:
        pc.sas.TOKEN_CACHE.clear()
        _LIFETIMES.clear()
    pc.settings.Settings.get.cache_clear()


#: Token lifetimes (seconds, as issued) by token request URL, for the renewal margin.
_LIFETIMES: dict[str, float] = {}
_TOKEN_LOCK = threading.Lock()
#: Public blobs Planetary Computer never signs (as ``planetary_computer.sign_url``).
_PUBLIC_ACCOUNTS = frozenset({"ai4edatasetspublicassets"})


def _planetary_computer() -> Any:
    try:
        import planetary_computer
        import planetary_computer.sas
        import planetary_computer.settings
        import planetary_computer.utils
    except ImportError:
        raise ConfigError(
            "Planetary Computer asset URLs must be signed, which needs the 'planetary-computer' "
            "package: pip install 'clc-dask[pc]' (or pass sign=False / another signer)."
        ) from None
    return planetary_computer


def _signable(url: str) -> bool:
    netloc = urlsplit(url).netloc
    return netloc.endswith(BLOB_STORAGE_DOMAIN) and netloc.split(".")[0] not in _PUBLIC_ACCOUNTS


def _account_container(url: str) -> tuple[str, str]:
    account, container = _planetary_computer().utils.parse_blob_url(urlparse(url))
    return str(account), str(container)


def _token_url(account: str, container: str) -> str:
    """The key of ``planetary_computer.sas.TOKEN_CACHE`` (its token request URL)."""
    settings = _planetary_computer().settings.Settings.get()
    return f"{settings.sas_url}/{account}/{container}"
