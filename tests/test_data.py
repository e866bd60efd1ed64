"""tests/data holds exactly the published files it lists, unchanged, each with its source."""

from __future__ import annotations

import shutil
from pathlib import PurePosixPath

import pytest
from real_data import DATA, files_on_disk, listed_files, missing_files, require_files, sha256


def test_every_data_file_is_listed_and_unchanged():
    listed = listed_files()
    assert len(listed) >= 60, "tests/data/SHA256SUMS lists too few files"
    assert files_on_disk() == sorted(listed), "files under tests/data differ from SHA256SUMS"
    changed = [path for path, digest in listed.items() if sha256(DATA / path) != digest]
    assert not changed, f"data files differ from the published copies: {changed}"


def test_readme_gives_every_file_a_source_and_its_tests():
    readme = (DATA / "README.md").read_text("utf-8")
    for path in listed_files():
        folders = [f"`{parent}/`" for parent in PurePosixPath(path).parents if str(parent) != "."]
        assert f"`{path}`" in readme or any(f in readme for f in folders), f"README.md does not list {path}"
    for word in ("licence", "commit", "used by"):
        assert word in readme.lower()


def test_a_missing_file_fails_the_test_naming_it(tmp_path):
    folder = tmp_path / "data"
    shutil.copytree(DATA, folder, ignore=shutil.ignore_patterns("*.tif", "*.gpkg", "*.yaml"))
    assert "clc/lanjaron/clc.gpkg" in missing_files(folder)
    assert "s2/earthsearch_v1_33TWM_2023-08/sentinel-2-l2a/S2B_33TWM_20230810_0_L2A/B04.tif" in missing_files(folder)
    assert not any(p.endswith((".json", ".csv")) for p in missing_files(folder))
    (folder / "SHA256SUMS").unlink()
    assert missing_files(folder) == ["SHA256SUMS"]


def test_missing_data_fails_rather_than_skips(tmp_path):
    shutil.copytree(DATA, tmp_path / "data", ignore=shutil.ignore_patterns("clc_legend.csv"))
    with pytest.raises(pytest.fail.Exception, match=r"missing from .*data: clc/legend/clc_legend.csv \("):
        require_files(tmp_path / "data")
    assert not issubclass(pytest.fail.Exception, pytest.skip.Exception)
    assert require_files(DATA) == DATA
