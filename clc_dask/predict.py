"""Inference: a mosaic and a checkpoint → a CLC class map, chunk by chunk on the Dask cluster.

How the map is made (and why it does not depend on the chunking)
----------------------------------------------------------------
A U-Net's output at a pixel depends on where the pixel sits inside the network's input
(5 poolings by 2 make it position-dependent modulo 32, and zero padding at the input's border
changes the last few hundred pixels of context). Blending whatever windows happen to fall inside
a dask block would therefore give a map that changes with the chunking, and seams at block edges.

So windows live on one **global grid**, anchored at the raster's top-left pixel:

* window ``(i, j)`` *predicts* the square of ``window × window`` px whose top-left pixel is
  ``(i·window, j·window)`` — its **core**;
* the network sees the core plus ``halo`` px of context on every side (rounded up so the input
  side, ``window + 2·halo``, is a multiple of 32); outside the raster that context is no data (0);
* each output pixel is the argmax of the one window whose core holds it (cores tile the raster:
  no blending, no seams).

A pixel's prediction is a function of its global position only. Each dask block is enlarged by
:func:`dask.array.map_overlap` (constant 0 = no-data boundary, then trimmed) just enough to hold
the inputs of every window whose core touches the block (``depth = halo`` when chunk edges fall on
multiples of ``window``), runs those windows in batches and keeps its own pixels. Any chunking gives
the *same* map, bit for bit, everywhere — including along the raster's outer edge.

Chunks that are multiples of ``window`` (e.g. 2048 px chunks, 512 px windows) compute every window
exactly once; other chunkings recompute the windows straddling chunk edges (still exact, only
slower; the plan is logged). The compute spent on context is ``((window + 2·halo) / window)²``:
1.56× for 512/64, 1.13× for 2048/64 — one window per 2048 px chunk means "the halo only once per
block".

The model is loaded once per worker by :func:`load_model`, a cache keyed by the checkpoint's path,
SHA-256 and device: tasks carry only those strings, never weights (PITFALLS: dask#12082).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import os
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import numpy as np
import torch
import xarray as xr
from dask.base import tokenize
from odc.geo.geobox import GeoBox

from clc_dask.classes import NODATA_CODE, ClassTable, colormap
from clc_dask.cluster import GPU_RESOURCE, inference_resource
from clc_dask.errors import CheckpointError, ConfigError, InputError, OutputError
from clc_dask.grid import DEFAULT_TILE_SIZE, TileGrid
from clc_dask.model import Checkpoint, Normalization, load_checkpoint
from clc_dask.rasters import (
    check_writable,
    geobox_of,
    open_raster,
    reading,
    to_dataarray,
    write_geotiff,
)
from clc_dask.stores import file_sha256, write_zarr

log = logging.getLogger(__name__)

DEFAULT_HALO = 64  # px of context on every side of a window's core
DEFAULT_WINDOW = 512  # px, side of the square one forward pass predicts
DEFAULT_BATCH_SIZE = 8  # windows per forward pass
DEFAULT_CHUNK_SIZE = 2048  # px, dask chunk edge (divides the 2048 px tiles)
MIN_RECOMMENDED_HALO = 64  # px; less context shows as artefacts along window edges
#: U-Net inputs must be divisible by 2⁵ (five poolings).
NET_MULTIPLE = 32
#: Probabilities are stored as uint8: probability = value / PROBABILITY_SCALE.
PROBABILITY_SCALE = 255
INFERENCE_LAYER = "clc-predict"


# --------------------------------------------------------------------------- window grid


@dataclass(frozen=True)
class WindowGrid:
    """The global window grid of one prediction (all sizes in pixels).

    Attributes:
        window: side of each window's core (what one forward pass predicts); multiple of 32.
        before: context above/left of the core (``halo`` plus rounding).
        after: context below/right of the core.
    """

    window: int
    before: int
    after: int

    @classmethod
    def from_options(cls, window: int, halo: int) -> WindowGrid:
        """Check ``window``/``halo`` and round the network input up to a multiple of 32."""
        if not isinstance(window, int) or window <= 0 or window % NET_MULTIPLE:
            raise ConfigError(
                f"window={window!r} px is not a positive multiple of {NET_MULTIPLE}: the U-Net halves "
                f"its input five times. Use e.g. `window` 512 (or 2048 for one window per 2048 px chunk)."
            )
        if not isinstance(halo, int) or halo < 0:
            raise ConfigError(
                f"halo={halo!r} px must be a whole number ≥ 0 (context added around every window); "
                f"use `halo` {DEFAULT_HALO} or more."
            )
        if halo < MIN_RECOMMENDED_HALO:
            log.warning("halo=%d px is below %d px: expect artefacts along window edges.",
                        halo, MIN_RECOMMENDED_HALO)
        side = math.ceil((window + 2 * halo) / NET_MULTIPLE) * NET_MULTIPLE
        extra = side - window - 2 * halo
        return cls(window, halo + extra // 2, halo + extra - extra // 2)

    @property
    def input_size(self) -> int:
        """Side of the network input (px): core plus context, a multiple of 32."""
        return self.window + self.before + self.after

    def indices(self, start: int, stop: int) -> range:
        """Indices of the windows whose cores meet the pixel range ``[start, stop)`` of one axis."""
        return range(start // self.window, (stop - 1) // self.window + 1)

    def reach(self, start: int, stop: int) -> tuple[int, int]:
        """Context (px) needed before and after ``[start, stop)`` to run all its windows."""
        ks = self.indices(start, stop)
        before = start - (ks.start * self.window - self.before)
        after = (ks.stop * self.window + self.after) - stop
        return before, after

    def depth(self, chunks: Sequence[int]) -> int:
        """The map_overlap depth (px) one axis with these chunks needs."""
        depth, start = 0, 0
        for size in chunks:
            depth = max(depth, *self.reach(start, start + size))
            start += size
        return depth

    def recompute_factor(self, chunks: Sequence[int]) -> float:
        """Windows run along one axis with these chunks ÷ windows needed (1.0 = no waste)."""
        run, start = 0, 0
        for size in chunks:
            run += len(self.indices(start, start + size))
            start += size
        return run / len(self.indices(0, start))


@dataclass(frozen=True)
class _AxisPlan:
    chunks: tuple[int, ...]  # chunks the inference runs on (the last one includes the padding)
    depth: int
    pad: int  # no-data pixels appended at the end, so the last window lies inside the array


def _plan_axis(grid: WindowGrid, chunks: Sequence[int]) -> _AxisPlan:
    """Inference chunks and map_overlap depth for one axis.

    The axis is padded with no data up to a whole number of windows (what the constant
    boundary would supply anyway), so the last window needs no more depth than the others.
    Chunks smaller than the depth are merged with a neighbour (dask needs ``depth ≤ chunk``).
    """
    chunks = [int(c) for c in chunks if c]
    length = sum(chunks)
    padded = math.ceil(length / grid.window) * grid.window
    while padded < max(grid.before, grid.after):  # rasters smaller than one window's context
        padded += grid.window
    chunks[-1] += padded - length
    while True:
        depth = grid.depth(chunks)
        if len(chunks) == 1 or min(chunks) >= depth:
            break
        i = int(np.argmin(chunks))
        lo = i - 1 if i > 0 else 0
        chunks[lo:lo + 2] = [chunks[lo] + chunks[lo + 1]]
    return _AxisPlan(tuple(chunks), depth, padded - length)


# --------------------------------------------------------------------------- devices and model cache


def resolve_device(device: str = "auto") -> str:
    """``"auto"`` → ``"cuda"`` where CUDA is available, else ``"cpu"``; other values checked."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" or device == "cuda" or (device.startswith("cuda:") and device[5:].isdigit()):
        return device
    raise ConfigError(f"device={device!r} is not one of auto, cpu, cuda, cuda:N.")


