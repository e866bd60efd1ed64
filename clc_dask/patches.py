"""Patch datasets: a patch index with a spatial train/validation split, streamed or cached.

From one or more seasonal mosaics and a label raster on the same grid, :func:`build_patch_index`
cuts the grid into non-overlapping square patches (128 or 256 px in the paper; any multiple of
32 px), rejects patches that are mostly no data, cloud or unlabelled, and splits the *locations*
into train and validation by blocks of ``split_block`` × ``split_block`` patches, so neighbouring
patches (which share texture and fields) never end up on both sides. Each season is a separate
sample of the same location (Table 1 of the paper: "September & April"), and both samples of a
location always fall in the same split.

The index is computed from the lazy (dask) arrays: one graph of per-chunk statistics (valid
pixels, cloud, class counts, band sums per patch) and one reduction; the mosaic is never held in
memory as a whole.

Patches then reach the trainer in one of two ways that give byte-identical samples and batches:

* :class:`DaskPatchStream` — a torch ``IterableDataset`` that computes patch windows on the Dask
  cluster (or the local threaded scheduler) and keeps a bounded number of them in flight ahead of
  the consumer.
* :func:`cache_patches` + :class:`ZarrPatchDataset` — patches written once to a Zarr store (one
  chunk per patch) and read from there.

The order of samples in an epoch depends only on ``(seed, epoch)`` (:func:`epoch_order`), which
makes training resumable with identical results.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import uuid
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import numpy as np
import pandas as pd
import torch
import xarray as xr
from affine import Affine
from odc.geo.geobox import GeoBox
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler

from clc_dask.classes import IGNORE_INDEX, ClassTable, label_of, official_codes
from clc_dask.errors import ConfigError, InputError, OutputError
from clc_dask.grid import assert_same_grid
from clc_dask.model import Normalization, composite_bands
from clc_dask.rasters import atomic_path, geobox_of, open_raster

log = logging.getLogger(__name__)

INDEX_FORMAT = "clc-dask-patch-index"
INDEX_VERSION = 1
CACHE_FORMAT = "clc-dask-patch-cache"
INDEX_FILE = "patch_index.json"
PATCHES_FILE = "patches.csv"
CLASS_STATS_JSON = "class_stats.json"
CLASS_STATS_CSV = "class_stats.csv"
CACHE_STORE = "patches.zarr"
SPLITS = ("train", "val")
#: Chunk edge (pixels) aimed at when opening rasters; rounded down to a multiple of the patch size.
READ_CHUNK = 2048
#: A class is flagged rare below this share of the training pixels …
RARE_SHARE = 0.01
#: … or when it occurs in fewer training patches than this.
RARE_MIN_PATCHES = 5


# --------------------------------------------------------------------------- samples and order


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


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool = True, limit: int | None = None) -> np.ndarray:
    """Positions ``0…n-1`` in the order of one epoch: a pure function of ``(seed, epoch)``.

    Both data paths (stream and Zarr cache) use it, and resuming training at epoch ``k``
    replays exactly the order an uninterrupted run would have used. ``limit`` keeps the first
    ``limit`` positions: a different seeded subset each epoch.
    """
    order = np.random.default_rng([int(seed), int(epoch)]).permutation(n) if shuffle else np.arange(n)
    return order if limit is None else order[: max(0, int(limit))]


# --------------------------------------------------------------------------- opening sources

Source = str | os.PathLike[str] | xr.DataArray


def _aligned_chunk(patch_size: int) -> int:
    return patch_size * max(1, READ_CHUNK // patch_size)


def _open(source: Source, patch_size: int, what: str, variable: str = "reflectance") -> tuple[xr.DataArray, str]:
    """Open a raster (GeoTIFF/COG, or a Zarr store's ``variable``) lazily, chunks aligned to patches."""
    chunk = _aligned_chunk(patch_size)
    if isinstance(source, xr.DataArray):
        arr = source if "band" in source.dims else source.expand_dims(band=["1"])
        arr = arr.transpose("band", "y", "x").chunk({"band": -1, "y": chunk, "x": chunk})
        return arr, ""
    path = Path(source)
    if not path.exists():
        raise InputError(f"The {what} {path} does not exist: check the path.")
    if path.is_dir():  # a Zarr mosaic store (clc-dask mosaic --format zarr)
        try:
            ds = xr.open_zarr(path)
        except Exception as exc:
            raise InputError(f"Cannot open the {what} {path} as Zarr: {exc}.") from exc
        if variable not in ds:
            raise InputError(f"The Zarr store {path} has no '{variable}' variable (has {list(ds.data_vars)}).")
        arr = ds[variable]
        arr = arr if "band" in arr.dims else arr.expand_dims(band=[variable])
        arr = arr.transpose("band", "y", "x").chunk({"band": -1, "y": chunk, "x": chunk})
        return arr, str(path.resolve())
    arr = open_raster(path, chunks={"band": -1, "y": chunk, "x": chunk})
    return arr, str(path.resolve())


def find_clear_count(mosaic: str | os.PathLike[str]) -> Path | None:
    """The clear-count raster written beside a mosaic by ``clc-dask mosaic`` (or None).

    COG mosaics have ``<stem>_clear_count.tif`` beside them; Zarr mosaics hold a
    ``clear_count`` variable (the store itself is returned).
    """
    path = Path(mosaic)
    if path.is_dir():
        return path if (path / "clear_count").exists() else None
    sidecar = path.with_name(f"{path.stem}_clear_count{path.suffix or '.tif'}")
    return sidecar if sidecar.is_file() else None


def _check_integer(arr: xr.DataArray, what: str) -> None:
    if arr.dtype.kind not in "iu":
        raise InputError(
            f"The {what} has data type {arr.dtype}, not integer: mosaics must hold uint16 DN "
            "(reflectance × 10000) and label rasters integer CLC codes."
        )


@dataclass
class _Sources:
    """The lazily opened inputs of a patch index.

    ``mosaics``/``labels``/``clear`` are the selected bands, for whole-raster statistics.
    ``mosaic_files``/``label_file`` are the arrays as opened (every band), for patch windows:
    a window must be sliced straight from the opened array. Slicing a derived array (a band
    selection) makes dask's slice fusion re-define that array's shared keys differently in
    every submitted graph, which corrupts the distributed scheduler's state.
    """

    mosaics: dict[str, xr.DataArray]
    labels: xr.DataArray
    clear: dict[str, xr.DataArray]
    mosaic_files: dict[str, xr.DataArray]
    band_index: dict[str, list[int]]
    label_file: xr.DataArray


def _open_sources(
    mosaics: Mapping[str, Source],
    labels: Source,
    clear_counts: Mapping[str, Source] | None,
    bands: tuple[str, ...] | None,
    patch_size: int,
) -> tuple[_Sources, dict[str, str], str, dict[str, str], tuple[str, ...], GeoBox]:
    if not mosaics:
        raise ConfigError("No mosaic given: pass at least one --mosaic SEASON=PATH.")
    opened: dict[str, xr.DataArray] = {}
    files: dict[str, xr.DataArray] = {}
    band_index: dict[str, list[int]] = {}
    paths: dict[str, str] = {}
    geobox: GeoBox | None = None
    first = ""
    for season, source in mosaics.items():
        if source is None or (isinstance(source, str) and not source):
            raise ConfigError(f"Season {season!r} has no mosaic: pass --mosaic {season}=PATH.")
        arr, path = _open(source, patch_size, f"{season} mosaic")
        _check_integer(arr, f"{season} mosaic")
        available = tuple(str(b) for b in arr["band"].values)
        wanted = bands or available
        missing = [b for b in wanted if b not in available]
        if missing:
            raise InputError(
                f"The {season} mosaic has bands {list(available)} but {missing} are needed for "
                f"{list(wanted)}: make the mosaic with these bands or choose another composite."
            )
        bands = tuple(wanted)
        gbox = geobox_of(arr)
        if geobox is None:
            geobox, first = gbox, season
        else:
            assert_same_grid(gbox, geobox, f"{season} mosaic", f"{first} mosaic")
        opened[season] = arr.sel(band=list(bands))
        files[season] = arr
        band_index[season] = [available.index(b) for b in bands]
        paths[season] = path
    assert geobox is not None and bands is not None
    label_arr, label_path = _open(labels, patch_size, "label raster")
    _check_integer(label_arr, "label raster")
    if label_arr.sizes["band"] != 1:
        raise InputError(
            f"The label raster has {label_arr.sizes['band']} bands: give a single-band raster of CLC codes."
        )
    assert_same_grid(geobox_of(label_arr), geobox, "label", f"{first} mosaic")
    clear: dict[str, xr.DataArray] = {}
    clear_paths: dict[str, str] = {}
    for season, source in (clear_counts or {}).items():
        if season not in opened:
            raise ConfigError(
                f"A clear-count raster was given for season {season!r}, which has no mosaic "
                f"(mosaics: {', '.join(opened)}): pass --mosaic {season}=PATH or drop --clear {season}."
            )
        arr, path = _open(source, patch_size, f"{season} clear-count raster", variable="clear_count")
        assert_same_grid(geobox_of(arr), geobox, f"{season} clear-count", f"{first} mosaic")
        clear[season] = arr.isel(band=0)
        clear_paths[season] = path
    sources = _Sources(opened, label_arr.isel(band=0), clear, files, band_index, label_arr)
    return sources, paths, label_path, clear_paths, tuple(bands), geobox


# --------------------------------------------------------------------------- per-chunk statistics


def _per_patch_sum(block: np.ndarray, size: int) -> np.ndarray:
    """Sum of each ``size``×``size`` patch over the last two axes (int64)."""
    *lead, h, w = block.shape
    return block.reshape(*lead, h // size, size, w // size, size).sum(axis=(-3, -1), dtype=np.int64)


def _mosaic_block_stats(block: np.ndarray, size: int) -> np.ndarray:
    """(band, h, w) DN → (1 + 2·band, h/size, w/size): valid pixels, band sums, sums of squares."""
    valid = (block != 0).any(axis=0)
    out = [_per_patch_sum(valid, size)]
    for band in block:
        out.append(_per_patch_sum(band.astype(np.int64), size))
    for band in block:
        dn = band.astype(np.int64)
        out.append(_per_patch_sum(dn * dn, size))
    return np.stack(out)


def _label_block_counts(block: np.ndarray, size: int, table: ClassTable) -> np.ndarray:
    """(h, w) CLC codes → (h/size, w/size, K+1) pixel counts per class index; the last bin is unlabelled."""
    k = len(table)
    index = table.to_index(block).astype(np.int64)
    index[index == IGNORE_INDEX] = k
    h, w = block.shape
    nr, nc = h // size, w // size
    patch_id = (np.arange(h)[:, None] // size) * nc + (np.arange(w)[None, :] // size)
    counts = np.bincount((patch_id * (k + 1) + index).ravel(), minlength=nr * nc * (k + 1))
    return counts.reshape(nr, nc, k + 1)


def _cloud_block_counts(block: np.ndarray, size: int) -> np.ndarray:
    """(h, w) clear-observation counts → (h/size, w/size) pixels never seen clear."""
    return _per_patch_sum(block == 0, size)


def _patch_chunks(chunks: tuple[int, ...], size: int) -> tuple[int, ...]:
    return tuple(c // size for c in chunks)


def _crop(arr: xr.DataArray, nrows: int, ncols: int, size: int) -> da.Array:
    data = arr.data[..., : nrows * size, : ncols * size]
    bad = [c for axis in (-2, -1) for c in data.chunks[axis] if c % size]
    if bad:  # in-memory inputs chunked elsewhere: realign once
        chunk = _aligned_chunk(size)
        data = data.rechunk({data.ndim - 2: chunk, data.ndim - 1: chunk})
    return data


def _statistics(
    sources: _Sources, size: int, nrows: int, ncols: int, level: int, client: Any | None
) -> tuple[dict[str, np.ndarray], np.ndarray, dict[str, np.ndarray]]:
    """Per-patch statistics of every input, computed in one dask reduction."""
    full_table = ClassTable(level)
    graphs: dict[str, da.Array] = {}
    for season, arr in sources.mosaics.items():
        data = _crop(arr, nrows, ncols, size).rechunk({0: -1})
        nb = data.shape[0]
        graphs[f"mosaic/{season}"] = data.map_blocks(
            _mosaic_block_stats, size=size, dtype=np.int64,
            chunks=((1 + 2 * nb,), _patch_chunks(data.chunks[1], size), _patch_chunks(data.chunks[2], size)),
        )
    labels = _crop(sources.labels, nrows, ncols, size)
    graphs["labels"] = labels.map_blocks(
        _label_block_counts, size=size, table=full_table, dtype=np.int64, new_axis=2,
        chunks=(_patch_chunks(labels.chunks[0], size), _patch_chunks(labels.chunks[1], size),
                (len(full_table) + 1,)),
    )
    for season, arr in sources.clear.items():
        data = _crop(arr, nrows, ncols, size)
        graphs[f"clear/{season}"] = data.map_blocks(
            _cloud_block_counts, size=size, dtype=np.int64,
            chunks=(_patch_chunks(data.chunks[0], size), _patch_chunks(data.chunks[1], size)),
        )
    keys = list(graphs)
    log.info("computing per-patch statistics of %d raster(s), %d×%d patches of %d px",
             len(keys), nrows, ncols, size)
    if client is not None:
        values = client.gather(client.compute([graphs[k] for k in keys]))
    else:
        values = dask.compute(*[graphs[k] for k in keys], scheduler="threads")
    results = dict(zip(keys, values, strict=True))
    mosaic_stats = {s: results[f"mosaic/{s}"] for s in sources.mosaics}
    clear_stats = {s: results[f"clear/{s}"] for s in sources.clear}
    return mosaic_stats, results["labels"], clear_stats


# --------------------------------------------------------------------------- split


def _assign_blocks(
    usable_per_location: np.ndarray, split_block: int, val_fraction: float, seed: int
) -> np.ndarray:
    """Boolean (rows, cols) mask of validation locations: whole blocks, ≈ ``val_fraction`` of usable samples.

    Blocks are visited in a seeded random order; a block joins validation when doing so brings
    the validation share of usable samples closer to ``val_fraction``.
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


def _dilate(mask: np.ndarray, radius: int) -> np.ndarray:
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


# --------------------------------------------------------------------------- the index


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
    _sources: _Sources | None = field(default=None, repr=False)

    # ---- selection

    def samples(self, split: str) -> list[Sample]:
        """Usable samples of ``split`` (``"train"`` or ``"val"``) in index order (season, row, col)."""
        if split not in SPLITS:
            raise ConfigError(f"split must be one of {SPLITS}, not {split!r}.")
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

    def sources(self) -> _Sources:
        """The inputs opened lazily (chunks aligned to the patch size); opened once and kept."""
        if self._sources is None:
            if any(not p for p in (*self.mosaic_paths.values(), self.label_path)):
                raise InputError("This patch index was built from in-memory arrays that are gone: rebuild it.")
            self._sources, *_ = _open_sources(self.mosaic_paths, self.label_path, self.clear_paths,
                                              self.bands, self.patch_size)
            for season in self.seasons:
                assert_same_grid(geobox_of(self._sources.mosaics[season]), self.geobox,
                                 f"{season} mosaic", "patch index")
        return self._sources

    def windows(self, sample: Sample) -> tuple[da.Array, da.Array]:
        """Lazy (band, y, x) DN and (y, x) label code windows of one sample (chunk-aligned)."""
        src = self.sources()
        ys, xs = sample.window
        x = src.mosaic_files[sample.season].data[:, ys, xs]  # sliced from the opened array, then
        y = src.label_file.data[:, ys, xs]  # bands picked: see _Sources
        return x[src.band_index[sample.season]], y[0]

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
        if any(not p for p in (*self.mosaic_paths.values(), self.label_path)):
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
    """Read a patch index written by :meth:`PatchIndex.save` (``clc-dask patches --out``)."""
    directory = Path(directory)
    meta_path = directory / INDEX_FILE
    if not meta_path.is_file():
        raise InputError(
            f"{directory} holds no patch index ({INDEX_FILE} missing): make one with clc-dask patches --out."
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
            1 removes every training patch touching validation).
        seed: seeds which blocks go to validation.
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
    _check_settings(patch_size, val_fraction, split_block, guard,
                    max_nodata_fraction, max_cloud_fraction, max_unlabelled_fraction)
    band_order = composite_bands(bands) if bands is not None else None
    sources, mosaic_paths, label_path, clear_paths, band_order, geobox = _open_sources(
        mosaics, labels, clear_counts, band_order, patch_size)
    nrows, ncols = geobox.shape.y // patch_size, geobox.shape.x // patch_size
    if nrows == 0 or ncols == 0:
        raise ConfigError(
            f"The grid ({geobox.shape.y}×{geobox.shape.x} px) holds no whole {patch_size} px patch: "
            "choose a smaller --patch-size."
        )
    seasons = tuple(mosaics)
    mosaic_stats, label_counts, clear_stats = _statistics(sources, patch_size, nrows, ncols, level, client)
    table, location_usable = _sample_table(
        seasons, mosaic_stats, label_counts, clear_stats, patch_size, level, codes,
        max_nodata_fraction, max_cloud_fraction, max_unlabelled_fraction)
    _check_usable(table, max_nodata_fraction, max_cloud_fraction, max_unlabelled_fraction, clear_stats)

    if split_map is None:
        val_mask = _assign_blocks(location_usable, split_block, val_fraction, seed)
        guard_mask = _dilate(val_mask, guard) & ~val_mask
        split = np.where(val_mask, "val", np.where(guard_mask, "guard", "train"))
    else:
        split = _given_split(split_map, nrows, ncols, patch_size)
    table["split"] = split[table["row"].to_numpy(), table["col"].to_numpy()]
    table["block_row"] = table["row"] // split_block
    table["block_col"] = table["col"] // split_block

    present = _present_codes(table, level, codes)
    classes = ClassTable(level, list(present))
    normalization = _normalization(table, mosaic_stats, band_order)
    settings = {
        "val_fraction": val_fraction, "split_block": split_block, "guard": guard, "seed": seed,
        "level": level, "max_nodata_fraction": max_nodata_fraction,
        "max_cloud_fraction": max_cloud_fraction, "max_unlabelled_fraction": max_unlabelled_fraction,
        "split": "blocks" if split_map is None else "given",
    }
    columns = ["season", "row", "col", "y0", "x0", "block_row", "block_col", "split", "usable", "reason",
               "nodata_fraction", "cloud_fraction", "unlabelled_fraction"]
    table = table[columns + [c for c in table.columns if c.startswith("px_")]]
    index = PatchIndex(geobox, patch_size, seasons, band_order, classes, normalization,
                       table.reset_index(drop=True), settings, mosaic_paths, label_path, clear_paths,
                       _sources=sources)
    for split_name in SPLITS:
        if not index.samples(split_name) and split_map is not None:
            raise ConfigError(
                f"The {split_name} split has no usable patch ({index.counts()}): the `split_map` gives "
                f"it no location whose {patch_size} px patch is usable; give it more area."
            )
        if not index.samples(split_name):
            raise ConfigError(
                f"The {split_name} split has no usable patch ({index.counts()}): the area holds too few "
                f"blocks of {split_block}×{split_block} patches; lower --split-block or --patch-size, "
                "or use a larger area."
            )
    counts = index.counts()
    log.info("patch index: %d train / %d val usable samples (%d rejected), %d classes %s",
             counts["train"]["total"], counts["val"]["total"], counts["rejected"]["total"],
             len(classes), list(classes.codes))
    return index


def _check_settings(patch_size: int, val_fraction: float, split_block: int, guard: int,
                    *fractions: float) -> None:
    if patch_size < 32 or patch_size % 32:
        raise ConfigError(
            f"patch_size {patch_size} px must be a positive multiple of 32 (the U-Net halves it 5 "
            "times); the paper uses 128 or 256."
        )
    if not 0 < val_fraction < 1:
        raise ConfigError(f"val_fraction must lie strictly between 0 and 1 (paper ≈ 0.25), not {val_fraction}.")
    if split_block < 1 or guard < 0:
        raise ConfigError(f"split_block must be ≥ 1 and guard ≥ 0 patches (got {split_block}, {guard}).")
    for value in fractions:
        if not 0 <= value <= 1:
            raise ConfigError(f"Rejection thresholds are fractions in 0…1, not {value}.")


def _given_split(split_map: np.ndarray, nrows: int, ncols: int, size: int) -> np.ndarray:
    split = np.asarray(split_map).astype(str)
    if split.shape != (nrows, ncols):
        raise ConfigError(
            f"`split_map` has shape {split.shape} but the grid holds {nrows}×{ncols} whole patches of "
            f"{size} px: give one word per patch location."
        )
    return split


def _sample_table(
    seasons: tuple[str, ...], mosaic_stats: dict[str, np.ndarray], label_counts: np.ndarray,
    clear_stats: dict[str, np.ndarray], size: int, level: int, codes: Sequence[int] | None,
    max_nodata: float, max_cloud: float, max_unlabelled: float,
) -> tuple[pd.DataFrame, np.ndarray]:
    nrows, ncols, nbins = label_counts.shape
    all_codes = official_codes(level)
    area = float(size * size)
    counts = label_counts[..., : nbins - 1]
    unlabelled = label_counts[..., nbins - 1].astype(np.float64)
    if codes is not None:
        keep = np.isin(np.asarray(all_codes), np.asarray(list(codes)))
        unlabelled = unlabelled + counts[..., ~keep].sum(axis=-1)
        counts = np.where(keep, counts, 0)
    rows, cols = np.meshgrid(np.arange(nrows), np.arange(ncols), indexing="ij")
    frames = []
    location_usable = np.zeros((nrows, ncols), np.int64)
    for season in seasons:
        nodata = 1.0 - mosaic_stats[season][0] / area
        cloud = clear_stats[season] / area if season in clear_stats else np.zeros((nrows, ncols))
        unl = unlabelled / area
        reason = np.where(nodata > max_nodata, "nodata",
                          np.where(cloud > max_cloud, "cloud",
                                   np.where(unl > max_unlabelled, "unlabelled", "")))
        usable = reason == ""
        location_usable += usable
        frame = pd.DataFrame({
            "season": season, "row": rows.ravel(), "col": cols.ravel(),
            "y0": rows.ravel() * size, "x0": cols.ravel() * size,
            "usable": usable.ravel(), "reason": reason.ravel(),
            "nodata_fraction": nodata.ravel(), "cloud_fraction": np.asarray(cloud, float).ravel(),
            "unlabelled_fraction": unl.ravel(),
        })
        for k, code in enumerate(all_codes):
            column = counts[..., k].ravel()
            if column.any():
                frame[f"px_{code}"] = column
        frames.append(frame)
    table = pd.concat(frames, ignore_index=True).fillna(0)
    for col in [c for c in table.columns if c.startswith("px_")]:
        table[col] = table[col].astype(np.int64)
    return table, location_usable


def _check_usable(table: pd.DataFrame, max_nodata: float, max_cloud: float, max_unlabelled: float,
                  clear_stats: Mapping[str, np.ndarray]) -> None:
    if table["usable"].any():
        return
    reasons = table["reason"].value_counts().to_dict()
    hints = {
        "nodata": f"{reasons.get('nodata', 0)} with > {max_nodata:.0%} no data (raise --max-nodata-fraction)",
        "cloud": f"{reasons.get('cloud', 0)} with > {max_cloud:.0%} never-clear pixels "
                 "(raise --max-cloud-fraction)",
        "unlabelled": f"{reasons.get('unlabelled', 0)} with > {max_unlabelled:.0%} unlabelled pixels "
                      "(raise --max-unlabelled-fraction, or check that the label raster covers the mosaic)",
    }
    worst = max(hints, key=lambda k: reasons.get(k, 0))
    listed = "; ".join(hints[k] for k in ("nodata", "cloud", "unlabelled")
                       if k != "cloud" or clear_stats)
    raise ConfigError(
        f"Zero usable patches out of {len(table)}: {listed}. Most were rejected for "
        f"'{worst}': relax that threshold or check the inputs."
    )


def _present_codes(table: pd.DataFrame, level: int, codes: Sequence[int] | None) -> tuple[int, ...]:
    if codes is not None:
        return tuple(sorted(int(c) for c in codes))
    usable = table[table["usable"] & table["split"].isin(SPLITS)]
    present = [int(c[3:]) for c in table.columns if c.startswith("px_") and usable[c].sum() > 0]
    if not present:
        raise ConfigError("The usable patches hold no labelled pixel: check the label raster and --level.")
    return tuple(sorted(present))


def _normalization(table: pd.DataFrame, mosaic_stats: Mapping[str, np.ndarray],
                   bands: tuple[str, ...]) -> Normalization:
    """Per-band mean/std (reflectance) over valid pixels of the usable training samples (exact sums)."""
    nb = len(bands)
    n = 0
    sums = [0] * nb
    sumsq = [0] * nb
    train = table[(table["split"] == "train") & table["usable"]]
    for season, stats in mosaic_stats.items():
        rows = train[train["season"] == season]
        r, c = rows["row"].to_numpy(), rows["col"].to_numpy()
        n += int(stats[0][r, c].sum())
        for b in range(nb):
            sums[b] += int(stats[1 + b][r, c].sum())
            sumsq[b] += int(stats[1 + nb + b][r, c].sum())
    if n == 0:
        raise ConfigError("The training patches hold no valid (non-zero) pixel to normalise the bands with.")
    scale = 1e-4
    means = tuple(s / n * scale for s in sums)
    stds = tuple(max(math.sqrt(max(q / n - (s / n) ** 2, 0.0)) * scale, 1e-6)
                 for s, q in zip(sums, sumsq, strict=True))
    return Normalization(means, stds, scale)


# --------------------------------------------------------------------------- fetching patches


#: Patches computed per dask call: one call per patch costs ~15 ms of graph handling, 16 per
#: call ~3 ms each (measured on a 2-core machine).
FETCH_GROUP = 16


def _fetch(index: PatchIndex, samples: Sequence[Sample], client: Any | None, prefetch: int,
           group: int = FETCH_GROUP) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield raw (DN uint16 (band, y, x), label codes (y, x)) of ``samples`` in order.

    Samples are computed in groups of ``group`` windows per dask call, and at most about
    ``prefetch`` patches are being computed ahead of the consumer: futures on the cluster with
    a client, else threads running dask's synchronous scheduler.
    """
    if client is not None and not all((*index.mosaic_paths.values(), index.label_path)):
        raise ConfigError(
            "Patches of in-memory or lazily computed arrays cannot be streamed from a cluster (their "
            "graphs would be resubmitted for every patch): write the mosaics and labels to files "
            "first, or stream without a client."
        )
    prefetch = max(1, int(prefetch))
    group = max(1, min(int(group), prefetch))
    in_flight = max(1, math.ceil(prefetch / group))
    todo = iter([list(samples[i:i + group]) for i in range(0, len(samples), group)])
    pending: deque[Any] = deque()

    def windows(part: list[Sample]) -> list[da.Array]:
        # one stacked array per input and group: 2 result keys per group instead of 2 per patch
        pairs = [index.windows(sample) for sample in part]
        return [da.stack([x for x, _ in pairs]), da.stack([y for _, y in pairs])]

    if client is not None:
        def submit(part: list[Sample]) -> Any:
            return client.compute(windows(part))

        def result(item: Any) -> list[np.ndarray]:
            return client.gather(item)

        def cancel(item: Any) -> None:
            # Only drop our references (the scheduler forgets unreferenced futures). client.cancel
            # would cancel the *keys*, which the next epoch may request again at the same moment.
            pass

        pool = None
    else:
        pool = ThreadPoolExecutor(max_workers=min(in_flight, max(2, os.cpu_count() or 2)),
                                  thread_name_prefix="clc-patches")

        def submit(part: list[Sample]) -> Any:
            return pool.submit(dask.compute, *windows(part), scheduler="sync")

        def result(item: Any) -> list[np.ndarray]:
            return list(item.result())

        def cancel(item: Any) -> None:
            item.cancel()
    try:
        for part in todo:
            pending.append(submit(part))
            if len(pending) >= in_flight:
                break
        while pending:
            item = pending.popleft()
            nxt = next(todo, None)
            if nxt is not None:
                pending.append(submit(nxt))
            xs, ys = result(item)
            yield from zip(np.asarray(xs), np.asarray(ys), strict=True)
    finally:
        for item in pending:
            cancel(item)
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


def _to_tensors(x: np.ndarray, y: np.ndarray, normalization: Normalization,
                classes: ClassTable) -> tuple[torch.Tensor, torch.Tensor]:
    """DN (band, y, x) → normalised float32 tensor; codes (y, x) → uint8 class indices (255 ignore)."""
    dn = torch.from_numpy(np.ascontiguousarray(x, dtype=np.int32))[None]
    xt = normalization.apply(dn)[0]
    yt = torch.from_numpy(np.ascontiguousarray(classes.to_index(y), dtype=np.uint8))
    return xt, yt


class DaskPatchStream(IterableDataset):
    """Patches computed on the Dask cluster and streamed to the trainer in a seeded order.

    Each sample's window of the lazy mosaic and labels (inside one chunk, so only that window is
    read) is computed as a future; ``prefetch`` futures stay in flight ahead of the consumer so
    the model step does not wait. Without a client, threads run dask's local scheduler.

    Use with ``DataLoader(stream, batch_size=…, num_workers=0)`` (:func:`patch_loader`); the
    stream does its own prefetching and cannot be copied into loader worker processes.

    Args:
        index: the patch index.
        split: ``"train"`` or ``"val"``.
        seed: seeds the per-epoch order (:func:`epoch_order`).
        shuffle: shuffle each epoch (default: for ``train`` only).
        client: a ``distributed.Client``; None = local threaded scheduler.
        prefetch: patches computed ahead of the consumer. Raise it when the cluster is far away.
        limit: yield at most this many samples per epoch (a different seeded subset each epoch);
            None = all.
    """

    def __init__(self, index: PatchIndex, split: str = "train", *, seed: int = 0,
                 shuffle: bool | None = None, client: Any | None = None, prefetch: int = 16,
                 limit: int | None = None) -> None:
        super().__init__()
        self.index = index
        self.split = split
        self._samples = index.samples(split)
        self.seed = seed
        self.shuffle = (split == "train") if shuffle is None else shuffle
        self.client = client
        self.prefetch = prefetch
        self.limit = limit
        self.epoch = 0

    def __len__(self) -> int:
        return len(self._samples) if self.limit is None else min(len(self._samples), self.limit)

    @property
    def samples(self) -> list[Sample]:
        """The split's samples in index order."""
        return list(self._samples)

    def set_epoch(self, epoch: int) -> None:
        """Select the order of ``epoch`` for the next iteration."""
        self.epoch = int(epoch)

    def order(self, epoch: int | None = None) -> list[Sample]:
        """Samples in the order they are yielded in ``epoch`` (default: the current epoch)."""
        epoch = self.epoch if epoch is None else epoch
        return [self._samples[i] for i in epoch_order(len(self._samples), self.seed, epoch, self.shuffle,
                                                      self.limit)]

    def raw(self, epoch: int | None = None) -> Iterator[tuple[Sample, np.ndarray, np.ndarray]]:
        """Raw (sample, DN, label codes) in epoch order (used to fill the Zarr cache)."""
        order = self.order(epoch)
        for sample, (x, y) in zip(order, _fetch(self.index, order, self.client, self.prefetch), strict=True):
            yield sample, x, y

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if torch.utils.data.get_worker_info() is not None:
            raise ConfigError("DaskPatchStream prefetches on the cluster itself: use it with num_workers=0.")
        for _, x, y in self.raw():
            yield _to_tensors(x, y, self.index.normalization, self.index.classes)


# --------------------------------------------------------------------------- Zarr cache


def cache_patches(index: PatchIndex, store: str | os.PathLike[str], *, client: Any | None = None,
                  prefetch: int = 16, overwrite: bool = False) -> Path:
    """Write every usable patch (train, then val, in index order) to a Zarr store, once.

    Layout: ``x`` (N, band, size, size) uint16 DN and ``y`` (N, size, size) class codes, one chunk
    per patch; attributes hold the samples, bands, normalisation and the index fingerprint. The
    store is written under a temporary name and renamed into place when complete, so a killed
    run never leaves a store that looks finished. An existing complete store of the same index
    is reused unless ``overwrite``.

    Returns:
        The store path.
    """
    store = Path(store)
    fingerprint = index.fingerprint()
    if store.exists() and not overwrite:
        try:
            attrs = _open_cache(store)[0].attrs
            if attrs.get("complete") and attrs.get("fingerprint") == fingerprint:
                log.info("patch cache %s is up to date; reusing it", store)
                return store
        except InputError:
            pass
        log.info("patch cache %s belongs to another index; rewriting it", store)
    import zarr

    samples = [(s, split) for split in SPLITS for s in index.samples(split)]
    size, nb = index.patch_size, len(index.bands)
    label_dtype = index.sources().labels.dtype
    store.parent.mkdir(parents=True, exist_ok=True)
    tmp = store.with_name(f".{store.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        group = zarr.open_group(str(tmp), mode="w", zarr_format=3)
        x_arr = group.create_array("x", shape=(len(samples), nb, size, size), chunks=(1, nb, size, size),
                                   dtype="uint16", fill_value=0)
        y_arr = group.create_array("y", shape=(len(samples), size, size), chunks=(1, size, size),
                                   dtype=str(label_dtype), fill_value=0)
        order = [s for s, _ in samples]
        for i, (x, y) in enumerate(_fetch(index, order, client, prefetch)):
            x_arr[i] = x
            y_arr[i] = y
        group.attrs.update({
            "format": CACHE_FORMAT, "version": INDEX_VERSION, "fingerprint": fingerprint,
            "bands": list(index.bands), "patch_size": size,
            "classes": {"level": index.classes.level, "records": index.classes.as_records()},
            "normalization": index.normalization.as_dict(),
            "samples": [[s.season, s.row, s.col, split] for s, split in samples],
            "complete": True,
        })
        if store.exists():
            old = store.with_name(f".{store.name}.old-{uuid.uuid4().hex[:8]}")
            os.replace(store, old)
            os.replace(tmp, store)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, store)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("cached %d patches to %s", len(samples), store)
    return store


def _open_cache(store: Path) -> tuple[Any, Any, Any]:
    import zarr

    if not store.exists():
        raise InputError(f"Patch cache {store} does not exist: write it with clc-dask patches --cache-zarr.")
    try:
        group = zarr.open_group(str(store), mode="r")
        attrs = group.attrs
        if attrs.get("format") != CACHE_FORMAT or not attrs.get("complete"):
            raise InputError(f"{store} is not a complete clc-dask patch cache: rerun cache_patches.")
        return group, group["x"], group["y"]
    except InputError:
        raise
    except Exception as exc:
        raise InputError(f"Cannot open patch cache {store}: {exc}. Rerun clc-dask patches --cache-zarr.") from exc


class EpochSampler(Sampler[int]):
    """Positions of a map-style dataset in :func:`epoch_order` for the current epoch."""

    def __init__(self, n: int, seed: int, shuffle: bool, limit: int | None = None) -> None:
        self.n, self.seed, self.shuffle, self.limit, self.epoch = n, seed, shuffle, limit, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.n if self.limit is None else min(self.n, self.limit)

    def __iter__(self) -> Iterator[int]:
        return iter(int(i) for i in epoch_order(self.n, self.seed, self.epoch, self.shuffle, self.limit))


class ZarrPatchDataset(Dataset):
    """Patches read from a store written by :func:`cache_patches` (map-style; loader workers allowed).

    ``dataset[i]`` is the ``i``-th sample of ``split`` in index order; :meth:`sampler` gives the
    per-epoch order, identical to :class:`DaskPatchStream`'s for the same seed.

    Args:
        store: the Zarr store.
        split: ``"train"`` or ``"val"``.
        index: if given, the store must have been written from this index (else InputError).
        seed: seeds the per-epoch order.
        shuffle: shuffle each epoch (default: for ``train`` only).
        limit: at most this many samples per epoch (a different seeded subset each epoch).
        preload: read the whole split into memory on first use (one bulk read instead of one
            read per sample and epoch); for splits that fit in memory, with ``num_workers=0``.
    """

    def __init__(self, store: str | os.PathLike[str], split: str = "train", *, index: PatchIndex | None = None,
                 seed: int = 0, shuffle: bool | None = None, limit: int | None = None,
                 preload: bool = False) -> None:
        if split not in SPLITS:
            raise ConfigError(f"split must be one of {SPLITS}, not {split!r}.")
        self.store = Path(store)
        group, _, _ = _open_cache(self.store)
        attrs = dict(group.attrs)
        if index is not None and attrs.get("fingerprint") != index.fingerprint():
            raise InputError(
                f"Patch cache {self.store} was written from another patch index: rerun "
                "clc-dask patches --cache-zarr (or cache_patches) for this index."
            )
        self.split = split
        self.bands = tuple(attrs["bands"])
        self.normalization = Normalization.from_dict(attrs["normalization"])
        cls = attrs["classes"]
        self.classes = ClassTable.from_records(int(cls["level"]), cls["records"])
        size = int(attrs["patch_size"])
        rows = [(i, Sample(str(s), int(r), int(c), size)) for i, (s, r, c, sp) in enumerate(attrs["samples"])
                if sp == split]
        self._rows = [i for i, _ in rows]
        self.samples = [s for _, s in rows]
        self.seed = seed
        self.shuffle = (split == "train") if shuffle is None else shuffle
        self.limit = limit
        self.preload = preload
        self._arrays: tuple[Any, Any] | None = None

    def __len__(self) -> int:
        return len(self._rows)

    @property
    def nbytes(self) -> int:
        """Bytes of the split's patches (images and labels) as stored uncompressed."""
        _, x_arr, y_arr = _open_cache(self.store)
        per_row = (math.prod(x_arr.shape[1:]) * x_arr.dtype.itemsize
                   + math.prod(y_arr.shape[1:]) * y_arr.dtype.itemsize)
        return per_row * len(self._rows)

    def _open(self) -> tuple[Any, Any]:
        if self._arrays is None:  # opened lazily: once per loader worker process
            _, x_arr, y_arr = _open_cache(self.store)
            if self.preload:  # the split's samples in order: sample i is row i of these arrays
                rows = (np.asarray(self._rows, dtype=np.int64),)
                self._arrays = (x_arr.get_orthogonal_selection(rows), y_arr.get_orthogonal_selection(rows))
                log.info("read %d %s patches of %s into memory", len(self._rows), self.split, self.store)
            else:
                self._arrays = (x_arr, y_arr)
        return self._arrays

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x_arr, y_arr = self._open()
        row = i if self.preload else self._rows[i]
        return _to_tensors(x_arr[row], y_arr[row], self.normalization, self.classes)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        if not self.preload:  # Zarr handles are reopened in each loader worker
            state["_arrays"] = None
        return state

    def sampler(self) -> EpochSampler:
        """The per-epoch order of this dataset (call ``set_epoch`` on it each epoch)."""
        return EpochSampler(len(self), self.seed, self.shuffle, self.limit)


def patch_loader(dataset: DaskPatchStream | ZarrPatchDataset, batch_size: int, epoch: int = 0,
                 num_workers: int = 0) -> DataLoader:
    """A DataLoader giving the batches of ``epoch``, the same for a stream and a Zarr cache.

    ``num_workers`` applies to the Zarr cache only (the stream prefetches on the cluster).
    """
    if isinstance(dataset, DaskPatchStream):
        dataset.set_epoch(epoch)
        return DataLoader(dataset, batch_size=batch_size, num_workers=0)
    sampler = dataset.sampler()
    sampler.set_epoch(epoch)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      persistent_workers=False)
