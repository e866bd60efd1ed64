"""Patches computed on the Dask cluster (or local threads) and streamed to the trainer.

:func:`fetch_patches` computes the windows of a list of samples, a bounded number ahead of
the consumer; :class:`DaskPatchStream` is the torch ``IterableDataset`` built on it.
"""

from __future__ import annotations

import logging
import math
import os
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import dask
import dask.array as da
import numpy as np
import torch
from torch.utils.data import IterableDataset

from clc_dask.classes import ClassTable
from clc_dask.errors import ConfigError
from clc_dask.model import Normalization
from clc_dask.patches.index import PatchIndex, Sample
from clc_dask.patches.loader import epoch_order

log = logging.getLogger(__name__)

#: Patches computed per dask call: one call per patch costs ~15 ms of graph handling, 16 per
#: call ~3 ms each (measured on a 2-core machine).
FETCH_GROUP = 16


def fetch_patches(index: PatchIndex, samples: Sequence[Sample], client: Any | None, prefetch: int,
                  group: int = FETCH_GROUP) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield raw (DN uint16 (band, y, x), label codes (y, x)) of ``samples`` in order.

    Samples are computed in groups of ``group`` windows per dask call, and at most about
    ``prefetch`` patches are being computed ahead of the consumer: futures on the cluster with
    a client, else threads running dask's synchronous scheduler.

    Args:
        index: the patch index.
        samples: the samples, in the order to yield them.
        client: a ``distributed.Client``; None = threads in this process.
        prefetch: patches computed ahead of the consumer.
        group: patches per dask call.
    """
    if client is not None and not index.from_files:
        raise ConfigError(
            "Patches of in-memory or lazily computed arrays cannot be streamed from a cluster (their "
            "graphs would be resubmitted for every patch): write the mosaics and labels to files "
            "first, or stream without a `client`."
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


def to_tensors(x: np.ndarray, y: np.ndarray, normalization: Normalization,
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
        """Raw (sample, DN, label codes) in epoch order."""
        order = self.order(epoch)
        for sample, (x, y) in zip(order, fetch_patches(self.index, order, self.client, self.prefetch),
                                  strict=True):
            yield sample, x, y

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if torch.utils.data.get_worker_info() is not None:
            raise ConfigError("DaskPatchStream prefetches on the cluster itself: use it with `num_workers`=0.")
        for _, x, y in self.raw():
            yield to_tensors(x, y, self.index.normalization, self.index.classes)
