"""The CORINE Land Cover class table: codes, labels, official colours, levels.

CLC codes are what users see in files and reports (Level 1: 1…5, Level 2: 11…52,
Level 3: 111…523). Models work on contiguous indices ``0…n-1``; :class:`ClassTable`
converts both ways. In code rasters ``0`` means no data; in index tensors
``IGNORE_INDEX`` (255) means "ignore this pixel".
"""

from __future__ import annotations

import csv
import functools
from dataclasses import dataclass
from importlib import resources
from typing import Literal

import numpy as np

from clc_dask.errors import InputError

Level = Literal[1, 2, 3]
NODATA_CODE = 0
IGNORE_INDEX = 255
#: EEA CLC rasters use GRID_CODE 1…44 for the classes and these for no data.
GRID_CODE_NODATA = (0, 48, 49, 50, 255)


@dataclass(frozen=True)
class CorineClass:
    """One CLC Level-3 class as published in the EEA legend."""

    grid_code: int
    code: int
    label1: str
    label2: str
    label3: str
    rgb: tuple[int, int, int]


@functools.cache
def legend() -> tuple[CorineClass, ...]:
    """The 44 official Level-3 classes, in GRID_CODE order (shipped with the package)."""
    text = resources.files("clc_dask.data").joinpath("clc_legend.csv").read_text("utf-8")
    rows = csv.DictReader(text.splitlines())
    classes = []
    for row in rows:
        r, g, b = (int(v) for v in row["RGB"].split("-"))
        classes.append(
            CorineClass(
                grid_code=int(row["GRID_CODE"]),
                code=int(row["CLC_CODE"]),
                label1=row["LABEL1"],
                label2=row["LABEL2"],
                label3=row["LABEL3"],
                rgb=(r, g, b),
            )
        )
    return tuple(classes)


def code_level(code: int) -> int:
    """The CLC level of a code: 1 for 1…5, 2 for 11…52, 3 for 111…523."""
    if 1 <= code <= 9:
        return 1
    if 10 <= code <= 99:
        return 2
    if 100 <= code <= 999:
        return 3
    raise InputError(f"{code} is not a CLC code: CLC codes have 1 to 3 digits (e.g. 3, 31, 311).")


def to_level(codes: np.ndarray | int, level: int) -> np.ndarray | int:
    """Reduce CLC codes to a coarser level (e.g. 311 → 31 → 3); 0 (no data) stays 0.

    Codes already at or above ``level`` are returned unchanged; asking for a finer level
    than the input holds is an error.
    """
    scalar = np.isscalar(codes)
    arr = np.asarray(codes)
    out = arr.copy()
    for src_level, divisor in ((3, {2: 10, 1: 100}), (2, {1: 10})):
        if level in divisor:
            lo, hi = (100, 999) if src_level == 3 else (10, 99)
            mask = (arr >= lo) & (arr <= hi)
            out = np.where(mask, arr // divisor[level], out)
    finest_present = 0
    valid = arr[arr != NODATA_CODE]
    if valid.size:
        finest_present = int(code_level(int(valid.min())))
    if finest_present and finest_present < level:
        raise InputError(
            f"Cannot turn Level-{finest_present} codes into Level {level}: "
            f"a finer level cannot be derived; ask for `level` {finest_present} or coarser."
        )
    out = out.astype(arr.dtype if arr.dtype.kind in "iu" else np.int64, copy=False)
    return int(out) if scalar else out


class ClassTable:
    """The classes of one CLC level, with code ↔ contiguous-index conversion.

    Args:
        level: 1, 2 (default in clc-dask) or 3.
        codes: restrict to these codes (of ``level``), e.g. the classes a model knows.
            Default: every official class of the level.
    """

    def __init__(self, level: int = 2, codes: list[int] | None = None) -> None:
        if level not in (1, 2, 3):
            raise InputError(f"CLC level must be 1, 2 or 3, not {level!r}.")
        self.level = level
        all_codes = official_codes(level)
        if codes is None:
            codes = list(all_codes)
        unknown = sorted(set(codes) - set(all_codes))
        if unknown:
            raise InputError(
                f"Unknown Level-{level} CLC code(s) {unknown}: valid codes are {list(all_codes)}."
            )
        self.codes: tuple[int, ...] = tuple(sorted(set(codes)))
        self._lut = np.full(1000, IGNORE_INDEX, dtype=np.uint8)
        for index, code in enumerate(self.codes):
            self._lut[code] = index

    def __len__(self) -> int:
        return len(self.codes)

    def __repr__(self) -> str:
        return f"ClassTable(level={self.level}, codes={list(self.codes)})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ClassTable) and (self.level, self.codes) == (
            other.level,
            other.codes,
        )

    def __hash__(self) -> int:
        return hash((self.level, self.codes))

    def label(self, code: int) -> str:
        """The official English label of a code of this table's level."""
        return label_of(code)

    def rgb(self, code: int) -> tuple[int, int, int]:
        """The official colour of a code (Level 1/2 take their first Level-3 class's colour)."""
        return rgb_of(code)

    def to_index(self, codes: np.ndarray) -> np.ndarray:
        """CLC codes (any finer level is reduced first) → uint8 indices, 255 where unknown/no data."""
        arr = np.asarray(codes)
        reduced = to_level(arr, self.level) if arr.size else arr
        reduced = np.clip(np.asarray(reduced, dtype=np.int64), 0, 999)
        return self._lut[reduced]

    def to_code(self, indices: np.ndarray) -> np.ndarray:
        """Contiguous indices → CLC codes (uint16); IGNORE_INDEX or out-of-range → 0."""
        lut = np.zeros(256, dtype=np.uint16)
        lut[: len(self.codes)] = self.codes
        return lut[np.asarray(indices, dtype=np.uint8)]

    def colormap(self) -> dict[int, tuple[int, int, int, int]]:
        """A GDAL colour table ``{code: (r, g, b, a)}`` for code rasters (0 is transparent)."""
        return colormap(self.level)

    def as_records(self) -> list[dict[str, object]]:
        """The table as plain records (code, index, label, rgb) for checkpoints and reports."""
        return [
            {"code": c, "index": i, "label": self.label(c), "rgb": list(self.rgb(c))}
            for i, c in enumerate(self.codes)
        ]

    @classmethod
    def from_records(cls, level: int, records: list[dict[str, object]]) -> ClassTable:
        """Rebuild a table from :meth:`as_records` output (index order is checked)."""
        codes = [int(r["code"]) for r in sorted(records, key=lambda r: int(r["index"]))]
        table = cls(level, codes)
        if list(table.codes) != codes:
            raise InputError(f"Class records are not in ascending code order: {codes}.")
        return table


