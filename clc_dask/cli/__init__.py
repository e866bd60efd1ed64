"""The ``clc-dask`` command line: one sub-command per stage.

Only the CLI configures logging and prints; library modules log. Any
:class:`~clc_dask.errors.ClcDaskError` becomes a one-line ``Error: …`` and exit code 1;
unknown commands or options exit with 2 (click's usage error).
"""

from __future__ import annotations

import importlib
import logging
import os
import re
import sys
from collections.abc import Mapping, Sequence

import typer

from clc_dask.errors import ClcDaskError

app = typer.Typer(
    name="clc-dask",
    help="CORINE Land Cover maps from Sentinel-2 with U-Net, at country scale on Dask.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

#: Sub-command modules, in pipeline order; each defines ``register(app)``.
COMMAND_MODULES = (
    "demo", "search", "mosaic", "labels", "patches", "train", "predict", "evaluate", "generalize", "run",
    "experiment",
)


@app.callback()
def _main(
    verbose: int = typer.Option(0, "--verbose", "-v", count=True, help="More log output (-v: libraries too, -vv: debug)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only warnings and errors."),
) -> None:
    # clc-dask's own progress at INFO (-q: warnings only); libraries from -v on.
    level = logging.WARNING if quiet else (logging.DEBUG if verbose > 1 else logging.INFO)
    library_level = {0: logging.WARNING, 1: logging.INFO}.get(verbose, logging.DEBUG)
    logging.basicConfig(level=library_level,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("clc_dask").setLevel(level)
    if verbose < 1:
        # distributed sets its loggers' levels from dask's config when imported (also in the
        # worker processes, which inherit the environment).
        os.environ.setdefault("DASK_DISTRIBUTED__LOGGING__DISTRIBUTED", "warning")
        logging.getLogger("distributed").setLevel(logging.WARNING)


for _name in COMMAND_MODULES:
    importlib.import_module(f"clc_dask.cli.{_name}").register(app)


_PARAMETER = re.compile(r"`([A-Za-z_][A-Za-z0-9_]*)`")


def cli_message(message: str, flags: Mapping[str, str]) -> str:
    """A library message for the command line: each backticked parameter that the command
    has as an option becomes that option (`` `mmu_ha` `` → ``--mmu-ha``)."""
    return _PARAMETER.sub(lambda m: flags.get(m[1], m[0]), message)


def command_flags(argv: Sequence[str]) -> dict[str, str]:
    """Parameter name → option (its first long flag) of the sub-command named in ``argv``."""
    import typer.main

    group = typer.main.get_command(app)
    name = next((a for a in argv if not a.startswith("-")), None)
    command = group.commands.get(name) if name and hasattr(group, "commands") else None  # type: ignore[attr-defined]
    flags: dict[str, str] = {}
    for param in getattr(command, "params", []):
        longs = [o for o in getattr(param, "opts", []) if o.startswith("--")]
        if param.name and longs:
            flags[param.name] = longs[0]
    return flags


def main() -> None:
    """Entry point: run the app, turning clc-dask errors into one clear line and exit 1."""
    try:
        app(standalone_mode=False)
    except ClcDaskError as exc:
        typer.echo(f"Error: {cli_message(str(exc), command_flags(sys.argv[1:]))}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        typer.echo("Interrupted.", err=True)
        sys.exit(130)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        typer.echo("Aborted.", err=True)
        sys.exit(1)
    except Exception as exc:
        # click's usage errors (unknown command/option, bad value): typer vendors click,
        # so recognise them by their interface rather than their import path.
        if hasattr(exc, "show") and isinstance(getattr(exc, "exit_code", None), int):
            exc.show()
            sys.exit(exc.exit_code)
        raise
