"""The run manifest as a journal: O(1) bookkeeping per tile, crash-safe records, cheap resumes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from clc_dask.run import manifest as M
from clc_dask.run.manifest import Manifest

GRID = {"crs": "EPSG:3035", "transform": [10, 0, 0, 0, -10, 0], "shape": [1, 1], "tile_size": 2048}
N_TILES = 5000


def start(store: Path) -> Manifest:
    return Manifest.open(store, "country", "c" * 64, "k" * 64, GRID, resume=False, overwrite=False)


def tile_file(store: Path, name: str) -> Path:
    path = store / "tiles" / name / "classes.tif"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(name.encode() * 7)
    return path


@pytest.fixture(scope="module")
def country(tmp_path_factory):
    """A store whose journal records 5,000 finished tiles, as a country run leaves it when killed."""
    store = tmp_path_factory.mktemp("country")
    manifest = start(store)
    snapshots = []
    real_save = manifest.save

    def counting_save() -> None:
        snapshots.append(len(manifest.tiles))
        real_save()

    manifest.save = counting_save  # type: ignore[method-assign]
    names = [f"{r}_{c}" for r in range(1, 51) for c in range(1, 101)]
    for name in names:
        manifest.record(name, {"classes": tile_file(store, name)}, {"clc_dask:input_items": ["a", "b"]})
    return store, names, snapshots


def test_a_record_is_one_appended_line_and_snapshots_are_rare(country):
    store, names, snapshots = country
    lines = (store / "manifest.journal").read_bytes().split(b"\n")
    assert lines[-1] == b""  # every record is complete
    # the snapshot is rewritten when the journal holds as many records as the snapshot (at least
    # a thousand): O(1) per tile; the first one starts the store
    assert snapshots == [1, 1000, 2000, 4000]
    written = (store / "manifest.json").stat().st_size * len(snapshots) + (store / "manifest.journal").stat().st_size
    per_tile = written / len(names)
    record = max(len(line) for line in lines)
    assert per_tile < 4 * record  # bytes written per tile do not grow with the number of tiles


def test_resuming_5000_tiles_reads_no_tile_file(country, monkeypatch):
    store, names, _ = country
    hashed = []
    monkeypatch.setattr(M, "file_sha256", lambda path: hashed.append(path) or "x")
    resumed = Manifest.open(store, "country", "c" * 64, "k" * 64, GRID, resume=True, overwrite=False)
    assert sorted(resumed.tiles) == sorted(names)
    assert all(resumed.is_done(name) for name in names)
    assert hashed == []  # size and modification time match: no file is read


def test_a_changed_file_is_hashed_once_and_its_tile_recomputed(country, tmp_path):
    store, names, _ = country
    manifest = Manifest.read(store)
    path = store / "tiles" / names[7] / "classes.tif"
    original = path.read_bytes()
    try:
        path.write_bytes(original[::-1])  # same size, other bytes, new mtime
        assert not manifest.is_done(names[7])
        touched = store / "tiles" / names[8] / "classes.tif"
        touched.write_bytes(touched.read_bytes())  # same bytes, new mtime: still done (hashed)
        assert manifest.is_done(names[8])
    finally:
        path.write_bytes(original)


def test_a_record_torn_by_a_crash_is_ignored(tmp_path, caplog):
    store = tmp_path / "store"
    manifest = start(store)
    manifest.record("1_1", {"classes": tile_file(store, "1_1")})
    manifest.record("1_2", {"classes": tile_file(store, "1_2")})
    journal = store / "manifest.journal"
    whole = journal.read_bytes()
    journal.write_bytes(whole[: len(whole) - 25])  # the last record cut short mid-write
    read = Manifest.read(store)
    assert sorted(read.tiles) == ["1_1"] and "torn" in caplog.text
    # the tile is computed again and recorded after the torn bytes, on a line of its own
    read.record("1_2", {"classes": tile_file(store, "1_2")})
    again = Manifest.read(store)
    assert sorted(again.tiles) == ["1_1", "1_2"] and again.is_done("1_2")
    # compaction folds the journal into the snapshot
    again.save()
    assert journal.read_bytes() == b""
    assert sorted(json.loads((store / "manifest.json").read_text())["tiles"]) == ["1_1", "1_2"]


def test_records_replay_to_the_same_state(tmp_path):
    store = tmp_path / "store"
    manifest = start(store)
    manifest.record("1_1", {"classes": tile_file(store, "1_1")})
    manifest.record("1_1", {"generalized": tile_file(store, "1_1")}, phase="generalized")
    manifest.forget("1_1")
    manifest.set_state(decisions="abc")
    read = Manifest.read(store)
    assert read.tiles == {} and sorted(read.generalized) == ["1_1"] and read.state == {"decisions": "abc"}
