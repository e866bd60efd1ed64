"""`clc-dask train`: train a U-Net on a patch index (or on mosaics directly), resumable."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Any

import typer

from clc_dask.cli.options import parse_guard
from clc_dask.cli.patches import CLEAR_HELP, MOSAIC_HELP, SCHEDULER_HELP, parse_season_paths
from clc_dask.cluster import connect
from clc_dask.errors import ConfigError
from clc_dask.patches import clear_counts_beside, load_patch_index
from clc_dask.presets import get_preset, preset_names
from clc_dask.train import (
    TrainConfig,
    TrainResult,
    config_for_index,
    make_train_config,
    train,
    train_from_mosaics,
)

log = logging.getLogger(__name__)


def print_result(result: TrainResult) -> None:
    """Best epoch, its per-class IoU, and where the files are."""
    typer.echo(f"Trained {result.epochs_run} epoch(s) in {result.seconds / 60:.1f} min.")
    if result.best_epoch is not None:
        best = result.history[result.best_epoch - 1]
        typer.echo(f"Best validation mIoU {result.best_val_miou:.3f} at epoch {result.best_epoch} "
                   f"(val loss {best['val_loss']:.4f}, overall accuracy {best['val_overall_accuracy']:.3f}).")
        for code in result.classes.codes:
            iou = best.get(f"iou_{code}")
            typer.echo(f"  {code:>3} {result.classes.label(code)[:45]:<46} IoU {'-' if iou is None else f'{iou:.3f}'}")
    typer.echo(f"Checkpoint {result.checkpoint}; best {result.best_checkpoint}; metrics {result.metrics_csv}")


def _channels(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        return tuple(int(c) for c in text.split(",") if c.strip())
    except ValueError:
        raise ConfigError(f"--decoder-channels {text!r} must be whole numbers separated by commas, "
                          "e.g. 128,64,32,16,8.") from None


def _check_data_options(patches: Path | None, mosaics: list[str] | None, labels: Path | None,
                        preset: str | None, composite: str | None, patch_size: int | None,
                        split: tuple[str | None, str | None] = (None, None)) -> None:
    """The options that choose the training data go together (checked before any work)."""
    if (patches is None) == (not mosaics):
        raise ConfigError("Give the training data: either --patches INDEX_DIR or --mosaic SEASON=PATH "
                          "(with --labels), not both or neither.")
    if mosaics and labels is None:
        raise ConfigError("--mosaic needs --labels LABELS.tif (the CLC code raster on the same grid).")
    if patches is not None and (composite or patch_size):
        raise ConfigError("--composite/--patch-size apply to --mosaic; a patch index has them "
                          "fixed (rebuild it with clc-dask patches to change them).")
    if patches is not None and any(split):
        raise ConfigError("--guard/--val-side shape the split of a new patch index (with --mosaic); "
                          "a patch index has its split fixed (rebuild it with clc-dask patches).")
    if preset and (composite or patch_size):
        raise ConfigError("--composite/--patch-size conflict with --preset, which fixes them: "
                          "drop them or the preset.")


def _config(base: TrainConfig, settings: dict[str, Any], no_weights: bool) -> TrainConfig:
    """``base`` with the command's settings; ``--encoder-weights none`` clears a preset's weights."""
    config = make_train_config(base, **settings)
    return config.model_copy(update={"encoder_weights": None}) if no_weights else config


def register(app: typer.Typer) -> None:
    """Add the `train` command to `app`."""

    @app.command("train")
    def train_command(
        out_dir: Annotated[Path, typer.Option("--out", help="Run folder: checkpoint.pt, best.pt, "
                           "metrics.csv, metrics.json.")],
        preset: Annotated[str | None, typer.Option("--preset", help="A named configuration: "
                          + ", ".join(preset_names()) + ".")] = None,
        patches: Annotated[Path | None, typer.Option("--patches", help="Patch index folder "
                           "(clc-dask patches --out).")] = None,
        mosaics: Annotated[list[str] | None, typer.Option("--mosaic", help=MOSAIC_HELP + " Instead "
                           "of --patches: the index is built with the preset's settings.")] = None,
        labels: Annotated[Path | None, typer.Option("--labels", help="CLC code raster (with --mosaic).")] = None,
        clear_counts: Annotated[list[str] | None, typer.Option("--clear", help=CLEAR_HELP)] = None,
        composite: Annotated[str | None, typer.Option("--composite", help="rgb, nrg or all "
                             "(with --mosaic and no preset; default nrg).")] = None,
        patch_size: Annotated[int | None, typer.Option("--patch-size", help="Patch edge in px "
                              "(with --mosaic and no preset; default 256).")] = None,
        epochs: Annotated[int | None, typer.Option("--epochs", min=1)] = None,
        batch_size: Annotated[int | None, typer.Option("--batch-size", min=1)] = None,
        lr: Annotated[float | None, typer.Option("--lr", help="Adam learning rate.")] = None,
        encoder: Annotated[str | None, typer.Option("--encoder", help="resnet18, resnet34, "
                           "resnet50 or resnet101.")] = None,
        encoder_weights: Annotated[str | None, typer.Option("--encoder-weights", help="imagenet or "
                                   "none.")] = None,
        loss: Annotated[str | None, typer.Option("--loss", help="ce or ce+dice.")] = None,
        class_weights: Annotated[str | None, typer.Option("--class-weights", help="none, "
                                 "inverse-frequency or inverse-sqrt-frequency.")] = None,
        decoder_channels: Annotated[str | None, typer.Option("--decoder-channels", help="U-Net decoder "
                                    "channels, deepest first, e.g. 128,64,32,16,8 (default "
                                    "256,128,64,32,16).")] = None,
        amp: Annotated[str | None, typer.Option("--amp", help="Mixed precision: auto (CUDA only), "
                       "bf16 (CUDA, or CPUs with native bfloat16), fp16 (CUDA) or off.")] = None,
        augment: Annotated[bool | None, typer.Option("--augment/--no-augment", help="Random flips "
                           "and 90° rotations.")] = None,
        seed: Annotated[int | None, typer.Option("--seed")] = None,
        device: Annotated[str | None, typer.Option("--device", help="auto, cpu or cuda.")] = None,
        data: Annotated[str | None, typer.Option("--data", help="stream (from Dask) or zarr "
                        "(cache the patches once, then read them).")] = None,
        num_workers: Annotated[int | None, typer.Option("--num-workers", min=0, help="DataLoader "
                               "workers (zarr data only).")] = None,
        val_every: Annotated[int | None, typer.Option("--val-every", min=1)] = None,
        guard: Annotated[str | None, typer.Option("--guard", help="Guard band around validation, in "
                         "patches, or auto: the encoder's receptive field (default).")] = None,
        val_side: Annotated[str | None, typer.Option("--val-side", help="Validation as a strip along "
                            "north, south (default), east or west, or blocks (seeded split blocks).")] = None,
        resume: Annotated[bool, typer.Option("--resume", help="Continue from OUT/checkpoint.pt "
                          "(same settings; --epochs may grow).")] = False,
        init_checkpoint: Annotated[Path | None, typer.Option("--init", help="Start from this checkpoint's "
                                   "weights (fine-tuning; bands and classes must match).")] = None,
        scheduler: Annotated[str | None, typer.Option("--scheduler", "--address", help=SCHEDULER_HELP)] = None,
        overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing run in --out.")] = False,
        progress: Annotated[bool | None, typer.Option("--progress/--no-progress", help="Progress bar "
                            "(default: on a terminal).")] = None,
    ) -> None:
        """Train a U-Net/ResNet (Adam) and write checkpoints and per-epoch metrics."""
        _check_data_options(patches, mosaics, labels, preset, composite, patch_size, (guard, val_side))
        no_weights = encoder_weights is not None and encoder_weights.lower() == "none"
        settings = dict(epochs=epochs, batch_size=batch_size, lr=lr, encoder=encoder,
                        encoder_weights=None if no_weights else encoder_weights, loss=loss,
                        class_weights=class_weights, augment=augment, seed=seed, device=device, data=data,
                        num_workers=num_workers, val_every=val_every, amp=amp,
                        decoder_channels=_channels(decoder_channels), guard=parse_guard(guard),
                        val_side=val_side)
        base = get_preset(preset) if preset else None
        run = dict(resume=resume, init_checkpoint=init_checkpoint, progress=progress, overwrite=overwrite)
        if patches is not None:
            index = load_patch_index(patches)
            config = _config(base or config_for_index(index), settings, no_weights)
            with connect(scheduler) as client:
                result = train(config, index, out_dir, client=client, **run)
        else:
            season_mosaics = parse_season_paths(mosaics, "--mosaic")
            config = _config(base or make_train_config(seasons=tuple(season_mosaics), composite=composite or "nrg",
                                                       patch_size=patch_size or 256), settings, no_weights)
            clear = clear_counts_beside({s: p for s, p in season_mosaics.items() if s in config.seasons},
                                        parse_season_paths(clear_counts, "--clear"))
            with connect(scheduler) as client:
                result = train_from_mosaics(config, season_mosaics, labels, out_dir, clear_counts=clear,
                                            client=client, **run)
        print_result(result)
