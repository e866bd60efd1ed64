"""Phase 2 of a run: the CORINE rules applied to the whole run's class map, then one vector layer.

A patch cut by a tile edge must be judged whole, so the generalization waits until every
tile of the AOI has its class map, then runs the tiled, chunk-exact algorithm of
:class:`clc_dask.generalize.TiledGeneralization` over the stitched map with chunks = tiles:
the result equals ``generalize()`` of the whole class map at once, whatever the tile size,
and its state (tile tables, global decisions) is saved under ``STORE/generalize/``, so an
interrupted phase resumes where it stopped. Each generalized tile is written on the worker
that computes it and journaled like a class tile. The decisions depend only on the class
tiles and the rules: their fingerprint is recorded, and a change (a class tile recomputed)
starts the phase again.

The generalized map is then written as one GeoPackage layer (``STORE/polygons.gpkg``,
layer ``clc``), polygons dissolved across tile edges, with QGIS/SLD styles.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import numpy as np
import rasterio

from clc_dask.generalize import TiledGeneralization, fixed_gpkg_date, rules_for, vectorize_tiled
from clc_dask.grid import Tile, TileGrid
from clc_dask.rasters import to_dataarray
from clc_dask.run.context import RunContext, select_tiles
from clc_dask.run.manifest import Manifest, file_record
from clc_dask.run.store import GENERALIZE_DIR, POLYGONS_FILE, POLYGONS_LAYER, TILE_FILES, tile_dir
from clc_dask.run.tiles import TileFailure, TileOutput, TileProcessor, TileWriter, flow

log = logging.getLogger(__name__)

#: Manifest state keys of this phase.
DECISIONS_STATE = "generalize_inputs_sha256"
POLYGONS_STATE = "polygons"


def inputs_fingerprint(manifest: Manifest, tiles: Sequence[Tile], rules: Any) -> str:
    """SHA-256 of what the generalization depends on: every class tile's checksum and the rules."""
    parts = {t.name: sorted(rec["sha256"] for rec in manifest.tiles[t.name]["files"].values()) for t in tiles}
    text = json.dumps({"tiles": parts, "rules": [rules.mmu_px, list(rules.width_px), rules.connectivity]},
                      sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def read_tile(path: Path) -> np.ndarray:
    """A tile's codes (runs on a worker)."""
    with rasterio.open(path) as src:
        return src.read(1)


def tile_map(store: Path, grid: TileGrid, tiles: Sequence[Tile], layer: str, dtype: np.dtype) -> da.Array:
    """A layer (``classes``, ``generalized``) of the run's tiles as one dask array with
    chunks = tiles (no data where no tile is)."""
    present = {t.name for t in tiles}
    rows, cols = grid.shape
    blocks = []
    for row in range(1, rows + 1):
        line = []
        for col in range(1, cols + 1):
            tile = grid.tile(f"{row}_{col}")
            shape = (tile.geobox.shape.y, tile.geobox.shape.x)
            if tile.name in present:
                path = tile_dir(store, tile) / TILE_FILES[layer]
                stat = path.stat()  # the key names this file as it is: another store's tile is another task
                token = dask.base.tokenize(str(path.resolve()), stat.st_size, stat.st_mtime_ns)
                read = dask.delayed(read_tile, pure=True)(path, dask_key_name=f"read-{layer}-{tile.name}-{token}")
                line.append(da.from_delayed(read, shape, dtype=dtype))
            else:
                line.append(da.zeros(shape, dtype=dtype, chunks=shape))
        blocks.append(line)
    return da.block(blocks)


def generalize_run(ctx: RunContext, processor: TileProcessor, *, client: Any, in_flight: int,
                   progress: Callable[[str], None] | None = None) -> tuple[list[str], dict[str, str]]:
    """Generalize the whole run once every class tile of the AOI exists; write what is missing.

    Returns:
        The tiles generalized now, and the failures (tile → reason).
    """
    config, manifest = ctx.config, ctx.manifest
    every = select_tiles(ctx.grid, ctx.aoi, None)
    waiting = [t.name for t in every if not manifest.is_done(t.name)]
    if waiting:
        log.info("the generalization waits for the class maps of %d tile(s) (%s%s): run them to finish the map",
                 len(waiting), ", ".join(waiting[:5]), "…" if len(waiting) > 5 else "")
        return [], {}
    gen = config.generalize
    rules = rules_for(abs(ctx.grid.geobox.resolution.x), gen.mmu_ha, gen.min_width_m)
    fingerprint = inputs_fingerprint(manifest, every, rules)
    if manifest.state.get(DECISIONS_STATE) != fingerprint:
        for name in list(manifest.generalized):
            manifest.forget(name, phase="generalized")
        shutil.rmtree(ctx.store / GENERALIZE_DIR, ignore_errors=True)  # decisions of other class tiles
        manifest.set_state(**{DECISIONS_STATE: fingerprint, POLYGONS_STATE: None})
    todo = [t for t in every if not manifest.is_done(t.name, phase="generalized")]
    computed: list[str] = []
    failed: dict[str, str] = {}
    if todo:
        log.info("generalizing the run's class map (%d tiles, %d to write)", len(every), len(todo))
        codes = to_dataarray(tile_map(ctx.store, ctx.grid, every, "classes", processor.dtype), ctx.grid.geobox,
                             name="classes")
        tiled = TiledGeneralization(codes, ctx.store / GENERALIZE_DIR, mmu_ha=gen.mmu_ha,
                                    min_width_m=gen.min_width_m, batch_size=max(in_flight, 16))
        tiled.run()
        writer = processor.writer_for("generalized", mmu_ha=f"{gen.mmu_ha:g}", min_width_m=f"{gen.min_width_m:g}")
        for out in _write_tiles(tiled, todo, writer, client, in_flight):
            if isinstance(out, TileFailure):
                failed[out.tile.name] = f"{type(out.error).__name__}: {out.error}"
                log.error("generalized tile %s failed: %s", out.tile.name, failed[out.tile.name])
                continue
            manifest.record(out.tile.name, out.files, out.extra, out.extra_files, phase="generalized",
                            hashes=out.hashes)
            computed.append(out.tile.name)
            if progress:
                progress(out.tile.name)
    if not failed and config.output.vectorize:
        write_polygons(ctx, every, processor.dtype)
    return computed, failed


def _write_tiles(tiled: TiledGeneralization, tiles: Sequence[Tile], writer: TileWriter, client: Any,
                 in_flight: int) -> Iterator[TileOutput | TileFailure]:
    """Write the generalized tiles, each computed from the saved decisions, flowing on a client."""
    def task(tile: Tile) -> Any:
        block = tiled.tile_task(tile.row - 1, tile.col - 1)
        return dask.delayed(writer.write, pure=True)(tile, block, {})

    if client is None:
        for tile in tiles:
            try:
                yield dask.compute(task(tile))[0]
            except Exception as exc:
                yield TileFailure(tile, exc)
        return
    yield from flow(client, tiles, lambda tile: client.compute(task(tile)), in_flight)


def write_polygons(ctx: RunContext, tiles: Sequence[Tile], dtype: np.dtype) -> Path | None:
    """``STORE/polygons.gpkg``: the generalized map as one layer, polygons dissolved across tiles."""
    manifest = ctx.manifest
    path = ctx.store / POLYGONS_FILE
    recorded = manifest.state.get(POLYGONS_STATE)
    if recorded and path.exists() and manifest.hash_of(path, *_stat(path)) == recorded["sha256"]:
        return path
    level = ctx.checkpoint.classes.level
    generalized = to_dataarray(tile_map(ctx.store, ctx.grid, tiles, "generalized", dtype), ctx.grid.geobox,
                               name="generalized")
    with fixed_gpkg_date(ctx.config.imagery.year):
        vectorize_tiled(generalized, path, level=level, layer=POLYGONS_LAYER, styles=True)
    manifest.set_state(**{POLYGONS_STATE: {"path": POLYGONS_FILE, **file_record(path)}})
    return path


def _stat(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns
