"""Scoring a trained configuration on a test area: chunked inference, counts reduced per block.

A test area is a set of blocks of one region (the split's test blocks, or a transfer region's).
The class map is predicted with :func:`clc_dask.predict.predict` over the whole mosaic (so every
test pixel gets the context around it, whatever lies there) but only the inference chunks that
hold test blocks are computed; other pixels of the written map are no data. The map is written
once (COG) and scored from the file with :func:`clc_dask.evaluate.evaluate`, whose per-tile
confusion matrices — one per test block, tree-summed on the cluster — feed the bootstrap.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import numpy as np
from odc.geo.geobox import GeoBox

from clc_dask.classes import NODATA_CODE
from clc_dask.evaluate import evaluate
from clc_dask.experiment.config import EvaluationConfig
from clc_dask.experiment.regions import Region
from clc_dask.grid import TileGrid
from clc_dask.predict import predict, write_prediction
from clc_dask.rasters import open_raster, to_dataarray

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TestArea:
    """The blocks of one region scored together, on one season's mosaic.

    Attributes:
        name: the evaluation's name (``<region>-<season>``), a folder name.
        region: the region's name.
        season: the season of the test mosaic.
        geobox: the region's grid.
        block_size: block edge in px.
        blocks: ``row_col`` names (from 1) of the test blocks on a ``block_size`` tile grid.
    """

    name: str
    region: str
    season: str
    geobox: GeoBox
    block_size: int
    blocks: tuple[str, ...]

    def block_indices(self) -> list[tuple[int, int]]:
        """(row, col) from 0 of each block."""
        return [(int(r) - 1, int(c) - 1) for r, c in (b.split("_") for b in self.blocks)]

    def window(self) -> tuple[slice, slice]:
        """Pixel slices of the smallest block-aligned window holding every test block."""
        idx = self.block_indices()
        rows, cols = [r for r, _ in idx], [c for _, c in idx]
        height, width = int(self.geobox.shape.y), int(self.geobox.shape.x)
        return (slice(min(rows) * self.block_size, min(height, (max(rows) + 1) * self.block_size)),
                slice(min(cols) * self.block_size, min(width, (max(cols) + 1) * self.block_size)))

    def window_geobox(self) -> GeoBox:
        """The grid of :meth:`window`."""
        ys, xs = self.window()
        return self.geobox[ys, xs]

    def record(self) -> dict[str, Any]:
        """JSON-ready description (for caches and reports)."""
        ys, xs = self.window()
        return {"name": self.name, "region": self.region, "season": self.season, "block_size": self.block_size,
                "blocks": list(self.blocks), "window": [ys.start, ys.stop, xs.start, xs.stop]}


def masked_window(area: TestArea, array: da.Array, dtype: np.dtype) -> da.Array:
    """The (y, x) window of ``array`` (on the region's grid) with pixels outside test blocks set to
    0; chunks of non-test blocks never touch ``array`` (nothing is computed there)."""
    ys, xs = area.window()
    size = area.block_size
    test = set(area.block_indices())
    rows = range(ys.start // size, math.ceil(ys.stop / size))
    cols = range(xs.start // size, math.ceil(xs.stop / size))
    pieces = []
    for r in rows:
        line = []
        for c in cols:
            y0, y1 = r * size, min(ys.stop, (r + 1) * size)
            x0, x1 = c * size, min(xs.stop, (c + 1) * size)
            line.append(array[y0:y1, x0:x1].astype(dtype) if (r, c) in test
                        else da.zeros((y1 - y0, x1 - x0), dtype=dtype, chunks=(y1 - y0, x1 - x0)))
        pieces.append(line)
    return da.block(pieces)


def prediction_chunk(block_size: int, window: int) -> int:
    """Inference chunk edge (px): whole blocks, at least one inference window."""
    return block_size * max(1, math.ceil(window / block_size))


def predict_test_area(area: TestArea, region: Region, checkpoint: str | os.PathLike[str], out: str | os.PathLike[str],
                      settings: EvaluationConfig, client: Any | None = None) -> Path:
    """Predict the test blocks with ``checkpoint`` and write the window as a COG (0 elsewhere).

    Returns:
        The written class map (on :meth:`TestArea.window_geobox`).
    """
    chunk = prediction_chunk(area.block_size, settings.window)
    mosaic = region.open_mosaic(area.season, chunks=chunk)
    class_map = predict(mosaic, checkpoint, halo=settings.halo, window=settings.window,
                        batch_size=settings.batch_size, device=settings.device, chunk_size=chunk, client=client)
    data = masked_window(area, class_map.data, class_map.dtype)
    masked = to_dataarray(data, area.window_geobox(), name="class_map", nodata=NODATA_CODE)
    masked.attrs.update(class_map.attrs)
    log.info("predicting %d test block(s) of %s (%s) with %s", len(area.blocks), area.region, area.season,
             checkpoint)
    with computing_with(client):
        return write_prediction(masked, out, level=int(class_map.attrs.get("clc_level", 2)))


def score_test_area(area: TestArea, region: Region, prediction: str | os.PathLike[str], *, level: int,
                    codes: Sequence[int], client: Any | None = None) -> dict[str, Any]:
    """Score a written test-area class map against the region's labels, per test block.

    Returns:
        The :func:`~clc_dask.evaluate.evaluate` report of the test blocks, with ``tiles`` keyed
        by the blocks' names on the region's grid (pixel slices on that grid too).
    """
    ys, xs = area.window()
    chunk = area.block_size
    labels = region.open_labels(chunks=chunk)
    reference = to_dataarray(masked_window(area, labels.data, labels.dtype), area.window_geobox(), nodata=0)
    predicted = open_raster(prediction, chunks=chunk).isel(band=0, drop=True)
    r0, c0 = ys.start // area.block_size, xs.start // area.block_size
    local = {f"{r - r0 + 1}_{c - c0 + 1}": name
             for (r, c), name in zip(area.block_indices(), area.blocks, strict=True)}
    grid = TileGrid(area.window_geobox(), area.block_size)
    with computing_with(client):
        report = evaluate(predicted, reference, level=level, codes=list(codes), tiles=grid.select(list(local)))
    blocks = {}
    for name, sub in report.pop("tiles").items():
        y0, y1, x0, x1 = sub["pixel_slices"]
        sub["pixel_slices"] = [y0 + ys.start, y1 + ys.start, x0 + xs.start, x1 + xs.start]
        blocks[local[name]] = sub
    report["tiles"] = blocks
    report["tile_size"] = area.block_size
    return report


@contextlib.contextmanager
def computing_with(client: Any | None) -> Iterator[None]:
    """Make ``client`` dask's scheduler for the block (None: local threads)."""
    with dask.config.set(scheduler=client if client is not None else "threads"):
        yield

