"""What the demo notebooks share: one layout of the work folder, the earlier stages made
again when a notebook runs on a fresh folder, and CLC maps in official colours.

Every notebook takes a ``WORKDIR``. Run in order, each one reuses what the earlier ones wrote
there; run alone on an empty folder, it makes its inputs with the functions below (the same
library calls the earlier notebooks show step by step). Layout::

    WORKDIR/region.json, clc/, stac/            the demo region (clc_dask.demo)
    WORKDIR/items.json                          scenes found by the search (notebook 01)
    WORKDIR/mosaics/mosaic_<season>.tif         NRG mosaics + *_clear_count.tif (01)
    WORKDIR/labels/clc_level2.tif               CLC Level-2 codes on the mosaic grid (02)
    WORKDIR/patches/                            patch index, split, class statistics (02)
    WORKDIR/train/                              checkpoints and metrics.csv (03)
    WORKDIR/predict/, WORKDIR/evaluation/       class map, report, tables, figures (04)
    WORKDIR/run/                                run config, AOI and the run's store (05)
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.patches import Patch

from clc_dask.classes import colormap, label_of
from clc_dask.demo import DemoRegion, build_region
from clc_dask.demo.training import demo_guard
from clc_dask.labels import make_labels, write_labels
from clc_dask.mosaic import make_mosaic, mosaic_paths, write_mosaic
from clc_dask.patches import PatchIndex, load_patch_index
from clc_dask.presets import get_preset
from clc_dask.seasons import SEASON_MONTHS, SEASONS
from clc_dask.train import BEST_FILE, CHECKPOINT_FILE, index_for_config, train

log = logging.getLogger(__name__)

#: The preset every notebook trains and predicts with (ResNet18, NRG, 64 px, September).
PRESET = "cpu-demo"
#: CLC level of the labels and maps.
LEVEL = 2
#: Scenes with more cloud cover (%) are left out of the mosaics (notebook 01's default).
MAX_CLOUD = 50.0
#: Month of each season in the demo region's scenes.
SEASON_MONTH = SEASON_MONTHS


@dataclass(frozen=True)
class DemoPaths:
    """Where each stage of the notebooks reads and writes, inside one work folder."""

    root: Path

    @property
    def items(self) -> Path:
        return self.root / "items.json"

    def mosaic(self, season: str) -> Path:
        """NRG mosaic COG of ``season`` (band, y, x) uint16."""
        return self.root / "mosaics" / f"mosaic_{season}.tif"

    def clear_count(self, season: str) -> Path:
        """Clear-observation count of ``season`` (written beside the mosaic)."""
        return mosaic_paths(self.mosaic(season))[1]

    @property
    def labels(self) -> Path:
        return self.root / "labels" / f"clc_level{LEVEL}.tif"

    @property
    def patches(self) -> Path:
        return self.root / "patches"

    @property
    def train(self) -> Path:
        return self.root / "train"

    @property
    def checkpoint(self) -> Path:
        """The best checkpoint (by validation mIoU), else the last one."""
        best = self.train / BEST_FILE
        return best if best.exists() else self.train / CHECKPOINT_FILE

    @property
    def predict(self) -> Path:
        return self.root / "predict"

    @property
    def evaluation(self) -> Path:
        return self.root / "evaluation"

    @property
    def run(self) -> Path:
        return self.root / "run"


def demo_paths(workdir: str | os.PathLike[str]) -> DemoPaths:
    """The layout of ``workdir`` (``~`` expanded, made absolute, created if missing)."""
    root = Path(workdir).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    return DemoPaths(root)


def ensure_mosaic(region: DemoRegion, paths: DemoPaths, season: str, chunk_size: int = 256,
                  max_cloud: float = MAX_CLOUD) -> Path:
    """The NRG mosaic of ``season`` (and its clear count), made from the region's scenes if missing.

    Args:
        region: the demo region.
        paths: the work folder's layout.
        season: ``april``, ``july`` or ``september``.
        chunk_size: dask chunk edge in pixels.
        max_cloud: scenes with more cloud cover (%) are left out, as in notebook 01.
    """
    if season not in SEASONS:
        raise ValueError(f"season {season!r} is not one of {SEASONS}")
    out = paths.mosaic(season)
    if out.exists() and paths.clear_count(season).exists():
        return out
    log.info("making the %s mosaic in %s", season, out)
    out.parent.mkdir(parents=True, exist_ok=True)
    mosaic = make_mosaic(str(region.catalog_path), grid=region.geobox, season=season, years=[region.year],
                         max_cloud=max_cloud, collection=region.collection_id, composite="nrg",
                         chunk_size=chunk_size)
    write_mosaic(mosaic, out)
    return out


def ensure_labels(region: DemoRegion, paths: DemoPaths, chunk_size: int = 256) -> Path:
    """CLC Level-2 codes rasterized on the September mosaic's grid, made if missing."""
    if paths.labels.exists():
        return paths.labels
    mosaic = ensure_mosaic(region, paths, "september", chunk_size)
    paths.labels.parent.mkdir(parents=True, exist_ok=True)
    labels = make_labels(region.clc_path, like=mosaic, level=LEVEL, chunk_size=chunk_size)
    return write_labels(labels, paths.labels)


