"""Polygons from a class map: one GeoPackage feature per patch, styled with CLC colours.

A *patch* is a 4-connected set of pixels of one code (as CLC polygons see a raster).
Chunks are polygonized independently with ``rasterio.features.shapes`` on per-block patch
labels, in pixel coordinates; the labels are joined across block faces exactly as in
:mod:`clc_dask.generalize` (same code on both sides of a face → same patch), the pieces of a
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

import datetime as dt
import logging
import os
import sqlite3
import xml.etree.ElementTree as ET
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import dask
import dask.array as da
import geopandas as gpd
import numpy as np
import pyogrio
import rasterio.features
import shapely
import xarray as xr
from affine import Affine
from shapely.geometry import shape

from clc_dask.classes import label_of, official_codes, rgb_of, validate_codes
from clc_dask.errors import InputError, OutputError
from clc_dask.generalize import as_class_map, assemble, block_patches
from clc_dask.rasters import atomic_path, check_writable, geobox_of

log = logging.getLogger(__name__)

CODE_FIELD = "CODE_18"
OUTLINE_RGB = (110, 110, 110)


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
        raise OutputError(f"{path}: vector output must be a GeoPackage named *.gpkg.")
    check_writable(path, overwrite)
    if styles:
        check_writable(path.with_suffix(".qml"), overwrite)
        check_writable(path.with_suffix(".sld"), overwrite)
    arr = as_class_map(codes)
    if np.dtype(arr.dtype).kind not in "iu":
        raise InputError(f"Cannot vectorize a {arr.dtype} raster: a class map holds integer codes.")
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
            _embed_style(tmp, layer, qml_style(level), sld_style(level, layer))
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


# ------------------------------------------------------------------------------ styles


def _hex(rgb: tuple[int, int, int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*rgb)


def qml_style(level: int = 2, field: str = CODE_FIELD) -> str:
    """A QGIS style (categorised renderer on ``field``) with the official CLC colours."""
    root = ET.Element("qgis", version="3.28.0", styleCategories="Symbology")
    renderer = ET.SubElement(root, "renderer-v2", type="categorizedSymbol", attr=field,
                             symbollevels="0", enableorderby="0", forceraster="0")
    categories = ET.SubElement(renderer, "categories")
    symbols = ET.SubElement(renderer, "symbols")
    for index, code in enumerate(official_codes(level)):
        ET.SubElement(categories, "category", value=str(code), symbol=str(index),
                      label=f"{code} {label_of(code)}", render="true", type="string")
        symbol = ET.SubElement(symbols, "symbol", type="fill", name=str(index), alpha="1",
                               clip_to_extent="1", force_rhr="0")
        fill = ET.SubElement(symbol, "layer", {"class": "SimpleFill", "enabled": "1", "pass": "0", "locked": "0"})
        options = ET.SubElement(fill, "Option", type="Map")
        for name, value in (
            ("color", "{},{},{},255".format(*rgb_of(code))),
            ("outline_color", "{},{},{},255".format(*OUTLINE_RGB)),
            ("outline_style", "solid"),
            ("outline_width", "0.1"),
            ("outline_width_unit", "MM"),
            ("style", "solid"),
        ):
            ET.SubElement(options, "Option", type="QString", name=name, value=value)
    ET.indent(root)
    return "<!DOCTYPE qgis PUBLIC 'http://mrcc.com/qgis.dtd' 'SYSTEM'>\n" + ET.tostring(root, encoding="unicode") + "\n"


def sld_style(level: int = 2, layer: str = "clc", field: str = CODE_FIELD) -> str:
    """An OGC SLD 1.0 style: one rule per official code of ``level``, official colours."""
    sld, ogc = "http://www.opengis.net/sld", "http://www.opengis.net/ogc"
    ET.register_namespace("", sld)
    ET.register_namespace("ogc", ogc)
    root = ET.Element(f"{{{sld}}}StyledLayerDescriptor", version="1.0.0")
    named = ET.SubElement(root, f"{{{sld}}}NamedLayer")
    ET.SubElement(named, f"{{{sld}}}Name").text = layer
    user = ET.SubElement(named, f"{{{sld}}}UserStyle")
    ET.SubElement(user, f"{{{sld}}}Title").text = f"CORINE Land Cover, Level {level}"
    fts = ET.SubElement(user, f"{{{sld}}}FeatureTypeStyle")
    for code in official_codes(level):
        rule = ET.SubElement(fts, f"{{{sld}}}Rule")
        ET.SubElement(rule, f"{{{sld}}}Name").text = str(code)
        ET.SubElement(rule, f"{{{sld}}}Title").text = f"{code} {label_of(code)}"
        flt = ET.SubElement(rule, f"{{{ogc}}}Filter")
        equal = ET.SubElement(flt, f"{{{ogc}}}PropertyIsEqualTo")
        ET.SubElement(equal, f"{{{ogc}}}PropertyName").text = field
        ET.SubElement(equal, f"{{{ogc}}}Literal").text = str(code)
        symbolizer = ET.SubElement(rule, f"{{{sld}}}PolygonSymbolizer")
        fill = ET.SubElement(symbolizer, f"{{{sld}}}Fill")
        ET.SubElement(fill, f"{{{sld}}}CssParameter", name="fill").text = _hex(rgb_of(code))
        stroke = ET.SubElement(symbolizer, f"{{{sld}}}Stroke")
        ET.SubElement(stroke, f"{{{sld}}}CssParameter", name="stroke").text = _hex(OUTLINE_RGB)
        ET.SubElement(stroke, f"{{{sld}}}CssParameter", name="stroke-width").text = "0.26"
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def _embed_style(gpkg: Path, layer: str, qml: str, sld: str) -> None:
    """Store the style as the layer's default in ``layer_styles`` (QGIS's convention), stamped
    with GDAL's ``OGR_CURRENT_DATE`` when set (:func:`fixed_gpkg_date`: the same bytes every run)."""
    now = pyogrio.get_gdal_config_option("OGR_CURRENT_DATE") or dt.datetime.now(dt.UTC).strftime(
        "%Y-%m-%dT%H:%M:%S.000Z")
    with sqlite3.connect(gpkg) as db:
        db.execute(
            "CREATE TABLE IF NOT EXISTS layer_styles (id INTEGER PRIMARY KEY AUTOINCREMENT, "
            "f_table_catalog TEXT(256), f_table_schema TEXT(256), f_table_name TEXT(256), "
            "f_geometry_column TEXT(256), styleName TEXT(30), styleQML TEXT, styleSLD TEXT, "
            "useAsDefault BOOLEAN, description TEXT, owner TEXT(30), ui TEXT(30), update_time DATETIME)"
        )
        db.execute(
            "INSERT OR IGNORE INTO gpkg_contents (table_name, data_type, identifier, last_change) "
            "VALUES ('layer_styles', 'attributes', 'layer_styles', ?)", (now,)
        )
        column = db.execute("SELECT column_name FROM gpkg_geometry_columns WHERE table_name = ?", (layer,)).fetchone()
        db.execute(
            "INSERT INTO layer_styles (f_table_catalog, f_table_schema, f_table_name, f_geometry_column, "
            "styleName, styleQML, styleSLD, useAsDefault, description, owner, ui, update_time) "
            "VALUES ('', '', ?, ?, ?, ?, ?, 1, 'CORINE Land Cover official colours', '', NULL, ?)",
            (layer, column[0] if column else "geom", layer, qml, sld, now),
        )
    db.close()


@contextmanager
def fixed_gpkg_date(year: int) -> Iterator[None]:
    """GDAL stamps GeoPackages with the current time unless ``OGR_CURRENT_DATE`` is set:
    fix it (to the end of the map's year) so that a tile's GeoPackage is reproducible."""
    key = "OGR_CURRENT_DATE"
    before = pyogrio.get_gdal_config_option(key)
    pyogrio.set_gdal_config_options({key: f"{year}-12-31T00:00:00.000Z"})
    try:
        yield
    finally:
        pyogrio.set_gdal_config_options({key: before})