@functools.cache
def official_codes(level: int) -> tuple[int, ...]:
    """All official codes of a level, ascending."""
    codes = {c.code for c in legend()}
    if level == 3:
        return tuple(sorted(codes))
    return tuple(sorted({int(to_level(c, level)) for c in codes}))


def _first_child(code: int) -> CorineClass:
    level = code_level(code)
    for cls in legend():
        if int(to_level(cls.code, level)) == code:
            return cls
    raise InputError(f"Unknown CLC code {code}: see the EEA legend for valid codes.")


def label_of(code: int) -> str:
    """Official label of any CLC code (Level 1, 2 or 3)."""
    cls = _first_child(code)
    return {1: cls.label1, 2: cls.label2, 3: cls.label3}[code_level(code)]


def rgb_of(code: int) -> tuple[int, int, int]:
    """Official colour of a code; coarser levels use their first Level-3 class's colour."""
    return _first_child(code).rgb


@functools.cache
def colormap(level: int) -> dict[int, tuple[int, int, int, int]]:
    """GDAL colour table for a code raster of ``level``; code 0 (no data) is transparent."""
    cmap: dict[int, tuple[int, int, int, int]] = {NODATA_CODE: (0, 0, 0, 0)}
    for code in official_codes(level):
        cmap[code] = (*rgb_of(code), 255)
    return cmap


def grid_code_to_code(grid_codes: np.ndarray) -> np.ndarray:
    """EEA raster GRID_CODE 1…44 → Level-3 CLC codes (uint16); 0/48/49/50/255 → 0 (no data)."""
    lut = np.zeros(256, dtype=np.uint16)
    for cls in legend():
        lut[cls.grid_code] = cls.code
    arr = np.asarray(grid_codes)
    bad = (arr < 0) | (arr > 255)
    if np.any(bad):
        raise InputError(
            f"GRID_CODE values must lie in 0…255, found {np.unique(arr[bad])[:5].tolist()}; "
            "is this a CLC GRID_CODE raster?"
        )
    return lut[arr.astype(np.int64)]


def validate_codes(codes: np.ndarray, level: int = 3) -> None:
    """Raise if ``codes`` holds anything but 0 and official codes of ``level``."""
    present = np.unique(np.asarray(codes))
    allowed = set(official_codes(level)) | {NODATA_CODE}
    unknown = sorted(int(c) for c in present if int(c) not in allowed)
    if unknown:
        raise InputError(
            f"Unknown Level-{level} CLC code(s) {unknown[:10]}: valid codes are "
            f"{list(official_codes(level))} (0 = no data). Check the code field or `level`."
        )
