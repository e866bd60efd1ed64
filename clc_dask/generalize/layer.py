"""One GeoPackage layer for a map stored as tiles: polygons dissolved across tile edges.

:func:`vectorize_tiled` polygonizes a class map tile by tile (on the workers) and writes
one layer in which every patch — a 4-connected set of pixels of one code — is one polygon,
wherever the tile edges cut it; so no two polygons of one class share an edge, and each
class's area is its pixel count × the pixel area. Memory on the client stays at one batch
of tiles plus the polygons that touch a tile edge:

1. each tile's patches are labelled (:func:`~clc_dask.generalize.patchgraph.block_patches`)
   and traced (``rasterio.features.shapes``) in whole-map pixel coordinates;
2. a patch that does not touch its tile's edge is complete: it is written at once;
3. the pieces of patches that touch a tile edge are kept, joined across tile faces (facing
   pixels of one code are one patch), dissolved (exact: integer pixel coordinates) and
   written last.

Fields: ``id`` (the row-major index of the patch's first pixel in the whole map: the same
for any tiling), ``CODE_18`` (code as text), ``label`` (official label) and ``area_ha``.
Geometries are the same as :func:`~clc_dask.generalize.vector.vectorize` writes for the
whole map; features are in tile order, then the dissolved ones by ``id``.
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import dask
import dask.array as da
import geopandas as gpd
import numpy as np
import pandas as pd
import pyogrio
import rasterio.features
import shapely
import xarray as xr
from affine import Affine
from odc.geo.geobox import GeoBox
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from shapely.geometry import shape

from clc_dask.classes import label_of, validate_codes
from clc_dask.errors import ConfigError, InputError, OutputError
from clc_dask.generalize.core import as_class_map
from clc_dask.generalize.patchgraph import block_patches
from clc_dask.generalize.styles import CODE_FIELD, embed_style, qml_style, sld_style
from clc_dask.rasters import check_writable, geobox_of
from clc_dask.stores import atomic_path

log = logging.getLogger(__name__)

ID_FIELD = "id"


@dataclass
class TilePolygons:
    """A tile's polygons: complete patches, and pieces of patches that touch the tile's edge.

    Geometries of complete patches are final (map CRS); pieces are in whole-map pixel
    coordinates, keyed by local label, with the tile's edge rows/columns of local labels.
    """

    code: np.ndarray
    area: np.ndarray
    first: np.ndarray
    geometry: np.ndarray
    piece_label: np.ndarray
    piece_code: np.ndarray
    piece_area: np.ndarray
    piece_first: np.ndarray
    piece_geometry: list[shapely.Geometry]
    edges: dict[str, np.ndarray] = field(default_factory=dict)


def tile_polygons(block: np.ndarray, origin: tuple[int, int], raster_width: int, transform: Affine) -> TilePolygons:
    """Polygonize one tile (runs on a worker).

    Args:
        block: the tile's codes (0 = no data).
        origin: ``(row, col)`` of the tile's first pixel in the whole map.
        raster_width: columns of the whole map (for first-pixel indices).
        transform: the whole map's pixel → CRS transform.
    """
    block = np.asarray(block)
    table, labels = block_patches(block, origin, raster_width, connectivity=4)
    on_edge = np.zeros(table.n + 1, dtype=bool)
    on_edge[np.concatenate([table.top, table.bottom, table.left, table.right])] = True
    on_edge[0] = False
    pixels = Affine.translation(origin[1], origin[0])
    geoms = np.empty(table.n + 1, dtype=object)
    for geom, value in rasterio.features.shapes(labels, mask=labels > 0, connectivity=4, transform=pixels):
        geoms[int(value)] = shape(geom)
    whole = np.flatnonzero(~on_edge[1:]) + 1
    pieces = np.flatnonzero(on_edge)
    return TilePolygons(
        code=table.code[whole - 1], area=table.area[whole - 1], first=table.first[whole - 1],
        geometry=finish_geometries(geoms[whole], transform),
        piece_label=pieces, piece_code=table.code[pieces - 1], piece_area=table.area[pieces - 1],
        piece_first=table.first[pieces - 1], piece_geometry=list(geoms[pieces]),
        edges={"top": table.top, "bottom": table.bottom, "left": table.left, "right": table.right},
    )


def finish_geometries(pixel_polygons: np.ndarray | Sequence[shapely.Geometry], transform: Affine) -> np.ndarray:
    """Polygons in pixel coordinates → the map's CRS, canonical (no collinear vertices where
    pieces met, fixed ring order and start), so features do not depend on the tiling."""
    geoms = shapely.normalize(shapely.simplify(np.asarray(pixel_polygons, dtype=object), 0))
    a, b, c, d, e, f = transform.a, transform.b, transform.c, transform.d, transform.e, transform.f

    def to_crs(xy: np.ndarray) -> np.ndarray:
        x, y = xy[:, 0], xy[:, 1]
        return np.column_stack([a * x + b * y + c, d * x + e * y + f])

    return shapely.transform(geoms, to_crs)


class _EdgePieces:
    """Pieces of patches that touch tile edges, gathered tile by tile, joined at the end."""

    def __init__(self, grid: tuple[int, int]) -> None:
        self.grid = grid
        self.edges: dict[tuple[int, int], dict[str, np.ndarray]] = {}
        self.ids: dict[tuple[int, int], np.ndarray] = {}  # tile → provisional id per local label
        self.code: list[np.ndarray] = []
        self.area: list[np.ndarray] = []
        self.first: list[np.ndarray] = []
        self.geometry: list[shapely.Geometry] = []

    def add(self, tile: tuple[int, int], polygons: TilePolygons) -> None:
        start = len(self.geometry)
        size = max([int(polygons.piece_label.max(initial=0))] + [int(e.max(initial=0)) for e in polygons.edges.values()])
        ids = np.full(size + 1, -1, dtype=np.int64)
        ids[polygons.piece_label] = np.arange(start, start + polygons.piece_label.size)
        self.ids[tile] = ids
        self.edges[tile] = polygons.edges
        self.code.append(polygons.piece_code)
        self.area.append(polygons.piece_area)
        self.first.append(polygons.piece_first)
        self.geometry.extend(polygons.piece_geometry)

    def _face(self, a: tuple[int, int], side_a: str, b: tuple[int, int], side_b: str) -> tuple[np.ndarray, np.ndarray]:
        return self.ids[a][self.edges[a][side_a]], self.ids[b][self.edges[b][side_b]]

    def dissolve(self, transform: Affine) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(code, area, first, geometry) of the patches the pieces make, ordered by first pixel."""
        n = len(self.geometry)
        if n == 0:
            return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, dtype=object)
        code, area, first = (np.concatenate(x) for x in (self.code, self.area, self.first))
        rows, cols = self.grid
        faces = [self._face((iy, ix), "bottom", (iy + 1, ix), "top") for iy in range(rows - 1) for ix in range(cols)]
        faces += [self._face((iy, ix), "right", (iy, ix + 1), "left") for iy in range(rows) for ix in range(cols - 1)]
        a = np.concatenate([f[0] for f in faces]) if faces else np.zeros(0, np.int64)
        b = np.concatenate([f[1] for f in faces]) if faces else np.zeros(0, np.int64)
        keep = (a >= 0) & (b >= 0)
        a, b = a[keep], b[keep]
        same = code[a] == code[b]
        graph = coo_matrix((np.ones(int(same.sum()), dtype=np.int8), (a[same], b[same])), shape=(n, n))
        count, patch = connected_components(graph, directed=False)
        p_area = np.bincount(patch, weights=area, minlength=count).astype(np.int64)
        p_first = np.full(count, np.iinfo(np.int64).max, dtype=np.int64)
        np.minimum.at(p_first, patch, first)
        p_code = np.zeros(count, dtype=code.dtype)
        p_code[patch] = code
        members: dict[int, list[shapely.Geometry]] = defaultdict(list)
        for index, p in enumerate(patch.tolist()):
            members[p].append(self.geometry[index])
        order = np.argsort(p_first, kind="stable")
        geoms = np.array([members[int(p)][0] if len(members[int(p)]) == 1 else shapely.union_all(members[int(p)])
                          for p in order], dtype=object)
        return p_code[order], p_area[order], p_first[order], finish_geometries(geoms, transform)


