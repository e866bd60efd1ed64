"""`clc-dask patches`: a patch index (spatial train/validation split, class statistics) from mosaics."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated

import typer

from clc_dask.cli.options import parse_guard
from clc_dask.cluster import connect
from clc_dask.errors import ConfigError
from clc_dask.model import receptive_field
from clc_dask.patches import (
    CACHE_STORE,
    SPLITS,
    PatchIndex,
    clear_counts_beside,
    guard_patches,
    write_patch_index,
)
from clc_dask.seasons import SEASONS

log = logging.getLogger(__name__)

MOSAIC_HELP = "SEASON=PATH of a mosaic COG or Zarr store (repeat for several seasons, e.g. september=… april=…)."
CLEAR_HELP = ("SEASON=PATH of a clear-count raster (default: the <mosaic>_clear_count.tif that "
              "clc-dask mosaic writes, if present).")
SCHEDULER_HELP = "Dask scheduler address (default: DASK_SCHEDULER_ADDRESS, else threads in this process)."


def parse_season_paths(values: Sequence[str] | None, option: str) -> dict[str, Path]:
    """``["september=a.tif", "april=b.tif"]`` → ``{"september": Path("a.tif"), …}``, checked."""
    out: dict[str, Path] = {}
    for value in values or []:
        season, sep, path = value.partition("=")
        season = season.strip().lower()
        if not sep or not path.strip():
            raise ConfigError(f"{option} {value!r} is not SEASON=PATH: e.g. {option} september=mosaic_sep.tif.")
        if season not in SEASONS:
            raise ConfigError(f"{option} {value!r}: season {season!r} is not one of {', '.join(SEASONS)}.")
        if season in out:
            raise ConfigError(f"{option} gives season {season!r} twice: give one path per season.")
        out[season] = Path(path.strip())
    return out


def print_summary(index: PatchIndex) -> None:
    """Table 1 of the paper for this index (usable patches per split and season) and rare classes."""
    counts = index.counts()
    seasons = list(index.seasons)
    header = f"{'':<12}" + "".join(f"{s:>12}" for s in seasons) + f"{'total':>10}"
    typer.echo(header)
    for row in (*SPLITS, "rejected"):
        typer.echo(f"{row:<12}" + "".join(f"{counts[row][s]:>12}" for s in seasons)
                   + f"{counts[row]['total']:>10}")
    stats = index.class_statistics()
    typer.echo(f"\n{'code':>5} {'label':<48}{'train px':>11}{'val px':>10}{'train p.':>9}{'val p.':>7}  note")
    for rec in stats.to_dict("records"):
        typer.echo(f"{rec['code']:>5} {rec['label'][:47]:<48}{rec['train_pixels']:>11}{rec['val_pixels']:>10}"
                   f"{rec['train_patches']:>9}{rec['val_patches']:>7}  {'RARE: ' + rec['note'] if rec['rare'] else ''}")


def register(app: typer.Typer) -> None:
    """Add the `patches` command to `app`."""

    @app.command("patches")
    def patches(
        mosaics: Annotated[list[str], typer.Option("--mosaic", help=MOSAIC_HELP)],
        labels: Annotated[Path, typer.Option("--labels", help="CLC code raster on the mosaics' grid "
                          "(clc-dask labels --like MOSAIC).")],
        out_dir: Annotated[Path, typer.Option("--out", help="Folder for the index (patch_index.json, "
                           "patches.csv, class_stats.json/csv).")],
        clear_counts: Annotated[list[str] | None, typer.Option("--clear", help=CLEAR_HELP)] = None,
        patch_size: Annotated[int, typer.Option("--patch-size", help="Patch edge in px, a multiple "
                              "of 32 (paper: 128 or 256).")] = 256,
        bands: Annotated[str | None, typer.Option("--composite", help="rgb, nrg, all or a band "
                         "list (default: every band of the mosaic).")] = None,
        level: Annotated[int, typer.Option("--level", help="CLC level of the classes.")] = 2,
        val_fraction: Annotated[float, typer.Option("--val-fraction", help="Validation share "
                                "(paper ≈ 0.25).")] = 0.25,
        split_block: Annotated[int, typer.Option("--split-block", help="Split blocks of N×N "
                               "patches go wholly to train or validation.")] = 4,
        guard: Annotated[str, typer.Option("--guard", help="Drop training patches within N patches "
                         "of validation; auto (default): the receptive field of --encoder.")] = "auto",
        encoder: Annotated[str, typer.Option("--encoder", help="The network the patches are for: "
                           "its receptive field sizes --guard auto.")] = "resnet34",
        val_side: Annotated[str, typer.Option("--val-side", help="Validation as a strip along north, "
                            "south (default), east or west, or blocks (seeded split blocks).")] = "south",
        seed: Annotated[int, typer.Option("--seed", help="Seeds the block split.")] = 0,
        max_nodata_fraction: Annotated[float, typer.Option("--max-nodata-fraction")] = 0.5,
        max_cloud_fraction: Annotated[float, typer.Option("--max-cloud-fraction")] = 0.5,
        max_unlabelled_fraction: Annotated[float, typer.Option("--max-unlabelled-fraction")] = 0.5,
        cache_zarr: Annotated[bool, typer.Option("--cache-zarr", help=f"Also write every usable "
                              f"patch to OUT/{CACHE_STORE} (read by clc-dask train --data zarr).")] = False,
        scheduler: Annotated[str | None, typer.Option("--scheduler", "--address", help=SCHEDULER_HELP)] = None,
        overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing index.")] = False,
    ) -> None:
        """Cut mosaics into patches, reject no-data/cloud/unlabelled ones, split train/val by blocks."""
        season_mosaics = parse_season_paths(mosaics, "--mosaic")
        clear = clear_counts_beside(season_mosaics, parse_season_paths(clear_counts, "--clear"))
        guard_width = parse_guard(guard)
        if guard_width == "auto":
            guard_width = guard_patches(receptive_field(encoder), patch_size)
        with connect(scheduler) as client:
            index = write_patch_index(
                season_mosaics, labels, out_dir, patch_size=patch_size, bands=bands, level=level,
                val_fraction=val_fraction, split_block=split_block, guard=guard_width, seed=seed,
                val_side=val_side,
                max_nodata_fraction=max_nodata_fraction, max_cloud_fraction=max_cloud_fraction,
                max_unlabelled_fraction=max_unlabelled_fraction, clear_counts=clear,
                cache_zarr=cache_zarr, overwrite=overwrite, client=client,
            )
        print_summary(index)
        typer.echo(f"\nPatch index written to {out_dir}")
