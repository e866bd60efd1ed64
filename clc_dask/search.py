"""STAC search: Sentinel-2 L2A scenes for an area, a season (or dates) and a cloud limit.

A *source* is one of

* a preset: ``earth-search`` (Earth Search v1, ``sentinel-2-l2a``) or
  ``planetary-computer`` (``sentinel-2-l2a``; asset URLs signed with the optional
  ``planetary-computer`` package),
* any STAC API URL (its landing page says which filter extensions it conforms to),
* a static catalog or collection JSON (path or URL; items are walked and filtered here),
* an item-collection JSON (e.g. one saved by :func:`save_item_collection`).

Cloud cover is filtered on the server where the API conforms to ``query`` or ``filter``
(CQL2) and always again on the client: servers that do not conform (rustac's memory
backend, for one) silently return unfiltered items. Every page is followed; HTTP 429 and
5xx are retried with exponential backoff honouring ``Retry-After``; every request has a
timeout. Relative asset hrefs are made absolute, so results can be saved and reused offline.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse, urlunparse

import geopandas as gpd
import pystac
import requests
import shapely.geometry
from pystac.utils import make_absolute_href
from pystac_client import ItemSearch
from pystac_client.exceptions import APIError
from pystac_client.stac_api_io import StacApiIO
from shapely.geometry.base import BaseGeometry
from urllib3.exceptions import MaxRetryError
from urllib3.util.retry import Retry

from clc_dask import __version__
from clc_dask.errors import ConfigError, InputError, SearchError
from clc_dask.redact import public_url, redact_text
from clc_dask.seasons import Interval, format_interval, parse_interval, season_intervals
from clc_dask.stores import atomic_path

log = logging.getLogger(__name__)

builtin_datetime = datetime  # ``search_items`` has an argument called ``datetime``
CloudFilter = Literal["auto", "filter", "query", "client"]
Signer = Callable[[pystac.Item], "pystac.Item | None"]

#: HTTP statuses retried (throttling and server errors).
RETRY_STATUSES = (429, 500, 502, 503, 504)
#: Item-collection field naming the signer whose tokens were stripped on save.
SIGNER_FIELD = "clc_dask:signer"
PC_SIGNER = "planetary-computer"


@dataclass(frozen=True)
class CatalogPreset:
    """A STAC API we know: its root URL, default collection, cloud filter and URL signer."""

    name: str
    url: str
    collection: str
    #: Server-side cloud filter known to work there (Earth Search v1 advertises only
    #: ``query`` and ignores CQL2 ``filter``; Planetary Computer's pgstac does CQL2).
    cloud_filter: Literal["query", "filter"]
    signer: str | None = None


PRESETS: dict[str, CatalogPreset] = {
    "earth-search": CatalogPreset(
        "earth-search", "https://earth-search.aws.element84.com/v1", "sentinel-2-l2a", "query"
    ),
    "planetary-computer": CatalogPreset(
        "planetary-computer",
        "https://planetarycomputer.microsoft.com/api/stac/v1",
        "sentinel-2-l2a",
        "filter",
        signer=PC_SIGNER,
    ),
}


# --------------------------------------------------------------------------- areas
def read_aoi_frame(path: str | os.PathLike[str]) -> gpd.GeoDataFrame:
    """The features of an AOI vector file (GeoJSON, GeoPackage, …) in their own CRS, checked:
    the file exists and holds non-empty geometries with a CRS."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"AOI file {path} does not exist: check `aoi`.")
    try:
        frame = gpd.read_file(path)
    except Exception as exc:
        raise InputError(f"Cannot read the AOI file {path}: {exc}. Give a GeoJSON or GeoPackage.") from exc
    if frame.empty:
        raise InputError(f"AOI file {path} holds no features: give a file with the area polygon.")
    if frame.crs is None:
        raise InputError(f"AOI file {path} has no CRS: save it with one (GeoJSON is always EPSG:4326).")
    if frame.geometry.is_empty.all():
        raise InputError(f"AOI file {path} has only empty geometries.")
    return frame


