"""Evaluation: confusion matrices per dask block, tree-summed, and the metrics of the paper.

A class map (prediction) is scored against a reference (CORINE) on the same grid. Both hold
CLC codes of any level; finer codes are reduced to the asked ``level`` (311 → 31). Nothing is
materialised: every dask block gives a small joint histogram (``np.bincount`` of
``n_bins * ref + pred``) and the histograms are added with a tree reduction
(``Array.sum(split_every=…)``), so the same code runs on a laptop and on a cluster.

Counting rules (what a user needs to compare our numbers with others'):

* A pixel is **valid** when its reference code, reduced to ``level``, is one of ``codes``.
  Reference no data (0) and reference codes outside ``codes`` are ignored.
* A valid pixel whose **prediction** is no data (0), not an official code of ``level``, or a code
  outside ``codes`` is a **miss**: it counts as a false negative of its reference class and a
  false positive of no class. The n×n confusion matrix has no column for it; its count per
  reference class is reported as ``missed_pixels`` and enters recall, IoU, F1, overall accuracy
  and kappa (as an extra "unclassified" prediction class). This equals scikit-learn's metrics
  with such predictions relabelled to a label outside ``codes``.
* ``codes`` default to the Level-``level`` official codes present in either raster (found in the
  same pass as the counts; nothing is read twice).
* Per class: IoU = TP / (TP + FP + FN), precision = TP / (TP + FP), recall = TP / (TP + FN),
  F1 = 2 TP / (2 TP + FP + FN). An undefined ratio (0 / 0) is ``None`` (JSON null), e.g. every
  figure of a class absent from both maps. A class only in the prediction has IoU 0.
* ``mean_iou`` averages IoU over the classes present in the reference (as in the paper);
  ``weighted_iou`` weights each class's IoU by its reference area.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import numpy as np
import xarray as xr
from odc.geo.geobox import GeoBox

from clc_dask.classes import NODATA_CODE, ClassTable, code_level, official_codes, to_level
from clc_dask.errors import ConfigError, InputError
from clc_dask.grid import DEFAULT_TILE_SIZE, Tile, TileGrid, assert_same_grid, chunk_size_for
from clc_dask.rasters import check_writable, geobox_of, open_raster
from clc_dask.report import write_figures
from clc_dask.stores import atomic_path

log = logging.getLogger(__name__)

#: Default chunk edge (pixels) when an input is an in-memory (numpy-backed) DataArray.
DEFAULT_CHUNK = 2048
#: Blocks summed per reduction step and axis (dask's ``split_every``).
DEFAULT_SPLIT_EVERY = 8


# --------------------------------------------------------------------------- binning


@dataclass(frozen=True)
class _Bins:
    """How raw code values fall into histogram bins for one level.

    Bin 0 is no data, bins ``1…K`` are the official codes of the level (ascending), bin
    ``K+1`` collects official codes of a *coarser* level (which cannot be refined) and bin
    ``K+2`` anything else (not a CLC code).
    """

    level: int
    codes: tuple[int, ...]
    lut: np.ndarray  # 65536 entries: raw uint16 value → bin (uint16: n² < 65536 for any level)

    @property
    def coarser(self) -> int:
        return len(self.codes) + 1

    @property
    def other(self) -> int:
        return len(self.codes) + 2

    @property
    def n(self) -> int:
        return len(self.codes) + 3


@functools.cache
def _bins(level: int) -> _Bins:
    if level not in (1, 2, 3):
        raise InputError(f"CLC level must be 1, 2 or 3, not {level!r}.")
    codes = official_codes(level)
    index = {code: i + 1 for i, code in enumerate(codes)}
    lut = np.full(65536, len(codes) + 2, dtype=np.uint16)
    lut[NODATA_CODE] = 0
    for finer in range(level, 4):
        for code in official_codes(finer):
            lut[code] = index[int(to_level(code, level))]
    for coarser in range(1, level):
        for code in official_codes(coarser):
            lut[code] = len(codes) + 1
    return _Bins(level, codes, lut)


def _to_bins(block: np.ndarray, lut: np.ndarray, nodata: float | None) -> np.ndarray:
    """Raw code values of one block → bin indices (uint16)."""
    if block.dtype.kind == "f":
        if nodata is not None and not math.isnan(nodata):
            block = np.where(block == nodata, 0, block)
        block = np.nan_to_num(block, nan=0.0)
        bad = (block != np.round(block)) | (block < 0) | (block > 65535)
        block = np.where(bad, 65535, block)
    elif nodata is not None and nodata != 0:
        block = np.where(block == nodata, 0, block)
    if block.dtype not in (np.uint8, np.uint16):
        block = np.where((block < 0) | (block > 65535), 65535, block)
    return lut[block.astype(np.uint16, copy=False)]


def _block_histogram(
    reference: np.ndarray,
    prediction: np.ndarray,
    level: int,
    ref_nodata: float | None,
    pred_nodata: float | None,
) -> np.ndarray:
    """The joint (reference bin × prediction bin) histogram of one block, shape (1, 1, n²).

    The lookup table is rebuilt (once, cached) where the task runs, so the graph stays small.
    """
    bins = _bins(level)
    joint = _to_bins(reference, bins.lut, ref_nodata)  # a fresh array: safe to modify in place
    joint *= bins.n
    joint += _to_bins(prediction, bins.lut, pred_nodata)
    counts = np.bincount(joint.ravel(), minlength=bins.n * bins.n)
    return counts.astype(np.int64, copy=False)[None, None, :]


# --------------------------------------------------------------------------- inputs


def _as_2d(array: xr.DataArray, what: str) -> xr.DataArray:
    """A single-band class raster as (y, x); (1, y, x) rasters from open_raster are squeezed."""
    if not isinstance(array, xr.DataArray):
        raise InputError(
            f"The {what} must be a georeferenced xarray.DataArray (e.g. from "
            f"clc_dask.rasters.open_raster), not {type(array).__name__}."
        )
    extra = [d for d in array.dims if d not in ("y", "x")]
    for dim in extra:
        if array.sizes[dim] != 1:
            raise InputError(
                f"The {what} raster has {array.sizes[dim]} entries along '{dim}': a class raster "
                "has one band of CLC codes. Pass the class band only."
            )
        array = array.isel({dim: 0}, drop=True)
    if array.dims != ("y", "x"):
        array = array.transpose("y", "x")
    if array.dtype.kind not in "uif":
        raise InputError(f"The {what} raster has dtype {array.dtype}: expected integer CLC codes.")
    return array


def _nodata(array: xr.DataArray) -> float | None:
    try:
        value = array.rio.nodata
    except Exception:  # no rio accessor information
        value = None
    return None if value is None else float(value)


def _dask_pair(prediction: xr.DataArray, reference: xr.DataArray) -> tuple[da.Array, da.Array]:
    """Both rasters as dask arrays with identical chunks (the reference's, if it is chunked)."""
    ref, pred = reference.data, prediction.data
    if isinstance(ref, da.Array):
        chunks = ref.chunks
    elif isinstance(pred, da.Array):
        chunks = pred.chunks
    else:
        chunks = (DEFAULT_CHUNK, DEFAULT_CHUNK)
    ref = ref.rechunk(chunks) if isinstance(ref, da.Array) else da.from_array(ref, chunks=chunks)
    pred = pred.rechunk(chunks) if isinstance(pred, da.Array) else da.from_array(pred, chunks=chunks)
    return pred, ref


def _align_to_tiles(array: da.Array, tiles: Sequence[Tile]) -> da.Array:
    """Rechunk so that every tile edge is a chunk edge (no-op when chunks divide tiles)."""
    edges = []
    for axis in (0, 1):
        bounds = set(np.cumsum((0, *array.chunks[axis])).tolist())
        for tile in tiles:
            sl = tile.pixel_slices[axis]
            bounds.update((sl.start, sl.stop))
        edges.append(sorted(bounds))
    chunks = tuple(tuple(np.diff(e).tolist()) for e in edges)
    return array if chunks == array.chunks else array.rechunk(chunks)


def _block_range(chunks: tuple[int, ...], sl: slice) -> slice:
    starts = np.cumsum((0, *chunks))
    return slice(int(np.searchsorted(starts, sl.start)), int(np.searchsorted(starts, sl.stop)))


def _select_tiles(geobox: GeoBox, tiles: TileGrid | Sequence[str] | Sequence[Tile] | None,
                  tile_size: int) -> list[Tile]:
    """The tiles to report on, checked against the rasters' grid before any pixel is read."""
    if tiles is None:
        return []
    if isinstance(tiles, TileGrid):
        assert_same_grid(tiles.geobox, geobox, "tile grid", "reference")
        return list(tiles)
    grid = TileGrid(geobox, tile_size)
    selected = []
    for tile in tiles:
        if isinstance(tile, Tile):
            ys, xs = tile.pixel_slices
            if ys.stop > geobox.shape.y or xs.stop > geobox.shape.x:
                raise InputError(f"Tile {tile.name} reaches outside the {geobox.shape.y}×"
                                 f"{geobox.shape.x} px rasters: build the tiles on their grid.")
            selected.append(tile)
        else:
            selected.append(grid.tile(str(tile)))
    names = [t.name for t in selected]
    if len(set(names)) != len(names):
        raise InputError(f"Tiles {names} name a tile twice: list each tile once.")
    return selected


# --------------------------------------------------------------------------- counting


@dataclass(frozen=True)
class Counts:
    """Pixel counts of one area: the confusion matrix over ``codes`` plus what it leaves out.

    Attributes:
        codes: the classes, ascending (rows and columns of ``matrix``).
        matrix: n×n int64, rows = reference, columns = prediction (pixels).
        missed: per reference class, valid pixels whose prediction is no data / not in ``codes``.
        ignored: reference pixels that are not no data but not in ``codes`` either.
        reference_nodata: reference pixels that are no data (0).
    """

    codes: tuple[int, ...]
    matrix: np.ndarray
    missed: np.ndarray
    ignored: int
    reference_nodata: int


def _histograms(
    prediction: xr.DataArray,
    reference: xr.DataArray,
    level: int,
    tiles: list[Tile],
    split_every: int | None,
) -> tuple[_Bins, np.ndarray, dict[str, np.ndarray]]:
    """Joint histograms (bins × bins) over the whole grid and over each tile, in one compute."""
    bins = _bins(level)
    pred, ref = _dask_pair(prediction, reference)
    if tiles:
        ref = _align_to_tiles(ref, tiles)
        pred = pred.rechunk(ref.chunks)
    per_block = da.blockwise(
        _block_histogram, "ijk",
        ref, "ij",
        pred, "ij",
        new_axes={"k": bins.n * bins.n},
        adjust_chunks={"i": 1, "j": 1},
        dtype=np.int64,
        level=level,
        ref_nodata=_nodata(reference),
        pred_nodata=_nodata(prediction),
    )
    split = split_every or DEFAULT_SPLIT_EVERY
    totals = {"": per_block.sum(axis=(0, 1), split_every={0: split, 1: split})}
    for tile in tiles:
        rows = _block_range(ref.chunks[0], tile.pixel_slices[0])
        cols = _block_range(ref.chunks[1], tile.pixel_slices[1])
        totals[tile.name] = per_block[rows, cols].sum(axis=(0, 1), split_every={0: split, 1: split})
    log.info("counting %d×%d px in %d block(s)%s", *ref.shape, per_block.numblocks[0] * per_block.numblocks[1],
             f", {len(tiles)} tile(s)" if tiles else "")
    (computed,) = dask.compute(totals)
    hists = {k: np.asarray(v, dtype=np.int64).reshape(bins.n, bins.n) for k, v in computed.items()}
    whole = hists.pop("")
    return bins, whole, hists


def _check_levels(bins: _Bins, hist: np.ndarray) -> None:
    """Refuse rasters holding codes too coarse for the level asked; warn about non-CLC values."""
    ref_coarse = int(hist[bins.coarser, :].sum())
    pred_coarse = int(hist[:, bins.coarser].sum())
    if ref_coarse or pred_coarse:
        which = "reference" if ref_coarse else "prediction"
        raise InputError(
            f"The {which} holds {max(ref_coarse, pred_coarse)} px of CLC codes coarser than "
            f"Level {bins.level}: finer classes cannot be derived from them. Evaluate at the "
            f"raster's level (`level` {bins.level - 1} or lower)."
        )
    ref_other = int(hist[bins.other, :].sum())
    pred_other = int(hist[:, bins.other].sum())
    if ref_other:
        log.warning("reference: %d px hold values that are not CLC codes; they are ignored", ref_other)
    if pred_other:
        log.warning("prediction: %d px hold values that are not CLC codes; inside valid reference "
                    "pixels they count as misses", pred_other)


def _default_codes(bins: _Bins, hist: np.ndarray) -> tuple[int, ...]:
    """Level codes present in the reference or the prediction."""
    k = len(bins.codes)
    present = (hist[1 : k + 1, :].sum(axis=1) + hist[:, 1 : k + 1].sum(axis=0)) > 0
    return tuple(c for c, p in zip(bins.codes, present, strict=True) if p)


def _counts(bins: _Bins, hist: np.ndarray, codes: Sequence[int]) -> Counts:
    """Reduce a joint bin histogram to the confusion matrix over ``codes``."""
    idx = np.array([bins.codes.index(c) + 1 for c in codes], dtype=np.intp)
    rows = hist[idx, :]
    matrix = rows[:, idx].copy()
    missed = rows.sum(axis=1) - matrix.sum(axis=1)
    ignored = int(hist[1:, :].sum() - rows.sum())
    return Counts(tuple(int(c) for c in codes), matrix, missed.astype(np.int64), ignored,
                  int(hist[0, :].sum()))


def _resolve_codes(level: int, codes: Sequence[int] | None) -> tuple[int, ...] | None:
    if codes is None:
        return None
    codes = [int(c) for c in codes]
    for code in codes:
        if code == NODATA_CODE or code_level(code) != level:
            raise InputError(f"Class {code} is not a Level-{level} CLC code: give codes of the "
                             f"evaluated level, e.g. {list(official_codes(level)[:4])}.")
    return ClassTable(level, codes).codes


def _prepare(prediction: xr.DataArray, reference: xr.DataArray, level: int,
             codes: Sequence[int] | None) -> tuple[xr.DataArray, xr.DataArray, tuple[int, ...] | None]:
    """Validate inputs before any pixel is read: single band, same grid, valid level/codes."""
    prediction = _as_2d(prediction, "prediction")
    reference = _as_2d(reference, "reference")
    assert_same_grid(geobox_of(prediction), geobox_of(reference), "prediction", "reference")
    _bins(level)
    return prediction, reference, _resolve_codes(level, codes)


def validate_inputs(
    prediction: xr.DataArray,
    reference: xr.DataArray,
    *,
    level: int = 2,
    codes: Sequence[int] | None = None,
    tiles: TileGrid | Sequence[str] | Sequence[Tile] | None = None,
    tile_size: int = DEFAULT_TILE_SIZE,
) -> None:
    """Check everything that can be checked without reading a pixel (grids, level, codes, tiles).

    Call it before creating outputs; :func:`evaluate` runs the same checks itself.
    """
    prediction, reference, _ = _prepare(prediction, reference, level, codes)
    _select_tiles(geobox_of(reference), tiles, tile_size)


def confusion_counts(
    prediction: xr.DataArray,
    reference: xr.DataArray,
    codes: Sequence[int] | None = None,
    *,
    level: int = 2,
    split_every: int | None = None,
) -> Counts:
    """The confusion matrix with the pixels it leaves out (misses, ignored, no data).

    Same arguments as :func:`confusion_matrix`.
    """
    prediction, reference, fixed = _prepare(prediction, reference, level, codes)
    bins, hist, _ = _histograms(prediction, reference, level, [], split_every)
    _check_levels(bins, hist)
    return _counts(bins, hist, fixed if fixed is not None else _default_codes(bins, hist))


def confusion_matrix(
    prediction: xr.DataArray,
    reference: xr.DataArray,
    codes: Sequence[int] | None = None,
    *,
    level: int = 2,
    split_every: int | None = None,
) -> np.ndarray:
    """Confusion matrix of two CLC code rasters on one grid, counted per block and tree-summed.

    Args:
        prediction: class map (y, x) or (1, y, x) of CLC codes, any level ≥ ``level``; 0 = no data.
        reference: reference map (e.g. CORINE) on exactly the same grid.
        codes: classes (Level-``level`` codes) to score, i.e. the rows/columns. Default: the
            official codes present in either raster. Give them to compare several runs on one
            class list or to leave classes out (their reference pixels are then ignored).
        level: CLC level to evaluate at (Level-3 inputs are reduced, 311 → 31).
        split_every: blocks summed per step of the tree reduction, per axis (default 8).

    Returns:
        int64 array (n, n) of pixel counts, rows = reference class, columns = predicted class,
        in ascending code order. Predictions of no data/outside ``codes`` are not in it (see the
        module notes and :func:`confusion_counts`).

    Raises:
        GridMismatchError: the rasters are on different grids (raised before reading a pixel).
        InputError: multi-band input, codes not of ``level``, or codes coarser than ``level``.
    """
    return confusion_counts(prediction, reference, codes, level=level, split_every=split_every).matrix


# --------------------------------------------------------------------------- metrics


def _ratio(num: np.ndarray, den: np.ndarray) -> list[float | None]:
    return [None if d == 0 else float(n) / float(d) for n, d in zip(num, den, strict=True)]


def _kappa(matrix: np.ndarray) -> float | None:
    """Cohen's kappa of a square confusion matrix (float64 from integer counts)."""
    total = float(matrix.sum())
    if total == 0:
        return None
    observed = float(np.trace(matrix)) / total
    expected = float((matrix.sum(axis=1).astype(np.float64) * matrix.sum(axis=0)).sum()) / (total * total)
    if expected == 1.0:
        return None
    return (observed - expected) / (1.0 - expected)


def metrics_from_confusion(
    cm: np.ndarray,
    codes: Sequence[int],
    *,
    missed: np.ndarray | Sequence[int] | None = None,
    pixel_area_m2: float | None = None,
) -> dict[str, Any]:
    """Per-class and overall accuracy figures from a confusion matrix (JSON-ready).

    Args:
        cm: n×n pixel counts, rows = reference, columns = prediction.
        codes: the n class codes of the rows/columns.
        missed: per reference class, valid pixels predicted as no data/outside ``codes``
            (false negatives with no false positive); default none.
        pixel_area_m2: area of one pixel in m²; adds ``area_ha`` per class when given.

    Returns:
        A dict with ``codes``, ``confusion_matrix``, per-class dicts keyed by the code as a
        string (``iou``, ``precision``, ``recall``, ``f1``, ``reference_pixels``,
        ``predicted_pixels``, ``tp``, ``fp``, ``fn``, ``missed_pixels``), ``mean_iou`` over
        classes present in the reference, ``weighted_iou`` (reference-area weighted),
        ``overall_accuracy``, ``kappa``, ``valid_pixels``, ``unclassified_pixels``.
        Undefined ratios (0/0) are ``None``.
    """
    cm = np.asarray(cm, dtype=np.int64)
    codes = [int(c) for c in codes]
    n = len(codes)
    if cm.shape != (n, n):
        raise InputError(f"Confusion matrix of shape {cm.shape} does not match {n} codes.")
    missed_arr = np.zeros(n, np.int64) if missed is None else np.asarray(missed, dtype=np.int64)
    if missed_arr.shape != (n,):
        raise InputError(f"'missed' has shape {missed_arr.shape}: expected ({n},), one per code.")
    tp = np.diag(cm).copy()
    reference = cm.sum(axis=1) + missed_arr
    predicted = cm.sum(axis=0)
    fp = predicted - tp
    fn = reference - tp
    iou = _ratio(tp, tp + fp + fn)
    precision = _ratio(tp, predicted)
    recall = _ratio(tp, reference)
    f1 = _ratio(2 * tp, 2 * tp + fp + fn)
    total = int(reference.sum())
    scored = [(v, int(r)) for v, r in zip(iou, reference, strict=True) if r > 0]
    mean_iou = sum(v for v, _ in scored) / len(scored) if scored else None
    weighted_iou = sum(v * r for v, r in scored) / total if total else None
    # Kappa and OA over n+1 classes: the extra column is "unclassified" (misses).
    augmented = np.zeros((n + 1, n + 1), np.int64)
    augmented[:n, :n] = cm
    augmented[:n, n] = missed_arr

    def keyed(values: Sequence[Any]) -> dict[str, Any]:
        return {str(c): (v if v is None or isinstance(v, float) else int(v))
                for c, v in zip(codes, values, strict=True)}

    out: dict[str, Any] = {
        "codes": codes,
        "confusion_matrix": cm.tolist(),
        "iou": keyed(iou),
        "precision": keyed(precision),
        "recall": keyed(recall),
        "f1": keyed(f1),
        "reference_pixels": keyed(reference),
        "predicted_pixels": keyed(predicted),
        "tp": keyed(tp),
        "fp": keyed(fp),
        "fn": keyed(fn),
        "missed_pixels": keyed(missed_arr),
        "mean_iou": mean_iou,
        "weighted_iou": weighted_iou,
        "overall_accuracy": float(tp.sum()) / total if total else None,
        "kappa": _kappa(augmented),
        "valid_pixels": total,
        "unclassified_pixels": int(missed_arr.sum()),
    }
    if pixel_area_m2 is not None:
        out["area_ha"] = {str(c): float(r) * pixel_area_m2 / 1e4 for c, r in zip(codes, reference, strict=True)}
        out["predicted_area_ha"] = {str(c): float(p) * pixel_area_m2 / 1e4
                                    for c, p in zip(codes, predicted, strict=True)}
    return out


def _report_of(counts: Counts, pixel_area_m2: float | None) -> dict[str, Any]:
    report = metrics_from_confusion(counts.matrix, counts.codes, missed=counts.missed,
                                    pixel_area_m2=pixel_area_m2)
    report["ignored_reference_pixels"] = counts.ignored
    report["reference_nodata_pixels"] = counts.reference_nodata
    return report


def _pixel_area_m2(geobox: GeoBox) -> float | None:
    """Area of one pixel in m², or None when the CRS is not in metres (e.g. lon/lat)."""
    crs = geobox.crs
    if crs is None or crs.geographic or any(u not in ("metre", "meter", "m") for u in crs.units):
        return None
    return abs(float(geobox.resolution.x) * float(geobox.resolution.y))


def evaluate(
    prediction: xr.DataArray,
    reference: xr.DataArray,
    *,
    level: int = 2,
    codes: Sequence[int] | None = None,
    tiles: TileGrid | Sequence[str] | Sequence[Tile] | None = None,
    tile_size: int = DEFAULT_TILE_SIZE,
    split_every: int | None = None,
) -> dict[str, Any]:
    """Score a class map against a reference: the full report, optionally per tile.

    Args:
        prediction: class map of CLC codes (0 = no data), lazily read (dask) or in memory.
        reference: reference CLC codes on exactly the same grid (Level 3 is reduced to ``level``).
        level: CLC level to evaluate at (1, 2 or 3).
        codes: classes to score (default: Level-``level`` codes present in either raster).
        tiles: also report per tile: a :class:`TileGrid` (all its tiles), tile names
            (``["4_3", "3_2"]``, "row_col" from 1 on a ``tile_size`` grid) or :class:`Tile`
            objects. Tiles share the overall ``codes``, so their tables line up.
        tile_size: tile edge in pixels when tiles are given by name (paper: 2048).
        split_every: blocks per step of the tree reduction, per axis.

    Returns:
        The :func:`metrics_from_confusion` dict plus ``level``, ``crs``, ``shape`` (pixels),
        ``pixel_size_m``, ``area_ha`` (hectares per reference class),
        ``ignored_reference_pixels``, ``reference_nodata_pixels`` and, with tiles, ``tiles``:
        ``{name: report}`` each with its ``pixel_slices`` (y0, y1, x0, x1) and ``bounds``
        (left, bottom, right, top in the CRS's units, metres for UTM).

    Raises:
        GridMismatchError: different grids (before reading any pixel).
        InputError: bad level, codes, tile names or class rasters.
    """
    prediction, reference, fixed = _prepare(prediction, reference, level, codes)
    geobox = geobox_of(reference)
    selected = _select_tiles(geobox, tiles, tile_size)
    bins, hist, tile_hists = _histograms(prediction, reference, level, selected, split_every)
    _check_levels(bins, hist)
    use_codes = fixed if fixed is not None else _default_codes(bins, hist)
    area = _pixel_area_m2(geobox)
    report: dict[str, Any] = {
        "level": level,
        "crs": _crs_name(geobox),
        "shape": [int(geobox.shape.y), int(geobox.shape.x)],
        "pixel_size_m": [abs(float(geobox.resolution.x)), abs(float(geobox.resolution.y))],
        **_report_of(_counts(bins, hist, use_codes), area),
    }
    if selected:
        report["tile_size"] = tile_size if not isinstance(tiles, TileGrid) else tiles.tile_size
        report["tiles"] = {}
        for tile in selected:
            ys, xs = tile.pixel_slices
            tile_report = _report_of(_counts(bins, tile_hists[tile.name], use_codes), area)
            tile_report["pixel_slices"] = [ys.start, ys.stop, xs.start, xs.stop]
            tile_report["bounds"] = [float(v) for v in tile.geobox.boundingbox]
            report["tiles"][tile.name] = tile_report
    log.info("mIoU %s, OA %s, kappa %s over %d class(es)", _fmt(report["mean_iou"]),
             _fmt(report["overall_accuracy"]), _fmt(report["kappa"]), len(use_codes))
    return report


def _crs_name(geobox: GeoBox) -> str | None:
    crs = geobox.crs
    if crs is None:
        return None
    return f"EPSG:{crs.epsg}" if crs.epsg is not None else crs.to_wkt()


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


# --------------------------------------------------------------------------- files


def write_report(report: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write a report as JSON (UTF-8, indented) atomically; undefined figures become null."""
    path = check_writable(path)
    text = json.dumps(report, indent=2, allow_nan=False, ensure_ascii=False)
    with atomic_path(path, suffix=".json") as tmp:
        tmp.write_text(text + "\n", encoding="utf-8")
    log.info("wrote report %s", path)
    return path


def evaluate_files(
    prediction: str | os.PathLike[str],
    reference: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    level: int = 2,
    codes: Sequence[int] | None = None,
    tiles: Sequence[str] | None = None,
    per_tile: bool = False,
    tile_size: int = DEFAULT_TILE_SIZE,
    chunk_size: int = DEFAULT_CHUNK,
    figures: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Score a class map file against a reference file and write the report (and figures).

    Args:
        prediction: class map GeoTIFF (CLC codes, 0 = no data).
        reference: reference CLC GeoTIFF on the same grid (Level 3 is reduced to ``level``).
        out: report JSON to write.
        level: CLC level to evaluate at.
        codes: classes to score (default: codes present in either map).
        tiles: also report these tiles (``row_col`` from 1 on a ``tile_size`` grid).
        per_tile: also report every tile of the grid (exclusive with ``tiles``).
        tile_size: tile edge in pixels.
        chunk_size: dask chunk edge in pixels (rounded down to divide ``tile_size``).
        figures: folder for PNG figures (IoU bars and maps, also per tile), or None.

    Returns:
        The report (as written), with the input paths in ``prediction``/``reference``.
    """
    if tiles and per_tile:
        raise ConfigError("Give either `tiles` (names) or `per_tile`, not both.")
    chunk = chunk_size_for(tile_size, chunk_size)
    pred = open_raster(prediction, chunks=chunk)
    ref = open_raster(reference, chunks=chunk)
    selected: TileGrid | list[str] | None = TileGrid(geobox_of(ref), tile_size) if per_tile else (
        list(tiles) if tiles else None)
    validate_inputs(pred, ref, level=level, codes=codes, tiles=selected, tile_size=tile_size)
    check_writable(out)
    if figures is not None:
        check_writable(Path(figures) / "iou.png")
    report = evaluate(pred, ref, level=level, codes=codes, tiles=selected, tile_size=tile_size)
    report["prediction"] = str(prediction)
    report["reference"] = str(reference)
    write_report(report, out)
    if figures is not None:
        write_figures(report, pred, ref, figures, title=Path(prediction).stem)
    return report


def read_report(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a report written by :func:`write_report` (checked for the fields tables need)."""
    path = Path(path)
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise InputError(f"Report {path} does not exist: check the path.") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"Report {path} is not JSON ({exc}): pass a file written by clc-dask evaluate.") from exc
    missing = [k for k in ("codes", "iou", "mean_iou") if not isinstance(report, dict) or k not in report]
    if missing:
        raise InputError(f"Report {path} lacks {missing}: pass a file written by clc-dask evaluate.")
    return report
