"""The order of samples in an epoch, and the DataLoader that gives an epoch's batches.

The order depends only on ``(seed, epoch)`` (:func:`epoch_order`), for a stream and a Zarr
cache alike, which makes training resumable with identical results.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool = True, limit: int | None = None) -> np.ndarray:
    """Positions ``0…n-1`` in the order of one epoch: a pure function of ``(seed, epoch)``.

    Both data paths (stream and Zarr cache) use it, and resuming training at epoch ``k``
    replays exactly the order an uninterrupted run would have used. ``limit`` keeps the first
    ``limit`` positions: a different seeded subset each epoch.
    """
    order = np.random.default_rng([int(seed), int(epoch)]).permutation(n) if shuffle else np.arange(n)
    return order if limit is None else order[: max(0, int(limit))]


class EpochSampler(Sampler[int]):
    """Positions of a map-style dataset in :func:`epoch_order` for the current epoch."""

    def __init__(self, n: int, seed: int, shuffle: bool, limit: int | None = None) -> None:
        self.n, self.seed, self.shuffle, self.limit, self.epoch = n, seed, shuffle, limit, 0

    def set_epoch(self, epoch: int) -> None:
        """Select the order of ``epoch`` for the next iteration."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.n if self.limit is None else min(self.n, self.limit)

    def __iter__(self) -> Iterator[int]:
        return iter(int(i) for i in epoch_order(self.n, self.seed, self.epoch, self.shuffle, self.limit))


@runtime_checkable
class EpochStream(Protocol):
    """An iterable dataset yielding the samples of the epoch chosen by ``set_epoch``
    (:class:`~clc_dask.patches.DaskPatchStream`)."""

    def set_epoch(self, epoch: int) -> None:
        """Select the order of ``epoch`` for the next iteration."""

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...


@runtime_checkable
class EpochDataset(Protocol):
    """A map-style dataset whose per-epoch order is its ``sampler()``
    (:class:`~clc_dask.patches.ZarrPatchDataset`)."""

    def sampler(self) -> EpochSampler:
        """The per-epoch order of the dataset."""

    def __len__(self) -> int: ...

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]: ...


def patch_loader(dataset: EpochStream | EpochDataset, batch_size: int, epoch: int = 0,
                 num_workers: int = 0) -> DataLoader:
    """A DataLoader giving the batches of ``epoch``, the same for a stream and a Zarr cache.

    Args:
        dataset: a :class:`~clc_dask.patches.DaskPatchStream` or
            :class:`~clc_dask.patches.ZarrPatchDataset`.
        batch_size: samples per batch (the last batch may be smaller).
        epoch: the epoch whose order to give.
        num_workers: loader worker processes; applies to the Zarr cache only (the stream
            prefetches on the cluster itself).
    """
    if isinstance(dataset, EpochStream):
        dataset.set_epoch(epoch)
        return DataLoader(dataset, batch_size=batch_size, num_workers=0)
    sampler = dataset.sampler()
    sampler.set_epoch(epoch)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      persistent_workers=False)