def read_aoi(path: str | os.PathLike[str]) -> BaseGeometry:
    """The union of all geometries in a vector file (GeoJSON, GeoPackage, …), in lon/lat."""
    return read_aoi_frame(path).to_crs("EPSG:4326").geometry.union_all()


def as_lonlat_geometry(aoi: object) -> BaseGeometry:
    """An AOI (shapely geometry, GeoJSON mapping/Feature/FeatureCollection, odc-geo
    Geometry, or a vector file path) as a shapely geometry in lon/lat."""
    if isinstance(aoi, BaseGeometry):
        return aoi
    if isinstance(aoi, (str, os.PathLike)):
        return read_aoi(aoi)
    if hasattr(aoi, "to_crs") and hasattr(aoi, "geom"):  # odc.geo.geom.Geometry
        return aoi.to_crs("EPSG:4326").geom  # type: ignore[attr-defined,no-any-return]
    if isinstance(aoi, Mapping):
        kind = aoi.get("type")
        if kind == "FeatureCollection":
            geoms = [shapely.geometry.shape(f["geometry"]) for f in aoi.get("features", [])]
            if not geoms:
                raise InputError("The AOI FeatureCollection has no features.")
            return shapely.union_all(geoms)
        if kind == "Feature":
            return shapely.geometry.shape(aoi["geometry"])
        try:
            return shapely.geometry.shape(aoi)
        except Exception as exc:
            raise InputError(f"The AOI is not a GeoJSON geometry: {exc}.") from exc
    raise InputError(f"Cannot use {type(aoi).__name__} as an AOI: give a GeoJSON geometry or a file.")


# --------------------------------------------------------------------------- HTTP
def make_stac_io(
    timeout: float | tuple[float, float] = (10.0, 60.0),
    retries: int = 5,
    backoff: float = 1.0,
) -> StacApiIO:
    """A pystac-client I/O object whose session retries and times out.

    Args:
        timeout: seconds (connect, read), or one number for both.
        retries: attempts after the first, for connection errors, timeouts and HTTP
            429/5xx — POST searches included (urllib3 skips POST unless
            ``allowed_methods=None``) — and, separately, for answers cut short or stalled
            after their headers (which urllib3 cannot retry).
        backoff: seconds; waits grow as ``backoff × 2^n`` unless the server sends
            ``Retry-After``, which is honoured.
    """
    retry = Retry(
        total=retries,
        backoff_factor=backoff,
        status_forcelist=RETRY_STATUSES,
        allowed_methods=None,
        respect_retry_after_header=True,
        raise_on_status=True,
    )
    return RetryingStacApiIO(
        retries=retries, backoff=backoff,
        headers={"User-Agent": f"clc-dask/{__version__}"}, timeout=timeout, max_retries=retry,
    )


