"""Normalised Sentinel-2 L2A items: one asset-key scheme, absolute hrefs, one reflectance scale.

Catalogs name the same files differently:

======================================  ================================  =====================
catalog                                 asset keys                        offset information
======================================  ================================  =====================
Earth Search v1 ``sentinel-2-l2a``      ``blue green red nir scl``        ``earthsearch:boa_offset_applied``
Earth Search v1 ``sentinel-2-c1-l2a``   ``blue green red nir scl``        ``raster:bands`` offset −0.1
Earth Search v0 ``sentinel-s2-l2a-cogs``  ``B02 B03 B04 B08 SCL``         ``sentinel:boa_offset_applied``
Planetary Computer ``sentinel-2-l2a``   ``B02 B03 B04 B08 SCL``           ``s2:processing_baseline``
======================================  ================================  =====================

:func:`normalize_items` returns copies with the canonical keys ``B02 B03 B04 B08 SCL``,
absolute hrefs, ``proj:epsg`` where only ``proj:code`` was given (stackstac 0.5.1 reads only
``proj:epsg``), and the property ``clc_dask:boa_offset``: the DN to subtract so that
surface reflectance = DN / 10000 for every scene (see :func:`boa_offset`).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime

import pystac
from pystac.utils import make_absolute_href

from clc_dask.errors import ConfigError, InputError

log = logging.getLogger(__name__)

#: 10 m reflectance bands, in wavelength order.
REFLECTANCE_BANDS: tuple[str, ...] = ("B02", "B03", "B04", "B08")
#: Scene classification layer (20 m).
SCL_BAND = "SCL"
CANONICAL_BANDS: tuple[str, ...] = (*REFLECTANCE_BANDS, SCL_BAND)

#: Band order of each composite (paper: RGB = B04,B03,B02; NRG = B08,B04,B03).
COMPOSITES: dict[str, tuple[str, ...]] = {
    "rgb": ("B04", "B03", "B02"),
    "nrg": ("B08", "B04", "B03"),
    "all": ("B02", "B03", "B04", "B08"),
}



def composite_bands(composite: str | Sequence[str]) -> tuple[str, ...]:
    """Band order of a composite: a name (``rgb`` → B04, B03, B02; ``nrg`` → B08, B04, B03;
    ``all`` → B02, B03, B04, B08), a comma list (``"B08,B04"``) or a sequence of band names.

    Raises:
        ConfigError: an unknown name, an unknown or repeated band, or no band at all.
    """
    given = composite if isinstance(composite, str) else ",".join(map(str, composite))
    if isinstance(composite, str):
        if composite.strip().lower() in COMPOSITES:
            return COMPOSITES[composite.strip().lower()]
        composite = [b.strip() for b in composite.split(",") if b.strip()]
    bands = tuple(str(b).upper() for b in composite)
    unknown = [b for b in bands if b not in REFLECTANCE_BANDS]
    if not bands or unknown or len(set(bands)) != len(bands):
        raise ConfigError(
            f"Unknown composite {given!r}: use one of {', '.join(COMPOSITES)}, or distinct band "
            f"names from {', '.join(REFLECTANCE_BANDS)} (e.g. B08,B04,B03)."
        )
    return bands


def composite_name(bands: Sequence[str]) -> str:
    """``rgb``, ``nrg``, ``all``, or the comma list of a band order (e.g. ``B08,B04``)."""
    known = {order: name for name, order in COMPOSITES.items()}
    return known.get(tuple(bands), ",".join(bands))


#: Asset keys used for each canonical band by the catalogs we know, most specific first.
ASSET_KEYS: dict[str, tuple[str, ...]] = {
    "B02": ("B02", "blue", "b02"),
    "B03": ("B03", "green", "b03"),
    "B04": ("B04", "red", "b04"),
    "B08": ("B08", "nir", "b08"),
    "SCL": ("SCL", "scl"),
}
_COMMON_NAMES = {"blue": "B02", "green": "B03", "red": "B04", "nir": "B08"}

#: Property carrying the harmonisation offset (DN) on normalised items.
OFFSET_PROPERTY = "clc_dask:boa_offset"
#: The offset ESA adds to L2A DN from processing baseline 04.00 on (reflectance 0.1 × 10000).
BOA_ADD_OFFSET = 1000
#: Baseline 04.00 went live on 25 January 2022; used only when an item says nothing else.
BASELINE_04_START = datetime(2022, 1, 25, tzinfo=UTC)
#: Properties saying whether the baseline-04.00 offset was already removed from the COGs
#: (Earth Search v1, v0), strongest first.
OFFSET_APPLIED_FLAGS: tuple[str, ...] = ("earthsearch:boa_offset_applied", "sentinel:boa_offset_applied")
_TRUE_TEXT, _FALSE_TEXT = "true", "false"

_BASELINE_IN_ID = re.compile(r"_N(\d{2})(\d{2})_")


def find_asset_key(item: pystac.Item, band: str) -> str | None:
    """The key of ``item``'s asset holding canonical ``band`` (``B02`` … ``SCL``), or None.

    Known keys are tried first (``red``, ``B04`` …); otherwise an asset whose single
    ``eo:bands`` entry is named ``band`` (or has its common name, e.g. ``red``) is used,
    preferring GeoTIFFs over JPEG2000 copies.
    """
    for key in ASSET_KEYS.get(band, (band,)):
        if key in item.assets:
            return key
    candidates = []
    for key, asset in item.assets.items():
        eo_bands = asset.extra_fields.get("eo:bands") or []
        if len(eo_bands) != 1:
            continue
        name = str(eo_bands[0].get("name", ""))
        common = str(eo_bands[0].get("common_name", ""))
        if name.upper() == band or (_COMMON_NAMES.get(common) == band and name.lower() in ("", common)):
            candidates.append(key)
    if not candidates:
        return None
    candidates.sort(key=lambda k: ("jp2" in (item.assets[k].media_type or "") or k.endswith("-jp2"), k))
    return candidates[0]


def processing_baseline(item: pystac.Item) -> tuple[int, int] | None:
    """The processing baseline as ``(major, minor)`` (``"05.09"`` → ``(5, 9)``), or None."""
    props = item.properties
    for key in ("s2:processing_baseline", "sentinel:processing_baseline", "processing:version"):
        value = props.get(key)
        if value is None:
            continue
        match = re.match(r"^\s*(\d+)\.(\d+)", str(value))
        if match:
            return int(match[1]), int(match[2])
    for key in ("s2:product_uri", "sentinel:product_id", "s2:datatake_id"):
        match = _BASELINE_IN_ID.search(str(props.get(key, "")))
        if match:
            return int(match[1]), int(match[2])
    match = _BASELINE_IN_ID.search(item.id)
    return (int(match[1]), int(match[2])) if match else None


def boa_offset(item: pystac.Item) -> int:
    """DN to subtract from ``item``'s reflectance bands so that reflectance = DN / 10000.

    1000 when the scene was processed with baseline ≥ 04.00 and the offset is still in
    the pixels, 0 otherwise. Evidence, strongest first:

    1. ``clc_dask:boa_offset`` (set by :func:`normalize_items`; set it yourself to override);
    2. ``earthsearch:boa_offset_applied`` / ``sentinel:boa_offset_applied`` (Earth Search
       v1/v0), read by :func:`offset_applied_flag`: ``true`` means the COGs were already
       harmonised → 0, whatever ``raster:bands`` says (Earth Search v1 ``sentinel-2-l2a``
       items carry offset −0.1 in ``raster:bands`` although the pixels no longer hold it:
       vegetation red is ~300 DN); ``false`` means the pixels are as ESA made them: 1000
       from baseline 04.00 on, decided by the baseline or, without one, by the date as in 5.
       (``raster:bands`` is not consulted then: Earth Search writes the same −0.1 on every
       item, whatever its baseline);
    3. ``raster:bands`` scale/offset of a reflectance asset (Earth Search ``c1`` collections):
       offset −0.1 with scale 0.0001 → 1000;
    4. the processing baseline (Planetary Computer ``s2:processing_baseline``, or the
       ``_N0400_`` part of product ids) → 1000 from 04.00;
    5. nothing of the above: the acquisition date (baseline 04.00 began 2022-01-25), with
       a warning.

    Raises:
        InputError: an offset flag holds neither a boolean nor ``"true"``/``"false"``.
    """
    props = item.properties
    if OFFSET_PROPERTY in props:
        return int(props[OFFSET_PROPERTY])
    baseline = processing_baseline(item)
    applied = offset_applied_flag(item)
    if applied:
        return 0
    if applied is None:
        from_raster = _offset_from_raster_bands(item)
        if from_raster is not None:
            return from_raster
    if baseline is not None:
        return BOA_ADD_OFFSET if baseline >= (4, 0) else 0
    return _offset_from_date(item)


def offset_applied_flag(item: pystac.Item) -> bool | None:
    """The item's ``…:boa_offset_applied`` flag (:data:`OFFSET_APPLIED_FLAGS`), or None.

    JSON booleans and the strings ``"true"``/``"false"`` (any case, surrounding spaces
    ignored) are read as such; a missing flag or ``null`` gives None. Anything else is
    refused rather than guessed: a wrong guess shifts every reflectance by 0.1.

    Raises:
        InputError: the flag holds another value (the item, property and value are named).
    """
    for flag in OFFSET_APPLIED_FLAGS:
        value = item.properties.get(flag)
        if value is None:
            continue
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in (_TRUE_TEXT, _FALSE_TEXT):
            return value.strip().lower() == _TRUE_TEXT
        raise InputError(
            f"Item {item.id} has {flag} = {value!r}, which is neither true nor false, so it is "
            "unknown whether the baseline-04.00 offset (1000 DN) is still in its pixels. Fix the "
            f"item's {flag} (true: already removed, false: still in the pixels), remove the "
            f"property to decide by processing baseline and date, or set {OFFSET_PROPERTY} "
            "(DN to subtract: 0 or 1000) on the item."
        )
    return None


def _offset_from_date(item: pystac.Item) -> int:
    """The offset by acquisition date alone (baseline 04.00 began on 2022-01-25), with a warning."""
    when = item.datetime or item.common_metadata.start_datetime
    offset = BOA_ADD_OFFSET if when is not None and when >= BASELINE_04_START else 0
    log.warning(
        "item %s gives no processing baseline (nor a raster:bands offset, or its offset flag is "
        "false): assuming offset %d DN from its date %s (baseline 04.00 began 2022-01-25)",
        item.id, offset, when,
    )
    return offset


def _offset_from_raster_bands(item: pystac.Item) -> int | None:
    for band in REFLECTANCE_BANDS:
        key = find_asset_key(item, band)
        if key is None:
            continue
        raster_bands = item.assets[key].extra_fields.get("raster:bands") or []
        if len(raster_bands) != 1 or "offset" not in raster_bands[0]:
            continue
        offset = float(raster_bands[0].get("offset") or 0.0)
        scale = float(raster_bands[0].get("scale") or 1.0)
        if scale <= 0:
            continue
        return max(0, round(-offset / scale))
    return None


def normalize_items(
    items: Iterable[pystac.Item], bands: Sequence[str] = CANONICAL_BANDS
) -> list[pystac.Item]:
    """Copies of ``items`` with canonical assets ``bands`` (+ ``SCL``), absolute hrefs,
    the harmonisation offset in ``clc_dask:boa_offset``, and no links.

    Args:
        items: STAC items from any supported catalog (see the module docstring).
        bands: canonical bands needed (``SCL`` is always required: it masks clouds).

    Raises:
        InputError: an item lacks one of the needed assets (the item and asset are named),
            or has a relative href and no location to resolve it against.
    """
    wanted = list(dict.fromkeys([*bands, SCL_BAND]))
    unknown = [b for b in wanted if b not in CANONICAL_BANDS]
    if unknown:
        raise InputError(f"Unknown band(s) {unknown}: use {list(CANONICAL_BANDS)}.")
    out = []
    for item in items:
        offset = boa_offset(item)
        new = item.clone()
        self_href = item.get_self_href()
        assets: dict[str, pystac.Asset] = {}
        for band in wanted:
            key = find_asset_key(item, band)
            if key is None:
                raise InputError(
                    f"Item {item.id} has no {band} asset (looked for keys "
                    f"{', '.join(ASSET_KEYS[band])} and eo:bands names); it has "
                    f"{sorted(item.assets)}. Remove this item or use a Sentinel-2 L2A collection "
                    f"that provides {band}."
                )
            asset = item.assets[key].clone()
            asset.href = _absolute(asset.href, self_href, item.id, band)
            assets[band] = asset
        new.assets = {}
        for band, asset in assets.items():
            new.add_asset(band, asset)
        new.properties[OFFSET_PROPERTY] = offset
        # links (root, parent …) are not needed to read pixels, and serialising an item with
        # a remote root link makes pystac fetch it
        new.links = []
        _add_proj_epsg(new)
        out.append(new)
    return out


def _absolute(href: str, self_href: str | None, item_id: str, band: str) -> str:
    if "://" in href or href.startswith("/"):
        return href
    if not self_href:
        raise InputError(
            f"Item {item_id} asset {band} has the relative href {href!r} but the item has no "
            "location to resolve it against: read items with clc_dask.search (it makes hrefs "
            "absolute) or give absolute hrefs."
        )
    return make_absolute_href(href, self_href)


def _add_proj_epsg(item: pystac.Item) -> None:
    """Copy ``proj:code`` ``EPSG:n`` into ``proj:epsg`` (stackstac 0.5.1 reads only the latter)."""
    holders = [item.properties] + [a.extra_fields for a in item.assets.values()]
    for fields in holders:
        code = fields.get("proj:code")
        if fields.get("proj:epsg") is None and isinstance(code, str):
            match = re.fullmatch(r"EPSG:(\d+)", code.strip(), flags=re.IGNORECASE)
            if match:
                fields["proj:epsg"] = int(match[1])
