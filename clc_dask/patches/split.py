"""The spatial train/validation split: whole blocks of patch locations go to one side.

Neighbouring patches share texture and fields, so locations are split by blocks of
``split_block`` × ``split_block`` patches, and training patches within ``guard`` patches of
validation can be dropped (split ``guard``).
"""

from __future__ import annotations

import math

import numpy as np


def validation_blocks(usable_per_location: np.ndarray, split_block: int, val_fraction: float,
                      seed: int) -> np.ndarray:
    """Boolean (rows, cols) mask of validation locations: whole blocks, ≈ ``val_fraction`` of usable samples.

    Blocks are visited in a seeded random order; a block joins validation when doing so brings
    the validation share of usable samples closer to ``val_fraction``.

    Args:
        usable_per_location: (rows, cols) usable samples (seasons) per patch location.
        split_block: block edge, in patches.
        val_fraction: share of usable samples aimed at for validation.
        seed: seeds the order in which blocks are visited.
    """
    nrows, ncols = usable_per_location.shape
    nbr, nbc = math.ceil(nrows / split_block), math.ceil(ncols / split_block)
    block_usable = np.zeros((nbr, nbc), np.int64)
    for br in range(nbr):
        for bc in range(nbc):
            block_usable[br, bc] = usable_per_location[
                br * split_block:(br + 1) * split_block, bc * split_block:(bc + 1) * split_block].sum()
    target = val_fraction * usable_per_location.sum()
    val_blocks = np.zeros((nbr, nbc), bool)
    taken = 0
    for flat in np.random.default_rng(int(seed)).permutation(nbr * nbc):
        br, bc = divmod(int(flat), nbc)
        n = int(block_usable[br, bc])
        if n and abs(taken + n - target) < abs(taken - target):
            val_blocks[br, bc] = True
            taken += n
    mask = np.repeat(np.repeat(val_blocks, split_block, axis=0), split_block, axis=1)
    return mask[:nrows, :ncols]


def dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Chebyshev dilation of a boolean (rows, cols) mask by ``radius`` cells."""
    if radius <= 0:
        return mask.copy()
    out = mask.copy()
    nrows, ncols = mask.shape
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            ys = slice(max(dy, 0), nrows + min(dy, 0))
            xs = slice(max(dx, 0), ncols + min(dx, 0))
            yd = slice(max(-dy, 0), nrows + min(-dy, 0))
            xd = slice(max(-dx, 0), ncols + min(-dx, 0))
            out[yd, xd] |= mask[ys, xs]
    return out


def split_locations(usable_per_location: np.ndarray, split_block: int, val_fraction: float, guard: int,
                    seed: int) -> np.ndarray:
    """(rows, cols) split name of every patch location: ``train``, ``val`` or ``guard``.

    Args:
        usable_per_location: (rows, cols) usable samples per patch location.
        split_block: block edge, in patches.
        val_fraction: share of usable samples aimed at for validation.
        guard: training locations within this many patches of validation become ``guard``.
        seed: seeds which blocks go to validation.
    """
    val_mask = validation_blocks(usable_per_location, split_block, val_fraction, seed)
    guard_mask = dilate(val_mask, guard) & ~val_mask
    return np.where(val_mask, "val", np.where(guard_mask, "guard", "train"))
