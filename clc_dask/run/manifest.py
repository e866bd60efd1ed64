"""The run manifest: the explicit record of which tiles are finished, kept as a journal.

Missing Zarr chunks or files do not prove a tile was never written (xarray#10117), and a
present file does not prove it is complete; the manifest does. It names the run, the
fingerprint of the settings that decide the outputs (config without the store path and
cluster section) and the checkpoint's SHA-256, so that a store holding another run's tiles
is recognised and refused, and a resumed run never mixes models.

Bookkeeping stays O(1) per tile, however many tiles a country has:

* ``manifest.json`` is a snapshot (header + every record), rewritten atomically only when
  the journal is compacted (every :data:`COMPACT_EVERY` records, and when a run ends);
* ``manifest.journal`` gets one JSON line per finished tile, appended and fsynced. A record
  torn by a crash mid-write (no final newline, or not JSON) is ignored, so its tile is
  computed again; replaying a record twice changes nothing.

Each record lists the tile's files with their SHA-256, size and modification time. A file
whose size and modification time are unchanged is trusted without reading it; one whose
stat changed is hashed (once per process) and compared. Records are kept per phase: the
class tiles (``classes``) and the generalized tiles (``generalized``).

Layout of ``<store>/manifest.json``::

    {"format": "clc-dask-run-manifest", "version": 2, "run_name": ..., "config_sha256": ...,
     "checkpoint_sha256": ..., "grid": {...}, "complete": false, "state": {...},
     "tiles": {"1_1": {"files": {"tiles/1_1/classes.tif": {"sha256": ..., "bytes": ...,
                                                          "mtime_ns": ...}},
                       "assets": {"classes": "tiles/1_1/classes.tif"}, "finished": "…Z", ...}},
     "generalized": {"1_1": {...}}}
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from clc_dask.errors import OutputError
from clc_dask.run.store import JOURNAL_NAME, MANIFEST_NAME, RUN_OUTPUTS
from clc_dask.stores import atomic_path, file_sha256, fsync_directory

log = logging.getLogger(__name__)

MANIFEST_FORMAT = "clc-dask-run-manifest"
MANIFEST_VERSION = 2
#: Records appended to the journal before it is folded into the snapshot (at least; a snapshot
#: of n records is rewritten after n more, so compaction costs O(1) per record).
COMPACT_EVERY = 1000
Phase = Literal["classes", "generalized"]
PHASES: tuple[str, ...] = ("classes", "generalized")


def config_fingerprint(config_yaml: str) -> str:
    """SHA-256 of a config text: identifies "the same run" (see :func:`clc_dask.run.context.output_settings`)."""
    return hashlib.sha256(config_yaml.encode("utf-8")).hexdigest()


def file_record(path: Path, sha256: str | None = None) -> dict[str, Any]:
    """What the manifest keeps of a file: SHA-256 (computed unless given), size, mtime (ns)."""
    stat = Path(path).stat()
    return {"sha256": sha256 or file_sha256(path), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}


@dataclass
class Manifest:
    """Finished tiles of one run, stored as ``manifest.json`` + ``manifest.journal``.

    Attributes:
        store: the run's output folder.
        run_name: ``name`` of the config.
        config_sha256: fingerprint of the settings that decide the outputs.
        checkpoint_sha256: SHA-256 of the model checkpoint used.
        grid: the run grid as plain values (CRS, transform, shape, tile size).
        tiles: tiles whose class map is finished, by name.
        generalized: tiles whose generalized map is finished, by name.
        state: run-wide values (e.g. the fingerprint of the generalization's decisions).
        complete: every tile of the AOI is finished and published.
        fresh: True when this manifest starts a run (nothing of it is on disk yet).
    """

    store: Path
    run_name: str
    config_sha256: str
    checkpoint_sha256: str
    grid: dict[str, Any]
    tiles: dict[str, dict[str, Any]] = field(default_factory=dict)
    generalized: dict[str, dict[str, Any]] = field(default_factory=dict)
    state: dict[str, Any] = field(default_factory=dict)
    complete: bool = False
    fresh: bool = True
    _verified: dict[tuple[str, str], bool] = field(default_factory=dict, repr=False)
    _hashes: dict[tuple[str, int, int], str] = field(default_factory=dict, repr=False)
    _appended: int = field(default=0, repr=False)
    _snapshot_records: int = field(default=0, repr=False)

    @property
    def path(self) -> Path:
        return self.store / MANIFEST_NAME

    @property
    def journal_path(self) -> Path:
        return self.store / JOURNAL_NAME

    def records(self, phase: Phase) -> dict[str, dict[str, Any]]:
        """The records of a phase (``classes`` or ``generalized``), by tile name."""
        if phase not in PHASES:
            raise ValueError(f"unknown manifest phase {phase!r}")
        return self.tiles if phase == "classes" else self.generalized

    # ----------------------------------------------------------------- reading
    @classmethod
    def read(cls, store: Path) -> Manifest | None:
        """The manifest in ``store`` as it is on disk (snapshot + journal), or None."""
        path = Path(store) / MANIFEST_NAME
        if not path.exists():
            return None
        try:
            data = json.loads(path.read_text("utf-8"))
        except (OSError, ValueError) as exc:
            raise OutputError(
                f"The run manifest {path} cannot be read ({exc}): the store is damaged. Choose another "
                "output.store, or pass `overwrite` to start the run again."
            ) from None
        if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
            raise OutputError(
                f"{path} is not a clc-dask run manifest: choose another output.store, or pass `overwrite`."
            )
        manifest = cls(Path(store), str(data.get("run_name")), str(data.get("config_sha256")),
                       str(data.get("checkpoint_sha256")), dict(data.get("grid") or {}),
                       dict(data.get("tiles") or {}), dict(data.get("generalized") or {}),
                       dict(data.get("state") or {}), bool(data.get("complete")), fresh=False)
        manifest._snapshot_records = len(manifest.tiles) + len(manifest.generalized)
        manifest._replay()
        return manifest

    def _replay(self) -> None:
        """Apply the journal's complete records; a torn last record is ignored."""
        if not self.journal_path.exists():
            return
        raw = self.journal_path.read_bytes()
        lines = raw.split(b"\n")
        torn = lines.pop()  # the text after the last newline: empty, or a record cut short
        if torn:
            log.warning("ignoring a record torn by an interrupted write at the end of %s", self.journal_path)
        for number, line in enumerate(lines, start=1):
            try:
                self._apply(json.loads(line))
            except (ValueError, KeyError, TypeError):
                log.warning("ignoring unreadable record %d of %s", number, self.journal_path)
        self._appended = len(lines)

    def _apply(self, record: Mapping[str, Any]) -> None:
        kind = record["kind"]
        if kind == "tile":
            self.records(record["phase"])[record["tile"]] = dict(record["entry"])
        elif kind == "forget":
            self.records(record["phase"]).pop(record["tile"], None)
        elif kind == "state":
            self.state.update(record["values"])
        elif kind == "complete":
            self.complete = bool(record["value"])
        else:
            raise KeyError(kind)

    @classmethod
    def open(cls, store: Path, run_name: str, config_sha256: str, checkpoint_sha256: str,
             grid: dict[str, Any], *, resume: bool, overwrite: bool) -> Manifest:
        """Open (resume) or start a manifest, refusing a store that holds another run's tiles.

        Nothing is written here. A started manifest has ``fresh=True``: the caller removes
        the old outputs (only allowed with ``overwrite``) before writing new ones.

        Raises:
            OutputError: the store holds another run's outputs (without ``overwrite``), or
                this run's finished tiles without ``resume``/``overwrite``.
        """
        store = Path(store)
        if store.exists() and not store.is_dir():
            raise OutputError(f"Output store {store} is a file, not a folder: choose another output.store.")
        old = cls.read(store)
        start = cls(store, run_name, config_sha256, checkpoint_sha256, grid)
        if old is None:
            leftovers = [n for n in RUN_OUTPUTS[:3] if (store / n).exists() and any((store / n).iterdir())]
            if leftovers and not overwrite:
                raise OutputError(
                    f"Output store {store} already holds {', '.join(leftovers)} but no run manifest: it may "
                    "be another run's output. Choose another output.store or pass `overwrite` to replace it."
                )
            return start
        if old.run_name == run_name and old.grid != grid:
            if not overwrite:
                raise OutputError(
                    f"Output store {store} holds class tiles of another grid ({old.grid.get('crs')}, "
                    f"{old.grid.get('shape')} px, tiles of {old.grid.get('tile_size')} px) than this run's "
                    f"({grid.get('crs')}, {grid.get('shape')} px, tiles of {grid.get('tile_size')} px): "
                    "choose another output.store or pass `overwrite`."
                )
            return start
        if old.run_name != run_name or old.config_sha256 != config_sha256:
            if not overwrite:
                what = (f"run {old.run_name!r}" if old.run_name != run_name
                        else f"run {run_name!r} made with different settings")
                raise OutputError(
                    f"Output store {store} holds {len(old.tiles)} tile(s) of {what}: choose another "
                    "output.store, or pass `overwrite` to replace them."
                )
            return start
        if old.checkpoint_sha256 != checkpoint_sha256 and old.tiles:
            if not overwrite:
                raise OutputError(
                    f"Output store {store} holds tiles predicted with checkpoint {old.checkpoint_sha256[:12]}… "
                    f"but model.checkpoint is now {checkpoint_sha256[:12]}…: resuming would mix two models. "
                    "Use the original checkpoint, another output.store, or `overwrite`."
                )
            return start
        if not resume:
            if old.tiles and not overwrite:
                raise OutputError(
                    f"Output store {store} already holds {len(old.tiles)} finished tile(s) of this run: "
                    "pass `resume` to continue it or `overwrite` to start again."
                )
            if overwrite:
                return start
        old.complete = False
        return old

    # ----------------------------------------------------------------- checking
    def is_done(self, tile_name: str, recheck: bool = False, phase: Phase = "classes") -> bool:
        """True if the tile is recorded and every file still holds what was recorded.

        A file with its recorded size and modification time is trusted without reading it;
        otherwise its SHA-256 is computed (once per process) and compared. ``recheck`` hashes
        every file again.
        """
        key = (phase, tile_name)
        if key in self._verified and not recheck:
            return self._verified[key]
        entry = self.records(phase).get(tile_name)
        ok = bool(entry)
        for rel, expected in (entry or {}).get("files", {}).items():
            if not self._file_matches(self.store / rel, expected, recheck):
                log.warning("tile %s: %s is missing or changed; it will be recomputed and is not published",
                            tile_name, self.store / rel)
                ok = False
                break
        self._verified[key] = ok
        return ok

    def _file_matches(self, path: Path, expected: Mapping[str, Any], recheck: bool) -> bool:
        try:
            stat = path.stat()
        except OSError:
            return False
        if not path.is_file() or stat.st_size != expected["bytes"]:
            return False
        if not recheck and expected.get("mtime_ns") == stat.st_mtime_ns:
            return True
        return self.hash_of(path, stat.st_size, stat.st_mtime_ns) == expected["sha256"]

    def hash_of(self, path: Path, size: int, mtime_ns: int) -> str:
        """SHA-256 of a file, computed once per process for a given size and mtime."""
        key = (str(path), size, mtime_ns)
        if key not in self._hashes:
            self._hashes[key] = file_sha256(path)
        return self._hashes[key]

    # ----------------------------------------------------------------- writing
    def forget(self, tile_name: str, phase: Phase = "classes") -> None:
        """Drop a tile's record (before it is recomputed)."""
        if self.records(phase).pop(tile_name, None) is not None:
            self._append({"kind": "forget", "phase": phase, "tile": tile_name})
        self._verified.pop((phase, tile_name), None)

    def record(self, tile_name: str, files: Mapping[str, Path], extra: Mapping[str, Any] | None = None,
               extra_files: Mapping[str, Path] | None = None, *, phase: Phase = "classes",
               hashes: Mapping[Path, Mapping[str, Any]] | None = None) -> None:
        """Record a finished tile: one line appended to the journal (fsynced).

        Args:
            tile_name: ``row_col``.
            files: asset name → file (inside the store), e.g. ``{"classes": …/classes.tif}``.
            extra: plain values kept with the tile (``clc_dask:*`` keys become STAC properties).
            extra_files: files that are part of the tile but not assets (e.g. its Zarr chunks).
            phase: ``classes`` (the class map) or ``generalized``.
            hashes: file → :func:`file_record` made where the file was written (a worker), so the
                client reads nothing; files missing here are hashed.
        """
        every = {**dict(files), **dict(extra_files or {})}
        known = {str(Path(p)): rec for p, rec in (hashes or {}).items()}
        entry = {
            "files": {self._rel(p): dict(known.get(str(Path(p))) or file_record(Path(p))) for p in every.values()},
            "assets": {k: self._rel(p) for k, p in files.items()},
            "finished": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            **(dict(extra) if extra else {}),
        }
        self.records(phase)[tile_name] = entry
        self._verified[(phase, tile_name)] = True
        self._append({"kind": "tile", "phase": phase, "tile": tile_name, "entry": entry})

    def set_state(self, **values: Any) -> None:
        """Record run-wide values (journaled)."""
        self.state.update(values)
        self._append({"kind": "state", "values": values})

    def _rel(self, path: Path) -> str:
        return Path(path).resolve().relative_to(self.store.resolve()).as_posix()

    def _append(self, record: Mapping[str, Any]) -> None:
        if self.fresh:
            self.save()
        line = json.dumps(record, separators=(",", ":"), sort_keys=True).encode("utf-8") + b"\n"
        new = not self.journal_path.exists()
        with open(self.journal_path, "ab") as fh:
            if not new and fh.tell() and not self._ends_with_newline():
                fh.write(b"\n")  # close a torn record, so the new one stands on its own line
            fh.write(line)
            fh.flush()
            os.fsync(fh.fileno())
        if new:
            fsync_directory(self.store)
        self._appended += 1
        if self._appended >= max(COMPACT_EVERY, self._snapshot_records):
            self.save()

    def _ends_with_newline(self) -> bool:
        with open(self.journal_path, "rb") as fh:
            fh.seek(-1, os.SEEK_END)
            return fh.read(1) == b"\n"

    def save(self) -> None:
        """Compact: write the snapshot atomically (temp file, fsync, rename), then empty the journal."""
        data = {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "run_name": self.run_name,
                "config_sha256": self.config_sha256, "checkpoint_sha256": self.checkpoint_sha256,
                "grid": self.grid, "complete": self.complete, "state": self.state,
                "tiles": dict(sorted(self.tiles.items())), "generalized": dict(sorted(self.generalized.items()))}
        self.store.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.path, suffix=".json") as tmp:
            tmp.write_text(json.dumps(data, indent=1), encoding="utf-8")
        if self.journal_path.exists():
            with atomic_path(self.journal_path, suffix=".journal"):
                pass  # an empty journal replaces the folded one
        self._appended = 0
        self._snapshot_records = len(self.tiles) + len(self.generalized)
        self.fresh = False
