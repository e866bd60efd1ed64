"""`clc-dask train`: train a U-Net on a patch index (or on mosaics directly), resumable."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from clc_dask.cli.patches import (
    CLEAR_HELP,
    MOSAIC_HELP,
    clear_counts_for,
    get_cli_client,
    parse_season_paths,
)
from clc_dask.errors import ConfigError
from clc_dask.patches import load_patch_index
from clc_dask.presets import get_preset, preset_names
from clc_dask.train import (
    TrainConfig,
    TrainResult,
    check_index,
    check_out_dir,
    config_for_index,
    index_for_config,
    make_train_config,
    train,
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


def _channels(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(c) for c in text.split(",") if c.strip())
    except ValueError:
        raise ConfigError(f"--decoder-channels {text!r} must be whole numbers separated by commas, "
                          "e.g. 128,64,32,16,8.") from None


def register(app: typer.Typer) -> None:
    """Add the `train` command to `app`."""

    @app.command("train")
    def train_command(
        out: Annotated[Path, typer.Option("--out", help="Run folder: checkpoint.pt, best.pt, "
                       "metrics.csv, metrics.json.")],
        preset: Annotated[str | None, typer.Option("--preset", help="A named configuration: "
                          + ", ".join(preset_names()) + ".")] = None,
        patches: Annotated[Path | None, typer.Option("--patches", help="Patch index folder "
                           "(clc-dask patches --out).")] = None,
        mosaic: Annotated[list[str] | None, typer.Option("--mosaic", help=MOSAIC_HELP + " Instead "
                          "of --patches: the index is built with the preset's settings.")] = None,
        labels: Annotated[Path | None, typer.Option("--labels", help="CLC code raster (with --mosaic).")] = None,
        clear: Annotated[list[str] | None, typer.Option("--clear", help=CLEAR_HELP)] = None,
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
        resume: Annotated[bool, typer.Option("--resume", help="Continue from OUT/checkpoint.pt "
                          "(same settings; --epochs may grow).")] = False,
        init: Annotated[Path | None, typer.Option("--init", help="Start from this checkpoint's "
                        "weights (fine-tuning; bands and classes must match).")] = None,
        address: Annotated[str | None, typer.Option("--address", help="Dask scheduler to stream "
                           "patches from (default: threads in this process).")] = None,
        overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing run in --out.")] = False,
        progress: Annotated[bool | None, typer.Option("--progress/--no-progress", help="Progress bar "
                            "(default: on a terminal).")] = None,
    ) -> None:
        """Train a U-Net/ResNet (Adam) and write checkpoints and per-epoch metrics."""
        if (patches is None) == (not mosaic):
            raise ConfigError("Give the training data: either --patches INDEX_DIR or --mosaic SEASON=PATH "
                              "(with --labels), not both or neither.")
        if mosaic and labels is None:
            raise ConfigError("--mosaic needs --labels LABELS.tif (the CLC code raster on the same grid).")
        no_weights = encoder_weights is not None and encoder_weights.lower() == "none"
        if no_weights:
            encoder_weights = None
        overrides = dict(epochs=epochs, batch_size=batch_size, lr=lr, encoder=encoder,
                         encoder_weights=encoder_weights, loss=loss, class_weights=class_weights,
                         augment=augment, seed=seed, device=device, data=data, num_workers=num_workers,
                         val_every=val_every, amp=amp,
                         decoder_channels=_channels(decoder_channels) if decoder_channels else None)
        base: TrainConfig | None = get_preset(preset) if preset else None
        check_out_dir(out, resume=resume, overwrite=overwrite)
        client = get_cli_client(address)
        try:
            if patches is not None:
                if composite or patch_size:
                    raise ConfigError("--composite/--patch-size apply to --mosaic; a patch index has them "
                                      "fixed (rebuild it with clc-dask patches to change them).")
                index = load_patch_index(patches)
                if base is None:
                    config = config_for_index(index, **overrides)
                else:
                    config = make_train_config(base, **overrides)
                    check_index(config, index)
            else:
                mosaics = parse_season_paths(mosaic, "--mosaic")
                if base is None:
                    base = make_train_config(None, seasons=tuple(mosaics), composite=composite or "nrg",
                                             patch_size=patch_size or 256)
                elif composite or patch_size:
                    raise ConfigError("--composite/--patch-size conflict with --preset, which fixes them: "
                                      "drop them or the preset.")
                config = make_train_config(base, **overrides)
                clear_counts = clear_counts_for({s: p for s, p in mosaics.items() if s in config.seasons},
                                                parse_season_paths(clear, "--clear"))
                index = index_for_config(config, mosaics, labels, clear_counts=clear_counts, client=client)
                index.save(out / "patches")
            if no_weights:
                config = config.model_copy(update={"encoder_weights": None})
            result = train(config, index, out, resume=resume, init_checkpoint=init, client=client,
                           progress=progress, overwrite=overwrite)
        finally:
            if client is not None:
                client.close()
        print_result(result)
