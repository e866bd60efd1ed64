"""STAC metadata of the demo scenes, laid out like Earth Search v1 ``sentinel-2-l2a``.

Items carry the properties real Earth Search v1 L2A items carry (``eo:cloud_cover``,
``proj:epsg``, ``s2:processing_baseline``, ``earthsearch:boa_offset_applied``, the
``s2:*_percentage`` statistics, sun angles …) and the asset keys blue/green/red/nir/scl
with ``raster:bands`` (``scale`` 0.0001, ``offset`` -0.1 where the DN carry the +1000 BOA
offset, 0 for older baselines), ``proj:shape`` and ``proj:transform``.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from typing import Any

from clc_dask import __version__
from clc_dask.demo.scenes import BOA_OFFSET, RELATIVE_ORBIT, ScenePlan

COLLECTION_ID = "sentinel-2-l2a"
COG_TYPE = "image/tiff; application=geotiff; profile=cloud-optimized"
ITEM_EXTENSIONS = [
    "https://stac-extensions.github.io/raster/v1.1.0/schema.json",
    "https://stac-extensions.github.io/mgrs/v1.0.0/schema.json",
    "https://stac-extensions.github.io/grid/v1.0.0/schema.json",
    "https://stac-extensions.github.io/projection/v1.1.0/schema.json",
    "https://stac-extensions.github.io/eo/v1.1.0/schema.json",
    "https://stac-extensions.github.io/view/v1.0.0/schema.json",
    "https://stac-extensions.github.io/processing/v1.1.0/schema.json",
]
COLLECTION_EXTENSIONS = [
    "https://stac-extensions.github.io/item-assets/v1.0.0/schema.json",
    "https://stac-extensions.github.io/view/v1.0.0/schema.json",
    "https://stac-extensions.github.io/raster/v1.1.0/schema.json",
    "https://stac-extensions.github.io/eo/v1.0.0/schema.json",
]
EO_BANDS: dict[str, dict[str, Any]] = {
    "blue": {"name": "blue", "common_name": "blue", "description": "Blue (band 2)",
             "center_wavelength": 0.49, "full_width_half_max": 0.098},
    "green": {"name": "green", "common_name": "green", "description": "Green (band 3)",
              "center_wavelength": 0.56, "full_width_half_max": 0.045},
    "red": {"name": "red", "common_name": "red", "description": "Red (band 4)",
            "center_wavelength": 0.665, "full_width_half_max": 0.038},
    "nir": {"name": "nir", "common_name": "nir", "description": "NIR 1 (band 8)",
            "center_wavelength": 0.842, "full_width_half_max": 0.145},
}
TITLES = {
    "blue": "Blue (band 2) - 10m", "green": "Green (band 3) - 10m", "red": "Red (band 4) - 10m",
    "nir": "NIR 1 (band 8) - 10m", "scl": "Scene classification map (SCL)",
}
_LAUNCH = {"sentinel-2a": datetime(2015, 6, 23, 1, 51, tzinfo=UTC),
           "sentinel-2b": datetime(2017, 3, 7, 1, 49, tzinfo=UTC)}
_ORBITS_PER_DAY = 14.3


def _stamp(when: datetime) -> str:
    return when.strftime("%Y-%m-%dT%H:%M:%S.%f") + "Z"


def _grid(shape: tuple[int, int], transform: Any) -> dict[str, Any]:
    return {"proj:shape": [int(shape[0]), int(shape[1])],
            "proj:transform": [float(transform.a), float(transform.b), float(transform.c),
                               float(transform.d), float(transform.e), float(transform.f)]}


def band_asset(key: str, href: str, shape: tuple[int, int], transform: Any, offset_in_dn: bool) -> dict[str, Any]:
    """A 10 m reflectance asset; ``raster:bands`` offset -0.1 when the DN carry +1000."""
    return {
        "href": href, "type": COG_TYPE, "title": TITLES[key], "eo:bands": [dict(EO_BANDS[key])],
        "gsd": 10, **_grid(shape, transform),
        "raster:bands": [{"nodata": 0, "data_type": "uint16", "bits_per_sample": 15,
                          "spatial_resolution": 10, "scale": 0.0001,
                          "offset": -BOA_OFFSET / 10000 if offset_in_dn else 0}],
        "roles": ["data", "reflectance"],
    }


def scl_asset(href: str, shape: tuple[int, int], transform: Any) -> dict[str, Any]:
    """The 20 m scene classification asset (uint8)."""
    return {
        "href": href, "type": COG_TYPE, "title": TITLES["scl"], **_grid(shape, transform),
        "raster:bands": [{"nodata": 0, "data_type": "uint8", "spatial_resolution": 20}],
        "roles": ["data", "reflectance"],
    }


def _absolute_orbit(platform: str, when: datetime) -> int:
    return int((when - _LAUNCH[platform]).total_seconds() / 86400 * _ORBITS_PER_DAY)


def _earth_sun_factor(when: datetime) -> float:
    doy = when.timetuple().tm_yday
    return 1.0 / (1 - 0.01672 * math.cos(math.radians(0.9856 * (doy - 4)))) ** 2


def item_dict(plan: ScenePlan, stats: dict[str, float], geometry: dict[str, Any],
              bbox: list[float], epsg: int, mgrs_tile: str, assets: dict[str, dict[str, Any]],
              datatake_start: datetime | None = None) -> dict[str, Any]:
    """An Earth Search v1 style L2A item (links relative to a static catalog layout).

    ``datatake_start`` is when the satellite pass began (default: the granule's own time);
    granules of one pass share it, and with it their datatake, product, orbit and
    generation time.
    """
    when = plan.datetime
    start = when if datatake_start is None else datatake_start
    baseline = plan.processing_baseline
    nbl = baseline.replace(".", "")
    generated = start + timedelta(hours=2, minutes=17, seconds=41)
    if plan.carries_boa_offset and start.year < 2022:  # reprocessed collection
        generated = datetime(2022, 11, 14, 3, 12, 5, tzinfo=UTC) + timedelta(days=start.timetuple().tm_yday)
    created = generated + timedelta(hours=6, minutes=2)
    short = "S2A" if plan.platform == "sentinel-2a" else "S2B"
    orbit = _absolute_orbit(plan.platform, start)
    t_acq, t_gen = f"{start:%Y%m%dT%H%M%S}", f"{generated:%Y%m%dT%H%M%S}"
    properties: dict[str, Any] = {
        "created": _stamp(created),
        "platform": plan.platform,
        "constellation": "sentinel-2",
        "instruments": ["msi"],
        "eo:cloud_cover": stats["eo:cloud_cover"],
        "proj:epsg": epsg,
        "proj:code": f"EPSG:{epsg}",
        "mgrs:utm_zone": int(mgrs_tile[:2]),
        "mgrs:latitude_band": mgrs_tile[2],
        "mgrs:grid_square": mgrs_tile[3:],
        "grid:code": f"MGRS-{mgrs_tile}",
        "view:sun_azimuth": round(plan.sun_azimuth, 9),
        "view:sun_elevation": round(plan.sun_elevation, 9),
        "s2:degraded_msi_data_percentage": 0.0,
        **{k: v for k, v in stats.items() if k.startswith("s2:")},
        "s2:product_type": "S2MSI2A",
        "s2:processing_baseline": baseline,
        "s2:product_uri": f"{short}_MSIL2A_{t_acq}_N{nbl}_R{RELATIVE_ORBIT:03d}_T{mgrs_tile}_{t_gen}.SAFE",
        "s2:generation_time": _stamp(generated),
        "s2:datatake_id": f"GS2{short[-1]}_{t_acq}_{orbit:06d}_N{baseline}",
        "s2:datatake_type": "INS-NOBS",
        "s2:datastrip_id": f"{short}_OPER_MSI_L2A_DS_SGS__{t_gen}_S{t_acq}_N{baseline}",
        "s2:granule_id": f"{short}_OPER_MSI_L2A_TL_SGS__{t_gen}_A{orbit:06d}_T{mgrs_tile}_N{baseline}",
        "s2:reflectance_conversion_factor": round(_earth_sun_factor(when), 12),
        "datetime": _stamp(when),
        "s2:sequence": "0",
        # Earth Search's flag says whether the offset was already *removed* from the COGs
        # (true) or is still in the DN (false): these files keep ESA's DN, offset included.
        "earthsearch:boa_offset_applied": False,
        "processing:software": {"clc-dask-demo": __version__},
        "updated": _stamp(created),
    }
    return {
        "type": "Feature",
        "stac_version": "1.0.0",
        "stac_extensions": list(ITEM_EXTENSIONS),
        "id": plan.id,
        "properties": properties,
        "geometry": geometry,
        "links": [
            {"rel": "root", "href": "../../catalog.json", "type": "application/json"},
            {"rel": "collection", "href": "../collection.json", "type": "application/json",
             "title": "Sentinel-2 Level 2A"},
            {"rel": "parent", "href": "../collection.json", "type": "application/json",
             "title": "Sentinel-2 Level 2A"},
        ],
        "assets": assets,
        "bbox": bbox,
        "collection": COLLECTION_ID,
    }


def collection_dict(bbox: list[float], interval: tuple[str, str], item_hrefs: list[str],
                    grid10: dict[str, Any], grid20: dict[str, Any]) -> dict[str, Any]:
    """The ``sentinel-2-l2a`` collection with item-assets for the five demo assets."""
    item_assets: dict[str, Any] = {}
    for key in ("blue", "green", "red", "nir"):
        item_assets[key] = {
            "type": COG_TYPE, "title": TITLES[key], "eo:bands": [dict(EO_BANDS[key])], "gsd": 10,
            **grid10,
            "raster:bands": [{"nodata": 0, "data_type": "uint16", "bits_per_sample": 15,
                              "spatial_resolution": 10, "scale": 0.0001, "offset": 0}],
            "roles": ["data", "reflectance"],
        }
    item_assets["scl"] = {
        "type": COG_TYPE, "title": TITLES["scl"], **grid20,
        "raster:bands": [{"nodata": 0, "data_type": "uint8", "spatial_resolution": 20}],
        "roles": ["data", "reflectance"],
    }
    links = [{"rel": "root", "href": "../catalog.json", "type": "application/json"},
             {"rel": "parent", "href": "../catalog.json", "type": "application/json"}]
    links += [{"rel": "item", "href": href, "type": "application/json"} for href in item_hrefs]
    return {
        "type": "Collection",
        "id": COLLECTION_ID,
        "stac_version": "1.0.0",
        "stac_extensions": list(COLLECTION_EXTENSIONS),
        "title": "Sentinel-2 Level 2A",
        "description": (
            "Synthetic Sentinel-2 L2A scenes of the clc-dask demo region, laid out like the "
            "Earth Search v1 sentinel-2-l2a collection (asset keys blue/green/red/nir/scl, "
            "cloud-optimized GeoTIFFs, BOA offset of baseline 04.00+ kept in the DN)."
        ),
        "keywords": ["sentinel", "earth observation", "esa", "synthetic", "demo"],
        "license": "CC0-1.0",
        "providers": [{"name": "clc-dask", "roles": ["producer", "processor", "host"]}],
        "extent": {"spatial": {"bbox": [bbox]}, "temporal": {"interval": [list(interval)]}},
        "summaries": {
            "platform": ["sentinel-2a", "sentinel-2b"],
            "constellation": ["sentinel-2"],
            "instruments": ["msi"],
            "gsd": [10, 20],
            "eo:bands": [dict(EO_BANDS[k]) for k in ("blue", "green", "red", "nir")],
        },
        "item_assets": item_assets,
        "links": links,
    }


def catalog_dict(title: str, description: str) -> dict[str, Any]:
    """The root catalog of the static layout (one child: the collection)."""
    return {
        "type": "Catalog",
        "id": "clc-dask-demo",
        "stac_version": "1.0.0",
        "title": title,
        "description": description,
        "links": [
            {"rel": "root", "href": "./catalog.json", "type": "application/json"},
            {"rel": "child", "href": f"./{COLLECTION_ID}/collection.json", "type": "application/json"},
        ],
    }
