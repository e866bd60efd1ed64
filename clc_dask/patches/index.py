"""The patch index: which patches of a grid are used, their split, classes and normalisation.

From one or more seasonal mosaics and a label raster on the same grid,
:func:`build_patch_index` cuts the grid into non-overlapping square patches, rejects those
that are mostly no data, cloud or unlabelled (:mod:`~clc_dask.patches.rejection`), and splits
the *locations* into train and validation by blocks (:mod:`~clc_dask.patches.split`). Each
season is a separate sample of the same location, and both samples of a location always fall
in the same split. :meth:`PatchIndex.save` and :func:`load_patch_index` keep it on disk.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import pandas as pd
from affine import Affine
from odc.geo.geobox import GeoBox

from clc_dask.classes import ClassTable, label_of
from clc_dask.errors import ConfigError, InputError, OutputError
from clc_dask.grid import assert_same_grid
from clc_dask.items import composite_bands
from clc_dask.model import Normalization
from clc_dask.patches.rejection import check_usable, sample_table
from clc_dask.patches.sources import Source, Sources, open_sources
from clc_dask.patches.split import VAL_SIDES, split_locations
from clc_dask.patches.statistics import band_normalization, patch_statistics
from clc_dask.rasters import geobox_of
from clc_dask.stores import atomic_path

log = logging.getLogger(__name__)

INDEX_FORMAT = "clc-dask-patch-index"
INDEX_VERSION = 1
INDEX_FILE = "patch_index.json"
PATCHES_FILE = "patches.csv"
CLASS_STATS_JSON = "class_stats.json"
CLASS_STATS_CSV = "class_stats.csv"
SPLITS = ("train", "val")
#: A class is flagged rare below this share of the training pixels …
RARE_SHARE = 0.01
#: … or when it occurs in fewer training patches than this.
RARE_MIN_PATCHES = 5


@dataclass(frozen=True, order=True)
class Sample:
    """One patch of one season: ``row``/``col`` count patches from the grid's top-left corner."""

    season: str
    row: int
    col: int
    size: int

    @property
    def y0(self) -> int:
        """First pixel row of the patch in the grid."""
        return self.row * self.size

    @property
    def x0(self) -> int:
        """First pixel column of the patch in the grid."""
        return self.col * self.size

    @property
    def window(self) -> tuple[slice, slice]:
        """(y, x) pixel slices of the patch in the grid."""
        return slice(self.y0, self.y0 + self.size), slice(self.x0, self.x0 + self.size)


def check_split(split: str) -> None:
    """Raise :class:`ConfigError` unless ``split`` is one of :data:`SPLITS`."""
    if split not in SPLITS:
        raise ConfigError(f"`split` must be one of {SPLITS}, not {split!r}.")


