"""The spatial split: train, validation and test blocks, with guard bands between them.

The training region's grid is cut into square blocks of ``block_size`` px. Whole blocks are
test (a strip on one side holding about ``test_fraction`` of the labelled pixels, or explicit
boxes), validation (the blocks farthest from the test area holding about ``val_fraction``, or
explicit boxes) or training (the rest, or explicit boxes). Test blocks holding labels are the
units the bootstrap resamples (:mod:`clc_dask.experiment.stats`).

Guard bands keep the networks' inputs apart: a training pixel is never within ``guard_px``
pixels (Chebyshev distance, so also Euclidean) of a test or validation pixel, and a validation
pixel never within ``guard_px`` of a test pixel — at least ``guard_px`` pixels lie between them.
The bands are carved out of training and validation blocks, never out of the test area. The
default ``guard_px`` is the receptive field of the largest network of the experiment
(:func:`clc_dask.model.receptive_field`): no output pixel of a test window can then depend on a
pixel that a training patch showed the network.

The arithmetic is exact on a grid of *cells* of ``gcd(block_size, patch_size)`` px: blocks and
patches are whole cells, so a cell at Chebyshev distance ``d`` cells from a zone has
``(d - 1) · cell`` pixels between them, and the cells within ``ceil(guard_px / cell)`` of a zone
are exactly those holding a pixel within ``guard_px``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import dask
import dask.array as da
import numpy as np
import xarray as xr
from affine import Affine
from odc.geo.geobox import GeoBox
from scipy import ndimage

from clc_dask.classes import IGNORE_INDEX, ClassTable, official_codes
from clc_dask.errors import ConfigError, InputError
from clc_dask.experiment.config import Bounds, SplitConfig

log = logging.getLogger(__name__)

TRAIN, VAL, TEST, GUARD, UNUSED = "train", "val", "test", "guard", "unused"
ROLES = (TRAIN, VAL, TEST, GUARD, UNUSED)
#: Row/column step of each side's strip, from the edge inwards.
_SIDES = {"south": (0, -1), "north": (0, 1), "west": (1, 1), "east": (1, -1)}


# --------------------------------------------------------------------------- label counts


def _block_counts(block: np.ndarray, level: int) -> np.ndarray:
    """(h, w) codes → (1, 1, K + 1) pixels per Level-``level`` class; the last bin is unlabelled."""
    table = ClassTable(level)
    index = table.to_index(block).astype(np.int64)
    index[index == IGNORE_INDEX] = len(table)
    return np.bincount(index.ravel(), minlength=len(table) + 1)[None, None, :]


def block_label_counts(labels: xr.DataArray, block_size: int, level: int, client: Any | None = None) -> np.ndarray:
    """Pixels per CLC class in every block, counted per block on the cluster.

    Args:
        labels: (y, x) CLC codes (lazy), any level ≥ ``level``; 0 = no data.
        block_size: block edge in px (the last row/column of blocks may be smaller).
        level: CLC level to count at.
        client: a ``distributed.Client``; None = local threads.

    Returns:
        int64 (block rows, block cols, K + 1): counts of the level's official codes in order,
        then unlabelled pixels.
    """
    data = labels.data if isinstance(labels.data, da.Array) else da.from_array(labels.data)
    data = data.rechunk((block_size, block_size))
    k = len(official_codes(level)) + 1
    counts = data.map_blocks(_block_counts, level=level, dtype=np.int64, new_axis=2,
                             chunks=((1,) * data.numblocks[0], (1,) * data.numblocks[1], (k,)))
    if client is not None:
        return np.asarray(client.compute(counts).result())
    (result,) = dask.compute(counts, scheduler="threads")
    return np.asarray(result)


# --------------------------------------------------------------------------- the split


@dataclass
class Split:
    """Roles of the blocks of one grid, their label counts and the guard band.

    Attributes:
        geobox: the training region's grid.
        block_size: block edge in px.
        guard_px: pixels kept between test and train/validation, and validation and train.
        roles: (block rows, block cols) of ``train`` / ``val`` / ``test`` / ``unused``.
        counts: (block rows, block cols, K + 1) labelled pixels per official code of ``level``
            (then unlabelled), from :func:`block_label_counts`.
        level: CLC level of ``counts``.
    """

    geobox: GeoBox
    block_size: int
    guard_px: int
    roles: np.ndarray
    counts: np.ndarray
    level: int

    # ---- blocks

    @property
    def block_shape(self) -> tuple[int, int]:
        """(rows, cols) of blocks."""
        return int(self.roles.shape[0]), int(self.roles.shape[1])

    @staticmethod
    def block_name(row: int, col: int) -> str:
        """``row_col`` from 1, as tiles of a :class:`~clc_dask.grid.TileGrid` of ``block_size``."""
        return f"{row + 1}_{col + 1}"

    def labelled(self) -> np.ndarray:
        """(block rows, block cols) labelled pixels."""
        return self.counts[..., :-1].sum(axis=-1)

    def blocks(self, role: str) -> list[str]:
        """Names of the blocks of ``role`` (row-major order)."""
        rows, cols = np.nonzero(self.roles == role)
        return [self.block_name(int(r), int(c)) for r, c in zip(rows, cols, strict=True)]

    def test_blocks(self) -> list[str]:
        """The bootstrap's units: test blocks holding at least one labelled pixel."""
        rows, cols = np.nonzero((self.roles == TEST) & (self.labelled() > 0))
        return [self.block_name(int(r), int(c)) for r, c in zip(rows, cols, strict=True)]

    def class_pixels(self, roles: Sequence[str]) -> dict[int, int]:
        """Labelled pixels per code in the blocks of ``roles`` (guard bands included)."""
        mask = np.isin(self.roles, list(roles))
        totals = self.counts[mask][:, :-1].sum(axis=0)
        return {int(c): int(n) for c, n in zip(official_codes(self.level), totals, strict=True)}

    def codes(self, roles: Sequence[str] = (TRAIN, VAL)) -> tuple[int, ...]:
        """Codes with labelled pixels in the blocks of ``roles``."""
        return tuple(c for c, n in self.class_pixels(roles).items() if n > 0)

    # ---- cells and patches

    def cell_roles(self, cell: int) -> np.ndarray:
        """Role of every ``cell`` px cell (``cell`` divides ``block_size``), guard bands marked.

        Returns:
            (ceil(height / cell), ceil(width / cell)) array of :data:`ROLES`.
        """
        if cell <= 0 or self.block_size % cell:
            raise ConfigError(f"cell {cell} px must divide block_size {self.block_size} px.")
        per = self.block_size // cell
        height, width = int(self.geobox.shape.y), int(self.geobox.shape.x)
        shape = (math.ceil(height / cell), math.ceil(width / cell))
        blocks = np.repeat(np.repeat(self.roles, per, axis=0), per, axis=1)[: shape[0], : shape[1]]
        radius = math.ceil(self.guard_px / cell)
        near_test = _dilate(blocks == TEST, radius)
        near_val = _dilate(blocks == VAL, radius)
        out = np.full(shape, UNUSED, dtype="<U6")
        out[blocks == TEST] = TEST
        out[(blocks == VAL) & near_test] = GUARD
        out[(blocks == VAL) & ~near_test] = VAL
        out[(blocks == TRAIN) & (near_test | near_val)] = GUARD
        out[(blocks == TRAIN) & ~(near_test | near_val)] = TRAIN
        return out

    def split_map(self, patch_size: int) -> np.ndarray:
        """The role of every patch location of ``patch_size`` px (for ``build_patch_index``).

        A location is ``train``/``val`` when every pixel of its patch is; ``test`` when it
        touches the test area; else ``guard`` (touches a guard band) or ``unused``.

        Returns:
            (height // patch_size, width // patch_size) array of :data:`ROLES`.
        """
        cell = math.gcd(self.block_size, patch_size)
        per = patch_size // cell
        rows, cols = int(self.geobox.shape.y) // patch_size, int(self.geobox.shape.x) // patch_size
        cells = self.cell_roles(cell)[: rows * per, : cols * per].reshape(rows, per, cols, per)

        def every(role: str) -> np.ndarray:
            return (cells == role).all(axis=(1, 3))

        def some(role: str) -> np.ndarray:
            return (cells == role).any(axis=(1, 3))

        out = np.full((rows, cols), UNUSED, dtype="<U6")
        out[some(GUARD)] = GUARD
        out[some(TEST)] = TEST
        out[every(TRAIN)] = TRAIN
        out[every(VAL)] = VAL
        return out

    # ---- records

    def summary(self) -> dict[str, Any]:
        """Per role: blocks, labelled pixels and classes of its blocks, and ``area_pixels`` left
        to it outside the guard bands (``guard`` holds the bands' area). JSON-ready."""
        out: dict[str, Any] = {}
        labelled = self.labelled()
        for role in (TRAIN, VAL, TEST, UNUSED):
            mask = self.roles == role
            out[role] = {"blocks": int(mask.sum()), "labelled_pixels": int(labelled[mask].sum()),
                         "class_pixels": {str(c): n for c, n in self.class_pixels([role]).items() if n}}
        out["test"]["labelled_blocks"] = len(self.test_blocks())
        cell = math.gcd(self.block_size, 32)
        cells = self.cell_roles(cell)
        height, width = int(self.geobox.shape.y), int(self.geobox.shape.x)
        weights = np.ones(cells.shape)  # the last row/column of cells may be partial
        weights[-1, :] *= (height - (cells.shape[0] - 1) * cell) / cell
        weights[:, -1] *= (width - (cells.shape[1] - 1) * cell) / cell
        out[GUARD] = {}
        for role in list(out):
            out[role]["area_pixels"] = int(round(weights[cells == role].sum() * cell * cell))
        return out

    def to_dict(self) -> dict[str, Any]:
        """The split as a JSON document (``split.json``)."""
        a = self.geobox.affine
        return {
            "geobox": {"crs": str(self.geobox.crs), "shape": [int(self.geobox.shape.y), int(self.geobox.shape.x)],
                       "affine": [a.a, a.b, a.c, a.d, a.e, a.f]},
            "block_size": self.block_size, "guard_px": self.guard_px, "level": self.level,
            "roles": self.roles.tolist(), "counts": self.counts.tolist(),
            "test_blocks": self.test_blocks(), "summary": self.summary(),
        }

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> Split:
        """Rebuild a split from :meth:`to_dict`."""
        g = doc["geobox"]
        geobox = GeoBox(tuple(g["shape"]), Affine(*g["affine"]), g["crs"])
        return cls(geobox, int(doc["block_size"]), int(doc["guard_px"]), np.array(doc["roles"], dtype="<U6"),
                   np.array(doc["counts"], dtype=np.int64), int(doc["level"]))

    def fingerprint(self) -> str:
        """SHA-256 of the grid, blocks, guard band, roles and counts."""
        doc = self.to_dict()
        doc.pop("summary")
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def _dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Chebyshev dilation of a boolean mask by ``radius`` cells (separable maximum filter)."""
    if radius <= 0 or not mask.any():
        return mask.copy()
    return ndimage.maximum_filter(mask.astype(np.uint8), size=2 * radius + 1, mode="constant", cval=0) > 0


# --------------------------------------------------------------------------- making the split


def make_split(config: SplitConfig, geobox: GeoBox, counts: np.ndarray, *, level: int, guard_px: int,
               region: str = "the training region") -> Split:
    """Assign every block a role and check that each role has labelled area left.

    Args:
        config: the experiment's split settings.
        geobox: the training region's grid.
        counts: :func:`block_label_counts` of its labels at ``block_size``.
        level: CLC level of ``counts``.
        guard_px: the guard band in px (``config.guard_px`` resolved).
        region: name of the region, for messages.

    Raises:
        ConfigError: explicit areas outside the grid or sharing a block; no labelled training
            or validation area outside the guard bands.
        InputError: the test area holds no labelled pixel.
    """
    shape = counts.shape[:2]
    labelled = counts[..., :-1].sum(axis=-1)
    if labelled.sum() == 0:
        raise InputError(f"The labels of {region} hold no pixel of a Level-{level} CLC class: check the "
                         "label raster (0 is no data) and `level`.")
    roles = np.full(shape, TRAIN, dtype="<U6")
    if config.test_bounds is not None:
        test = _boxes_to_blocks(config.test_bounds, geobox, config.block_size, shape, "test_bounds")
    else:
        test = _strip(labelled, config.test_side, config.test_fraction)
    allowed = np.ones(shape, bool)
    if config.train_bounds is not None:
        allowed = _boxes_to_blocks(config.train_bounds, geobox, config.block_size, shape, "train_bounds")
    if config.val_bounds is not None:
        val = _boxes_to_blocks(config.val_bounds, geobox, config.block_size, shape, "val_bounds")
    else:
        val = _farthest(labelled, test, allowed & ~test, config.val_fraction)
    if (test & val).any():
        _shared_block("test_bounds", "val_bounds", test & val, config.block_size)
    if config.train_bounds is not None:
        for name, area in (("test_bounds", test), ("val_bounds", val)):
            if (allowed & area).any():
                _shared_block("train_bounds", name, allowed & area, config.block_size)
    roles[~allowed] = UNUSED
    roles[val] = VAL
    roles[test] = TEST
    split = Split(geobox, config.block_size, guard_px, roles, counts, level)
    _check_roles(split, region)
    return split


def _strip(labelled: np.ndarray, side: str, fraction: float) -> np.ndarray:
    """Blocks of the strip along ``side`` holding ≥ ``fraction`` of the labelled pixels (≥ 1 line)."""
    axis, step = _SIDES[side]
    per_line = labelled.sum(axis=1 - axis)
    order = range(len(per_line) - 1, -1, -1) if step < 0 else range(len(per_line))
    target = fraction * labelled.sum()
    lines, taken = [], 0
    for line in order:
        lines.append(line)
        taken += per_line[line]
        if taken >= target:
            break
    mask = np.zeros(labelled.shape, bool)
    if axis == 0:
        mask[lines, :] = True
    else:
        mask[:, lines] = True
    return mask


def _farthest(labelled: np.ndarray, test: np.ndarray, candidates: np.ndarray, fraction: float) -> np.ndarray:
    """Labelled candidate blocks farthest from the test blocks (Chebyshev, in blocks; ties in
    reading order) until they hold ≥ ``fraction`` of the labelled pixels."""
    distance = ndimage.distance_transform_cdt(~test, metric="chessboard") if test.any() else \
        np.zeros(test.shape, int)
    rows, cols = np.nonzero(candidates & (labelled > 0))
    order = sorted(zip(rows.tolist(), cols.tolist(), strict=True), key=lambda rc: (-distance[rc], rc))
    target = fraction * labelled.sum()
    mask = np.zeros(test.shape, bool)
    taken = 0
    for rc in order:
        mask[rc] = True
        taken += labelled[rc]
        if taken >= target:
            break
    return mask


def _boxes_to_blocks(boxes: Sequence[Bounds], geobox: GeoBox, block_size: int, shape: tuple[int, int],
                     what: str) -> np.ndarray:
    """Blocks touched by any box (CRS units), snapped outwards."""
    mask = np.zeros(shape, bool)
    inverse = ~geobox.affine
    height, width = int(geobox.shape.y), int(geobox.shape.x)
    for box in boxes:
        left, bottom, right, top = box
        xs, ys = zip(*(inverse * corner for corner in ((left, top), (right, bottom))), strict=True)
        x0, x1 = sorted(xs)
        y0, y1 = sorted(ys)
        x0, y0 = max(0.0, x0), max(0.0, y0)
        x1, y1 = min(float(width), x1), min(float(height), y1)
        if x0 >= x1 or y0 >= y1:
            left_, bottom_, right_, top_ = geobox.boundingbox
            raise ConfigError(
                f"The split's `{what}` box {list(box)} lies outside the training region "
                f"({left_:.0f}, {bottom_:.0f}, {right_:.0f}, {top_:.0f} in {geobox.crs}): give boxes "
                "in the region's CRS units (metres)."
            )
        mask[int(y0 // block_size): math.ceil(y1 / block_size), int(x0 // block_size): math.ceil(x1 / block_size)] = True
    return mask


def _shared_block(a: str, b: str, shared: np.ndarray, block_size: int) -> None:
    rows, cols = np.nonzero(shared)
    names = [Split.block_name(int(r), int(c)) for r, c in zip(rows[:5], cols[:5], strict=True)]
    raise ConfigError(
        f"The split's `{a}` and `{b}` share block(s) {names} of {block_size} px once snapped to blocks: "
        "an area is either training, validation or test. Align the boxes to the blocks or lower "
        "`block_size`."
    )


def _check_roles(split: Split, region: str) -> None:
    if not split.test_blocks():
        raise InputError(
            f"The test area of {region} ({len(split.blocks(TEST))} block(s) of {split.block_size} px) holds "
            "no labelled pixel, so nothing could be scored there: move the test area (`test_bounds` or "
            "`test_side`) onto labelled land, or check the label raster."
        )
    cells = split.cell_roles(math.gcd(split.block_size, 32))
    for role in (TRAIN, VAL):
        if not (cells == role).any():
            raise ConfigError(
                f"No {role} area of {region} is left outside the guard bands of {split.guard_px} px "
                f"around the {'test and validation areas' if role == TRAIN else 'test area'}: the "
                "region is too small for this split. Lower `test_fraction`/`val_fraction`, choose "
                "`guard_px` (below the networks' receptive field the areas see each other), or use a "
                "larger region."
            )
