import numpy as np
import pytest

from clc_dask.classes import (
    IGNORE_INDEX,
    ClassTable,
    colormap,
    grid_code_to_code,
    label_of,
    legend,
    official_codes,
    rgb_of,
    to_level,
    validate_codes,
)
from clc_dask.errors import InputError


def test_legend_matches_official_csv(shared_data):
    import csv

    rows = list(csv.DictReader(open(shared_data / "clc/legend/clc_legend.csv", encoding="utf-8")))
    assert len(legend()) == len(rows) == 44
    for cls, row in zip(legend(), rows, strict=True):
        assert cls.code == int(row["CLC_CODE"]) and cls.grid_code == int(row["GRID_CODE"])
        assert "-".join(f"{v:03d}" for v in cls.rgb) == row["RGB"]
        assert cls.label3 == row["LABEL3"]


def test_levels_and_labels():
    assert official_codes(1) == (1, 2, 3, 4, 5)
    assert official_codes(2) == (11, 12, 13, 14, 21, 22, 23, 24, 31, 32, 33, 41, 42, 51, 52)
    assert len(official_codes(3)) == 44
    assert label_of(311) == "Broad-leaved forest"
    assert label_of(31) == "Forests"
    assert label_of(3) == "Forest and semi natural areas"
    assert rgb_of(311) == (128, 255, 0)
    assert rgb_of(41) == rgb_of(411) == (166, 166, 255)


def test_to_level_keeps_nodata_and_reduces():
    arr = np.array([[0, 311, 312], [523, 211, 0]], dtype=np.uint16)
    assert to_level(arr, 2).tolist() == [[0, 31, 31], [52, 21, 0]]
    assert to_level(arr, 1).tolist() == [[0, 3, 3], [5, 2, 0]]
    assert to_level(np.array([31, 0]), 2).tolist() == [31, 0]
    with pytest.raises(InputError, match="finer level"):
        to_level(np.array([31]), 3)


def test_index_round_trip_and_ignore():
    table = ClassTable(2)
    codes = np.array([11, 52, 0, 41, 311])
    idx = table.to_index(codes)
    assert idx.tolist() == [0, 14, IGNORE_INDEX, 11, 8]
    assert table.to_code(idx).tolist() == [11, 52, 0, 41, 31]
    sub = ClassTable(2, [21, 31, 51])
    assert sub.to_index(np.array([31, 11])).tolist() == [1, IGNORE_INDEX]
    assert ClassTable.from_records(2, sub.as_records()) == sub
    with pytest.raises(InputError, match="Unknown Level-2"):
        ClassTable(2, [19])


def test_grid_codes_and_colormap():
    gc = np.array([[1, 44, 0], [48, 23, 255]], dtype=np.uint8)
    assert grid_code_to_code(gc).tolist() == [[111, 523, 0], [0, 311, 0]]
    cmap = colormap(2)
    assert cmap[0] == (0, 0, 0, 0)
    assert cmap[31] == (128, 255, 0, 255)
    assert set(cmap) == {0, *official_codes(2)}


def test_validate_codes_names_unknown():
    validate_codes(np.array([0, 111, 523]), 3)
    with pytest.raises(InputError, match=r"\[999\]"):
        validate_codes(np.array([111, 999]), 3)
