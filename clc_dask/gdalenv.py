"""GDAL settings for reading Sentinel-2 COGs from object storage (and local catalogs).

GDAL does not retry HTTP by default and its defaults are tuned for local files. The
defaults here retry throttled/failed requests, time out stalled ones, merge range requests
and skip directory listings on open (``GDAL_DISABLE_READDIR_ON_OPEN=EMPTY_DIR``), which is
right for COGs in buckets. Every option can be changed:

1. the defaults below (:data:`DEFAULT_GDAL_OPTIONS`),
2. overridden by the same variable in the process environment
   (``export GDAL_DISABLE_READDIR_ON_OPEN=NO``), which is how GDAL users expect to set them,
3. overridden by explicit options per call (``gdal_env({"GDAL_HTTP_MAX_RETRY": "10"})``,
   ``clc-dask mosaic --gdal KEY=VALUE``).

Catalogs whose georeference lives in ``.aux.xml`` sidecars (e.g. rasters re-encoded as
JPEG2000 without embedded georeferencing) need ``GDAL_DISABLE_READDIR_ON_OPEN=NO``:
with ``EMPTY_DIR`` GDAL never sees the sidecar and the raster has no CRS.

GDAL remembers what it learned about a ``/vsicurl/`` URL (its size, downloaded blocks, a
failed first request) for the life of the process. :func:`clear_cached_url` forgets it, so
that a retry after a dropped connection really asks the server again.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os
import re
from collections.abc import Callable, Iterable, Mapping

from stackstac import LayeredEnv

from clc_dask.errors import ConfigError

log = logging.getLogger(__name__)

#: Options applied whenever GDAL opens or reads an asset.
DEFAULT_GDAL_OPTIONS: dict[str, str] = {
    # Retry HTTP 429 and 5xx (GDAL honours Retry-After and doubles the delay each time).
    "GDAL_HTTP_MAX_RETRY": "5",
    "GDAL_HTTP_RETRY_DELAY": "1",  # seconds before the first retry
    "GDAL_HTTP_TIMEOUT": "60",  # seconds for a whole request
    "GDAL_HTTP_CONNECTTIMEOUT": "20",  # seconds to connect
    # Do not list the "directory" (a bucket prefix) on open; COGs need no sidecars.
    "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR",
    # Fetch the COG header in one request, and merge neighbouring tile ranges.
    "GDAL_INGESTED_BYTES_AT_OPEN": "32768",
    "GDAL_HTTP_MULTIRANGE": "YES",
    "GDAL_HTTP_MERGE_CONSECUTIVE_RANGES": "YES",
    "CPL_VSIL_CURL_CACHE_SIZE": str(128 * 1024 * 1024),  # bytes of /vsicurl/ cache per process
}

#: Extra options while opening (cache the header requests, so re-opens per thread are cheap).
OPEN_OPTIONS: dict[str, str] = {"VSI_CACHE": "TRUE"}
#: Extra options while reading pixels (don't let pixel data evict the cached headers).
READ_OPTIONS: dict[str, str] = {"VSI_CACHE": "FALSE"}

_KEY = re.compile(r"^[A-Z][A-Z0-9_]*$")


def parse_gdal_options(pairs: Iterable[str]) -> dict[str, str]:
    """Parse ``KEY=VALUE`` strings (as given to ``--gdal``) into a dict of GDAL options."""
    options: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip()
        if not sep or not _KEY.match(key):
            raise ConfigError(
                f"GDAL option {pair!r} is not KEY=VALUE with an upper-case GDAL config key, "
                "e.g. `gdal` GDAL_DISABLE_READDIR_ON_OPEN=NO."
            )
        options[key] = value.strip()
    return options


def gdal_options(overrides: Mapping[str, object] | None = None) -> dict[str, str]:
    """The effective options: defaults, then the process environment, then ``overrides``."""
    options = dict(DEFAULT_GDAL_OPTIONS)
    for key in list(options) + list(OPEN_OPTIONS):
        if key in os.environ:
            options[key] = os.environ[key]
    for key, value in (overrides or {}).items():
        if not _KEY.match(str(key)):
            raise ConfigError(f"GDAL option name {key!r} is not an upper-case GDAL config key.")
        options[str(key)] = _as_text(value)
    return options


def gdal_env(overrides: Mapping[str, object] | None = None) -> LayeredEnv:
    """A stackstac :class:`~stackstac.LayeredEnv` with our defaults and ``overrides``.

    ``VSI_CACHE`` is on while opening and off while reading unless set explicitly
    (environment or ``overrides``), in which case the explicit value applies to both.
    """
    options = gdal_options(overrides)
    explicit_cache = "VSI_CACHE" in options
    open_opts = {} if explicit_cache else dict(OPEN_OPTIONS)
    read_opts = {} if explicit_cache else dict(READ_OPTIONS)
    changed = {k: v for k, v in options.items() if DEFAULT_GDAL_OPTIONS.get(k) != v}
    if changed:
        log.info("GDAL options changed from the defaults: %s", changed)
    return LayeredEnv(always=options, open=open_opts, read=read_opts)


def _as_text(value: object) -> str:
    if isinstance(value, bool):
        return "YES" if value else "NO"
    return str(value)


def clear_cached_url(url: str) -> bool:
    """Forget GDAL's cached state for ``url`` (file size, downloaded blocks, failed requests).

    Called before retrying a failed read, so that the retry sends new requests instead of
    replaying what GDAL cached (``VSICurlPartialClearCache`` of the libgdal rasterio uses).

    Args:
        url: an asset href as given to rasterio (``https://…``, ``s3://…``, ``/vsicurl/…``).

    Returns:
        True if a cache was cleared; False for local files (GDAL caches nothing for them) or
        where the GDAL function is unavailable.
    """
    path = _vsi_path(url)
    if not path.startswith("/vsi"):
        return False
    clear = _partial_clear_cache()
    if clear is None:
        log.debug("VSICurlPartialClearCache is unavailable: GDAL's cache for %s stays", path)
        return False
    clear(path.encode("utf-8"))
    return True


def _vsi_path(url: str) -> str:
    """The GDAL file name rasterio opens for ``url`` (``https://h/f.tif`` → ``/vsicurl/https://h/f.tif``)."""
    try:
        from rasterio._path import _parse_path

        return str(_parse_path(url).as_vsi())
    except Exception:  # rasterio's private helper moved: the rules for plain HTTP(S) URLs
        return f"/vsicurl/{url}" if url.startswith(("http://", "https://")) else url


@functools.cache
def _partial_clear_cache() -> Callable[[bytes], None] | None:
    """``VSICurlPartialClearCache`` from the libgdal loaded by rasterio (None if not found).

    rasterio's extension modules link libgdal, so the symbol resolves through them; a
    separately installed libgdal would have a cache of its own and is only a fallback.
    """
    import rasterio._env

    for library in (rasterio._env.__file__, ctypes.util.find_library("gdal")):
        if not library:
            continue
        try:
            function = ctypes.CDLL(library).VSICurlPartialClearCache
        except (OSError, AttributeError):
            continue
        function.argtypes = [ctypes.c_char_p]
        function.restype = None
        return function  # type: ignore[no-any-return]
    return None