class RetryingStacApiIO(StacApiIO):
    """pystac-client's I/O, also retrying answers whose body was cut short or stalled.

    urllib3 retries a request until its status line and headers arrive; a connection dropped
    (or timed out) while the body is read surfaces later, inside ``requests``, and pystac-client
    turns it into an :class:`~pystac_client.exceptions.APIError`. Those are retried here, with
    exponential backoff, up to ``retries`` times; then the error names the URL (without its
    query string) and the cause.

    Args:
        retries: attempts after the first for an answer cut short.
        backoff: seconds before the first of them; doubled each time.
        **kwargs: :class:`~pystac_client.stac_api_io.StacApiIO` arguments.
    """

    def __init__(self, *, retries: int = 5, backoff: float = 1.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.retries = retries
        self.backoff = backoff

    def request(self, href: str, method: str | None = None, headers: dict[str, str] | None = None,
                parameters: dict[str, Any] | None = None) -> str:
        """Make the request; retry an answer cut short, else raise APIError."""
        attempt = 0
        while True:
            try:
                return super().request(href, method=method, headers=headers, parameters=parameters)
            except APIError as exc:
                cause = exc.__context__
                if not is_cut_short(cause):
                    raise
                reason = redact_text(_short(cause))  # type: ignore[arg-type]
                if attempt >= self.retries:
                    tried = f" after {attempt + 1} attempts" if attempt else ""
                    raise APIError(
                        f"the answer of {public_url(href)} was cut short{tried}: {reason}"
                    ) from None
                delay = self.backoff * 2**attempt
                log.warning("the answer of %s was cut short (%s); retry %d/%d in %.2f s",
                            public_url(href), reason, attempt + 1, self.retries, delay)
                time.sleep(delay)
                attempt += 1


def is_cut_short(exc: BaseException | None) -> bool:
    """True for a ``requests`` error raised while reading a body (connection dropped, body
    shorter than promised, read timeout), not for one urllib3 already retried to exhaustion."""
    if isinstance(exc, (requests.exceptions.ChunkedEncodingError,
                        requests.exceptions.ContentDecodingError)):
        return True
    if isinstance(exc, (requests.exceptions.ConnectionError, requests.exceptions.Timeout)):
        return not any(isinstance(arg, MaxRetryError) for arg in exc.args)
    return False


# --------------------------------------------------------------------------- search
def search_items(
    source: str | os.PathLike[str],
    *,
    bbox: Sequence[float] | None = None,
    aoi: object | None = None,
    datetime: str | None = None,
    season: str | None = None,
    years: Sequence[int] = (),
    max_cloud: float | None = None,
    collection: str | Sequence[str] | None = None,
    limit: int | None = 100,
    max_items: int | None = None,
    sign: Signer | bool | None = None,
    cloud_filter: CloudFilter = "auto",
    timeout: float | tuple[float, float] = (10.0, 60.0),
    retries: int = 5,
    backoff: float = 1.0,
) -> pystac.ItemCollection:
    """Find STAC items over an area and time with at most ``max_cloud`` % cloud cover.

    Args:
        source: preset name (``earth-search``, ``planetary-computer``), STAC API URL, static
            catalog/collection JSON, or item-collection JSON (path or URL).
        bbox: ``(west, south, east, north)`` in degrees. Exclusive with ``aoi``.
        aoi: area as a shapely/odc geometry, GeoJSON mapping or vector file (lon/lat).
        datetime: ``START/END`` (ISO 8601; ``..`` open). Exclusive with ``season``.
        season: ``april``/``july``/``september``/``MM-DD/MM-DD`` with ``years``, or
            ``START/END``; one search per year.
        years: calendar years for ``season``.
        max_cloud: maximum ``eo:cloud_cover`` in percent; items without it are dropped.
        collection: collection id(s); default: the preset's, else all.
        limit: items per page asked of the server (None: the server's default).
        max_items: stop after this many items came from the server (before the
            client-side safety filter); None follows every page.
        sign: a function signing one item (returns the signed item, or None after signing
            in place); None: the preset's signer (``planetary_computer.sign`` for
            ``planetary-computer``, or re-signing a saved collection that was signed);
            False: no signing.
        cloud_filter: ``auto`` (what the API conforms to: CQL2 ``filter``, else ``query``,
            else client only), or force ``filter``/``query``/``client``. The client-side
            filter always runs too.
        timeout: seconds (connect, read) per HTTP request.
        retries: HTTP retries on connection errors, 429 and 5xx (see :func:`make_stac_io`).
        backoff: seconds; base of the exponential wait between retries.

    Returns:
        The matching items (hrefs absolute; signed where a signer applies), with each
        item's datetime order kept as the server gave it.

    Raises:
        SearchError: nothing matched (the message says which filter to relax), the AOI is
            outside the catalog, or the API failed after retries.
        ConfigError: contradictory or malformed filters.
    """
    geometry = area_geometry(bbox, aoi)
    intervals = _search_intervals(datetime, season, years)
    if max_cloud is not None and not 0 <= max_cloud <= 100:
        raise ConfigError(f"max_cloud {max_cloud} must be a percentage between 0 and 100.")
    if cloud_filter not in ("auto", "filter", "query", "client"):
        raise ConfigError(f"cloud_filter {cloud_filter!r} must be auto, filter, query or client.")
    request = _Request(geometry, bbox is not None, intervals, max_cloud)
    text = str(source)
    preset = PRESETS.get(text.strip().lower())
    if preset is not None:
        collections = _as_list(collection) or [preset.collection]
        items = _search_api(preset.url, request, collections, limit, max_items, cloud_filter,
                            preset, make_stac_io(timeout, retries, backoff))
        signer_name = preset.signer
        extra: dict[str, Any] = {}
    elif text.startswith(("http://", "https://")) and not _looks_like_json_file(text):
        collections = _as_list(collection)
        items = _search_api(text.rstrip("/"), request, collections, limit, max_items,
                            cloud_filter, None, make_stac_io(timeout, retries, backoff))
        signer_name = None
        extra = {}
    else:
        collections = _as_list(collection)
        items, extra = _search_static(text, request, collections, max_items)
        signer_name = extra.get(SIGNER_FIELD)
    signer = _resolve_signer(sign, signer_name)
    if signer is not None:
        items = [_sign(signer, item) for item in items]
    result = pystac.ItemCollection(items)
    if signer is not None and signer_name:
        result.extra_fields[SIGNER_FIELD] = signer_name
    log.info("found %d item(s) in %s", len(items), text)
    return result


@dataclass(frozen=True)
class _Request:
    geometry: BaseGeometry | None
    from_bbox: bool
    intervals: list[Interval] | None
    max_cloud: float | None

    def describe(self) -> str:
        parts = []
        if self.geometry is not None:
            w, s, e, n = self.geometry.bounds
            parts.append(f"{'bbox' if self.from_bbox else 'AOI'} {w:.4f},{s:.4f},{e:.4f},{n:.4f}")
        if self.intervals:
            parts.append("datetime " + ", ".join(format_interval(i) for i in self.intervals))
        if self.max_cloud is not None:
            parts.append(f"max cloud {self.max_cloud:g}%")
        return "; ".join(parts) or "no filters"


def area_geometry(bbox: Sequence[float] | None = None, aoi: object | None = None) -> BaseGeometry | None:
    """The search area in lon/lat from a bbox ``(west, south, east, north)`` or an AOI."""
    if bbox is not None and aoi is not None:
        raise ConfigError("Give either a bbox or an AOI, not both.")
    if bbox is not None:
        if len(bbox) != 4:
            raise ConfigError(f"bbox {list(bbox)} must be west,south,east,north in degrees.")
        w, s, e, n = (float(v) for v in bbox)
        if not (-180 <= w < e <= 180 and -90 <= s < n <= 90):
            raise ConfigError(
                f"bbox {list(bbox)} is not a lon/lat box: give west,south,east,north in degrees "
                "with west < east and south < north."
            )
        return shapely.geometry.box(w, s, e, n)
    if aoi is not None:
        geom = as_lonlat_geometry(aoi)
        if not geom.is_valid:
            geom = shapely.make_valid(geom)
        return geom
    return None


def _search_intervals(datetime: str | None, season: str | None, years: Sequence[int]) -> list[Interval] | None:
    if datetime and season:
        raise ConfigError("Give either a datetime range or a season (with years), not both.")
    if season:
        return season_intervals(season, years)
    if datetime:
        if years:
            raise ConfigError("Years go with a season (april, july, …); a datetime range has its own.")
        return [parse_interval(datetime)]
    if years:
        return [(builtin_datetime(y, 1, 1, tzinfo=UTC), builtin_datetime(y, 12, 31, 23, 59, 59, tzinfo=UTC))
                for y in sorted(set(years))]
    return None


def _as_list(collection: str | Sequence[str] | None) -> list[str]:
    if collection is None:
        return []
    if isinstance(collection, str):
        return [c.strip() for c in collection.split(",") if c.strip()]
    return list(collection)


def _looks_like_json_file(url: str) -> bool:
    return urlparse(url).path.lower().endswith(".json")


# --------------------------------------------------------------------------- STAC APIs
def _search_api(
    url: str,
    request: _Request,
    collections: list[str],
    limit: int | None,
    max_items: int | None,
    cloud_filter: CloudFilter,
    preset: CatalogPreset | None,
    stac_io: StacApiIO,
) -> list[pystac.Item]:
    if preset is not None:
        search_url, method = f"{url}/search", "POST"
        server_filter = preset.cloud_filter if cloud_filter == "auto" else cloud_filter
    else:
        search_url, method, conforms = _landing(url, stac_io)
        server_filter = _choose_filter(conforms) if cloud_filter == "auto" else cloud_filter
    params: dict[str, Any] = {}
    if collections:
        params["collections"] = collections
    if request.geometry is not None:
        if request.from_bbox:
            params["bbox"] = list(request.geometry.bounds)
        else:
            params["intersects"] = shapely.geometry.mapping(request.geometry)
    if request.max_cloud is not None and server_filter == "query":
        params["query"] = {"eo:cloud_cover": {"lte": request.max_cloud}}
    elif request.max_cloud is not None and server_filter == "filter":
        params["filter"] = {"op": "lte", "args": [{"property": "eo:cloud_cover"}, request.max_cloud]}
        params["filter_lang"] = "cql2-json"
    log.info("searching %s (%s; cloud filter on the server: %s)", search_url, request.describe(),
             server_filter if request.max_cloud is not None else "none")
    received: list[dict[str, Any]] = []
    for interval in request.intervals or [None]:
        remaining = None if max_items is None else max_items - len(received)
        if remaining is not None and remaining <= 0:
            break
        search = ItemSearch(
            search_url, method=method, stac_io=stac_io, client=None, limit=limit,
            max_items=remaining, datetime=None if interval is None else format_interval(interval),
            **params,
        )
        try:
            for page in search.pages_as_dicts():
                received.extend(page.get("features", []))
        except APIError as exc:
            raise SearchError(
                f"The STAC API search at {search_url} failed: {_short(exc)}. Retries on 429/5xx "
                "were exhausted or the request was refused: check the URL, the collection "
                f"({', '.join(collections) or 'all'}) and the filters, or try again later."
            ) from None
    items = _unique([_parse_item(d) for d in received])
    log.info("the server returned %d item(s)", len(items))
    kept, report = filter_items(items, request.geometry, request.intervals, request.max_cloud,
                                collections)
    if len(kept) < len(items):
        log.warning("dropped %d item(s) the server should have filtered out (%s)",
                    len(items) - len(kept), report)
    if not kept:
        footprint = _api_footprint(url, collections, stac_io)
        _raise_empty(url, request, len(items), report, footprint)
    return kept


def _landing(url: str, stac_io: StacApiIO) -> tuple[str, str, list[str]]:
    """Search URL, method and conformance classes from an API's landing page."""
    try:
        landing = json.loads(stac_io.read_text(url))
    except APIError as exc:
        raise SearchError(
            f"Cannot open the STAC API at {url}: {_short(exc)}. Check the URL (the API's root, "
            "not /search) and your connection."
        ) from None
    except json.JSONDecodeError as exc:
        raise SearchError(f"{url} did not answer with JSON ({exc}): is it a STAC API?") from None
    links = [link for link in landing.get("links", []) if link.get("rel") == "search"]
    if not links:
        raise SearchError(
            f"{url} has no 'search' link: it is not a STAC API with item search. For a static "
            "catalog give the catalog.json URL or path."
        )
    methods = {str(link.get("method")).upper() for link in links if link.get("method")}
    method = "GET" if methods == {"GET"} else "POST"
    post = [link for link in links if str(link.get("method", "POST")).upper() == method]
    search_url = make_absolute_href((post or links)[0]["href"], url + "/", start_is_dir=True)
    conforms = [str(c) for c in landing.get("conformsTo", [])]
    if not conforms:
        log.warning("%s lists no conformance classes: cloud cover is filtered on the client", url)
    return search_url, method, conforms


def _choose_filter(conforms: Iterable[str]) -> Literal["filter", "query", "client"]:
    """The server-side cloud filter an API conforms to: CQL2 ``filter``, else ``query``."""
    uris = list(conforms)
    if any(_FILTER_URI.search(u) for u in uris):
        return "filter"
    if any(_QUERY_URI.search(u) for u in uris):
        return "query"
    return "client"


_FILTER_URI = re.compile(r"item-search#filter(:[\w-]+)?$|ogcapi-features-3/1\.0/conf/(features-)?filter$")
_QUERY_URI = re.compile(r"item-search#query$")


def _api_footprint(url: str, collections: list[str], stac_io: StacApiIO) -> BaseGeometry | None:
    """Union of the collections' spatial extents (None if the API does not tell)."""
    boxes = []
    for cid in collections:
        try:
            data = json.loads(stac_io.read_text(f"{url}/collections/{cid}"))
            for bb in data["extent"]["spatial"]["bbox"]:
                boxes.append(shapely.geometry.box(*bb[:2], *bb[-2:]) if len(bb) == 6 else shapely.geometry.box(*bb))
        except Exception as exc:  # best effort, only to explain an empty result
            log.debug("no extent for collection %s: %s", cid, exc)
            return None
    return shapely.union_all(boxes) if boxes else None


def _short(exc: Exception) -> str:
    text = str(exc).strip().replace("\n", " ")
    return text[:300] + ("…" if len(text) > 300 else "")


# --------------------------------------------------------------------------- static files
def _search_static(
    source: str, request: _Request, collections: list[str], max_items: int | None
) -> tuple[list[pystac.Item], dict[str, Any]]:
    items, extra = read_items(source)
    if collections:
        items = [i for i in items if i.collection_id in collections]
        if not items:
            raise SearchError(
                f"{source} has no items in collection(s) {', '.join(collections)}: check "
                "`collection` (or leave it out to use all items)."
            )
    if request.geometry is not None and items:
        footprint = shapely.union_all([_item_shape(i) for i in items])
        if not footprint.intersects(request.geometry):
            _raise_outside(source, request, footprint)
    kept, report = filter_items(items, request.geometry, request.intervals, request.max_cloud)
    if not kept:
        _raise_empty(source, request, len(items), report, None)
    if max_items is not None:
        kept = kept[:max_items]
    return kept, extra


def read_items(source: str | os.PathLike[str]) -> tuple[list[pystac.Item], dict[str, Any]]:
    """All items of a static catalog/collection, item collection or single item (path or
    URL), with absolute hrefs; also the item collection's extra top-level fields."""
    text = str(source)
    is_url = text.startswith(("http://", "https://"))
    if not is_url and not Path(text).exists():
        raise InputError(
            f"{text} is neither a catalog preset ({', '.join(PRESETS)}), a STAC API URL, nor an "
            "existing catalog/item-collection file: check `source`."
        )
    href = text if is_url else str(Path(text).resolve())
    try:
        data = pystac.StacIO.default().read_json(href)
    except Exception as exc:
        raise InputError(f"Cannot read {text} as JSON: {exc}.") from exc
    kind = data.get("type")
    if kind == "FeatureCollection":
        extra = {k: v for k, v in data.items() if k not in ("type", "features", "links")}
        items = [_item_from_dict(f, href) for f in data.get("features", [])]
        return items, extra
    if kind == "Feature":
        return [_item_from_dict(data, href)], {}
    if kind in ("Catalog", "Collection"):
        try:
            root = pystac.read_file(href)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                found = list(root.get_items(recursive=True))  # type: ignore[attr-defined]
        except Exception as exc:
            raise InputError(f"Cannot walk the STAC catalog {text}: {exc}.") from exc
        items = [_item_from_dict(i.to_dict(transform_hrefs=False), i.get_self_href() or href)
                 for i in found]
        return items, {}
    raise InputError(
        f"{text} is a JSON of type {kind!r}: give a STAC Catalog, Collection, FeatureCollection "
        "(item collection) or Feature (item)."
    )


def _item_from_dict(data: dict[str, Any], location: str) -> pystac.Item:
    """An item whose asset and link hrefs are absolute, resolved against its own self link
    (if any) or the file it came from."""
    data = json.loads(json.dumps(data))
    self_href = next((link["href"] for link in data.get("links", [])
                      if link.get("rel") == "self" and "://" in link.get("href", "")), None)
    base = self_href or location
    for asset in data.get("assets", {}).values():
        asset["href"] = make_absolute_href(asset["href"], base)
    for link in data.get("links", []):
        if "href" in link:
            link["href"] = make_absolute_href(link["href"], base)
    try:
        item = _parse_item(data)
    except Exception as exc:
        raise InputError(f"Invalid STAC item {data.get('id', '?')} in {location}: {exc}.") from exc
    return item


def _parse_item(data: dict[str, Any]) -> pystac.Item:
    with warnings.catch_warnings():
        # pystac's storage-extension migration cannot parse https bucket URLs: harmless
        warnings.filterwarnings("ignore", message="Could not parse bucket", category=UserWarning)
        return pystac.Item.from_dict(data, preserve_dict=False)


# --------------------------------------------------------------------------- client-side filter
def filter_items(
    items: Sequence[pystac.Item],
    geometry: BaseGeometry | None = None,
    intervals: Sequence[Interval] | None = None,
    max_cloud: float | None = None,
    collections: Sequence[str] | None = None,
) -> tuple[list[pystac.Item], dict[str, int]]:
    """Items passing every filter, and how many each filter removed (in order:
    collection, area, time, cloud). Items without ``eo:cloud_cover`` fail ``max_cloud``."""
    report = {"collection": 0, "area": 0, "time": 0, "cloud": 0}
    kept = []
    for item in items:
        if collections and item.collection_id not in collections:
            report["collection"] += 1
        elif geometry is not None and not _item_shape(item).intersects(geometry):
            report["area"] += 1
        elif intervals and not any(_overlaps(item, i) for i in intervals):
            report["time"] += 1
        elif max_cloud is not None and not _cloud_ok(item, max_cloud):
            report["cloud"] += 1
        else:
            kept.append(item)
    return kept, report


def _item_shape(item: pystac.Item) -> BaseGeometry:
    if item.geometry:
        return shapely.geometry.shape(item.geometry)
    if item.bbox:
        return shapely.geometry.box(*item.bbox[:2], *item.bbox[-2:]) if len(item.bbox) == 6 \
            else shapely.geometry.box(*item.bbox)
    raise InputError(f"Item {item.id} has neither geometry nor bbox: cannot place it.")


def _overlaps(item: pystac.Item, interval: Interval) -> bool:
    start = item.common_metadata.start_datetime or item.datetime
    end = item.common_metadata.end_datetime or item.datetime
    if start is None or end is None:
        return False
    lo, hi = interval
    return (hi is None or _utc(start) <= hi) and (lo is None or _utc(end) >= lo)


def _utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _cloud_ok(item: pystac.Item, max_cloud: float) -> bool:
    cloud = item.properties.get("eo:cloud_cover")
    return cloud is not None and float(cloud) <= max_cloud


def _unique(items: Iterable[pystac.Item]) -> list[pystac.Item]:
    seen: set[tuple[str | None, str]] = set()
    out = []
    for item in items:
        key = (item.collection_id, item.id)
        if key not in seen:
            seen.add(key)
            out.append(item)
    return out


def _raise_outside(source: str, request: _Request, footprint: BaseGeometry) -> None:
    w, s, e, n = footprint.bounds
    raise SearchError(
        f"The area ({request.describe().split(';')[0]}) lies outside {source}: its items cover "
        f"lon {w:.4f}…{e:.4f}, lat {s:.4f}…{n:.4f}. Check `bbox`/`aoi` (west,south,east,north "
        "in degrees) or use a catalog that covers the area."
    )


def _raise_empty(source: str, request: _Request, n_found: int, report: Mapping[str, int],
                 footprint: BaseGeometry | None) -> None:
    if request.geometry is not None and footprint is not None and not footprint.intersects(request.geometry):
        _raise_outside(source, request, footprint)
    hints = []
    if request.max_cloud is not None:
        hints.append(f"raise `max_cloud` (now {request.max_cloud:g})")
    if request.intervals:
        hints.append("widen `season`/`datetime` or add `years`")
    if request.geometry is not None:
        hints.append("enlarge the area")
    removed = ", ".join(f"{n} by {k}" for k, n in report.items() if n)
    found = f"{n_found} item(s) came back, removed {removed}" if n_found else "no item matched"
    raise SearchError(
        f"No scenes found in {source} for {request.describe()}: {found}. "
        + ("To find some, " + " or ".join(hints) + "." if hints else "The catalog is empty.")
    )


# --------------------------------------------------------------------------- signing
def planetary_computer_signer() -> Signer:
    """``planetary_computer.sign`` (the optional ``planetary-computer`` package)."""
    try:
        import planetary_computer
    except ImportError:
        raise ConfigError(
            "Planetary Computer asset URLs must be signed, which needs the 'planetary-computer' "
            "package: pip install 'clc-dask[pc]' (or pass sign=False / another signer)."
        ) from None
    return planetary_computer.sign  # type: ignore[no-any-return]


def _resolve_signer(sign: Signer | bool | None, preset_signer: str | None) -> Signer | None:
    if sign is False:
        return None
    if callable(sign):
        return sign
    if sign is True and not preset_signer:
        raise ConfigError("sign=True needs a source with a known signer (planetary-computer).")
    if preset_signer == PC_SIGNER:
        return planetary_computer_signer()
    return None


def _sign(signer: Signer, item: pystac.Item) -> pystac.Item:
    try:
        signed = signer(item)
    except Exception as exc:
        raise SearchError(f"Signing the asset URLs of item {item.id} failed: {exc}.") from exc
    return item if signed is None else signed


def _unsigned(href: str) -> str:
    """``href`` without an Azure SAS token (they expire; a saved run re-signs)."""
    parsed = urlparse(href)
    if parsed.netloc.endswith(".blob.core.windows.net") and "sig=" in parsed.query:
        return urlunparse(parsed._replace(query=""))
    return href


# --------------------------------------------------------------------------- saving
def save_item_collection(items: pystac.ItemCollection | Iterable[pystac.Item],
                         path: str | os.PathLike[str]) -> Path:
    """Write items as an item-collection JSON, atomically, so a run can be repeated offline.

    Planetary Computer SAS tokens are removed (they expire after about an hour) and the
    collection is marked, so that reading it back with :func:`search_items` signs again.
    """
    collection = items if isinstance(items, pystac.ItemCollection) else pystac.ItemCollection(items)
    data = collection.to_dict(transform_hrefs=False)
    signer = collection.extra_fields.get(SIGNER_FIELD)
    if signer:
        for feature in data["features"]:
            for asset in feature.get("assets", {}).values():
                asset["href"] = _unsigned(asset["href"])
            feature.get("properties", {}).pop("msft:expiry", None)
    path = Path(path)
    with atomic_path(path, suffix=".json") as tmp:
        tmp.write_text(json.dumps(data, indent=1), encoding="utf-8")
    log.info("saved %d item(s) to %s", len(data["features"]), path)
    return path