def ensure_patch_index(region: DemoRegion, paths: DemoPaths, client: Any = None,
                       chunk_size: int = 256) -> PatchIndex:
    """The :data:`PRESET` patch index saved in ``paths.patches``, built if missing."""
    if (paths.patches / "patch_index.json").exists():
        return load_patch_index(paths.patches)
    config = get_preset(PRESET, guard=demo_guard(region.size))
    mosaics = {s: ensure_mosaic(region, paths, s, chunk_size) for s in config.seasons}
    labels = ensure_labels(region, paths, chunk_size)
    index = index_for_config(config, mosaics, labels,
                             clear_counts={s: paths.clear_count(s) for s in config.seasons}, client=client)
    index.save(paths.patches)
    return index


def ensure_checkpoint(region: DemoRegion, paths: DemoPaths, epochs: int, client: Any = None,
                      chunk_size: int = 256) -> Path:
    """A trained :data:`PRESET` checkpoint in ``paths.train``, trained for ``epochs`` if missing."""
    if paths.checkpoint.exists():
        return paths.checkpoint
    index = ensure_patch_index(region, paths, client, chunk_size)
    train(get_preset(PRESET, epochs=epochs, guard=demo_guard(region.size)), index, paths.train, client=client,
          progress=False)
    return paths.checkpoint


def open_demo(workdir: str | os.PathLike[str], size: int, seed: int) -> tuple[DemoRegion, DemoPaths]:
    """Build (or reuse) the demo region in ``workdir``; return it with the folder's layout."""
    paths = demo_paths(workdir)
    return build_region(paths.root, size, seed), paths


# --------------------------------------------------------------------------- maps


def clc_rgba(codes: np.ndarray, level: int = LEVEL) -> np.ndarray:
    """CLC codes → RGBA floats (0–1) in the official colours; no data (0) transparent."""
    lut = np.zeros((1000, 4), dtype=np.float32)
    for code, rgba in colormap(level).items():
        lut[code] = np.asarray(rgba, dtype=np.float32) / 255
    values = np.asarray(codes).astype(np.int64)
    return lut[np.where((values < 0) | (values > 999), 0, values)]


def clc_legend(ax: Axes, codes: np.ndarray, level: int = LEVEL, **kwargs: Any) -> None:
    """A legend of the CLC classes present in ``codes`` (official colour, code and label)."""
    present = [int(c) for c in np.unique(np.asarray(codes)) if c != 0]
    cmap = colormap(level)
    handles = [Patch(facecolor=np.asarray(cmap[c][:3]) / 255, label=f"{c} {label_of(c)}") for c in present]
    ax.legend(handles=handles, title=f"CLC Level {level}", fontsize=7, title_fontsize=8,
              frameon=False, **({"loc": "center left", "bbox_to_anchor": (1.01, 0.5)} | kwargs))


def extent_km(region_or_bounds: DemoRegion | tuple[float, float, float, float]) -> tuple[float, float, float, float]:
    """``imshow`` extent (left, right, bottom, top) in km of a region or (left, bottom, right, top) bounds."""
    bounds = region_or_bounds.bounds if isinstance(region_or_bounds, DemoRegion) else region_or_bounds
    left, bottom, right, top = bounds
    return left / 1000, right / 1000, bottom / 1000, top / 1000
