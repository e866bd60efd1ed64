"""The generalization rules in pixels, and rule B (minimum width) on one block.

:func:`rules_for` turns the CORINE rules in hectares and metres into :class:`Rules` in
pixels; :func:`width_step` applies the minimum-width rule to a block that includes its halo.
The rules themselves are defined in :mod:`clc_dask.generalize`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.ndimage as ndi

from clc_dask.errors import ConfigError, InputError

#: The no-data code of every class map.
NODATA = 0
_BIG = 1 << 30  # larger than any code, for window minima over valid pixels only


# --------------------------------------------------------------------------- rules


@dataclass(frozen=True)
class Rules:
    """The generalization rules in pixels (see the module docstring for the definition).

    Attributes:
        mmu_px: patches with fewer pixels than this are merged (≤ 1: no MMU step).
        width_px: ``(rows, cols)`` box of the minimum-width disk (both ≤ 1: no width step).
        connectivity: 4 or 8, how pixels of one code connect into a patch.
    """

    mmu_px: int
    width_px: tuple[int, int]
    connectivity: int = 4

    @property
    def width_enabled(self) -> bool:
        """Whether the minimum-width step runs."""
        return max(self.width_px) > 1

    @property
    def rounds(self) -> int:
        """Region-growing rounds that refill thin pixels (``max(wy, wx)``)."""
        return max(self.width_px) if self.width_enabled else 0

    @property
    def halo(self) -> tuple[int, int]:
        """Rows and columns of context the width step needs around each pixel."""
        if not self.width_enabled:
            return (0, 0)
        wy, wx = self.width_px
        return (wy - 1 + self.rounds, wx - 1 + self.rounds)


def rules_for(
    pixel_size: float | tuple[float, float],
    mmu_ha: float = 25.0,
    min_width_m: float = 100.0,
    connectivity: int = 4,
) -> Rules:
    """Turn the CORINE rules in hectares and metres into :class:`Rules` in pixels.

    Args:
        pixel_size: pixel edge in metres, or ``(y, x)`` edges for non-square pixels.
        mmu_ha: minimum mapping unit in hectares (CLC: 25). 0 disables the MMU step.
        min_width_m: minimum width in metres (CLC: 100). Below 1.5 pixels it is a no-op.
        connectivity: 4 (default, like CLC polygons) or 8.
    """
    py, px = (pixel_size, pixel_size) if np.isscalar(pixel_size) else tuple(pixel_size)
    py, px = abs(float(py)), abs(float(px))
    if not (math.isfinite(py) and math.isfinite(px) and py > 0 and px > 0):
        raise InputError(f"Pixel size `pixel_size` must be positive metres, got {pixel_size!r}: is the raster georeferenced?")
    if not (math.isfinite(mmu_ha) and mmu_ha >= 0):
        raise ConfigError(f"The minimum mapping unit `mmu_ha` must be ≥ 0 hectares (CLC uses 25), not {mmu_ha!r}.")
    if not (math.isfinite(min_width_m) and min_width_m >= 0):
        raise ConfigError(f"The minimum width `min_width_m` must be ≥ 0 metres (CLC uses 100), not {min_width_m!r}.")
    if connectivity not in (4, 8):
        raise ConfigError(f"`connectivity` must be 4 (edges) or 8 (edges and corners), not {connectivity!r}.")
    mmu_px = max(0, math.ceil(mmu_ha * 10_000 / (py * px) - 1e-9))
    width = (math.floor(min_width_m / py + 0.5), math.floor(min_width_m / px + 0.5))
    return Rules(mmu_px=mmu_px, width_px=(max(1, width[0]), max(1, width[1])), connectivity=connectivity)


def check_codes_dtype(dtype: np.dtype) -> None:
    """Refuse a raster whose dtype cannot hold CLC codes (anything but integers)."""
    if np.dtype(dtype).kind not in "iu":
        raise InputError(
            f"A class map must hold integer CLC codes (uint8/uint16), not {np.dtype(dtype).name}: "
            "is this a class map (not a probability or reflectance raster)?"
        )


# ---------------------------------------------------------------- rule B: minimum width


def footprint(width_px: tuple[int, int]) -> np.ndarray:
    """The width rule's structuring element: a digital disk (ellipse) of ``wy × wx`` pixels.

    Pixel ``(i, j)`` of the ``wy × wx`` box belongs to it if its centre lies in the ellipse
    inscribed in the box: ``((i + ½ − wy/2) / (wy/2))² + ((j + ½ − wx/2) / (wx/2))² ≤ 1``.
    Every row is one contiguous run (or empty, for very elongated ellipses); the shape is
    symmetric under a half turn about the box centre. Widths 1–3 give the full box;
    10 × 10 gives 80 pixels (rows of 4, 8, 8, 10, 10, 10, 10, 8, 8, 4).
    """
    wy, wx = width_px
    i = (np.arange(wy) + 0.5 - wy / 2) / (wy / 2)
    j = (np.arange(wx) + 0.5 - wx / 2) / (wx / 2)
    return i[:, None] ** 2 + j[None, :] ** 2 <= 1 + 1e-9


def _forward(arr: np.ndarray, fp: np.ndarray, func: Any, combine: Any, neutral: int) -> np.ndarray:
    """``out[a] = func over arr[a + (i, j)]`` for ``(i, j)`` in ``fp`` (windows anchored
    top-left; beyond the array counts as ``neutral``, the identity of ``combine``)."""
    if fp.all():  # a full box is separable
        out = arr
        for axis, n in enumerate(fp.shape):
            if n > 1:
                out = func(out, n, axis=axis, mode="constant", cval=neutral, origin=-(n // 2))
        return out
    height, width = arr.shape
    out = np.full(arr.shape, neutral, dtype=arr.dtype)
    runs = [(i, int(np.argmax(row)), int(row.sum())) for i, row in enumerate(fp) if row.any()]
    for n in sorted({n for _, _, n in runs}):
        along = func(arr, n, axis=1, mode="constant", cval=neutral, origin=-(n // 2)) if n > 1 else arr
        for i, j0, _ in (r for r in runs if r[2] == n):
            target = out[: height - i, : width - j0]
            combine(target, along[i:, j0:], out=target)
    return out


def width_step(block: np.ndarray, rules: Rules) -> np.ndarray:
    """Apply the minimum-width rule to a block that already includes its halo.

    The result is exact for pixels at least ``rules.halo`` away from the block's edges
    (the rest is context and must be trimmed). Pixels beyond the block count as no data.
    """
    if not rules.width_enabled:
        return block.copy()
    wy, wx = rules.width_px
    fp = footprint(rules.width_px)
    h, w = block.shape
    valid = block != NODATA
    codes = block.astype(np.int32)
    lo = _forward(np.where(valid, codes, _BIG), fp, ndi.minimum_filter1d, np.minimum, _BIG)
    hi = _forward(np.where(valid, codes, 0), fp, ndi.maximum_filter1d, np.maximum, 0)
    pure = (hi <= lo).astype(np.uint8)  # placement holds at most one class (no data = wildcard)
    # wide[p] = any pure[p − (i, j)], (i, j) in fp; fp is half-turn symmetric, so this is
    # the forward reduction shifted by (wy − 1, wx − 1)
    cover = _forward(pure, fp, ndi.maximum_filter1d, np.maximum, 0)
    wide = np.zeros_like(valid)
    wide[wy - 1 :, wx - 1 :] = cover[: h - wy + 1, : w - wx + 1].astype(bool)
    wide &= valid
    thin = valid & ~wide
    if not thin.any():
        return block.copy()
    return _grow_into(block, wide, thin, rules.rounds)


def _grow_into(block: np.ndarray, wide: np.ndarray, thin: np.ndarray, rounds: int) -> np.ndarray:
    """Refill thin pixels from filled 4-neighbours, ``rounds`` synchronous rounds."""
    stride = block.shape[1] + 2
    state = np.pad(np.where(wide, block, NODATA), 1)  # zero ring = no data beyond the block
    own = np.pad(block, 1)
    todo = np.flatnonzero(np.pad(thin, 1))
    flat = state.reshape(-1)
    for _ in range(rounds):
        if todo.size == 0:
            break
        nb = np.stack([flat[todo - 1], flat[todo + 1], flat[todo - stride], flat[todo + stride]])
        votes = (nb[:, None, :] == nb[None, :, :]).sum(axis=1)
        votes[nb == NODATA] = 0
        best = votes.max(axis=0)
        tied = np.where((votes == best) & (best > 0), nb, np.iinfo(nb.dtype).max)
        mine = own.reshape(-1)[todo]
        choice = np.where((tied == mine).any(axis=0), mine, tied.min(axis=0))
        filled = best > 0
        flat[todo[filled]] = choice[filled]
        todo = todo[~filled]
    flat[todo] = own.reshape(-1)[todo]
    return state[1:-1, 1:-1]


def width_in_memory(codes: np.ndarray, rules: Rules) -> np.ndarray:
    """The width step on a whole array in memory (beyond its edges counts as no data)."""
    if not rules.width_enabled:
        return codes.copy()
    hy, hx = rules.halo
    return width_step(np.pad(codes, ((hy, hy), (hx, hx))), rules)[hy:-hy, hx:-hx]
