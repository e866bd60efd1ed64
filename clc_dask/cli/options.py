"""Option help texts and parsers shared by the sub-commands (no heavy imports: fast ``--help``)."""

from __future__ import annotations

from collections.abc import Sequence

from clc_dask.errors import ConfigError

SOURCE_HELP = ("Catalog preset (earth-search, planetary-computer), STAC API URL, static "
               "catalog/collection JSON, or item-collection JSON.")
SEASON_HELP = ("april, july, september (the whole month, in each --year), MM-DD/MM-DD, or "
               "YYYY-MM-DD/YYYY-MM-DD.")
SCHEDULER_HELP = ("Dask scheduler address, e.g. tcp://scheduler:8786 (default: DASK_SCHEDULER_ADDRESS, "
                  "else threads in this process).")


def parse_numbers(text: str | None, option: str, count: int, example: str) -> tuple[float, ...] | None:
    """``"a,b,c,d"`` → ``count`` floats (None stays None)."""
    if text is None:
        return None
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != count:
        raise ConfigError(f"{option} {text!r} is not {count} comma-separated numbers, e.g. {example}.")
    return values


def parse_bbox(text: str | None) -> tuple[float, float, float, float] | None:
    """``"W,S,E,N"`` in degrees → four floats (None stays None)."""
    return parse_numbers(text, "--bbox (WEST,SOUTH,EAST,NORTH in degrees)", 4,  # type: ignore[return-value]
                         "16.0,46.0,16.1,46.1")


def parse_bounds(text: str | None) -> tuple[float, float, float, float] | None:
    """``"left,bottom,right,top"`` (in the grid's CRS) → four floats (None stays None)."""
    return parse_numbers(text, "--bounds (LEFT,BOTTOM,RIGHT,TOP in the --epsg CRS)", 4,  # type: ignore[return-value]
                         "453250,4081010,465090,4099650")


def parse_names(text: str | None, option: str, example: str) -> list[str] | None:
    """A comma list → its non-empty items (None stays None; an empty list is an error)."""
    if text is None:
        return None
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise ConfigError(f"{option} is empty: give e.g. {option} {example}.")
    return names


def parse_tile_names(text: str | None) -> list[str] | None:
    """``"4_3,3_2"`` → tile names (row_col from 1)."""
    return parse_names(text, "--tiles", "4_3,3_2 (row_col from 1)")


def parse_codes(text: str | None, option: str) -> list[int] | None:
    """``"11,12,21"`` → CLC codes."""
    names: Sequence[str] | None = parse_names(text, option, "11,12,21")
    if names is None:
        return None
    try:
        return [int(v) for v in names]
    except ValueError:
        raise ConfigError(f"{option} must be comma-separated CLC codes such as 11,12,21, not {text!r}.") from None


def parse_guard(value: str | None) -> int | str | None:
    """``--guard``: ``auto`` or a number of patches (None: keep the config's)."""
    if value is None or value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"--guard {value!r} is not a number of patches or auto (the encoder's "
                          "receptive field).") from None
