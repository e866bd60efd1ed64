"""Which scenes a run reads: one catalog search for the whole AOI, then the scenes of each tile."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import pystac
import shapely
import shapely.geometry
from odc.geo.geobox import GeoBox
from odc.geo.geom import Geometry

from clc_dask.config import RunConfig
from clc_dask.errors import InputError
from clc_dask.search import search_items
from clc_dask.seasons import season_search

log = logging.getLogger(__name__)


def search_area(aoi: Geometry, crs: Any, margin_m: float) -> shapely.Geometry:
    """The lon/lat area whose scenes a run needs: the AOI grown by ``margin_m`` metres
    (context of edge tiles), simplified to at most a few hundred vertices without shrinking."""
    tolerance = max(margin_m, 1000.0)
    grown = aoi.to_crs(crs).buffer(margin_m + tolerance).simplify(tolerance)
    return grown.to_crs("EPSG:4326", resolution=tolerance).geom


def find_scenes(config: RunConfig, aoi: Geometry, crs: Any, margin_m: float, *,
                timeout: float | tuple[float, float] = (10.0, 60.0), retries: int = 5) -> pystac.ItemCollection:
    """Search the config's catalog once for the whole AOI and the prediction season."""
    return search_items(
        config.imagery.source, aoi=search_area(aoi, crs, margin_m), max_cloud=config.imagery.max_cloud,
        collection=config.imagery.collection, timeout=timeout, retries=retries,
        **season_search(config.imagery.prediction_season, config.imagery.year),  # type: ignore[arg-type]
    )


def item_index(items: Sequence[pystac.Item]) -> shapely.STRtree:
    """A spatial index of item footprints (lon/lat), for picking each tile's scenes."""
    return shapely.STRtree([_footprint(i) for i in items])


def _footprint(item: pystac.Item) -> shapely.Geometry:
    if item.geometry:
        return shapely.geometry.shape(item.geometry)
    if item.bbox:
        west, south, east, north = (item.bbox[0], item.bbox[1], item.bbox[-2], item.bbox[-1])
        return shapely.box(west, south, east, north)
    raise InputError(f"Item {item.id} has neither geometry nor bbox: it cannot be placed on the grid.")


def items_over(items: Sequence[pystac.Item], index: shapely.STRtree, geobox: GeoBox) -> list[pystac.Item]:
    """Items whose footprint intersects ``geobox`` (in the order given)."""
    footprint = geobox.extent.to_crs("EPSG:4326", resolution=geobox.extent.boundingbox.span_x / 8).geom
    hits = sorted(int(i) for i in index.query(footprint, predicate="intersects"))
    return [items[i] for i in hits]
