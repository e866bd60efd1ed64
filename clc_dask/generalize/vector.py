"""Polygons from a class map: one GeoPackage feature per patch, styled with CLC colours.

A *patch* is a 4-connected set of pixels of one code (as CLC polygons see a raster).
Chunks are polygonized independently with ``rasterio.features.shapes`` on per-block patch
labels, in pixel coordinates; the labels are joined across block faces exactly as in
:mod:`clc_dask.generalize.patchgraph` (same code on both sides of a face → same patch), the pieces of a
patch are dissolved into one polygon (integer pixel coordinates, so shared edges cancel
exactly), and only then transformed to the raster's CRS. The result does not depend on the
chunking: a polygon crossing chunk boundaries is one feature, and features are ordered by
their first pixel in row-major order.

Fields: ``CODE_18`` (the code as text, as in the EEA CLC 2018 vector data; the same name is
kept for Level-2 codes such as ``"31"``), ``label`` (official English label of the code at
its level) and ``area_ha`` (pixel count × pixel area, hectares). Beside ``out.gpkg`` go
``out.qml`` (QGIS categorised renderer on ``CODE_18``) and ``out.sld`` (OGC SLD 1.0) with
the official colours; the QML is also stored in the GeoPackage's ``layer_styles`` table so
QGIS opens the layer styled. Every file is written to a temporary name and renamed into
place when complete.
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from pathlib import Path

import dask
import dask.array as da
import geopandas as gpd
import numpy as np
import rasterio.features
import shapely
import xarray as xr
from affine import Affine
from shapely.geometry import shape

from clc_dask.classes import label_of, validate_codes
from clc_dask.errors import InputError, OutputError
from clc_dask.generalize.core import as_class_map
from clc_dask.generalize.patchgraph import assemble, block_patches
from clc_dask.generalize.styles import CODE_FIELD, embed_style, qml_style, sld_style
from clc_dask.rasters import check_writable, geobox_of
from clc_dask.stores import atomic_path

log = logging.getLogger(__name__)


def vectorize(
    codes: xr.DataArray,
    path: str | os.PathLike[str],
    *,
    level: int = 2,
    layer: str | None = None,
    styles: bool = True,
    overwrite: bool = True,
) -> Path:
    """Write a class map's patches as GeoPackage polygons (one feature per patch).

    Args:
        codes: (y, x) or single-band DataArray of CLC codes (0 = no data), georeferenced;
            dask-backed arrays are polygonized block by block.
        path: the ``.gpkg`` to write.
        level: CLC level of the codes (2 or 3; 1 works too): picks labels and colours.
            Codes that are not official codes of this level are refused before writing.
        layer: layer name (default: the file's stem).
        styles: also write ``.qml`` and ``.sld`` beside it and embed the QML.
        overwrite: replace existing files (otherwise an existing file is an error).

    Returns:
        The GeoPackage path.
    """
    path = Path(path)
    if path.suffix.lower() != ".gpkg":
        raise OutputError(f"`path` {path}: vector output must be a GeoPackage named *.gpkg.")
    check_writable(path, overwrite)
    if styles:
        check_writable(path.with_suffix(".qml"), overwrite)
        check_writable(path.with_suffix(".sld"), overwrite)
    arr = as_class_map(codes)
    if np.dtype(arr.dtype).kind not in "iu":
        raise InputError(f"Cannot vectorize a {arr.dtype} raster `codes`: a class map holds integer codes.")
    gbox = geobox_of(arr)
    layer = layer or path.stem

    data = arr.data if isinstance(arr.data, da.Array) else da.from_array(np.asarray(arr.data), chunks=-1)
    blocks = data.to_delayed(optimize_graph=False)
    row0 = np.concatenate([[0], np.cumsum(data.chunks[0])[:-1]])
    col0 = np.concatenate([[0], np.cumsum(data.chunks[1])[:-1]])
    polygonize = dask.delayed(_block_polygons, pure=True)
    tasks = [polygonize(blocks[iy, ix], (int(row0[iy]), int(col0[ix])), data.shape[1])
             for iy in range(blocks.shape[0]) for ix in range(blocks.shape[1])]
    results = dask.compute(*tasks)
    nx = blocks.shape[1]
    tables = [[results[iy * nx + ix][0] for ix in range(nx)] for iy in range(blocks.shape[0])]
    graph = assemble(tables, connectivity=4)
    present = np.unique(graph.code)
    validate_codes(present, level)

    pieces: dict[int, list[shapely.Geometry]] = defaultdict(list)
    for index, (_, polygons) in enumerate(results):
        offset = graph.offsets[index // nx][index % nx]
        for local, geom in polygons:
            pieces[int(graph.patch_of[offset + local - 1])].append(geom)
    order = np.argsort(graph.first, kind="stable")
    geoms = np.array([_dissolve(pieces[int(p)]) for p in order], dtype=object)
    # exact in integer pixel coordinates: drop the collinear vertices where pieces met and
    # fix ring order/start, so the features do not depend on the chunking
    geoms = shapely.normalize(shapely.simplify(geoms, 0))
    geoms = shapely.transform(geoms, _to_crs(gbox.affine))
    pixel_ha = abs(gbox.affine.determinant) / 10_000
    frame = gpd.GeoDataFrame(
        {
            CODE_FIELD: [str(int(c)) for c in graph.code[order]],
            "label": [label_of(int(c)) for c in graph.code[order]],
            "area_ha": graph.area[order] * pixel_ha,
        },
        geometry=geoms,
        crs=gbox.crs.to_wkt(),
    )
    with atomic_path(path, suffix=".gpkg") as tmp:
        tmp.unlink()  # GDAL creates the GeoPackage itself
        frame.to_file(tmp, layer=layer, driver="GPKG", engine="pyogrio", geometry_type="Polygon")
        if styles:
            embed_style(tmp, layer, qml_style(level), sld_style(level, layer))
    if styles:
        for suffix, text in ((".qml", qml_style(level)), (".sld", sld_style(level, layer))):
            with atomic_path(path.with_suffix(suffix), suffix=suffix) as tmp:
                tmp.write_text(text, encoding="utf-8")
    log.info("wrote %s: %d polygons, %d classes", path, len(frame), present.size)
    return path


def _block_polygons(block: np.ndarray, origin: tuple[int, int], width: int) -> tuple[object, list]:
    """Patch table and (local label, polygon in whole-raster pixel coordinates) of a block."""
    table, labels = block_patches(block, origin, width, connectivity=4)
    to_pixels = Affine.translation(origin[1], origin[0])
    polygons = [(int(value), shape(geom)) for geom, value in
                rasterio.features.shapes(labels, mask=labels > 0, connectivity=4, transform=to_pixels)]
    return table, polygons


def _dissolve(parts: list[shapely.Geometry]) -> shapely.Geometry:
    if len(parts) == 1:
        return parts[0]
    return shapely.union_all(parts)


def _to_crs(transform: Affine):  # noqa: ANN202 - returns a (N, 2) → (N, 2) callable
    a, b, c, d, e, f = transform.a, transform.b, transform.c, transform.d, transform.e, transform.f

    def apply(xy: np.ndarray) -> np.ndarray:
        x, y = xy[:, 0], xy[:, 1]
        return np.column_stack([a * x + b * y + c, d * x + e * y + f])

    return apply
