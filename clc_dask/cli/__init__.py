"""The ``clc-dask`` command line: one sub-command per stage.

Only the CLI configures logging and prints; library modules log. Any
:class:`~clc_dask.errors.ClcDaskError` becomes a one-line ``Error: …`` and exit code 1;
unknown commands or options exit with 2 (click's usage error). No secret is printed: every
log record (of clc-dask and of the libraries, warnings included), error line and traceback
passes through :mod:`clc_dask.redact` (signed URLs lose their query strings).
SIGTERM, SIGINT and SIGHUP stop a command cleanly (:mod:`clc_dask.cli.signals`): what it
started is stopped, its temporary files are removed, and it exits with 128 + the signal's number.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
import re
import sys
import traceback
from collections.abc import Callable, Mapping
from typing import Any

import typer
import typer.models
import typer.utils

from clc_dask.cli.signals import Stopped, signal_name, stop_on_signals
from clc_dask.errors import ClcDaskError
from clc_dask.redact import install_log_redaction, redact_text

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
    logging.captureWarnings(True)  # warnings become log records, redacted like the others
    install_log_redaction()
    if verbose < 1:
        # distributed sets its loggers' levels from dask's config when imported (also in the
        # worker processes, which inherit the environment).
        os.environ.setdefault("DASK_DISTRIBUTED__LOGGING__DISTRIBUTED", "warning")
        logging.getLogger("distributed").setLevel(logging.WARNING)


_PARAMETER = re.compile(r"`([A-Za-z_][A-Za-z0-9_]*)`")


def cli_message(message: str, flags: Mapping[str, str]) -> str:
    """A library message for the command line: each backticked parameter that the command
    has as an option becomes that option (`` `mmu_ha` `` → ``--mmu-ha``)."""
    return _PARAMETER.sub(lambda m: flags.get(m[1], m[0]), message)


def option_flags(callback: Callable[..., Any]) -> dict[str, str]:
    """Parameter name → option (its first long flag) of a command function."""
    flags: dict[str, str] = {}
    for name, meta in typer.utils.get_params_from_function(callback).items():
        info = meta.default
        if not isinstance(info, typer.models.OptionInfo):
            continue
        decls = [d for d in (info.param_decls or ()) if d.startswith("--")]
        flags[name] = decls[0] if decls else "--" + name.replace("_", "-")
    return flags


def with_cli_messages(callback: Callable[..., Any]) -> Callable[..., Any]:
    """``callback`` whose clc-dask errors name its options instead of library parameters."""
    flags = option_flags(callback)

    @functools.wraps(callback)
    def command(*args: Any, **kwargs: Any) -> Any:
        try:
            return callback(*args, **kwargs)
        except ClcDaskError as exc:
            exc.args = (cli_message(str(exc), flags), *exc.args[1:])
            raise

    return command


for _name in COMMAND_MODULES:
    importlib.import_module(f"clc_dask.cli.{_name}").register(app)
for _info in app.registered_commands:
    if _info.callback is not None:
        _info.callback = with_cli_messages(_info.callback)


def main() -> None:
    """Entry point: run the app, turning clc-dask errors into one clear line and exit 1, and
    stop signals into a clean stop with exit code 128 + signal number."""
    with stop_on_signals():
        try:
            _run_app()
        except Stopped as stop:
            typer.echo(f"Stopped by {signal_name(stop.signum)}: what this command started was stopped "
                       "and its temporary files removed.", err=True)
            sys.exit(stop.exit_code)


def _run_app() -> None:
    try:
        app(standalone_mode=False)
    except ClcDaskError as exc:
        typer.echo(f"Error: {redact_text(str(exc))}", err=True)
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
        # an unexpected error: its traceback, as Python shows it, redacted
        typer.echo(redact_text("".join(traceback.format_exception(exc))).rstrip(), err=True)
        sys.exit(1)
