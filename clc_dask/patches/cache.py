"""A Zarr cache of patches: written once (:func:`cache_patches`), read by :class:`ZarrPatchDataset`.

Layout: ``x`` (N, band, size, size) uint16 DN and ``y`` (N, size, size) class codes, one chunk
per patch; the group's attributes hold the samples (train, then val, in index order), bands,
classes, normalisation and the index fingerprint. Samples and batches equal the stream's.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr
from torch.utils.data import Dataset

from clc_dask.classes import ClassTable
from clc_dask.errors import InputError
from clc_dask.model import Normalization
from clc_dask.patches.index import INDEX_VERSION, SPLITS, PatchIndex, Sample, check_split
from clc_dask.patches.loader import EpochSampler
from clc_dask.patches.stream import fetch_patches, to_tensors
from clc_dask.stores import ZARR_FORMAT, atomic_directory

log = logging.getLogger(__name__)

CACHE_FORMAT = "clc-dask-patch-cache"
#: Name of the cache store beside a saved patch index.
CACHE_STORE = "patches.zarr"


def cache_patches(index: PatchIndex, store: str | os.PathLike[str], *, client: Any | None = None,
                  prefetch: int = 16, overwrite: bool = False) -> Path:
    """Write every usable patch (train, then val, in index order) to a Zarr store, once.

    The store is written under a temporary name and renamed into place when complete
    (:func:`clc_dask.stores.atomic_directory`), so a killed run never leaves a store that looks
    finished. An existing complete store of the same index is reused unless ``overwrite``.

    Args:
        index: the patch index.
        store: the store directory (e.g. ``<index>/patches.zarr``).
        client: a ``distributed.Client`` computing the patches; None = threads in this process.
        prefetch: patches computed ahead of the writer.
        overwrite: rewrite a complete store of the same index.

    Returns:
        The store path.
    """
    store = Path(store)
    if store.exists() and not overwrite:
        if _is_cache_of(store, index.fingerprint()):
            log.info("patch cache %s is up to date; reusing it", store)
            return store
        log.info("patch cache %s belongs to another index; rewriting it", store)
    samples = [(s, split) for split in SPLITS for s in index.samples(split)]
    with atomic_directory(store) as tmp:
        _write_cache(index, tmp, samples, client, prefetch)
    log.info("cached %d patches to %s", len(samples), store)
    return store


def _is_cache_of(store: Path, fingerprint: str) -> bool:
    """True if ``store`` is a complete cache of the index with this fingerprint."""
    try:
        attrs = open_cache(store)[0].attrs
    except InputError:
        return False
    return bool(attrs.get("complete")) and attrs.get("fingerprint") == fingerprint


def _write_cache(index: PatchIndex, directory: Path, samples: list[tuple[Sample, str]], client: Any | None,
                 prefetch: int) -> None:
    """Fill a new Zarr group in ``directory`` with ``samples``; attributes (``complete``) last."""
    size, nb = index.patch_size, len(index.bands)
    label_dtype = index.sources().labels.dtype
    group = zarr.open_group(str(directory), mode="w", zarr_format=ZARR_FORMAT)
    x_arr = group.create_array("x", shape=(len(samples), nb, size, size), chunks=(1, nb, size, size),
                               dtype="uint16", fill_value=0)
    y_arr = group.create_array("y", shape=(len(samples), size, size), chunks=(1, size, size),
                               dtype=str(label_dtype), fill_value=0)
    order = [s for s, _ in samples]
    for i, (x, y) in enumerate(fetch_patches(index, order, client, prefetch)):
        x_arr[i] = x
        y_arr[i] = y
    group.attrs.update({
        "format": CACHE_FORMAT, "version": INDEX_VERSION, "fingerprint": index.fingerprint(),
        "bands": list(index.bands), "patch_size": size,
        "classes": {"level": index.classes.level, "records": index.classes.as_records()},
        "normalization": index.normalization.as_dict(),
        "samples": [[s.season, s.row, s.col, split] for s, split in samples],
        "complete": True,
    })


def open_cache(store: Path) -> tuple[Any, Any, Any]:
    """The group, ``x`` and ``y`` arrays of a complete patch cache.

    Raises:
        InputError: no store, not a patch cache, or an incomplete one.
    """
    if not store.exists():
        raise InputError(f"Patch cache {store} does not exist: write it with cache_patches.")
    try:
        group = zarr.open_group(str(store), mode="r")
        attrs = group.attrs
        if attrs.get("format") != CACHE_FORMAT or not attrs.get("complete"):
            raise InputError(f"{store} is not a complete clc-dask patch cache: rerun cache_patches.")
        return group, group["x"], group["y"]
    except InputError:
        raise
    except Exception as exc:
        raise InputError(f"Cannot open patch cache {store}: {exc}. Rerun cache_patches.") from exc


def _unreadable(x_arr: Any, y_arr: Any, row: int) -> bool:
    """True if the patch in ``row`` of the cache cannot be read."""
    try:
        x_arr[row], y_arr[row]
    except Exception:
        return True
    return False


def _damaged_cache_error(store: Path, x_arr: Any, y_arr: Any, row: int, error: Exception) -> InputError:
    """An InputError naming the chunk files of a patch that cannot be read."""
    files = [store / name / arr.metadata.encode_chunk_key((row, *[0] * (arr.ndim - 1)))
             for name, arr in (("x", x_arr), ("y", y_arr))]
    return InputError(
        f"The patch cache {store} is damaged: patch {row} (chunk file {files[0]} or {files[1]}) cannot be "
        f"read ({type(error).__name__}: {error}). Write it again (`cache_patches` with `overwrite`, or "
        "clc-dask patches --cache-zarr --overwrite), or delete it: training with data 'zarr' rebuilds a "
        "missing cache."
    )


class ZarrPatchDataset(Dataset):
    """Patches read from a store written by :func:`cache_patches` (map-style; loader workers allowed).

    ``dataset[i]`` is the ``i``-th sample of ``split`` in index order; :meth:`sampler` gives the
    per-epoch order, identical to :class:`~clc_dask.patches.DaskPatchStream`'s for the same seed.

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
        check_split(split)
        self.store = Path(store)
        group, _, _ = open_cache(self.store)
        attrs = dict(group.attrs)
        if index is not None and attrs.get("fingerprint") != index.fingerprint():
            raise InputError(
                f"Patch cache {self.store} was written from another patch index: rewrite it with "
                "cache_patches for this index."
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
        _, x_arr, y_arr = open_cache(self.store)
        per_row = (math.prod(x_arr.shape[1:]) * x_arr.dtype.itemsize
                   + math.prod(y_arr.shape[1:]) * y_arr.dtype.itemsize)
        return per_row * len(self._rows)

    def _open(self) -> tuple[Any, Any]:
        if self._arrays is None:  # opened lazily: once per loader worker process
            _, x_arr, y_arr = open_cache(self.store)
            if self.preload:  # the split's samples in order: sample i is row i of these arrays
                rows = (np.asarray(self._rows, dtype=np.int64),)
                try:
                    self._arrays = (x_arr.get_orthogonal_selection(rows), y_arr.get_orthogonal_selection(rows))
                except Exception as exc:
                    damaged = next((r for r in self._rows if _unreadable(x_arr, y_arr, r)), self._rows[0])
                    raise _damaged_cache_error(self.store, x_arr, y_arr, damaged, exc) from exc
                log.info("read %d %s patches of %s into memory", len(self._rows), self.split, self.store)
            else:
                self._arrays = (x_arr, y_arr)
        return self._arrays

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x_arr, y_arr = self._open()
        row = i if self.preload else self._rows[i]
        try:
            x, y = x_arr[row], y_arr[row]
        except Exception as exc:
            raise _damaged_cache_error(self.store, x_arr, y_arr, row, exc) from exc
        return to_tensors(x, y, self.normalization, self.classes)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        if not self.preload:  # Zarr handles are reopened in each loader worker
            state["_arrays"] = None
        return state

    def sampler(self) -> EpochSampler:
        """The per-epoch order of this dataset (call ``set_epoch`` on it each epoch)."""
        return EpochSampler(len(self), self.seed, self.shuffle, self.limit)
