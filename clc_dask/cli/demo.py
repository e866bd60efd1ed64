"""`clc-dask demo`: build the offline demo region, serve it on loopback, run the demo steps."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

#: Default region side (px); equals clc_dask.demo.region.DEFAULT_SIZE (kept literal so the CLI
#: starts without importing the demo's geospatial stack).
DEFAULT_SIZE = 4096


def _echo_step(name: str, result: dict[str, Any]) -> None:
    """One line per finished demo step."""
    if name == "region":
        how = "reused" if result.get("reused") else "built"
        typer.echo(f"Region {how}: {result['workdir']} ({result['size']} px at 10 m, seed "
                   f"{result['seed']}, {result['scenes']} scenes) [{result['seconds']:.1f} s]")
        if "granule_crs" in result:
            typer.echo(f"Two UTM zones: region grid {result['crs']}, granules in "
                       f"{' and '.join(result['granule_crs'])}")
    elif name == "serve":
        typer.echo(f"STAC API: {result['stac_url']}")
        typer.echo(f"Data (COGs over HTTP, range requests): {result['data_url']}")
    elif name == "search":
        typer.echo(f"Search: the STAC API found {result['items']} items for the region "
                   f"({result['clear_items']} with cloud cover < {result['max_cloud']:g} %)")
    elif name == "keep_serving":
        typer.echo("Serving until Ctrl-C …")
    else:
        details = ", ".join(f"{k}={v}" for k, v in result.items() if k != "seconds")
        typer.echo(f"{name}: {details} [{result.get('seconds', 0):.1f} s]")


def register(app: typer.Typer) -> None:
    """Add the `demo` command to `app`."""

    @app.command("demo")
    def demo(
        workdir: Annotated[Path, typer.Option(
            "--workdir", help="Folder for the demo region and every output (created if missing; "
            "a complete region with the same seed and size is reused).")] = Path("demo-run"),
        size: Annotated[int, typer.Option(
            "--size", help="Region side in pixels at 10 m (multiple of 64, at least 256). "
            "4096 = 40.96 km; 512 builds in seconds.")] = DEFAULT_SIZE,
        seed: Annotated[int, typer.Option("--seed", help="Seed of the synthetic region.")] = 0,
        stac_port: Annotated[int, typer.Option(
            "--stac-port", help="Port of the STAC API (0: a free port).")] = 0,
        data_port: Annotated[int, typer.Option(
            "--data-port", help="Port of the COG file server (0: a free port).")] = 0,
        until: Annotated[str | None, typer.Option(
            "--until", help="Stop after this step: region, serve, search, mosaics, labels, train, "
            "predict, evaluate, generalize or run (default: the whole chain).")] = None,
        epochs: Annotated[int | None, typer.Option(
            "--epochs", min=1, help="Training epochs (default: the cpu-demo preset's).")] = None,
        keep_serving: Annotated[bool, typer.Option(
            "--keep-serving/--no-keep-serving",
            help="Keep the servers up after the demo until Ctrl-C (to explore with other tools).",
        )] = False,
        two_zone: Annotated[bool, typer.Option(
            "--two-zone", help="Build the region across the UTM zone border at 12° E: an "
            "EPSG:3035 grid, every pass delivered as two overlapping granules in EPSG:32632 "
            "(MGRS 32TQN) and EPSG:32633 (33TTH), as real Sentinel-2 there.")] = False,
    ) -> None:
        """Build the offline demo region, serve it like the real thing on loopback (rustac
        STAC API + COGs over HTTP) and run the whole chain against it: seasonal mosaics, CLC
        labels, training (cpu-demo preset), prediction, evaluation on a held-out strip,
        generalization and a production run with STAC outputs."""
        from clc_dask.demo import run_demo

        ctx = run_demo(workdir, size, seed, stac_port=stac_port, data_port=data_port,
                       keep_serving=keep_serving, on_step=_echo_step, until=until,
                       epochs=epochs, two_zone=two_zone)
        typer.echo(f"Demo done in {ctx.workdir}; servers stopped.")
