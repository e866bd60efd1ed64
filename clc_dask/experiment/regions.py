"""Regions of an experiment: seasonal mosaics and CLC labels on one grid, opened or built.

A region given as files is opened lazily and checked against the configurations before any
pixel is read: every season a configuration trains or is tested on has a mosaic, every mosaic
has the configuration's bands, and every raster is on the labels' grid. A region given as an
area (``aoi`` + ``grid`` + ``imagery`` + ``clc``) is first checked the same way against what it
will hold, then built: one mosaic per season (searched, SCL-masked median) and the labels,
each written atomically and reused when the experiment runs again.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import xarray as xr
from odc.geo.geobox import GeoBox
from odc.geo.geom import Geometry

from clc_dask.errors import ConfigError, InputError
from clc_dask.experiment.config import Configuration, RegionConfig
from clc_dask.grid import assert_same_grid, geobox_for_aoi, lonlat_box
from clc_dask.items import COMPOSITES
from clc_dask.labels import make_labels, write_labels
from clc_dask.mosaic import make_mosaic, mosaic_paths, write_mosaic
from clc_dask.patches import find_clear_count
from clc_dask.rasters import geobox_of, open_raster
from clc_dask.search import read_aoi

log = logging.getLogger(__name__)

#: Files of a built region, inside the experiment folder's ``regions/<name>/``.
LABELS_FILE = "labels.tif"


def mosaic_file(season: str) -> str:
    """File name of a built region's mosaic of ``season``."""
    return f"mosaic_{season}.tif"


@dataclass
class Region:
    """A region's rasters, opened lazily: season → mosaic, the labels, clear counts."""

    name: str
    mosaics: dict[str, Path]
    labels: Path
    geobox: GeoBox
    bands: dict[str, tuple[str, ...]]
    clear_counts: dict[str, Path] = field(default_factory=dict)

    def open_mosaic(self, season: str, chunks: int = 2048) -> xr.DataArray:
        """The (band, y, x) mosaic of ``season`` (lazy)."""
        return _open_mosaic(self.mosaics[season], chunks)

    def open_labels(self, chunks: int = 2048) -> xr.DataArray:
        """The (y, x) CLC code raster (lazy)."""
        return open_raster(self.labels, chunks=chunks).isel(band=0, drop=True)

    def record(self) -> dict[str, Any]:
        """What the region is made of (for provenance and resume checks)."""
        return {"mosaics": {s: str(p) for s, p in self.mosaics.items()}, "labels": str(self.labels),
                "clear_counts": {s: str(p) for s, p in self.clear_counts.items()},
                "shape": [int(self.geobox.shape.y), int(self.geobox.shape.x)],
                "crs": str(self.geobox.crs), "affine": list(self.geobox.affine)[:6]}


def _open_mosaic(path: Path, chunks: int) -> xr.DataArray:
    if path.is_dir():  # a Zarr mosaic store (clc-dask mosaic --format zarr)
        ds = xr.open_zarr(path, mask_and_scale=False)
        if "reflectance" not in ds:
            raise InputError(f"The Zarr store {path} has no 'reflectance' variable: pass a clc-dask mosaic.")
        return ds["reflectance"].transpose("band", "y", "x")
    return open_raster(path, chunks=chunks)


def open_region(name: str, config: RegionConfig) -> Region:
    """Open a region given as files (metadata only) and check that its rasters share one grid.

    Raises:
        InputError: a file is missing or unreadable.
        GridMismatchError: a mosaic or clear count is on another grid than the labels.
    """
    if config.mosaics is None or config.labels is None:
        raise ConfigError(f"Region {name!r} is built from an area: build it first (build_region).")
    labels = Path(config.labels)
    geobox = geobox_of(open_raster(labels))
    mosaics, bands = {}, {}
    for season, path in config.mosaics.items():
        mosaic = _open_mosaic(Path(path), 2048)
        assert_same_grid(geobox_of(mosaic), geobox, f"{season} mosaic of region {name!r}", "labels")
        mosaics[season] = Path(path)
        bands[season] = tuple(str(b) for b in mosaic["band"].values)
    clear = _clear_counts(config, mosaics)
    for season, path in clear.items():
        assert_same_grid(geobox_of(_open_mosaic(path, 2048)), geobox,
                         f"{season} clear count of region {name!r}", "labels")
    return Region(name, mosaics, labels, geobox, bands, clear)


def _clear_counts(config: RegionConfig, mosaics: Mapping[str, Path]) -> dict[str, Path]:

    if config.clear_counts is not None:
        unknown = sorted(set(config.clear_counts) - set(mosaics))
        if unknown:
            raise ConfigError(f"clear_counts of season(s) {unknown} have no mosaic: drop them or add mosaics.")
        return {s: Path(p) for s, p in config.clear_counts.items()}
    found = {s: find_clear_count(p) for s, p in mosaics.items()}
    return {s: p for s, p in found.items() if p is not None and not p.is_dir()}