def autocast_context(device: str) -> contextlib.AbstractContextManager[Any]:
    """bfloat16 autocast on CUDA devices; a no-op (float32) elsewhere."""
    if device.startswith("cuda"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@dataclass(frozen=True)
class LoadedModel:
    """A model resident on one worker, with what is needed to feed it and read its output."""

    model: torch.nn.Module
    normalization: Normalization
    classes: ClassTable
    device: str


_CACHE: dict[tuple[str, str, str], LoadedModel] = {}
_CACHE_LOCK = threading.Lock()
_LOADS: Counter[str] = Counter()
_CACHE_SIZE = 2  # models kept per process (e.g. comparing two checkpoints)


def load_model(path: str, sha256: str, device: str = "auto") -> LoadedModel:
    """The checkpoint's model, loaded at most once per process (worker) and cached.

    Tasks call this with the checkpoint's path and SHA-256 only. A file whose hash differs
    from ``sha256`` (replaced since the graph was built) is refused rather than silently used.
    """
    device = resolve_device(device)
    key = (path, sha256, device)
    with _CACHE_LOCK:
        if key in _CACHE:
            return _CACHE[key]
        if not Path(path).is_file():
            raise CheckpointError(
                f"Checkpoint {path} is not visible on this worker: put it on storage every worker "
                "can read (a shared file system), then predict again."
            )
        actual = file_sha256(path)
        if actual != sha256:
            raise CheckpointError(
                f"Checkpoint {path} changed after the prediction was planned (SHA-256 {actual[:12]}… "
                f"≠ {sha256[:12]}…): run predict again with the file you mean to use."
            )
        ckpt = load_checkpoint(path, map_location="cpu")
        loaded = LoadedModel(ckpt.build_model(device), ckpt.normalization, ckpt.classes, device)
        if len(_CACHE) >= _CACHE_SIZE:
            _CACHE.pop(next(iter(_CACHE)))
        _CACHE[key] = loaded
        _LOADS[sha256] += 1
        log.info("loaded model %s (%s…) on %s", Path(path).name, sha256[:12], device)
        return loaded


def load_count(sha256: str | None = None) -> int:
    """How many times this process loaded a model (of one checkpoint, or of any)."""
    return _LOADS[sha256] if sha256 else sum(_LOADS.values())


def clear_model_cache() -> None:
    """Forget cached models and reset the load counter (tests, or to free device memory)."""
    with _CACHE_LOCK:
        _CACHE.clear()
        _LOADS.clear()


# --------------------------------------------------------------------------- inference kernel


def infer_region(
    dn: np.ndarray,
    origin: tuple[int, int],
    region: tuple[int, int, int, int],
    loaded: LoadedModel,
    grid: WindowGrid,
    batch_size: int = DEFAULT_BATCH_SIZE,
    probabilities: bool = False,
) -> np.ndarray:
    """Predict the pixels ``region`` from the windows of ``grid`` that cover it.

    Args:
        dn: (band, y, x) uint16 DN holding every window input the region needs.
        origin: global (row, col) of ``dn[:, 0, 0]`` (px).
        region: global (row0, row1, col0, col1) to predict (px, end exclusive).
        loaded: the resident model.
        grid: the global window grid.
        batch_size: windows per forward pass.
        probabilities: also return per-class probabilities (uint8, value/255).

    Returns:
        (1 + C if probabilities else 1, rows, cols): CLC codes in layer 0 (0 where the input is no
        data), then the probability of each class of ``loaded.classes``.
    """
    r0, r1, c0, c1 = region
    oy, ox = origin
    n_classes = len(loaded.classes)
    out = np.zeros((1 + n_classes * probabilities, r1 - r0, c1 - c0), dtype=np.uint16)
    valid = (dn != 0).any(axis=0)
    jobs = []
    for i in grid.indices(r0, r1):
        for j in grid.indices(c0, c1):
            # the window's core, clipped to the region, in global pixels
            y0, y1 = max(i * grid.window, r0), min((i + 1) * grid.window, r1)
            x0, x1 = max(j * grid.window, c0), min((j + 1) * grid.window, c1)
            if valid[y0 - oy:y1 - oy, x0 - ox:x1 - ox].any():  # all no data → stays 0
                jobs.append((i, j, y0, y1, x0, x1))
    side = grid.input_size
    for start in range(0, len(jobs), batch_size):
        batch = jobs[start:start + batch_size]
        # every forward pass has the same shape: a partial batch is filled with no-data windows,
        # because kernels chosen for another batch size may round differently, and a window's
        # classes must not depend on how many windows its block happened to hold
        inputs = np.zeros((batch_size, dn.shape[0], side, side), dtype=np.int32)
        for n, (i, j, *_) in enumerate(batch):
            top, left = i * grid.window - grid.before - oy, j * grid.window - grid.before - ox
            if top < 0 or left < 0 or top + side > dn.shape[1] or left + side > dn.shape[2]:
                raise RuntimeError(f"window {i}_{j} reaches outside its block: depth planning is wrong")
            inputs[n] = dn[:, top:top + side, left:left + side]
        codes, probs = _forward(inputs, loaded, probabilities)
        for n, (i, j, y0, y1, x0, x1) in enumerate(batch):
            ty, tx = y0 - i * grid.window + grid.before, x0 - j * grid.window + grid.before
            target = (slice(y0 - r0, y1 - r0), slice(x0 - c0, x1 - c0))
            out[0][target] = codes[n, ty:ty + y1 - y0, tx:tx + x1 - x0]
            if probabilities:
                out[(slice(1, None), *target)] = probs[n, :, ty:ty + y1 - y0, tx:tx + x1 - x0]
    nodata = ~valid[r0 - oy:r1 - oy, c0 - ox:c1 - ox]
    out[:, nodata] = NODATA_CODE
    return out


def _forward(inputs: np.ndarray, loaded: LoadedModel, probabilities: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """One batch (N, band, s, s) DN → codes (N, s, s) uint16 and probabilities (N, C, s, s) uint8."""
    with torch.inference_mode(), autocast_context(loaded.device):
        x = loaded.normalization.apply(torch.from_numpy(inputs).to(loaded.device))
        logits = loaded.model(x)
        index = logits.argmax(dim=1).to(torch.uint8)
        probs = None
        if probabilities:
            scaled = torch.softmax(logits.float(), dim=1) * PROBABILITY_SCALE
            probs = scaled.round_().to(torch.uint8).cpu().numpy()
    return loaded.classes.to_code(index.cpu().numpy()), probs


def _predict_block(
    block: np.ndarray,
    *,
    checkpoint: str,
    sha256: str,
    device: str,
    grid: WindowGrid,
    overlap: tuple[int, int],
    batch_size: int,
    probabilities: bool,
    out_dtype: str,
    block_info: dict[Any, Any] | None = None,
) -> np.ndarray:
    """map_overlap kernel: one block with its halo → codes (and probabilities) for the block core."""
    loaded = load_model(checkpoint, sha256, device)
    info = block_info[0]
    dy, dx = overlap
    (ys, _), (xs, _) = info["array-location"][1:]
    iy, ix = info["chunk-location"][1:]
    # array-location is in the overlapped array, where every block grew by 2·depth
    core_y, core_x = ys - 2 * dy * iy, xs - 2 * dx * ix
    ny, nx = block.shape[1] - 2 * dy, block.shape[2] - 2 * dx
    region = (core_y, core_y + ny, core_x, core_x + nx)
    started = time.perf_counter()
    core = infer_region(block, (core_y - dy, core_x - dx), region, loaded, grid, batch_size, probabilities)
    log.debug("predicted block rows %d:%d cols %d:%d in %.2f s on %s", core_y, core_y + ny, core_x,
              core_x + nx, time.perf_counter() - started, _worker_address())
    out = np.zeros((core.shape[0], block.shape[1], block.shape[2]), dtype=out_dtype)
    out[:, dy:dy + ny, dx:dx + nx] = core
    return out


def _worker_address() -> str:
    try:
        from distributed import get_worker

        return str(get_worker().address)
    except (ImportError, ValueError):
        return "local"


def keep_annotations(array: Any) -> contextlib.AbstractContextManager[Any]:
    """Compute inside this context so resource annotations (GPU, inference slots) survive
    graph optimization.

    Dask's low-level task fusion drops layer annotations (dask#7036, dask#10325); it is switched
    off while computing collections (arrays, Datasets, delayed) that carry resource annotations.
    :func:`write_prediction`, :func:`write_probabilities` and runs use it; use it too when you
    ``.compute()`` a prediction on a GPU cluster.
    """
    graph = array.__dask_graph__()
    annotated = graph is not None and any(
        "resources" in (layer.annotations or {}) for layer in getattr(graph, "layers", {}).values()
    )
    return dask.config.set({"optimization.fuse.active": False}) if annotated else contextlib.nullcontext()


# --------------------------------------------------------------------------- predict


def predict(
    mosaic: xr.DataArray,
    checkpoint: str | os.PathLike[str],
    *,
    halo: int = DEFAULT_HALO,
    window: int = DEFAULT_WINDOW,
    batch_size: int = DEFAULT_BATCH_SIZE,
    device: str = "auto",
    probabilities: bool = False,
    tiles: Sequence[str] | None = None,
    tile_size: int = DEFAULT_TILE_SIZE,
    chunk_size: int | None = DEFAULT_CHUNK_SIZE,
    client: Any = None,
) -> xr.DataArray | xr.Dataset:
    """A lazy CLC class map of ``mosaic`` predicted by the model in ``checkpoint``.

    Nothing is computed here: write the result with :func:`write_prediction` or ``.compute()`` it
    (inside :func:`keep_annotations` on GPU clusters, so tasks keep their ``GPU`` resource).
    Every check (bands, tiles, options) happens before the graph exists.

    Args:
        mosaic: (band, y, x) uint16 DN with band names (as from :func:`clc_dask.rasters.open_raster`).
            Bands are picked by name in the checkpoint's order; missing bands are an error.
        checkpoint: a clc-dask checkpoint file, readable by every worker (shared storage).
        halo: context (px) the network sees around every window's core, ≥ 64 recommended. More
            context costs ``((window + 2·halo) / window)²`` compute.
        window: side (px, multiple of 32) of the square each forward pass predicts. Make chunk
            sizes multiples of it; raise it (e.g. 2048) on GPUs with memory to spare.
        batch_size: windows per forward pass; lower it if the device runs out of memory.
        device: ``auto`` (CUDA where the worker has it), ``cpu``, ``cuda`` or ``cuda:N``.
        probabilities: also return per-class probabilities (uint8, probability × 255).
        tiles: restrict to these ``row_col`` tiles (from 1) of the mosaic's tile grid; the result
            is the window spanning them, predicted with context from the surrounding mosaic.
        tile_size: tile edge (px) for ``tiles`` (paper: 2048).
        chunk_size: dask chunk edge (px); None keeps the mosaic's chunks. Large chunks (≥ 2048)
            keep per-task overhead negligible.
        client: the Dask client that will compute the result (default: the current one, if any);
            used to annotate inference tasks with the ``GPU`` resource when it has GPU workers.

    Returns:
        (y, x) CLC codes (uint8 for Level 1–2, uint16 for Level 3), 0 where the mosaic is no
        data, on the mosaic's grid; or, with ``probabilities``, a Dataset with ``class_map`` and
        ``probability`` (class, y, x) computed by the same tasks.
    """
    grid = check_options(window, halo, batch_size, chunk_size)
    client = client if client is not None else _current_client()
    resource = inference_resource(client)
    device = _check_device(device, resource == GPU_RESOURCE)
    path = Path(checkpoint).resolve()
    ckpt, sha256 = _checkpoint_header(path)
    mosaic = _checked_mosaic(mosaic, ckpt.bands)
    ckpt.check_compatible(bands=[str(b) for b in mosaic["band"].values])
    gbox = geobox_of(mosaic)
    window_slices = _tile_window(gbox, tiles, tile_size)
    classes = ckpt.classes

    kernel = dict(checkpoint=str(path), sha256=sha256, device=device, batch_size=batch_size,
                  probabilities=probabilities)
    stacked = _stacked_prediction(mosaic, grid, chunk_size, classes, resource, kernel)
    attrs = {"clc_level": classes.level, "class_codes": list(classes.codes), "encoder": ckpt.encoder,
             "checkpoint_sha256": sha256, "halo_px": halo, "window_px": window}
    ys, xs = window_slices or (slice(None), slice(None))
    out_gbox = gbox[ys, xs] if window_slices else gbox
    class_map = to_dataarray(stacked[0, ys, xs], out_gbox, name="class_map", nodata=NODATA_CODE)
    class_map.attrs.update(attrs)
    if not probabilities:
        return class_map
    probs = to_dataarray(stacked[1:, ys, xs].astype(np.uint8), out_gbox, name="probability", nodata=None)
    probs = probs.rename(band="class").assign_coords({"class": list(classes.codes)})
    probs.attrs.update(attrs, scale=1 / PROBABILITY_SCALE,
                       description="per-class softmax probability × 255 (0 where no data)")
    return xr.Dataset({"class_map": class_map, "probability": probs}, attrs=attrs)


def predict_region(
    data: da.Array,
    checkpoint: str | os.PathLike[str],
    *,
    origin: tuple[int, int],
    region: tuple[int, int, int, int],
    halo: int = DEFAULT_HALO,
    window: int = DEFAULT_WINDOW,
    batch_size: int = DEFAULT_BATCH_SIZE,
    device: str = "auto",
    client: Any = None,
) -> da.Array:
    """The class codes of one region, predicted by **one task** (a run's tile).

    The windows lie on the same global grid as in :func:`predict` (anchored at global pixel
    (0, 0)), so the codes equal those of :func:`predict` over a raster holding ``data`` at
    ``origin`` and no data (0) everywhere else — a tile predicted alone matches the whole map.
    One task per region keeps a run's graph small and lets a worker run the region's inference
    in one inference slot (the task needs one ``GPU``/``inference`` resource where workers
    advertise it: compute the result inside :func:`keep_annotations`, or with
    ``optimize_graph=False``).

    Args:
        data: (band, y, x) DN in the checkpoint's band order (any chunking; merged into one block).
        checkpoint: a clc-dask checkpoint file, readable by every worker.
        origin: global (row, col) of ``data[:, 0, 0]`` (px).
        region: global (row0, row1, col0, col1) to predict (px, end exclusive).
        halo: context (px) around every window's core, as for :func:`predict`.
        window: side (px) of each window's core.
        batch_size: windows per forward pass.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        client: the client that will compute the result (its workers' resources decide the
            annotation); default the current one.

    Returns:
        (rows, cols) CLC codes (uint8 for Level 1–2, uint16 for Level 3), 0 where ``data`` is no data.
    """
    grid = check_options(window, halo, batch_size, None)
    client = client if client is not None else _current_client()
    resource = inference_resource(client)
    device = _check_device(device, resource == GPU_RESOURCE)
    path = Path(checkpoint).resolve()
    ckpt, sha256 = _checkpoint_header(path)
    if data.ndim != 3 or data.shape[0] != len(ckpt.bands):
        raise InputError(f"predict_region needs (band, y, x) data with the checkpoint's {len(ckpt.bands)} bands "
                         f"{list(ckpt.bands)}; got shape {data.shape}.")
    r0, r1, c0, c1 = (int(v) for v in region)
    if r1 <= r0 or c1 <= c0:
        raise InputError(f"region {region} is empty: give (row0, row1, col0, col1) with row0 < row1, col0 < col1.")
    dtype = np.dtype(np.uint16 if ckpt.classes.level == 3 else np.uint8)
    kernel = dict(checkpoint=str(path), sha256=sha256, device=device, grid=grid, batch_size=batch_size,
                  origin=(int(origin[0]), int(origin[1])), region=(r0, r1, c0, c1), out_dtype=dtype.str)
    block = data.rechunk(data.shape)
    name = f"{INFERENCE_LAYER}-{tokenize(block.name, kernel)}"
    annotation = dask.annotate(resources={resource: 1}) if resource else contextlib.nullcontext()
    with annotation:
        return block.map_blocks(_predict_region_block, name=name, drop_axis=0, chunks=((r1 - r0,), (c1 - c0,)),
                                dtype=dtype, meta=np.empty((0, 0), dtype=dtype), **kernel)


def _predict_region_block(block: np.ndarray, *, checkpoint: str, sha256: str, device: str, grid: WindowGrid,
                          batch_size: int, origin: tuple[int, int], region: tuple[int, int, int, int],
                          out_dtype: str) -> np.ndarray:
    """Kernel of :func:`predict_region`: ``block`` padded with no data to every window input."""
    loaded = load_model(checkpoint, sha256, device)
    r0, r1, c0, c1 = region
    rows, cols = grid.indices(r0, r1), grid.indices(c0, c1)
    # the inputs of every window whose core meets the region, in global pixels
    top, left = rows.start * grid.window - grid.before, cols.start * grid.window - grid.before
    bottom, right = rows.stop * grid.window + grid.after, cols.stop * grid.window + grid.after
    dn = np.zeros((block.shape[0], bottom - top, right - left), dtype=block.dtype)
    oy, ox = origin
    ys = slice(max(top, oy), min(bottom, oy + block.shape[1]))
    xs = slice(max(left, ox), min(right, ox + block.shape[2]))
    if ys.start < ys.stop and xs.start < xs.stop:
        dn[:, ys.start - top:ys.stop - top, xs.start - left:xs.stop - left] = \
            block[:, ys.start - oy:ys.stop - oy, xs.start - ox:xs.stop - ox]
    started = time.perf_counter()
    codes = infer_region(dn, (top, left), region, loaded, grid, batch_size, False)[0]
    log.debug("predicted region rows %d:%d cols %d:%d in %.2f s on %s", r0, r1, c0, c1,
              time.perf_counter() - started, _worker_address())
    return codes.astype(out_dtype)


def check_options(window: int, halo: int, batch_size: int, chunk_size: int | None) -> WindowGrid:
    """Check the numeric options of :func:`predict` (cheap: call it before starting a cluster)."""
    grid = WindowGrid.from_options(window, halo)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size={batch_size!r} must be a whole number ≥ 1 (windows per forward pass).")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ConfigError(f"chunk_size={chunk_size!r} must be a positive number of pixels (e.g. 2048).")
    return grid


def _stacked_prediction(mosaic: xr.DataArray, grid: WindowGrid, chunk_size: int | None, classes: ClassTable,
                        resource: str | None, kernel: dict[str, Any]) -> da.Array:
    """The map_overlap graph: (1 [+ C], y, x) codes [and probabilities], chunked like the mosaic;
    inference tasks need one unit of ``resource`` (a GPU, or a CPU worker's inference slot)."""
    data = mosaic.data if isinstance(mosaic.data, da.Array) else da.from_array(mosaic.data)
    data = data.rechunk({0: -1, 1: chunk_size, 2: chunk_size} if chunk_size else {0: -1})
    out_chunks = data.chunks[1:]
    plans = [_plan_axis(grid, c) for c in out_chunks]
    if any(p.pad for p in plans):
        data = da.pad(data, ((0, 0), (0, plans[0].pad), (0, plans[1].pad)), mode="constant")
    data = data.rechunk((data.shape[0], plans[0].chunks, plans[1].chunks))
    dtype = np.dtype(np.uint16 if classes.level == 3 else np.uint8)
    layers = 1 + len(classes) * kernel["probabilities"]
    depth = (plans[0].depth, plans[1].depth)
    kernel = kernel | dict(grid=grid, overlap=depth, out_dtype=dtype.str)
    name = f"{INFERENCE_LAYER}-{tokenize(data.name, kernel)}"
    annotation = dask.annotate(resources={resource: 1}) if resource else contextlib.nullcontext()
    with annotation:
        stacked = da.map_overlap(
            _predict_block, data, depth={0: 0, 1: depth[0], 2: depth[1]}, boundary=0, trim=True,
            dtype=dtype, meta=np.empty((0, 0, 0), dtype=dtype), name=name,
            chunks=((layers,), tuple(c + 2 * depth[0] for c in data.chunks[1]),
                    tuple(c + 2 * depth[1] for c in data.chunks[2])),
            **kernel,
        )
    _log_plan(grid, plans, out_chunks, resource, kernel["device"])
    return stacked[:, : mosaic.sizes["y"], : mosaic.sizes["x"]].rechunk((layers, *out_chunks))


def _checkpoint_header(path: Path) -> tuple[Checkpoint, str]:
    """The checkpoint's metadata and SHA-256, read once per process and file version (path,
    inode, size, mtime): a run planning thousands of tiles reads and hashes its checkpoint once.
    (Workers still check the hash before using the file.)"""
    try:
        stat = path.stat()
    except OSError:  # load_checkpoint raises the clear error for a missing or unreadable file
        return _read_checkpoint_header(str(path))
    return _cached_checkpoint_header(str(path), stat.st_ino, stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _cached_checkpoint_header(path: str, inode: int, size: int, mtime_ns: int) -> tuple[Checkpoint, str]:
    return _read_checkpoint_header(path)


def _read_checkpoint_header(path: str) -> tuple[Checkpoint, str]:
    ckpt = load_checkpoint(path)
    # the weights stay on disk (workers load them); the client keeps what planning needs
    return (dataclasses.replace(ckpt, state_dict={}, optimizer_state=None, rng_state=None, history=[]),
            file_sha256(path))


def _current_client() -> Any:
    try:
        from distributed import default_client

        return default_client()
    except (ImportError, ValueError):
        return None


def _check_device(device: str, gpu_cluster: bool) -> str:
    if device == "auto":
        return device  # resolved on each worker
    device = resolve_device(device)
    if device.startswith("cuda") and not (gpu_cluster or torch.cuda.is_available()):
        raise ConfigError(
            f"device={device!r} but there is no CUDA device here and no worker advertises a "
            f"{GPU_RESOURCE} resource: use `device` auto or cpu, or connect to a GPU cluster."
        )
    return device


def _checked_mosaic(mosaic: xr.DataArray, bands: Sequence[str]) -> xr.DataArray:
    """(band, y, x) uint16 with the checkpoint's bands in its order (picked by name)."""
    if not isinstance(mosaic, xr.DataArray) or mosaic.dims != ("band", "y", "x"):
        dims = getattr(mosaic, "dims", type(mosaic).__name__)
        raise InputError(f"The mosaic must be a (band, y, x) DataArray, not {dims}: open it with "
                         "clc_dask.rasters.open_raster.")
    if mosaic.dtype != np.uint16:
        raise InputError(f"The mosaic holds {mosaic.dtype} but reflectance must be uint16 DN (0 = no data): "
                         "use a clc-dask mosaic, not scaled reflectance.")
    if mosaic.sizes["y"] == 0 or mosaic.sizes["x"] == 0:
        raise InputError(f"The mosaic is empty ({mosaic.sizes['y']}×{mosaic.sizes['x']} px): nothing to predict.")
    names = [str(b) for b in mosaic["band"].values] if "band" in mosaic.coords else []
    if names != list(bands) and set(bands) <= set(names):
        log.info("using mosaic bands %s (of %s) for the checkpoint", list(bands), names)
        mosaic = mosaic.sel(band=list(bands))
    return mosaic


def _tile_window(gbox: GeoBox, tiles: Sequence[str] | None, tile_size: int) -> tuple[slice, slice] | None:
    """Pixel slices spanning the named tiles, or None for the whole mosaic."""
    if tiles is None:
        return None
    names = [t for t in (s.strip() for s in tiles) if t]
    if not names:
        raise InputError("No tile selected (empty `tiles`): name tiles as row_col, e.g. 4_3,3_2, "
                         "or leave the option out to predict the whole mosaic.")
    selected = TileGrid(gbox, tile_size).select(names)
    ys = slice(min(t.pixel_slices[0].start for t in selected), max(t.pixel_slices[0].stop for t in selected))
    xs = slice(min(t.pixel_slices[1].start for t in selected), max(t.pixel_slices[1].stop for t in selected))
    if ys.stop <= ys.start or xs.stop <= xs.start:
        raise InputError(f"Tiles {names} do not overlap the mosaic: choose tiles inside it.")
    return ys, xs


def _log_plan(grid: WindowGrid, plans: list[_AxisPlan], chunks: tuple[tuple[int, ...], ...],
              resource: str | None, device: str) -> None:
    waste = grid.recompute_factor(plans[0].chunks) * grid.recompute_factor(plans[1].chunks)
    log.info("predict: window %d px (+%d/%d px context, input %d px), depth %s px, %d×%d inference "
             "blocks, device %s%s", grid.window, grid.before, grid.after, grid.input_size,
             [p.depth for p in plans], len(plans[0].chunks), len(plans[1].chunks), device,
             f", one {resource} per inference task" if resource else "")
    if waste > 1.05:
        log.info("chunk edges %s are not multiples of window=%d px: %.2f× the windows are run "
                 "(chunk sizes that are multiples of the window avoid it)", chunks[0][:3], grid.window, waste)


# --------------------------------------------------------------------------- outputs


def write_prediction(
    class_map: xr.DataArray,
    path: str | os.PathLike[str],
    *,
    overwrite: bool = True,
    level: int | None = None,
) -> Path:
    """Write a class map as a COG with the official CLC colour table (nodata 0), atomically.

    Args:
        class_map: (y, x) codes from :func:`predict` (lazy: computed chunk by chunk).
        path: output ``.tif``.
        overwrite: replace an existing file.
        level: CLC level of the codes (default: the map's ``clc_level`` attribute, else 2).
    """
    level = int(level or class_map.attrs.get("clc_level", 2))
    tags = {k: str(v) for k, v in class_map.attrs.items()
            if k in ("clc_level", "class_codes", "encoder", "checkpoint_sha256", "halo_px", "window_px")}
    with keep_annotations(class_map):
        return write_geotiff(class_map, path, nodata=NODATA_CODE, colormap=colormap(level),
                             overwrite=overwrite, tags=tags)


def write_probabilities(prediction: xr.Dataset, path: str | os.PathLike[str], *, overwrite: bool = True) -> Path:
    """Write :func:`predict`'s Dataset (``class_map`` + ``probability``) to a Zarr store, atomically.

    Zarr chunks equal the dask chunks (regular grid), the store is written under a temporary
    name beside ``path`` and renamed into place only when complete.
    """
    path = Path(path)
    _check_store_writable(path, overwrite)
    variables, encoding = {}, {}
    for name, var in prediction.data_vars.items():
        var = var.copy()
        if isinstance(var.data, da.Array):  # Zarr chunks = dask chunks (regular grid)
            regular = tuple(c[0] for c in var.data.chunks)
            var = var.chunk(dict(zip(var.dims, regular, strict=True)))
            encoding[name] = {"chunks": regular}
        # 0 is a value (no data in codes, 0 % in probabilities), not a mask: keep integers on read
        var.attrs.pop("_FillValue", None)
        var.encoding.clear()
        var.attrs["nodata"] = NODATA_CODE
        encoding.setdefault(name, {})["_FillValue"] = None
        variables[name] = var
    ds = xr.Dataset(variables, attrs=prediction.attrs)
    with keep_annotations(ds):
        write_zarr(ds, path, encoding)
    log.info("wrote %s (%s)", path, ", ".join(f"{k} {tuple(v.shape)}" for k, v in ds.data_vars.items()))
    return path


def _check_store_writable(path: Path, overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise OutputError(f"{path} exists: pass `overwrite` to replace it, or choose another path.")
    if path.exists() and not path.is_dir():
        raise OutputError(f"{path} is a file, not a Zarr store: choose another `probabilities` path.")
    check_writable(path.parent / f".{path.name}.check", overwrite=True)


def tile_output_path(path: str | os.PathLike[str], tile: str) -> Path:
    """``out.tif`` + tile ``4_3`` → ``out_4_3.tif`` (also for ``probs.zarr``)."""
    path = Path(path)
    return path.with_name(f"{path.stem}_{tile}{path.suffix}")


def predict_to_file(
    mosaic_path: str | os.PathLike[str],
    checkpoint_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    client: Any = None,
    *,
    probabilities_path: str | os.PathLike[str] | None = None,
    overwrite: bool = True,
    **opts: Any,
) -> Path:
    """Predict a mosaic file and write the class map COG (and the probabilities Zarr).

    With ``tiles=[...]`` in ``opts`` the written map is the window spanning those tiles; use
    :func:`predict_tiles_to_files` for one file per tile. Options are those of :func:`predict`.
    The inference runs once even when both outputs are written.
    """
    out_path = check_writable(out_path, overwrite)
    if probabilities_path is not None:
        _check_store_writable(Path(probabilities_path), overwrite)
    mosaic = open_raster(mosaic_path, chunks=opts.get("chunk_size") or DEFAULT_CHUNK_SIZE)
    result = predict(mosaic, checkpoint_path, client=client, probabilities=probabilities_path is not None, **opts)
    with reading(mosaic_path, "mosaic"):  # the mosaic is read while the map is written
        return _write(result, out_path, probabilities_path, overwrite)


def predict_tiles_to_files(
    mosaic_path: str | os.PathLike[str],
    checkpoint_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    tiles: Sequence[str],
    client: Any = None,
    *,
    probabilities_path: str | os.PathLike[str] | None = None,
    overwrite: bool = True,
    **opts: Any,
) -> dict[str, Path]:
    """One class map COG per tile (``out_4_3.tif``…), each predicted with its surroundings as context.

    All tile names, options and output paths are checked before anything is computed.
    """
    tile_size = opts.pop("tile_size", DEFAULT_TILE_SIZE)
    mosaic = open_raster(mosaic_path, chunks=opts.get("chunk_size") or DEFAULT_CHUNK_SIZE)
    _tile_window(geobox_of(mosaic), tiles, tile_size)  # every name valid before any write
    names = [t.strip() for t in tiles if t.strip()]
    outs = {t: check_writable(tile_output_path(out_path, t), overwrite) for t in names}
    probs = {t: tile_output_path(probabilities_path, t) for t in names} if probabilities_path else {}
    for p in probs.values():
        _check_store_writable(p, overwrite)
    written = {}
    for tile in names:
        result = predict(mosaic, checkpoint_path, client=client, tiles=[tile], tile_size=tile_size,
                         probabilities=bool(probs), **opts)
        with reading(mosaic_path, "mosaic"):
            written[tile] = _write(result, outs[tile], probs.get(tile), overwrite)
    return written


def _write(result: xr.DataArray | xr.Dataset, out_path: Path, probabilities_path: str | os.PathLike[str] | None,
           overwrite: bool) -> Path:
    if probabilities_path is None:
        return write_prediction(result, out_path, overwrite=overwrite)
    store = write_probabilities(result, probabilities_path, overwrite=overwrite)
    # the class map is read back from the store: the model runs once for both outputs
    stored = xr.open_zarr(store, mask_and_scale=False)["class_map"]
    class_map = to_dataarray(stored.data, geobox_of(result["class_map"]), name="class_map", nodata=NODATA_CODE)
    class_map.attrs.update(result["class_map"].attrs)
    return write_prediction(class_map, out_path, overwrite=overwrite)
