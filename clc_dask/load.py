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
  one would differ from the whole grid read at once);
* a reader that retries transient read errors (after clearing GDAL's cache for the URL) and
  otherwise raises :class:`ReadError` naming the asset (URL without its query string) and
  the reason. Unlike stackstac's default, HTTP 404 is an error too: an asset the catalog
  lists but the server lacks is broken input, not "no data".
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any
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
from clc_dask.redact import public_url, redact_text

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


class RetryingReader(AutoParallelRioReader):
    """stackstac's rasterio reader with an exact warp, retries, and loud failures.

    * Reprojection uses GDAL's exact transformer by default, so a pixel's value never depends
      on the window read or on the grid's extent (GDAL's approximate transformer picks other
      source pixels for "nearest" depending on the window).
    * A transient failure (HTTP 429/5xx after GDAL's own retries, a connection reset, a
      timeout, a body cut short) is retried with exponential backoff after GDAL's cached
      state for the asset's URL is cleared, so the retry really asks the server again.
    * Anything else, or a failure that outlasts the retries, is a :class:`ReadError` naming
      the asset (without its query string) and the cause.

    Args:
        retries: further attempts after a transient failure (the dataset is re-opened).
        retry_delay: seconds before the first retry; doubled each time.
        warp_tolerance: error allowed in GDAL's warp transform, in source pixels; 0 is exact.
        **kwargs: stackstac's reader arguments (``url``, ``spec``, ``dtype`` …).
    """

    def __init__(self, *, retries: int = 3, retry_delay: float = 1.0, warp_tolerance: float = 0.0,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.retries = retries
        self.retry_delay = retry_delay
        self.warp_tolerance = warp_tolerance

    def read(self, window: Any, **kwargs: Any) -> np.ndarray:
        """Read ``window`` of the output grid; retry transient errors, else raise ReadError."""
        attempt = 0
        while True:
            try:
                return super().read(window, **kwargs)
            except Exception as exc:  # rasterio/GDAL raise several types, wrapped by stackstac
                reason = redact_text(_reason(exc))
                if attempt < self.retries and _TRANSIENT.search(reason):
                    delay = self.retry_delay * 2**attempt
                    log.warning("reading %s failed (%s); retry %d/%d in %.2f s",
                                public_url(self.url), reason, attempt + 1, self.retries, delay)
                    self.close()
                    clear_cached_url(self.url)
                    time.sleep(delay)
                    attempt += 1
                    continue
                tried = f" after {attempt + 1} attempts" if attempt else ""
                raise ReadError(
                    f"Cannot read asset {public_url(self.url)}{tried}: {reason}. Check that the "
                    "file exists and is a valid GeoTIFF/COG reachable with the GDAL settings in "
                    "use (`gdal`, see clc_dask.gdalenv), or remove the item from the input."
                ) from None

    def _open(self) -> Any:
        """Open the asset and, unless it is on the output grid already, a warped view of it.

        Replaces stackstac's ``_open`` to control how the warped view is made (exact
        transformer); errors are never turned into no data.
        """
        with self.gdal_env.open:
            try:
                ds = SelfCleaningDatasetReader(self.url, sharing=False)
            except Exception as exc:
                raise RuntimeError(f"Error opening {public_url(self.url)}: {exc}") from exc
            if ds.count != 1:
                count = ds.count
                ds.close()
                raise RuntimeError(f"the file has {count} bands; each asset must hold exactly one")
            if ds.crs is None:
                ds.close()
                raise RuntimeError(_NO_CRS)
            if self.spec.vrt_params == {"crs": ds.crs.to_epsg(), "transform": ds.transform,
                                        "height": ds.height, "width": ds.width}:
                view = None
            else:
                with self.gdal_env.open_vrt:
                    view = self._warped(ds)
        # GeoTIFFs are read by several threads, each re-opening its own copy; others under a lock
        threadsafe = ds.driver in MULTITHREADED_DRIVER_ALLOWLIST
        if view is None or self.warp_tolerance:
            base, vrt = ds, view
        else:  # the exact view is opened from its XML and opens the asset itself
            base, vrt = view, None
            ds.close()
        dataset = ThreadLocalRioDataset if threadsafe else SingleThreadedRioDataset
        return dataset(self.gdal_env, base, vrt=vrt)

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
                     warp_tolerance=self.warp_tolerance)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:  # type: ignore[override]
        self.__init__(**state)  # type: ignore[misc]


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


def load_scenes(
    items: Sequence[pystac.Item],
    geobox: GeoBox | None = None,
    *,
    epsg: int | None = None,
    resolution: float | None = None,
    bounds: tuple[float, float, float, float] | None = None,
    bands: Sequence[str] = CANONICAL_BANDS,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    gdal: LayeredEnv | Mapping[str, object] | None = None,
    retries: int = 3,
    retry_delay: float = 1.0,
    warp_tolerance: float = 0.0,
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
        chunk_size: spatial chunk edge in pixels (time and band chunks are whole dates / one
            band). Larger chunks mean fewer tasks but more memory per task
            (dates × chunk_size² × 2 bytes per band).
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
        chunksize: the former name of ``chunk_size`` (still accepted).

    Returns:
        DataArray with dims ``(time, band, y, x)``, dtype uint16 (0 = no data), band names
        ``bands + ["SCL"]``, coordinates ``id`` and ``boa_offset`` (DN per date) along time,
        and the grid's CRS (``.odc.geobox`` equals the requested grid).

    Raises:
        InputError: no items, missing assets, or no item overlapping the grid.
        ConfigError: neither a geobox nor epsg/resolution/bounds given.
    """
    gbox = _grid(geobox, epsg, resolution, bounds)
    if not items:
        raise InputError("No items to load: the search returned nothing (relax its filters).")
    if chunksize is not None:
        chunk_size = chunksize
    if chunk_size <= 0:
        raise ConfigError(f"`chunk_size` must be a positive number of pixels, not {chunk_size}.")
    if not warp_tolerance >= 0:
        raise ConfigError(f"`warp_tolerance` must be 0 (exact) or a positive number of source "
                          f"pixels, not {warp_tolerance}.")
    wanted = [b for b in dict.fromkeys(bands) if b != SCL_BAND]
    normalized = normalize_items(items, wanted)
    assets = [*wanted, SCL_BAND]
    env = gdal if isinstance(gdal, LayeredEnv) else gdal_env(gdal)
    epsg_code = gbox.crs.epsg
    if epsg_code is None:
        raise ConfigError(f"The grid CRS {gbox.crs} has no EPSG code: use an EPSG CRS (UTM, 3035).")
    left, bottom, right, top = gbox.boundingbox
    try:
        stack = stackstac.stack(
            [item.to_dict(transform_hrefs=False) for item in normalized],
            assets=assets,
            epsg=epsg_code,
            resolution=abs(gbox.resolution.x),
            bounds=(left, bottom, right, top),
            snap_bounds=False,
            resampling=Resampling.nearest,
            chunksize=(-1, 1, chunk_size, chunk_size),
            dtype=np.dtype("uint16"),
            fill_value=np.uint16(0),
            rescale=False,
            sortby_date="asc",
            xy_coords="center",
            properties=[OFFSET_PROPERTY, "eo:cloud_cover"],
            band_coords=False,
            gdal_env=env,
            errors_as_nodata=(),
            reader=partial(RetryingReader, retries=retries, retry_delay=retry_delay,
                           warp_tolerance=warp_tolerance),
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
    drop = [c for c in stack.coords if c not in ("time", "band", "id")]
    stack = stack.drop_vars(drop)
    stack = stack.assign_coords(boa_offset=("time", offsets), **xr_coords(gbox))
    stack.name = "scenes"
    stack.attrs = {"nodata": 0, "units": "DN (reflectance × 10000, before harmonisation)"}
    log.info(
        "scenes: %d date(s) × %d band(s) × %d×%d px at %g m on EPSG:%d, %d chunk(s)",
        stack.sizes["time"], len(assets), gbox.shape.y, gbox.shape.x, abs(gbox.resolution.x),
        epsg_code, stack.data.npartitions,
    )
    return stack


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