# --------------------------------------------------------------------------- checks


def check_inputs(region: str, bands: Mapping[str, Iterable[str]], configurations: Sequence[Configuration],
                 needs: Mapping[str, Sequence[str]]) -> None:
    """Every configuration finds a mosaic with its bands for every season it needs.

    Args:
        region: region name (for messages).
        bands: season → bands its mosaic holds (or will hold).
        configurations: the experiment's configurations.
        needs: configuration name → the seasons it needs in this region (training and/or test).

    Raises:
        ConfigError: naming the configuration, the season and the missing bands.
    """
    for configuration in configurations:
        for season in needs.get(configuration.name, ()):
            if season not in bands:
                raise ConfigError(
                    f"Configuration {configuration.name!r} needs a mosaic of {season} in region {region!r}, "
                    f"which has mosaics of {sorted(bands) or 'no season'}: add one, or change the "
                    "configuration's `seasons` (or the evaluation's)."
                )
            missing = [b for b in configuration.train.bands if b not in tuple(bands[season])]
            if missing:
                raise ConfigError(
                    f"Configuration {configuration.name!r} uses bands {list(configuration.train.bands)} "
                    f"({configuration.train.composite}) but the {season} mosaic of region {region!r} has "
                    f"{list(bands[season])}, without {missing}: make the mosaic with composite 'all', "
                    "or change the configuration's `composite`."
                )


def planned_bands(config: RegionConfig) -> dict[str, tuple[str, ...]]:
    """Season → bands the mosaics of a region to be built will hold."""
    if config.imagery is None:
        raise ConfigError("planned_bands is for regions built from an area.")
    return {s: COMPOSITES[config.imagery.composite] for s in config.imagery.seasons}


# --------------------------------------------------------------------------- building


def built_region_config(config: RegionConfig, folder: str | os.PathLike[str]) -> RegionConfig:
    """The files a region built in ``folder`` is made of, as a files-region config."""
    folder = Path(folder)
    if config.imagery is None:
        raise ConfigError("built_region_config is for regions built from an area.")
    return RegionConfig(mosaics={s: str(folder / mosaic_file(s)) for s in config.imagery.seasons},
                        labels=str(folder / LABELS_FILE))


def build_region(name: str, config: RegionConfig, folder: str | os.PathLike[str], *, level: int,
                 chunk_size: int = 1024) -> Region:
    """Build (or reuse) a region's mosaics and labels in ``folder`` and open it.

    Each season's scenes are searched in ``imagery.source`` over the AOI, masked with SCL and
    composited (median) on the region's grid; the labels are rasterized from ``clc``. Files
    already complete in ``folder`` are reused. Computations run on the current Dask client
    (or local threads).

    Raises:
        SearchError, InputError: no scenes, unreadable sources.
    """


    assert config.aoi is not None and config.grid is not None and config.imagery is not None
    assert config.clc is not None
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if config.aoi.bbox is not None:
        area = lonlat_box(config.aoi.bbox)
    else:
        area = Geometry(read_aoi(config.aoi.path or ""), "EPSG:4326")
    geobox = geobox_for_aoi(area, config.grid.epsg, config.grid.resolution)
    files = built_region_config(config, folder)
    assert files.mosaics is not None and files.labels is not None
    for season, path in files.mosaics.items():
        if all(p.is_file() for p in mosaic_paths(path)):
            log.info("region %s: reusing the %s mosaic %s", name, season, path)
            continue
        _build_mosaic(config, season, area, geobox, Path(path), chunk_size)
    if not Path(files.labels).is_file():
        log.info("region %s: rasterizing %s to Level-%d labels", name, config.clc.source, level)
        labels = make_labels(config.clc.source, geobox, level=level, field=config.clc.field,
                              layer=config.clc.layer, chunk_size=chunk_size)
        write_labels(labels, files.labels, level=level)
    return open_region(name, files)


def _build_mosaic(config: RegionConfig, season: str, area: Any, geobox: GeoBox, out: Path,
                  chunk_size: int) -> None:

    imagery = config.imagery
    assert imagery is not None
    mosaic = make_mosaic(imagery.source, aoi=area, season=season, years=[imagery.year],
                         max_cloud=imagery.max_cloud, collection=imagery.collection,
                         composite=imagery.composite, epsg=geobox.crs.epsg, resolution=abs(geobox.resolution.x),
                         chunk_size=chunk_size, gdal=dict(imagery.gdal) or None)
    if mosaic.odc.geobox != geobox:  # the region's grid is what its labels are rasterized on
        raise ConfigError(f"The {season} mosaic of region {out.parent} came out on another grid than the region's.")
    log.info("building the %s mosaic %s from %d scene(s)", season, out, len(mosaic.attrs["items"]))
    write_mosaic(mosaic, out, clear_count=True)