@dataclass
class PatchIndex:
    """Patches of one grid, their split, quality and classes.

    ``table`` has one row per (season, patch location): ``season, row, col, y0, x0, block_row,
    block_col, split`` (train / val / guard), ``nodata_fraction, cloud_fraction,
    unlabelled_fraction, usable, reason`` and ``px_<code>`` pixel counts per CLC code.
    Only ``usable`` rows of ``train``/``val`` are used for training.
    """

    geobox: GeoBox
    patch_size: int
    seasons: tuple[str, ...]
    bands: tuple[str, ...]
    classes: ClassTable
    normalization: Normalization
    table: pd.DataFrame
    settings: dict[str, Any]
    mosaic_paths: dict[str, str]
    label_path: str
    clear_paths: dict[str, str] = field(default_factory=dict)
    directory: Path | None = None
    _sources: Sources | None = field(default=None, repr=False)

    # ---- selection

    def samples(self, split: str) -> list[Sample]:
        """Usable samples of ``split`` (``"train"`` or ``"val"``) in index order (season, row, col)."""
        check_split(split)
        rows = self.table[(self.table["split"] == split) & self.table["usable"]]
        return [Sample(str(s), int(r), int(c), self.patch_size)
                for s, r, c in zip(rows["season"], rows["row"], rows["col"], strict=True)]

    def counts(self) -> dict[str, dict[str, int]]:
        """Usable patches per split and season, as Table 1 of the paper (plus totals)."""
        out: dict[str, dict[str, int]] = {}
        for split in SPLITS:
            rows = self.table[(self.table["split"] == split) & self.table["usable"]]
            per = {s: int((rows["season"] == s).sum()) for s in self.seasons}
            per["total"] = int(len(rows))
            out[split] = per
        out["rejected"] = {s: int(((self.table["season"] == s) & ~self.table["usable"]).sum())
                           for s in self.seasons}
        out["rejected"]["total"] = int((~self.table["usable"]).sum())
        return out

    def class_statistics(self, rare_share: float = RARE_SHARE,
                         rare_min_patches: int = RARE_MIN_PATCHES) -> pd.DataFrame:
        """Pixels and patches per class code and split, with rare classes flagged.

        A class is ``rare`` when it holds less than ``rare_share`` of the training pixels, occurs
        in fewer than ``rare_min_patches`` training patches, or is missing from one split.
        """
        records = []
        usable = self.table[self.table["usable"]]
        pixels = {c: (usable[f"px_{c}"] if f"px_{c}" in usable else pd.Series(0, index=usable.index))
                  for c in self.classes.codes}
        totals = {s: max(1, int(sum(v[usable["split"] == s].sum() for v in pixels.values()))) for s in SPLITS}
        for code in self.classes.codes:
            rec: dict[str, Any] = {"code": int(code), "label": label_of(int(code))}
            for split in SPLITS:
                values = pixels[code][usable["split"] == split]
                rec[f"{split}_pixels"] = int(values.sum())
                rec[f"{split}_patches"] = int((values > 0).sum())
                rec[f"{split}_share"] = rec[f"{split}_pixels"] / totals[split]
            notes = []
            if rec["train_share"] < rare_share:
                notes.append(f"<{rare_share:.0%} of training pixels")
            if rec["train_patches"] < rare_min_patches:
                notes.append(f"in {rec['train_patches']} training patch(es)")
            if rec["val_patches"] == 0:
                notes.append("absent from validation")
            if rec["train_patches"] == 0:
                notes.append("absent from training")
            rec["rare"] = bool(notes)
            rec["note"] = "; ".join(notes)
            records.append(rec)
        return pd.DataFrame.from_records(records)

    def fingerprint(self) -> str:
        """SHA-256 of what defines the samples: sources, grid, bands, size, split and normalisation."""
        payload = {
            "mosaics": self.mosaic_paths, "labels": self.label_path, "bands": list(self.bands),
            "patch_size": self.patch_size, "geobox": _geobox_dict(self.geobox),
            "classes": list(self.classes.codes), "level": self.classes.level,
            "normalization": self.normalization.as_dict(),
            "samples": {s: [[x.season, x.row, x.col] for x in self.samples(s)] for s in SPLITS},
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()

    # ---- lazy arrays

    def sources(self) -> Sources:
        """The inputs opened lazily (chunks aligned to the patch size); opened once and kept."""
        if self._sources is None:
            if any(not p for p in (*self.mosaic_paths.values(), self.label_path)):
                raise InputError("This patch index was built from in-memory arrays that are gone: rebuild it.")
            self._sources = open_sources(self.mosaic_paths, self.label_path, self.clear_paths,
                                         self.bands, self.patch_size).sources
            for season in self.seasons:
                assert_same_grid(geobox_of(self._sources.mosaics[season]), self.geobox,
                                 f"{season} mosaic", "patch index")
        return self._sources

    def windows(self, sample: Sample) -> tuple[da.Array, da.Array]:
        """Lazy (band, y, x) DN and (y, x) label code windows of one sample (chunk-aligned)."""
        src = self.sources()
        ys, xs = sample.window
        x = src.mosaic_files[sample.season].data[:, ys, xs]  # sliced from the opened array, then
        y = src.label_file.data[:, ys, xs]  # bands picked: see Sources
        return x[src.band_index[sample.season]], y[0]

    @property
    def from_files(self) -> bool:
        """True when every input is a file (not an in-memory array)."""
        return all((*self.mosaic_paths.values(), self.label_path))

    # ---- persistence

    def metadata(self) -> dict[str, Any]:
        """The JSON document saved as ``patch_index.json``."""
        return {
            "format": INDEX_FORMAT, "version": INDEX_VERSION,
            "geobox": _geobox_dict(self.geobox), "patch_size": self.patch_size,
            "seasons": list(self.seasons), "bands": list(self.bands),
            "mosaics": self.mosaic_paths, "labels": self.label_path, "clear_counts": self.clear_paths,
            "classes": {"level": self.classes.level, "records": self.classes.as_records()},
            "normalization": self.normalization.as_dict(), "settings": self.settings,
            "counts": self.counts(), "fingerprint": self.fingerprint(),
        }

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write ``patches.csv``, ``class_stats.{json,csv}`` and (last) ``patch_index.json``."""
        directory = Path(directory)
        if not self.from_files:
            raise OutputError(
                "Cannot save a patch index built from in-memory arrays: write the mosaics and labels "
                "to GeoTIFF first (the index refers to files)."
            )
        directory.mkdir(parents=True, exist_ok=True)
        with atomic_path(directory / PATCHES_FILE, suffix=".csv") as tmp:
            self.table.to_csv(tmp, index=False)
        stats = self.class_statistics()
        with atomic_path(directory / CLASS_STATS_CSV, suffix=".csv") as tmp:
            stats.to_csv(tmp, index=False)
        with atomic_path(directory / CLASS_STATS_JSON, suffix=".json") as tmp:
            tmp.write_text(json.dumps({"counts": self.counts(), "classes": stats.to_dict("records"),
                                       "rare": [int(c) for c in stats.loc[stats["rare"], "code"]]},
                                      indent=2))
        with atomic_path(directory / INDEX_FILE, suffix=".json") as tmp:
            tmp.write_text(json.dumps(self.metadata(), indent=2))
        self.directory = directory
        log.info("saved patch index to %s", directory)
        return directory


def _geobox_dict(geobox: GeoBox) -> dict[str, Any]:
    a = geobox.affine
    return {"crs": str(geobox.crs), "shape": [int(geobox.shape.y), int(geobox.shape.x)],
            "affine": [a.a, a.b, a.c, a.d, a.e, a.f]}


def _geobox_from(data: Mapping[str, Any]) -> GeoBox:
    return GeoBox(tuple(data["shape"]), Affine(*data["affine"]), data["crs"])


def load_patch_index(directory: str | os.PathLike[str]) -> PatchIndex:
    """Read a patch index written by :meth:`PatchIndex.save` (or :func:`write_patch_index`).

    Raises:
        InputError: no index in ``directory``, an unknown format, or files that disagree.
    """
    directory = Path(directory)
    meta_path = directory / INDEX_FILE
    if not meta_path.is_file():
        raise InputError(
            f"{directory} holds no patch index ({INDEX_FILE} missing): make one with write_patch_index "
            "(clc-dask patches)."
        )
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != INDEX_FORMAT or meta.get("version", 0) > INDEX_VERSION:
        raise InputError(f"{meta_path} is not a clc-dask patch index this version can read.")
    table = pd.read_csv(directory / PATCHES_FILE, dtype={"season": str, "split": str, "reason": str},
                        keep_default_na=False)
    table["usable"] = table["usable"].astype(bool)
    cls = meta["classes"]
    index = PatchIndex(
        geobox=_geobox_from(meta["geobox"]), patch_size=int(meta["patch_size"]),
        seasons=tuple(meta["seasons"]), bands=tuple(meta["bands"]),
        classes=ClassTable.from_records(int(cls["level"]), cls["records"]),
        normalization=Normalization.from_dict(meta["normalization"]), table=table,
        settings=dict(meta["settings"]), mosaic_paths=dict(meta["mosaics"]), label_path=meta["labels"],
        clear_paths=dict(meta.get("clear_counts") or {}), directory=directory,
    )
    if index.fingerprint() != meta.get("fingerprint"):
        raise InputError(f"{directory}: {PATCHES_FILE} does not match {INDEX_FILE}; rebuild the index.")
    return index


def build_patch_index(
    mosaics: Mapping[str, Source],
    labels: Source,
    *,
    patch_size: int = 256,
    bands: str | Sequence[str] | None = None,
    level: int = 2,
    codes: Sequence[int] | None = None,
    val_fraction: float = 0.25,
    split_block: int = 4,
    guard: int = 0,
    seed: int = 0,
    val_side: str | None = None,
    max_nodata_fraction: float = 0.5,
    max_cloud_fraction: float = 0.5,
    max_unlabelled_fraction: float = 0.5,
    clear_counts: Mapping[str, Source] | None = None,
    client: Any | None = None,
    split_map: np.ndarray | None = None,
) -> PatchIndex:
    """Cut mosaics and labels into patches, reject bad ones and split train/validation by blocks.

    Args:
        mosaics: season name → mosaic COG path (or lazy DataArray), (band, y, x) uint16 DN.
            Several seasons give separate samples of the same locations (paper: September and
            September + April).
        labels: single-band CLC code raster on the same grid (0 = no data).
        patch_size: patch edge in pixels, a multiple of 32 (paper: 128 or 256 px = 1.28/2.56 km
            at 10 m). Edge strips narrower than a patch are not used.
        bands: composite name (``rgb``, ``nrg``, ``all``), a band list, or None for every band
            of the first mosaic in its order.
        level: CLC level of the classes (2 as in the paper; 3 needs Level-3 labels).
        codes: the classes to learn; default every code present in usable patches.
        val_fraction: share of usable samples aimed at for validation (paper: ≈ 0.25).
        split_block: edge of a split block in patches; whole blocks go to one split. Larger
            blocks separate train and validation further but make the share coarser.
        guard: drop training patches within this many patches of a validation patch (0 = none;
            1 removes every training patch touching validation). As wide as the network's
            receptive field (``guard_patches(receptive_field(encoder), patch_size)``, what
            training configs use by default), no validation pixel is within reach of a training
            patch, so the validation scores that choose the best epoch are honest.
        seed: seeds which blocks go to validation.
        val_side: ``north``, ``south``, ``east`` or ``west``: validation is a strip of whole
            patch rows (or columns) along that side of the usable area instead of seeded blocks,
            so a wide guard band costs one strip rather than a ring around every block.
        max_nodata_fraction: reject a sample whose mosaic has more no-data (0) pixels than this.
        max_cloud_fraction: reject a sample with more never-clear pixels (clear count 0) than
            this; only with ``clear_counts``.
        max_unlabelled_fraction: reject a location with more unlabelled pixels (label 0 or a code
            outside ``codes``) than this.
        clear_counts: season → single-band clear-observation count raster (optional).
        client: a ``distributed.Client`` to compute on; default the local threaded scheduler.
        split_map: a given split instead of the block split: a (rows, cols) array with one word
            per patch location (``height // patch_size`` × ``width // patch_size``): ``"train"``,
            ``"val"``, or any other word for a location never used (e.g. ``"test"``, ``"guard"``).
            ``val_fraction``, ``split_block``, ``guard`` and ``seed`` are then not used.
            :mod:`clc_dask.experiment` makes one around its test area.

    Raises:
        ConfigError: bad patch size, fraction or thresholds; no usable patch in a split (the
            message names the threshold to relax).
        InputError: missing files, missing bands, non-integer rasters.
        GridMismatchError: a label or mosaic raster on another grid.
    """
    thresholds = {"max_nodata_fraction": max_nodata_fraction, "max_cloud_fraction": max_cloud_fraction,
                  "max_unlabelled_fraction": max_unlabelled_fraction}
    _check_settings(patch_size, val_fraction, split_block, guard, val_side, thresholds)
    band_order = _band_order(bands)
    opened = open_sources(mosaics, labels, clear_counts, band_order, patch_size)
    geobox = opened.geobox
    nrows, ncols = geobox.shape.y // patch_size, geobox.shape.x // patch_size
    if nrows == 0 or ncols == 0:
        raise ConfigError(
            f"The grid ({geobox.shape.y}×{geobox.shape.x} px) holds no whole {patch_size} px patch: "
            "choose a smaller `patch_size`."
        )
    seasons = tuple(mosaics)
    stats = patch_statistics(opened.sources, patch_size, nrows, ncols, level, client)
    table, location_usable = sample_table(
        seasons, stats.mosaics, stats.labels, stats.clear, patch_size, level, codes,
        max_nodata_fraction, max_cloud_fraction, max_unlabelled_fraction)
    check_usable(table, max_nodata_fraction, max_cloud_fraction, max_unlabelled_fraction, bool(stats.clear))

    if split_map is None:
        split = split_locations(location_usable, split_block, val_fraction, guard, seed,
                                None if val_side == "blocks" else val_side)
    else:
        split = _given_split(split_map, nrows, ncols, patch_size)
    table["split"] = split[table["row"].to_numpy(), table["col"].to_numpy()]
    table["block_row"] = table["row"] // split_block
    table["block_col"] = table["col"] // split_block
    _check_splits(table, split_map is not None, guard, patch_size, split_block, geobox)

    classes = ClassTable(level, list(_present_codes(table, codes)))
    normalization = band_normalization(table, stats.mosaics, opened.bands)
    settings = {
        "val_fraction": val_fraction, "split_block": split_block, "guard": guard, "seed": seed,
        "val_side": None if val_side == "blocks" else val_side,
        "level": level, **thresholds, "split": "blocks" if split_map is None else "given",
    }
    columns = ["season", "row", "col", "y0", "x0", "block_row", "block_col", "split", "usable", "reason",
               "nodata_fraction", "cloud_fraction", "unlabelled_fraction"]
    table = table[columns + [c for c in table.columns if c.startswith("px_")]]
    index = PatchIndex(geobox, patch_size, seasons, opened.bands, classes, normalization,
                       table.reset_index(drop=True), settings, opened.mosaic_paths, opened.label_path,
                       opened.clear_paths, _sources=opened.sources)
    counts = index.counts()
    log.info("patch index: %d train / %d val usable samples (%d rejected), %d classes %s",
             counts["train"]["total"], counts["val"]["total"], counts["rejected"]["total"],
             len(classes), list(classes.codes))
    return index


def _check_splits(table: pd.DataFrame, given: bool, guard: int, patch_size: int, split_block: int,
                  geobox: GeoBox) -> None:
    """Raise ConfigError naming the setting to change if the train or validation split is empty."""
    for split_name in SPLITS:
        if (table["usable"] & (table["split"] == split_name)).any():
            continue
        counts = {s: int((table["usable"] & (table["split"] == s)).sum()) for s in SPLITS}
        if given:
            raise ConfigError(
                f"The {split_name} split has no usable patch ({counts}): the `split_map` gives "
                f"it no location whose {patch_size} px patch is usable; give it more area."
            )
        if guard:
            raise ConfigError(
                f"The {split_name} split has no usable patch ({counts}): the guard band of "
                f"{guard} patch(es) ({guard * patch_size} px) around validation leaves no room for it "
                f"in this {geobox.shape.y}×{geobox.shape.x} px area. Use a larger area, or a narrower "
                "`guard` (0 = none; a band narrower than the network's receptive field lets "
                "validation pixels see training patches)."
            )
        raise ConfigError(
            f"The {split_name} split has no usable patch ({counts}): the area holds too few "
            f"blocks of {split_block}×{split_block} patches; lower `split_block` or `patch_size`, "
            "or use a larger area."
        )


def _band_order(bands: str | Sequence[str] | None) -> tuple[str, ...] | None:
    """A composite name or comma list through :func:`composite_bands`; a sequence of band names
    as given (any band the mosaics hold: missing ones are named when the mosaics are opened)."""
    if bands is None or isinstance(bands, str):
        return None if bands is None else composite_bands(bands)
    return tuple(str(b).upper() for b in bands)


def _given_split(split_map: np.ndarray, nrows: int, ncols: int, size: int) -> np.ndarray:
    split = np.asarray(split_map).astype(str)
    if split.shape != (nrows, ncols):
        raise ConfigError(
            f"`split_map` has shape {split.shape} but the grid holds {nrows}×{ncols} whole patches of "
            f"{size} px: give one word per patch location."
        )
    return split


def _check_settings(patch_size: int, val_fraction: float, split_block: int, guard: int, val_side: str | None,
                    thresholds: Mapping[str, float]) -> None:
    if patch_size < 32 or patch_size % 32:
        raise ConfigError(
            f"`patch_size` {patch_size} px must be a positive multiple of 32 (the U-Net halves it 5 "
            "times); the paper uses 128 or 256."
        )
    if not 0 < val_fraction < 1:
        raise ConfigError(f"`val_fraction` must lie strictly between 0 and 1 (paper ≈ 0.25), not {val_fraction}.")
    if split_block < 1:
        raise ConfigError(f"`split_block` must be ≥ 1 patch, not {split_block}.")
    if guard < 0:
        raise ConfigError(f"`guard` must be ≥ 0 patches, not {guard}.")
    if val_side is not None and val_side != "blocks" and val_side not in VAL_SIDES:
        raise ConfigError(f"`val_side` must be one of {', '.join(VAL_SIDES)} (or blocks / None for seeded blocks), "
                          f"not {val_side!r}.")
    for name, value in thresholds.items():
        if not 0 <= value <= 1:
            raise ConfigError(f"`{name}` is a fraction in 0…1, not {value}.")


def _present_codes(table: pd.DataFrame, codes: Sequence[int] | None) -> tuple[int, ...]:
    """The class codes to learn: ``codes``, else those present in usable train/val samples."""
    if codes is not None:
        return tuple(sorted(int(c) for c in codes))
    usable = table[table["usable"] & table["split"].isin(SPLITS)]
    present = [int(c[3:]) for c in table.columns if c.startswith("px_") and usable[c].sum() > 0]
    if not present:
        raise ConfigError("The usable patches hold no labelled pixel: check the label raster and `level`.")
    return tuple(sorted(present))