def _frame(code: np.ndarray, area: np.ndarray, first: np.ndarray, geometry: np.ndarray, pixel_ha: float,
           crs: str) -> gpd.GeoDataFrame:
    return gpd.GeoDataFrame(
        {ID_FIELD: first.astype(np.int64), CODE_FIELD: [str(int(c)) for c in code],
         "label": [label_of(int(c)) for c in code], "area_ha": area * pixel_ha},
        geometry=list(geometry), crs=crs,
    )


def _batches(data: da.Array, gbox: GeoBox, batch_size: int) -> Iterator[list[tuple[tuple[int, int], TilePolygons]]]:
    """Tiles polygonized in batches of ``batch_size``, in row-major order."""
    blocks = data.to_delayed(optimize_graph=False)
    row0 = np.concatenate([[0], np.cumsum(data.chunks[0])[:-1]])
    col0 = np.concatenate([[0], np.cumsum(data.chunks[1])[:-1]])
    task = dask.delayed(tile_polygons, pure=True)
    tiles = [(iy, ix) for iy in range(blocks.shape[0]) for ix in range(blocks.shape[1])]
    for start in range(0, len(tiles), batch_size):
        batch = tiles[start : start + batch_size]
        results = dask.compute(*[task(blocks[iy, ix], (int(row0[iy]), int(col0[ix])), data.shape[1], gbox.affine)
                                 for iy, ix in batch])
        yield list(zip(batch, results, strict=True))


