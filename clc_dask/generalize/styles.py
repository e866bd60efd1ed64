"""Styles of the polygon layers: QGIS (QML) and OGC SLD with the official CLC colours.

:func:`embed_style` stores a style in a GeoPackage's ``layer_styles`` table (QGIS opens the
layer styled); :func:`fixed_gpkg_date` makes GDAL's GeoPackage timestamps reproducible.
"""

from __future__ import annotations

import datetime as dt
import sqlite3
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pyogrio

from clc_dask.classes import label_of, official_codes, rgb_of

#: The code field of every polygon layer (as in the EEA CLC 2018 vector data).
CODE_FIELD = "CODE_18"
#: Outline colour of the polygons.
OUTLINE_RGB = (110, 110, 110)


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


def embed_style(gpkg: Path, layer: str, qml: str, sld: str) -> None:
    """Store the style as the layer's default in ``layer_styles`` (QGIS's convention)."""
    # the date GDAL stamps the file with (fixed by fixed_gpkg_date), so the file is reproducible
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
