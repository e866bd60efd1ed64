"""The spatial train/validation split: whole blocks of patch locations go to one side.

Neighbouring patches share texture and fields, so locations are split by blocks of
``split_block`` × ``split_block`` patches — or validation takes a strip along one side of the
area (``val_side``) — and training patches within ``guard`` patches of validation are dropped
(split ``guard``). A guard band as wide as the network's receptive field (:func:`guard_patches`)
keeps every validation pixel out of reach of every training patch: a strip needs one band,
scattered blocks need one around each.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np

#: Sides of the area a validation strip can lie along.
ValSide = Literal["north", "south", "east", "west"]
VAL_SIDES: tuple[str, ...] = ("north", "south", "east", "west")


def guard_patches(guard_px: int, patch_size: int) -> int:
    """The guard band of ``guard_px`` pixels in whole patches of ``patch_size`` px (rounded up)."""
    return -(-int(guard_px) // int(patch_size))


def validation_strip(usable_per_location: np.ndarray, side: str, val_fraction: float) -> np.ndarray:
    """Boolean (rows, cols) mask of validation locations: whole lines along ``side``.

    Lines (rows for ``north``/``south``, columns for ``east``/``west``) are taken from that edge
    of the usable area inwards, each while it brings the validation share of usable samples
    closer to ``val_fraction`` (at least one line holding usable samples).
    """
    axis = 0 if side in ("north", "south") else 1  # row 0 is the northern edge (north-up grids)
    per_line = usable_per_location.sum(axis=1 - axis)
    usable_lines = np.flatnonzero(per_line)
    mask = np.zeros(usable_per_location.shape, bool)
    if usable_lines.size == 0:
        return mask
    if side in ("north", "west"):
        order = range(int(usable_lines[0]), per_line.size)
    else:
        order = range(int(usable_lines[-1]), -1, -1)
    target = val_fraction * usable_per_location.sum()
    taken, chosen = 0, []
    for line in order:
        n = int(per_line[line])
        if chosen and n and abs(taken + n - target) >= abs(taken - target):
            break
        chosen.append(line)
        taken += n
    if axis == 0:
        mask[chosen, :] = True
    else:
        mask[:, chosen] = True
    return mask


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
    nrows, ncols = mask.shape
    out = mask.copy()
    for axis, length in ((0, nrows), (1, ncols)):  # a square dilation is a row one, then a column one
        reach = min(radius, length - 1)
        grown = out.copy()
        for step in range(1, reach + 1):
            lead = [slice(None), slice(None)]
            lag = [slice(None), slice(None)]
            lead[axis], lag[axis] = slice(step, None), slice(None, -step)
            grown[tuple(lead)] |= out[tuple(lag)]
            grown[tuple(lag)] |= out[tuple(lead)]
        out = grown
    return out


def split_locations(usable_per_location: np.ndarray, split_block: int, val_fraction: float, guard: int,
                    seed: int, val_side: str | None = None) -> np.ndarray:
    """(rows, cols) split name of every patch location: ``train``, ``val`` or ``guard``.

    Args:
        usable_per_location: (rows, cols) usable samples per patch location.
        split_block: block edge, in patches (block layout).
        val_fraction: share of usable samples aimed at for validation.
        guard: training locations within this many patches of validation become ``guard``.
        seed: seeds which blocks go to validation (block layout).
        val_side: validation as a strip along this side (:func:`validation_strip`) instead of
            seeded blocks.
    """
    if val_side is not None:
        val_mask = validation_strip(usable_per_location, val_side, val_fraction)
    else:
        val_mask = validation_blocks(usable_per_location, split_block, val_fraction, seed)
    guard_mask = dilate(val_mask, guard) & ~val_mask
    return np.where(val_mask, "val", np.where(guard_mask, "guard", "train"))