def vectorize_tiled(
    codes: xr.DataArray,
    path: str | os.PathLike[str],
    *,
    level: int = 2,
    layer: str = "clc",
    styles: bool = True,
    batch_size: int = 16,
    overwrite: bool = True,
) -> Path:
    """Write a map stored as tiles as one GeoPackage layer, polygons dissolved across tiles.

    Args:
        codes: (y, x) or single-band DataArray of CLC codes (0 = no data), georeferenced,
            dask-backed with one chunk per tile (e.g. a run's generalized map); a NumPy-backed
            array is one tile.
        path: the ``.gpkg`` to write (replaced atomically when complete).
        level: CLC level of the codes: picks labels and colours; other codes are refused.
        layer: the layer name.
        styles: also write ``.qml`` and ``.sld`` beside the GeoPackage and embed the QML.
        batch_size: tiles polygonized per ``dask.compute`` (client memory holds one batch
            of tiles' polygons); raise it for more parallelism on a large cluster.
        overwrite: replace existing files (otherwise an existing file is an error).

    Returns:
        The GeoPackage path.
    """
    path = Path(path)
    if path.suffix.lower() != ".gpkg":
        raise OutputError(f"`path` {path}: vector output must be a GeoPackage named *.gpkg.")
    if batch_size < 1:
        raise ConfigError(f"`batch_size` must be a positive number of tiles, not {batch_size}.")
    outputs = [path] + ([path.with_suffix(".qml"), path.with_suffix(".sld")] if styles else [])
    for target in outputs:
        check_writable(target, overwrite)
    arr = as_class_map(codes)
    if np.dtype(arr.dtype).kind not in "iu":
        raise InputError(f"Cannot vectorize a {arr.dtype} raster `codes`: a class map holds integer codes.")
    gbox = geobox_of(arr)
    data = arr.data if isinstance(arr.data, da.Array) else da.from_array(np.asarray(arr.data), chunks=-1)
    pixel_ha = abs(gbox.affine.determinant) / 10_000
    crs = gbox.crs.to_wkt()
    pieces = _EdgePieces((len(data.chunks[0]), len(data.chunks[1])))
    written = 0
    with atomic_path(path, suffix=".gpkg") as tmp:
        tmp.unlink()  # GDAL creates the GeoPackage itself
        for batch in _batches(data, gbox, batch_size):
            frames = []
            for tile, polygons in batch:
                validate_codes(np.unique(np.concatenate([polygons.code, polygons.piece_code])), level)
                pieces.add(tile, polygons)
                frames.append(_frame(polygons.code, polygons.area, polygons.first, polygons.geometry, pixel_ha, crs))
            written += _append(tmp, layer, frames, written == 0)
        dissolved = _frame(*pieces.dissolve(gbox.affine), pixel_ha, crs)
        written += _append(tmp, layer, [dissolved], written == 0, force=written == 0)
        if styles:
            embed_style(tmp, layer, qml_style(level), sld_style(level, layer))
    if styles:
        for suffix, text in ((".qml", qml_style(level)), (".sld", sld_style(level, layer))):
            with atomic_path(path.with_suffix(suffix), suffix=suffix) as tmp:
                tmp.write_text(text, encoding="utf-8")
    log.info("wrote %s: %d polygons (%d dissolved across tile edges)", path, written, len(dissolved))
    return path


def _append(gpkg: Path, layer: str, frames: list[gpd.GeoDataFrame], create: bool, force: bool = False) -> int:
    """Append features to the layer (creating it first); returns how many were written."""
    frame = gpd.GeoDataFrame(pd.concat(frames, ignore_index=True), crs=frames[0].crs) if len(frames) > 1 else frames[0]
    if len(frame) == 0 and not force:
        return 0
    pyogrio.write_dataframe(frame, gpkg, layer=layer, driver="GPKG", geometry_type="Polygon",
                            append=not create, promote_to_multi=False)
    return len(frame)

