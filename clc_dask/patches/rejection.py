"""The sample table: one row per (season, patch location), with why a sample is rejected.

A sample is rejected when its mosaic has too much no data, too many never-clear pixels, or
its location too many unlabelled pixels; the reasons are kept so a user sees which threshold
to relax.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from clc_dask.classes import official_codes
from clc_dask.errors import ConfigError


def sample_table(
    seasons: tuple[str, ...], mosaic_stats: Mapping[str, np.ndarray], label_counts: np.ndarray,
    clear_stats: Mapping[str, np.ndarray], size: int, level: int, codes: Sequence[int] | None,
    max_nodata: float, max_cloud: float, max_unlabelled: float,
) -> tuple[pd.DataFrame, np.ndarray]:
    """The sample table and the usable samples per location.

    Args:
        seasons: the seasons, in order.
        mosaic_stats: season → per-patch mosaic statistics (valid pixels first).
        label_counts: (rows, cols, K + 1) pixels per class index, the last bin unlabelled.
        clear_stats: season → (rows, cols) never-clear pixels (seasons without clear counts absent).
        size: patch edge (px).
        level: CLC level of the classes.
        codes: the classes to learn (others count as unlabelled); None = all.
        max_nodata: rejection threshold of the no-data fraction.
        max_cloud: rejection threshold of the never-clear fraction.
        max_unlabelled: rejection threshold of the unlabelled fraction.

    Returns:
        The table (``season, row, col, y0, x0, usable, reason``, fractions and ``px_<code>``
        pixel counts) and the (rows, cols) number of usable seasons per location.
    """
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


def check_usable(table: pd.DataFrame, max_nodata: float, max_cloud: float, max_unlabelled: float,
                 with_clear_counts: bool) -> None:
    """Raise :class:`ConfigError` naming the threshold to relax when no sample is usable."""
    if table["usable"].any():
        return
    reasons = table["reason"].value_counts().to_dict()
    hints = {
        "nodata": f"{reasons.get('nodata', 0)} with > {max_nodata:.0%} no data (raise `max_nodata_fraction`)",
        "cloud": f"{reasons.get('cloud', 0)} with > {max_cloud:.0%} never-clear pixels "
                 "(raise `max_cloud_fraction`)",
        "unlabelled": f"{reasons.get('unlabelled', 0)} with > {max_unlabelled:.0%} unlabelled pixels "
                      "(raise `max_unlabelled_fraction`, or check that the label raster covers the mosaic)",
    }
    worst = max(hints, key=lambda k: reasons.get(k, 0))
    listed = "; ".join(hints[k] for k in ("nodata", "cloud", "unlabelled")
                       if k != "cloud" or with_clear_counts)
    raise ConfigError(
        f"Zero usable patches out of {len(table)}: {listed}. Most were rejected for "
        f"'{worst}': relax that threshold or check the inputs."
    )
