"""The demo's training stage: the ``cpu-demo`` preset on the demo mosaics, resumable."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from clc_dask.patches import Source
from clc_dask.presets import get_preset
from clc_dask.train import TrainResult, train_from_mosaics

log = logging.getLogger(__name__)

#: Smallest demo region (px) whose training area (north of the held-out quarter) holds the
#: ``cpu-demo`` validation strip behind a guard band of its network's receptive field (576 px).
MIN_GUARDED_SIZE = 2048


def demo_guard(size: int) -> int | None:
    """The guard band a ``size`` px demo region trains with: the preset's (``auto``, the
    receptive field) from :data:`MIN_GUARDED_SIZE` px, else 0 — a smaller region has no room for
    one, and its validation scores are optimistic (logged)."""
    if size >= MIN_GUARDED_SIZE:
        return None
    log.warning("the %d px demo region is too small for a guard band of the network's receptive field "
                "around validation (from %d px): validating without one, scores are optimistic",
                size, MIN_GUARDED_SIZE)
    return 0


def train_demo(
    mosaics: Mapping[str, Source],
    labels: Source,
    out_dir: str | os.PathLike[str],
    *,
    preset: str = "cpu-demo",
    client: Any | None = None,
    clear_counts: Mapping[str, Source] | None = None,
    progress: bool | None = None,
    epochs: int | None = None,
    guard: int | str | None = None,
) -> TrainResult:
    """The demo's training stage: patch index in ``out_dir/patches``, model in ``out_dir/train``.

    Re-running on the same folder continues (or returns) the earlier run instead of starting over.

    Args:
        mosaics: season → mosaic COG (e.g. ``{"september": "mosaic_september.tif"}``).
        labels: the CLC label raster on the same grid.
        out_dir: working folder of the demo's training stage.
        preset: a preset name (``clc_dask.presets``); ``cpu-demo`` fits 2 CPU cores.
        client: a ``distributed.Client`` that computes the patch index and the patches; None =
            dask's threaded scheduler in this process. ``cpu-demo`` caches the patches to Zarr
            once (on the cluster) and trains from the cache, so a LocalCluster on the same cores
            never competes with the model step (streaming from it would: see
            ``benchmarks/bench_patch_stream.py``).
        clear_counts: optional season → clear-count raster.
        progress: progress bar (default: when stderr is a terminal).
        epochs: override the preset's number of epochs (e.g. a quick look).
        guard: override the preset's guard band around validation (patches, or ``auto``: the
            encoder's receptive field); 0 for regions too small to hold one.
    """
    config = get_preset(preset, epochs=epochs, guard=guard)
    out_dir = Path(out_dir)
    return train_from_mosaics(config, mosaics, labels, out_dir / "train", clear_counts=clear_counts,
                              index_dir=out_dir / "patches", client=client, resume=True, progress=progress)
