"""The run manifest: the explicit record of which tiles are finished.

Missing Zarr chunks or files do not prove a tile was never written (xarray#10117), and a
present file does not prove it is complete; the manifest does. It is rewritten atomically
after every finished tile and lists each tile's files with their SHA-256 and size. It names
the run, the fingerprint of the settings that decide the outputs (config without the
store path and cluster section) and the checkpoint's SHA-256, so that a store holding
another run's tiles is recognised and refused, and a resumed run never mixes models.

Layout of ``<store>/manifest.json``::

    {"format": "clc-dask-run-manifest", "version": 1, "run_name": ..., "config_sha256": ...,
     "checkpoint_sha256": ..., "grid": {...}, "complete": false,
     "tiles": {"1_1": {"files": {"tiles/1_1/classes.tif": {"sha256": ..., "bytes": ...}},
                       "assets": {"classes": "tiles/1_1/classes.tif"},
                       "finished": "2026-…Z", "clc_dask:input_items": [...]}}}
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clc_dask.errors import OutputError
from clc_dask.run.store import MANIFEST_NAME, RUN_OUTPUTS
from clc_dask.stores import atomic_path, file_sha256

log = logging.getLogger(__name__)

MANIFEST_FORMAT = "clc-dask-run-manifest"
MANIFEST_VERSION = 1


def config_fingerprint(config_yaml: str) -> str:
    """SHA-256 of a config text: identifies "the same run" (see :func:`clc_dask.run.context.output_settings`)."""
    return hashlib.sha256(config_yaml.encode("utf-8")).hexdigest()


@dataclass
class Manifest:
    """Finished tiles of one run, stored as ``<store>/manifest.json``.

    Attributes:
        store: the run's output folder.
        run_name: ``name`` of the config.
        config_sha256: fingerprint of the settings that decide the outputs.
        checkpoint_sha256: SHA-256 of the model checkpoint used.
        grid: the run grid as plain values (CRS, transform, shape, tile size).
        tiles: finished tiles by name.
        complete: every tile of the AOI is finished and published.
        fresh: True when this manifest starts a run (nothing of it is on disk yet).
    """

    store: Path
    run_name: str
    config_sha256: str
    checkpoint_sha256: str
    grid: dict[str, Any]
    tiles: dict[str, dict[str, Any]] = field(default_factory=dict)
    complete: bool = False
    fresh: bool = True
    _verified: dict[str, bool] = field(default_factory=dict, repr=False)

    @property
    def path(self) -> Path:
        return self.store / MANIFEST_NAME

    @classmethod
    def read(cls, store: Path) -> Manifest | None:
        """The manifest in ``store`` as it is on disk, or None if there is none."""
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
        if data.get("format") != MANIFEST_FORMAT:
            raise OutputError(
                f"{path} is not a clc-dask run manifest: choose another output.store, or pass `overwrite`."
            )
        return cls(Path(store), str(data.get("run_name")), str(data.get("config_sha256")),
                   str(data.get("checkpoint_sha256")), dict(data.get("grid") or {}),
                   dict(data.get("tiles") or {}), bool(data.get("complete")), fresh=False)

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
        if old.grid != grid:
            if not overwrite:
                raise OutputError(f"Output store {store} was made on another grid: choose another output.store "
                                  "or pass `overwrite`.")
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

    def is_done(self, tile_name: str, recheck: bool = False) -> bool:
        """True if the tile is recorded and every file still has its recorded size and SHA-256.

        Verified once per tile and process unless ``recheck`` (files are hashed again).
        """
        if tile_name in self._verified and not recheck:
            return self._verified[tile_name]
        entry = self.tiles.get(tile_name)
        ok = bool(entry)
        for rel, expected in (entry or {}).get("files", {}).items():
            path = self.store / rel
            if not path.is_file() or path.stat().st_size != expected["bytes"] or file_sha256(path) != expected["sha256"]:
                log.warning("tile %s: %s is missing or changed; it will be recomputed and is not published",
                            tile_name, rel)
                ok = False
                break
        self._verified[tile_name] = ok
        return ok

    def forget(self, tile_name: str) -> None:
        """Drop a tile's record (before it is recomputed)."""
        self.tiles.pop(tile_name, None)
        self._verified.pop(tile_name, None)

    def record(self, tile_name: str, files: Mapping[str, Path], extra: Mapping[str, Any] | None = None,
               extra_files: Mapping[str, Path] | None = None) -> None:
        """Record a finished tile and save the manifest (atomically).

        Args:
            tile_name: ``row_col``.
            files: asset name → file (inside the store), e.g. ``{"classes": …/classes.tif}``.
            extra: plain values kept with the tile (``clc_dask:*`` keys become STAC properties).
            extra_files: files that are part of the tile but not assets (e.g. its Zarr chunks).
        """
        every = {**dict(files), **dict(extra_files or {})}
        self.tiles[tile_name] = {
            "files": {self._rel(p): {"sha256": file_sha256(p), "bytes": Path(p).stat().st_size}
                      for p in every.values()},
            "assets": {k: self._rel(p) for k, p in files.items()},
            "finished": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            **(dict(extra) if extra else {}),
        }
        self._verified[tile_name] = True
        self.save()

    def _rel(self, path: Path) -> str:
        return Path(path).resolve().relative_to(self.store.resolve()).as_posix()

    def save(self) -> None:
        """Write the manifest atomically (temp file, fsync, rename)."""
        data = {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "run_name": self.run_name,
                "config_sha256": self.config_sha256, "checkpoint_sha256": self.checkpoint_sha256,
                "grid": self.grid, "complete": self.complete, "tiles": dict(sorted(self.tiles.items()))}
        self.store.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.path, suffix=".json") as tmp:
            tmp.write_text(json.dumps(data, indent=2), encoding="utf-8")
        self.fresh = False
