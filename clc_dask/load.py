"""Load Sentinel-2 scenes onto the run's grid as one lazy (time, band, y, x) uint16 cube.

A thin, opinionated wrapper around :func:`stackstac.stack`:

* the grid is explicit (CRS, resolution, bounds from an odc-geo GeoBox): stackstac 0.5.1
  reads ``proj:epsg`` but not ``proj:code``, and catalogs sometimes describe other grids
  than their files hold;
* ``uint16`` DN with 0 = no data and ``rescale=False``: harmonisation happens in one place
  (:mod:`clc_dask.mosaic`, using each item's ``boa_offset``), never float64;
* chunks ``(-1, 1, X, X)``: all dates of one band in one chunk, as a median over time needs;
* SCL (20 m) is read onto the same grid with nearest-neighbour resampling (class codes);
* reprojection with GDAL's exact transformer, so a pixel never depends on the window read
  (GDAL's default approximation moves "nearest" picks with the window: tiles read one by
  one would differ from the whole grid read at once); a file whose pixels the grid shares
  (same CRS, edges on the grid, e.g. 10 m bands and the 20 m SCL on a 10 m UTM grid of
  their zone) is read directly, without the warper — the same pixels, at a fraction of
  the cost;
* a reader that retries transient read errors (after clearing GDAL's cache for the URL) and
  otherwise raises :class:`ReadError` naming the asset (URL without its query string) and
  the reason. Unlike stackstac's default, HTTP 404 is an error too: an asset the catalog
  lists but the server lacks is broken input, not "no data";
* each time step is one granule (item); the coordinates along time (:data:`PASS_COORDS`)
  say which satellite pass it belongs to, so that :func:`clc_dask.mosaic.seasonal_mosaic`
  can merge overlapping granules of one pass (neighbouring MGRS tiles, UTM zones).
* asset URLs that must be signed (the items name their signer, see :mod:`clc_dask.signing`)
  are signed by the reader, on the worker, each time it opens the asset — with a token cache
  that renews tokens before they expire — and signed again when the server refuses a
  signature (HTTP 403), so runs outlast the tokens. The task graph holds unsigned URLs and
  the signer, never a token; no log line or error shows a query string.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any
from urllib.parse import urlsplit
from xml.etree import ElementTree

import numpy as np
import pystac
import stackstac
import xarray as xr
from odc.geo.geobox import GeoBox
from odc.geo.xr import xr_coords
from rasterio.enums import Resampling
from rasterio.io import DatasetReader
from rasterio.vrt import WarpedVRT
from rasterio.windows import Window
from stackstac import LayeredEnv
from stackstac.rio_reader import (
    MULTITHREADED_DRIVER_ALLOWLIST,
    AutoParallelRioReader,
    SelfCleaningDatasetReader,
    SingleThreadedRioDataset,
    ThreadLocalRioDataset,
)

from clc_dask.errors import ConfigError, InputError, ReadError
from clc_dask.gdalenv import clear_cached_url, gdal_env
from clc_dask.grid import snapped_geobox
from clc_dask.items import CANONICAL_BANDS, OFFSET_PROPERTY, SCL_BAND, normalize_items
from clc_dask.redact import REDACTED, public_url, redact_text, unsigned_url
from clc_dask.signing import UrlSigner, invalidate, resolve_signer, signer_label

log = logging.getLogger(__name__)

DEFAULT_CHUNK_SIZE = 1024  # pixels; divides the 2048 px tiles
#: Messages of read failures worth retrying (seen on real buckets), matched case-insensitively.
TRANSIENT_ERRORS: tuple[str, ...] = (
    r"not recognized as (being in )?a supported file format",
    r"Read or write failed",
    r"IReadBlock failed",
    r"HTTP response code: (429|5\d\d)",
    r"CURL error",
    r"timed? ?out",
    r"Connection (reset|refused|aborted|closed)",
    # a body cut short: "TIFFFillTile: Read error at row …; got 145431 bytes, expected 287547"
    r"Read error",
    r"got \d+ bytes, expected \d+",
    r"transfer closed",
    r"Empty reply",
)
_TRANSIENT = re.compile("|".join(TRANSIENT_ERRORS), re.IGNORECASE)
#: Messages of a refused signature or missing credentials (GDAL reports the status on open).
REFUSED_ERRORS: tuple[str, ...] = (r"HTTP response code: 40[13]\b",)
_REFUSED = re.compile("|".join(REFUSED_ERRORS), re.IGNORECASE)
#: ``text`` without query strings, also those GDAL appends to bare file names in its messages.
public_text = redact_text


class _PublicTextFilter(logging.Filter):
    """Strips query strings from the records of libraries that log dataset names."""

    def filter(self, record: logging.LogRecord) -> bool:  # noqa: A003 - logging's name
        message = record.getMessage()
        clean = public_text(message)
        if clean != message or record.args:
            record.msg, record.args = clean, None
        return True


def _protect_library_logs() -> None:
    """rasterio and stackstac log dataset names (signed URLs) at DEBUG and GDAL's messages at
    INFO: their loggers get a filter that removes query strings."""
    for name in list(logging.Logger.manager.loggerDict):
        if name.split(".")[0] in ("rasterio", "stackstac"):
            logger = logging.getLogger(name)
            if not any(isinstance(f, _PublicTextFilter) for f in logger.filters):
                logger.addFilter(_PublicTextFilter())


_protect_library_logs()

#: Property set on the items handed to stackstac: the longitude (degrees east) of the centre
#: of the item's bbox, NaN when unknown (no bbox, or one spanning more than 180°).
CENTRE_LON_PROPERTY = "clc_dask:centre_lon"
#: Coordinates along time that identify a granule's satellite pass, read from item
#: properties: coordinate name → (property, value when the item lacks it).
PASS_COORDS: dict[str, tuple[str, object]] = {
    "platform": ("platform", ""),
    "datatake_id": ("s2:datatake_id", ""),
    "absolute_orbit": ("sat:absolute_orbit", -1),
    "granule_epsg": ("proj:epsg", 0),
    "centre_lon": (CENTRE_LON_PROPERTY, math.nan),
}


class RetryingReader(AutoParallelRioReader):
    """stackstac's rasterio reader with an exact warp, retries, signing, and loud failures.

    * Reprojection uses GDAL's exact transformer by default, so a pixel's value never depends
      on the window read or on the grid's extent (GDAL's approximate transformer picks other
      source pixels for "nearest" depending on the window).
    * With a ``signer``, the URL (``url``, unsigned) is signed each time the asset is opened,
      here on the worker; the signer caches tokens per process and renews them a margin
      before they expire, and a read finding the token renewed since the asset was opened
      re-opens it with the new one, so an open dataset never outlives its token. When a read
      fails, the asset is re-opened at once (up to ``sign_retries`` times): with a new
      signature when the server refused the old one (HTTP 403, which drops it from the
      cache) or the token was renewed meanwhile, else once with the same signature (GDAL
      shows a 403 on a read only as a short read; the new open shows the status).
    * A transient failure (HTTP 429/5xx after GDAL's own retries, a connection reset, a
      timeout, a body cut short) is retried with exponential backoff after GDAL's cached
      state for the asset's URL is cleared, so the retry really asks the server again.
    * Anything else, or a failure that outlasts the retries, is a :class:`ReadError` naming
      the asset (without its query string) and the cause.

    Args:
        retries: further attempts after a transient failure (the dataset is re-opened).
        retry_delay: seconds before the first retry; doubled each time.
        warp_tolerance: error allowed in GDAL's warp transform, in source pixels; 0 is exact.
        signer: signs the URL before each open (see :mod:`clc_dask.signing`); None reads it
            as it is.
        sign_retries: immediate re-opens per read after a failure of a signed asset.
        **kwargs: stackstac's reader arguments (``url``, ``spec``, ``dtype`` …).
    """

    def __init__(self, *, retries: int = 3, retry_delay: float = 1.0, warp_tolerance: float = 0.0,
                 signer: UrlSigner | None = None, sign_retries: int = 3, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.retries = retries
        self.retry_delay = retry_delay
        self.warp_tolerance = warp_tolerance
        self.signer = signer
        self.sign_retries = sign_retries
        self._signed_url: str | None = None  # the URL the open dataset was opened with
        self._queries: set[str] = set()  # query strings of the URLs this reader signed

    def read(self, window: Any, **kwargs: Any) -> np.ndarray:
        """Read ``window`` of the output grid; re-open, re-sign or retry, else raise ReadError."""
        attempt = reopened = resigned = 0
        probed = False
        while True:
            try:
                self._follow_renewal()
                return super().read(window, **kwargs)
            except _SigningError as exc:
                raise ReadError(
                    f"Cannot sign the URL of asset {public_url(self.url)} with "
                    f"{signer_label(exc.signer)}: {self._public(_reason(exc))}. Check the signer's "
                    "token service and credentials (Planetary Computer: PC_SDK_SAS_URL, "
                    "PC_SDK_SUBSCRIPTION_KEY) and the connection to it."
                ) from None
            except Exception as exc:  # rasterio/GDAL raise several types, wrapped by stackstac
                reason = self._public(_reason(exc))
                refused = bool(_REFUSED.search(reason))
                transient = not refused and bool(_TRANSIENT.search(reason))
                how = None
                if reopened < self.sign_retries:
                    how = self._reopen_signed(refused, probe=transient and not probed)
                if how is not None:
                    reopened += 1
                    resigned += how == _NEW_SIGNATURE
                    probed = probed or how == _SAME_SIGNATURE
                    log.info("reading %s failed (%s); opening it again %s (%d/%d)",
                             public_url(self.url), reason, how, reopened, self.sign_retries)
                    continue
                if transient and attempt < self.retries:
                    delay = self.retry_delay * 2**attempt
                    log.warning("reading %s failed (%s); retry %d/%d in %.2f s",
                                public_url(self.url), reason, attempt + 1, self.retries, delay)
                    self.close()
                    clear_cached_url(self._signed_url or self.url)
                    time.sleep(delay)
                    attempt += 1
                    continue
                raise ReadError(self._failure(reason, attempt, resigned, refused)) from None

    def _failure(self, reason: str, attempt: int, resigned: int, refused: bool) -> str:
        """The message of a read that cannot succeed."""
        asset = public_url(self.url)
        if refused and self.signer is not None:
            return (f"Cannot read asset {asset}: the server refused its signature ({reason}), also "
                    f"after {resigned} new signature(s) from {signer_label(self.signer)}. Check that "
                    "the signer's credentials grant access to this asset (Planetary Computer: "
                    "PC_SDK_SUBSCRIPTION_KEY), or remove the item from the input.")
        if refused:
            return (f"Cannot read asset {asset}: the server refused access ({reason}). If the "
                    "catalog's asset URLs must be signed, pass `sign` (e.g. 'planetary-computer'), "
                    "or give the GDAL credentials it needs (`gdal`).")
        tried = f" after {attempt + 1} attempts" if attempt else ""
        return (f"Cannot read asset {asset}{tried}: {reason}. Check that the file exists and is a "
                "valid GeoTIFF/COG reachable with the GDAL settings in use (`gdal`, see "
                "clc_dask.gdalenv), or remove the item from the input.")

    def _follow_renewal(self) -> None:
        """Close the asset when the signer's token was renewed since it was opened, so that
        it is re-opened with the new one before the old one expires."""
        used = self._signed_url
        if self.signer is not None and used is not None and self._sign() != used:
            log.debug("the token of %s was renewed: opening it again", public_url(self.url))
            self.close()
            clear_cached_url(used)

    def _reopen_signed(self, refused: bool, probe: bool) -> str | None:
        """How a signed asset whose read failed is re-opened at once (then it is closed), or
        None when that would not help.

        A refused signature (HTTP 403 on open) is dropped from the signer's cache; a renewed
        token gives a new signature; a failed read (GDAL shows a 403 on a read only as a short
        one) is re-opened once with the same signature, whose refusal the open would show.
        """
        used = self._signed_url
        if self.signer is None or used is None:
            return None
        if refused:
            invalidate(self.signer, used)
        try:
            fresh = self._sign()
        except _SigningError:
            return None  # the next open fails to sign and says why
        if fresh != used:
            how = _NEW_SIGNATURE
        elif probe:
            how = _SAME_SIGNATURE
        else:
            return None
        self.close()
        clear_cached_url(used)
        return how

    def _sign(self) -> str:
        """The URL to open: ``url`` signed by the signer (or as it is without one)."""
        if self.signer is None:
            return self.url
        try:
            signed = self.signer(self.url)
        except Exception as exc:
            raise _SigningError(self.signer) from exc
        query = urlsplit(signed).query
        if query:
            self._queries.add(query)
        return signed

    def _public(self, text: str) -> str:
        """``text`` without the query strings of URLs, least of all those this reader signed."""
        text = public_text(text)
        for query in tuple(self._queries):
            text = text.replace(query, REDACTED)
        return text

    def _open(self) -> Any:
        """Open the asset (signed first) and, unless the output grid is aligned on its pixels
        (:func:`pixel_alignment`), a warped view of it.

        Replaces stackstac's ``_open`` to control how the warped view is made (exact
        transformer) and to sign the URL; errors are never turned into no data.
        """
        url = self._sign()
        self._signed_url = url
        opening = self.gdal_env.open
        with opening:
            try:
                ds = SelfCleaningDatasetReader(url, sharing=False)
            except Exception as exc:
                raise RuntimeError(f"Error opening {public_url(self.url)}: {exc}") from exc
            if ds.count != 1:
                count = ds.count
                ds.close()
                raise RuntimeError(f"the file has {count} bands; each asset must hold exactly one")
            if ds.crs is None:
                ds.close()
                raise RuntimeError(_NO_CRS)
            alignment = pixel_alignment(ds, self.spec.vrt_params)
            view = None
            if alignment is None:
                with _inner(self.gdal_env.open_vrt, opening):
                    view = self._warped(ds)
        # GeoTIFFs are read by several threads, each re-opening its own copy; others under a lock
        threadsafe = ds.driver in MULTITHREADED_DRIVER_ALLOWLIST
        if view is None or self.warp_tolerance:
            base, vrt = ds, view
        else:  # the exact view is opened from its XML and opens the asset itself
            base, vrt = view, None
            ds.close()
        dataset = ThreadLocalRioDataset if threadsafe else SingleThreadedRioDataset
        opened = dataset(self.gdal_env, base, vrt=vrt)
        if alignment is None:
            return opened
        return AlignedWindowDataset(opened, alignment, (ds.height, ds.width))

    def _warped(self, ds: DatasetReader) -> Any:
        """``ds`` warped onto the output grid (nodata-less sources get an alpha band)."""
        approximate = WarpedVRT(ds, sharing=False, resampling=self.resampling,
                                add_alpha=ds.nodata is None,
                                tolerance=self.warp_tolerance or APPROXIMATE_TOLERANCE,
                                **self.spec.vrt_params)
        if self.warp_tolerance:
            return approximate
        with approximate:
            xml = approximate.tags(ns="xml:VRT")["xml:VRT"]
        return SelfCleaningDatasetReader(exact_warp_xml(xml), sharing=False)

    def __getstate__(self) -> dict[str, Any]:  # type: ignore[override]
        state = dict(super().__getstate__())
        state.update(retries=self.retries, retry_delay=self.retry_delay,
                     warp_tolerance=self.warp_tolerance, signer=self.signer,
                     sign_retries=self.sign_retries)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:  # type: ignore[override]
        self.__init__(**state)  # type: ignore[misc]


@dataclass(frozen=True)
class PixelAlignment:
    """How an output grid lies on a source's pixels (same CRS, no rotation, shared edges).

    Attributes:
        rows: output grid origin, in output pixels below the source's origin.
        cols: output grid origin, in output pixels right of the source's origin.
        factor: source pixel edge in output pixels (1: the same pixels; 2: a 20 m band on a
            10 m grid).
    """

    rows: int
    cols: int
    factor: int


def pixel_alignment(ds: DatasetReader, params: Mapping[str, Any]) -> PixelAlignment | None:
    """The alignment of the output grid (stackstac's ``vrt_params``) on ``ds``'s pixels, or
    None when it is not aligned (then the source is warped).

    Aligned means: the same CRS, no rotation, a source pixel of a whole number of output
    pixels, and the output origin on an output pixel edge counted from the source's origin.
    Then every output pixel's centre lies strictly inside one source pixel, the one that
    nearest-neighbour warping (exact or not) picks: it is read directly, without the warper.
    """
    src, dst = ds.transform, params["transform"]
    if ds.crs is None or ds.crs.to_epsg() != params["crs"]:
        return None
    if src.b or src.d or dst.b or dst.d or src.a * dst.a <= 0 or src.e * dst.e <= 0:
        return None
    factor = src.a / dst.a
    if round(factor) < 1 or abs(factor - round(factor)) > _ALIGNED * factor or \
            abs(src.e / dst.e - factor) > _ALIGNED * factor:
        return None
    cols, rows = (dst.c - src.c) / dst.a, (dst.f - src.f) / dst.e
    if abs(cols - round(cols)) > _ALIGNED * max(1.0, abs(cols)) or \
            abs(rows - round(rows)) > _ALIGNED * max(1.0, abs(rows)):
        return None
    return PixelAlignment(round(rows), round(cols), round(factor))


#: Relative difference under which pixel sizes and edges are taken as equal.
_ALIGNED = 1e-9


class AlignedWindowDataset:
    """A source dataset read on an output grid aligned on its pixels (:class:`PixelAlignment`):
    each output window is mapped to the source pixels under it, read directly, and repeated
    ``factor`` times along both axes; what lies outside the source is masked (filled with no
    data by the reader).

    Args:
        dataset: stackstac's thread-safe dataset of the source (thread-local copies).
        alignment: where the output grid lies on the source's pixels.
        shape: (height, width) of the source in pixels.
    """

    def __init__(self, dataset: Any, alignment: PixelAlignment, shape: tuple[int, int]) -> None:
        self.dataset = dataset
        self.alignment = alignment
        self.shape = shape

    def read(self, window: Window, **kwargs: Any) -> np.ma.MaskedArray:
        """The masked (1, height, width) values of ``window`` (output grid pixels)."""
        (top, bottom), (left, right) = window.toranges()
        k, height, width = self.alignment.factor, int(bottom - top), int(right - left)
        g_top, g_left = int(top) + self.alignment.rows, int(left) + self.alignment.cols  # output px from source origin
        f0, f1 = max(g_top, 0), min(g_top + height, self.shape[0] * k)  # the part over the source
        e0, e1 = max(g_left, 0), min(g_left + width, self.shape[1] * k)
        if f0 >= f1 or e0 >= e1:
            return np.ma.masked_all((1, height, width), dtype=kwargs.get("out_dtype") or np.uint16)
        r0, c0 = f0 // k, e0 // k  # source pixels under them
        r1, c1 = (f1 - 1) // k + 1, (e1 - 1) // k + 1
        inside = self.dataset.read(Window(c0, r0, c1 - c0, r1 - r0), **kwargs)
        if k > 1:
            inside = inside.repeat(k, axis=1).repeat(k, axis=2)[:, f0 - r0 * k:f1 - r0 * k, e0 - c0 * k:e1 - c0 * k]
        if (f0, f1, e0, e1) == (g_top, g_top + height, g_left, g_left + width):
            return inside
        out = np.ma.masked_all((inside.shape[0], height, width), dtype=inside.dtype)
        out[:, f0 - g_top:f1 - g_top, e0 - g_left:e1 - g_left] = inside
        return out

    def close(self) -> None:
        """Release the source (every thread's copy)."""
        self.dataset.close()


def _inner(env: Any, outer: Any) -> Any:
    """``env`` to enter inside ``outer``, unless it is the same ``rasterio.Env`` object.

    stackstac's ``LayeredEnv`` gives a layer without options of its own the object of the
    layer it falls back to (``open_vrt`` → ``open``), and a ``rasterio.Env`` keeps the state
    of its entry on the object: entered twice nested, its outer exit leaves every option set
    in the thread, so later reads in that (pooled) thread use this read's GDAL options.
    """
    return contextlib.nullcontext() if env is outer else env


_NEW_SIGNATURE = "with a new signature"
_SAME_SIGNATURE = "to check its signature"


class _SigningError(Exception):
    """The signer failed (its exception is the cause)."""

    def __init__(self, signer: UrlSigner) -> None:
        super().__init__("signing failed")
        self.signer = signer


#: Tolerance (source pixels) of the warped view that is serialised and made exact.
APPROXIMATE_TOLERANCE = 0.125
_NO_CRS = ("the raster has no CRS (georeference); if it lives in a .aux.xml sidecar, let GDAL "
           "see it with GDAL_DISABLE_READDIR_ON_OPEN=NO")


def exact_warp_xml(vrt_xml: str) -> str:
    """A GDAL warped-VRT document with its approximate transformer replaced by the exact one.

    rasterio's ``WarpedVRT(tolerance=0)`` cannot be built with an explicit grid (rasterio
    1.4 leaves the warp without a transformer), so the view is built approximately, then
    its XML is rewritten: the ``ApproxTransformer`` element gives way to the transformer it
    wraps, which GDAL then evaluates for every pixel.
    """
    root = ElementTree.fromstring(vrt_xml)
    holder = root.find("GDALWarpOptions/Transformer")
    approx = None if holder is None else holder.find("ApproxTransformer")
    if holder is None or approx is None:
        return vrt_xml
    base = approx.find("BaseTransformer")
    if base is None or len(base) != 1:
        raise RuntimeError("GDAL's warped view has an approximate transformer without a base")
    holder.remove(approx)
    holder.append(base[0])
    return ElementTree.tostring(root, encoding="unicode")


def _reason(exc: BaseException) -> str:
    """The innermost error message (stackstac wraps rasterio's in RuntimeError)."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    text = str(exc).strip().replace("\n", " ")
    if isinstance(exc, AttributeError) and "to_epsg" in text:
        return _NO_CRS
    return text or type(exc).__name__


def _chunk_shape(chunk_size: int | tuple[int, int]) -> tuple[int, int]:
    """(rows, cols) of a chunk given as one edge or a pair, both positive (px)."""
    if isinstance(chunk_size, int | np.integer):
        pair: tuple[int, ...] = (int(chunk_size), int(chunk_size))
    elif isinstance(chunk_size, str):
        pair = ()
    else:
        try:
            pair = tuple(int(c) for c in chunk_size)
        except (TypeError, ValueError):
            pair = ()
    if len(pair) != 2 or min(pair) <= 0:
        raise ConfigError(f"`chunk_size` must be a positive number of pixels or a (rows, cols) pair of them, "
                          f"not {chunk_size!r}.")
    return pair[0], pair[1]


def load_scenes(
    items: Sequence[pystac.Item],
    geobox: GeoBox | None = None,
    *,
    epsg: int | None = None,
    resolution: float | None = None,
    bounds: tuple[float, float, float, float] | None = None,
    bands: Sequence[str] = CANONICAL_BANDS,
    chunk_size: int | tuple[int, int] = DEFAULT_CHUNK_SIZE,
    gdal: LayeredEnv | Mapping[str, object] | None = None,
    retries: int = 3,
    retry_delay: float = 1.0,
    warp_tolerance: float = 0.0,
    sign: UrlSigner | str | bool | None = None,
    chunksize: int | None = None,
) -> xr.DataArray:
    """Scenes as a lazy ``(time, band, y, x)`` uint16 DataArray on one grid.

    Args:
        items: STAC items from any supported catalog (normalised here: canonical band names,
            absolute hrefs, harmonisation offset).
        geobox: the run's grid. Alternatively give ``epsg``, ``resolution`` (metres) and
            ``bounds`` (left, bottom, right, top in that CRS), snapped to the pixel.
        epsg: CRS of the grid when no ``geobox`` is given.
        resolution: pixel size in metres when no ``geobox`` is given.
        bounds: extent in ``epsg`` coordinates when no ``geobox`` is given.
        bands: reflectance bands to load (``B02 B03 B04 B08``); ``SCL`` is always added last.
        chunk_size: spatial chunk edge in pixels, or (rows, cols) (time and band chunks are
            whole dates / one band). Larger chunks mean fewer tasks but more memory per task
            (dates × chunk_size² × 2 bytes per band); each chunk opens and decodes every
            scene's blocks under it.
        gdal: GDAL options: a :class:`~stackstac.LayeredEnv`, or overrides for
            :func:`clc_dask.gdalenv.gdal_env` (e.g. ``{"GDAL_DISABLE_READDIR_ON_OPEN": "NO"}``).
        retries: attempts after a transient read failure (HTTP 429/5xx that outlasted GDAL's
            own retries, a dropped connection, a timeout, a body cut short), per asset and
            window; GDAL's cache for the asset is cleared before each.
        retry_delay: seconds before the first retry (doubled each time).
        warp_tolerance: error allowed when reprojecting, in source pixels. 0 (exact) makes
            every pixel independent of the window read, so tiles loaded one by one equal the
            whole grid loaded at once; GDAL's usual 0.125 reads faster (see
            ``benchmarks/bench_read_transform.py``) but shifts "nearest" picks with the window.
        sign: how asset URLs are signed, on the workers, each time an asset is opened (tokens
            are cached per worker process and renewed before they expire; a refused signature
            is replaced and the read retried). None: with the signer the items name
            (``clc_dask:signer``, set by :func:`clc_dask.search.search_items`, e.g. for
            Planetary Computer); False: never; a signer name, or a
            :class:`~clc_dask.signing.UrlSigner` (e.g. ``PlanetaryComputerSigner(renew_before=600)``).
        chunksize: the former name of ``chunk_size`` (still accepted).

    Returns:
        DataArray with dims ``(time, band, y, x)`` (one time step per item), dtype uint16
        (0 = no data), band names ``bands + ["SCL"]``, the grid's CRS (``.odc.geobox``
        equals the requested grid) and coordinates along time: ``id``, ``boa_offset`` (DN)
        and the pass coordinates of :data:`PASS_COORDS` (``platform``, ``datatake_id``,
        ``absolute_orbit``, ``granule_epsg``, ``centre_lon`` in degrees east).

    Raises:
        InputError: no items, missing assets, or no item overlapping the grid.
        ConfigError: neither a geobox nor epsg/resolution/bounds given; an unknown signer, or
            its package missing.
    """
    gbox = _grid(geobox, epsg, resolution, bounds)
    if not items:
        raise InputError("No items to load: the search returned nothing (relax its filters).")
    if chunksize is not None:
        chunk_size = chunksize
    chunk_rows, chunk_cols = _chunk_shape(chunk_size)
    if not warp_tolerance >= 0:
        raise ConfigError(f"`warp_tolerance` must be 0 (exact) or a positive number of source "
                          f"pixels, not {warp_tolerance}.")
    wanted = [b for b in dict.fromkeys(bands) if b != SCL_BAND]
    normalized = normalize_items(items, wanted)
    signer = resolve_signer(sign, normalized)
    if signer is not None:  # the graph holds unsigned URLs: the reader signs them when it opens them
        for item in normalized:
            for asset in item.assets.values():
                asset.href = unsigned_url(asset.href)
    assets = [*wanted, SCL_BAND]
    env = gdal if isinstance(gdal, LayeredEnv) else gdal_env(gdal)
    epsg_code = gbox.crs.epsg
    if epsg_code is None:
        raise ConfigError(f"The grid CRS {gbox.crs} has no EPSG code: use an EPSG CRS (UTM, 3035).")
    left, bottom, right, top = gbox.boundingbox
    try:
        stack = stackstac.stack(
            [_with_centre_lon(item.to_dict(transform_hrefs=False)) for item in normalized],
            assets=assets,
            epsg=epsg_code,
            resolution=abs(gbox.resolution.x),
            bounds=(left, bottom, right, top),
            snap_bounds=False,
            resampling=Resampling.nearest,
            chunksize=(-1, 1, chunk_rows, chunk_cols),
            dtype=np.dtype("uint16"),
            fill_value=np.uint16(0),
            rescale=False,
            sortby_date="asc",
            xy_coords="center",
            properties=[OFFSET_PROPERTY, "eo:cloud_cover", *(p for p, _ in PASS_COORDS.values())],
            band_coords=False,
            gdal_env=env,
            errors_as_nodata=(),
            reader=partial(RetryingReader, retries=retries, retry_delay=retry_delay,
                           warp_tolerance=warp_tolerance, signer=signer),
        )
    except ValueError as exc:
        raise InputError(f"Cannot stack the items on the grid: {exc}") from exc
    if stack.sizes["time"] == 0:
        raise InputError(f"None of the {len(items)} items overlaps the grid {gbox.boundingbox}.")
    missing = [a for a in assets if a not in list(stack["band"].values)]
    if missing:
        raise InputError(f"No item has data for band(s) {missing} on this grid.")
    if (stack.sizes["y"], stack.sizes["x"]) != tuple(gbox.shape):
        raise InputError(
            f"stackstac built a {stack.sizes['y']}×{stack.sizes['x']} px grid instead of "
            f"{gbox.shape.y}×{gbox.shape.x} px: give bounds that are multiples of the resolution."
        )
    # stackstac turns a property with one value for all dates into a scalar coordinate
    offsets = np.broadcast_to(np.asarray(stack[OFFSET_PROPERTY].values, dtype="uint16"),
                              (stack.sizes["time"],)).copy()
    if list(stack["band"].values) != assets:
        stack = stack.sel(band=assets)
    passes = {name: ("time", _along_time(stack, prop, fill)) for name, (prop, fill) in PASS_COORDS.items()}
    drop = [c for c in stack.coords if c not in ("time", "band", "id")]
    stack = stack.drop_vars(drop)
    stack = stack.assign_coords(boa_offset=("time", offsets), **passes, **xr_coords(gbox))
    stack.name = "scenes"
    stack.attrs = {"nodata": 0, "units": "DN (reflectance × 10000, before harmonisation)"}
    log.info(
        "scenes: %d date(s) × %d band(s) × %d×%d px at %g m on EPSG:%d, %d chunk(s)",
        stack.sizes["time"], len(assets), gbox.shape.y, gbox.shape.x, abs(gbox.resolution.x),
        epsg_code, stack.data.npartitions,
    )
    return stack


def _with_centre_lon(item: dict[str, Any]) -> dict[str, Any]:
    """The item dict with :data:`CENTRE_LON_PROPERTY` set from its bbox (antimeridian-aware)."""
    bbox = item.get("bbox") or []
    lon = math.nan
    if len(bbox) >= 4:
        west, east = float(bbox[0]), float(bbox[len(bbox) // 2])
        width = east - west if east >= west else east - west + 360.0  # crossing the antimeridian
        if width <= 180.0:
            lon = (west + width / 2.0 + 180.0) % 360.0 - 180.0
    item["properties"] = {**item["properties"], CENTRE_LON_PROPERTY: lon}
    return item


def _along_time(stack: xr.DataArray, prop: str, fill: object) -> np.ndarray:
    """Property ``prop`` of every time step (stackstac makes a property with one value for
    all items a scalar), ``fill`` where an item lacks it or has a value of another type."""
    values = stack[prop].values if prop in stack.coords else None
    values = np.broadcast_to(np.asarray(values, dtype=object), (stack.sizes["time"],))
    kind = type(fill)
    out = []
    for value in values:
        try:
            out.append(fill if value is None else kind(value))
        except (TypeError, ValueError):
            out.append(fill)
    return np.asarray(out, dtype=str if kind is str else kind)


def _grid(
    geobox: GeoBox | None,
    epsg: int | None,
    resolution: float | None,
    bounds: tuple[float, float, float, float] | None,
) -> GeoBox:
    if geobox is not None:
        if any(v is not None for v in (epsg, resolution, bounds)):
            raise ConfigError("Give either a geobox or epsg/resolution/bounds, not both.")
        if not geobox.axis_aligned:
            raise ConfigError("The grid must be north-up (axis aligned).")
        return geobox
    if epsg is None or resolution is None or bounds is None:
        raise ConfigError(
            "Give the grid: a GeoBox, or all of epsg, resolution (metres) and bounds "
            "(left, bottom, right, top in that CRS)."
        )
    return snapped_geobox(bounds, epsg, resolution)
