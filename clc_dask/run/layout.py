"""Where a tile's arrays lie: the loaded area (tile + the network's context) and the no-data
padding that puts the inference windows on the run grid's window grid."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

from odc.geo.geobox import GeoBox

from clc_dask.config import RunConfig
from clc_dask.grid import Tile
from clc_dask.predict import WindowGrid


@dataclass(frozen=True)
class TileLayout:
    """Where a tile's arrays lie, in pixels relative to the tile's top-left corner.

    The mosaic is padded with no data so that its top-left corner lies on the *run grid's*
    window grid: :func:`clc_dask.predict.predict` anchors its windows at the array origin,
    so every pixel is predicted by the same window, with the same context, as it would be
    in one prediction over the whole grid — neighbouring tiles meet without seams.

    Attributes:
        tile: the tile.
        context: real imagery loaded around the tile for the network (px).
        before: (y, x) no-data-padded context before the tile, putting the array origin
            on the run grid's window grid (px, ≥ ``context``).
        after: context after the tile (px, ≥ ``context``).
        chunk: dask chunk edge inside the tile (px).
    """

    tile: Tile
    context: int
    before: tuple[int, int]
    after: int
    chunk: int

    @classmethod
    def for_tile(cls, tile: Tile, config: RunConfig) -> TileLayout:
        """The layout of ``tile`` under the config's window, halo and chunk size."""
        windows = window_grid(config.model.window, config.model.halo)
        window = windows.window
        context = max(windows.before, windows.after)
        starts = (tile.pixel_slices[0].start, tile.pixel_slices[1].start)
        before = tuple(context + (s - context) % window for s in starts)
        after = math.ceil(context / window) * window
        return cls(tile, context, (int(before[0]), int(before[1])), after, config.grid.chunk_size)

    @property
    def shape(self) -> tuple[int, int]:
        """(rows, cols) of the tile."""
        return (self.tile.geobox.shape.y, self.tile.geobox.shape.x)

    @property
    def load_geobox(self) -> GeoBox:
        """The grid the scenes are loaded on: the tile + context on every side."""
        return self.tile.geobox.pad(self.context)

    @property
    def array_geobox(self) -> GeoBox:
        """The inference array: the tile + no-data-padded context (origin on the window grid)."""
        pad = max(*self.before, self.after)
        big = self.tile.geobox.pad(pad)
        ny, nx = self.shape
        by, bx = self.before
        return big[pad - by: pad + ny + self.after, pad - bx: pad + nx + self.after]

    @property
    def load_chunks(self) -> tuple[int, int]:
        """(rows, cols) chunk of the loaded scenes (px): along each axis as many chunks as the
        tile has, each grown to take its share of the context.

        Chunks of ``chunk`` px would leave slivers of context alone in their own chunks, and
        every chunk opens and decodes each scene's blocks under it again: with 1024 px tiles
        and chunks, 64 px of context per side made 4 reads of each asset instead of 1 and
        nearly doubled the mosaic's CPU time (``benchmarks/bench_run.py``).
        """
        load = self.load_geobox.shape
        rows, cols = (math.ceil(loaded / math.ceil(inside / self.chunk))
                      for loaded, inside in zip((load.y, load.x), self.shape, strict=True))
        return rows, cols

    def array_chunks(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Chunks of the inference array: padding, the tile's chunks, padding."""
        out = []
        for axis, n in enumerate(self.shape):
            inner = [self.chunk] * (n // self.chunk) + ([n % self.chunk] if n % self.chunk else [])
            sizes = [self.before[axis], *inner, self.after]
            out.append(tuple(s for s in sizes if s))
        return out[0], out[1]

    def load_pixels(self) -> int:
        """Pixels of the loaded grid (tile + context)."""
        gb = self.load_geobox
        return gb.shape.y * gb.shape.x


@functools.lru_cache(maxsize=8)
def window_grid(window: int, halo: int) -> WindowGrid:
    """The inference window grid of a run (checked, and warned about, once per process)."""
    return WindowGrid.from_options(window, halo)
