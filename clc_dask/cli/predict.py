"""`clc-dask predict`: mosaic + checkpoint → CLC class map COG (and probabilities Zarr)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from clc_dask.cli.options import parse_tile_names
from clc_dask.grid import DEFAULT_TILE_SIZE


def predict_command(
    mosaic: Annotated[Path, typer.Option(
        "--mosaic", help="Mosaic COG: (band, y, x) uint16 DN, band names as descriptions.")],
    checkpoint: Annotated[Path, typer.Option(
        "--checkpoint", help="clc-dask checkpoint (.pt), on storage every worker can read.")],
    out: Annotated[Path, typer.Option(
        "--out", help="Class map COG; with --tiles one file per tile (out_4_3.tif, …).")],
    tiles: Annotated[str | None, typer.Option(
        "--tiles", help="Only these tiles, e.g. 4_3,3_2 (row_col from 1), each with its surroundings as context.")] = None,
    tile_size: Annotated[int, typer.Option("--tile-size", help="Tile edge in pixels for --tiles.")] = DEFAULT_TILE_SIZE,
    halo: Annotated[int, typer.Option("--halo", help="Context in pixels around every window (≥ 64 recommended).")] = 64,
    window: Annotated[int, typer.Option(
        "--window", help="Pixels one forward pass predicts (multiple of 32); the network sees window + 2·halo.")] = 512,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Windows per forward pass (lower it on out-of-memory).")] = 8,
    device: Annotated[str, typer.Option("--device", help="auto (CUDA where a worker has it), cpu, cuda or cuda:N.")] = "auto",
    probabilities: Annotated[Path | None, typer.Option(
        "--probabilities", help="Also write per-class probabilities (uint8, ×255) to this Zarr store.")] = None,
    chunk_size: Annotated[int, typer.Option(
        "--chunk-size", help="Dask chunk edge in pixels; a multiple of --window runs every window once.")] = 2048,
    scheduler: Annotated[str | None, typer.Option(
        "--scheduler", "--address", help="Dask scheduler address (default: DASK_SCHEDULER_ADDRESS, else a "
        "local cluster).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace existing outputs.")] = False,
) -> None:
    """Predict a CLC class map from a mosaic with a trained U-Net, chunk by chunk on Dask."""
    from clc_dask.cluster import connect
    from clc_dask.predict import (
        check_options,
        predict_tiles_to_files,
        predict_to_file,
        resolve_device,
    )

    names = parse_tile_names(tiles)
    check_options(window, halo, batch_size, chunk_size)  # before a cluster starts
    if device != "auto":
        resolve_device(device)
    opts = dict(halo=halo, window=window, batch_size=batch_size, device=device, chunk_size=chunk_size)
    with connect(scheduler, kind="auto") as client:
        if names:
            written = predict_tiles_to_files(mosaic, checkpoint, out, names, client, probabilities_path=probabilities,
                                             overwrite=overwrite, tile_size=tile_size, **opts)
            for name, path in written.items():
                typer.echo(f"{name}: {path}")
        else:
            path = predict_to_file(mosaic, checkpoint, out, client, probabilities_path=probabilities,
                                   overwrite=overwrite, **opts)
            typer.echo(str(path))


def register(app: typer.Typer) -> None:
    """Add the `predict` command to `app`."""
    app.command("predict")(predict_command)
