"""The one season table: which months the paper's seasons are, and date intervals for searches.

The paper composites April, July and September (§2.1), each the whole month. A season can
also be any ``MM-DD/MM-DD`` window, repeated in each year asked for (an end before the start
runs into the next year), or a full ``START/END`` range of ISO dates.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

from dateutil.parser import isoparse
from dateutil.relativedelta import relativedelta

from clc_dask.errors import ConfigError

#: The paper's seasons and their months (the whole month each).
SEASON_MONTHS: dict[str, int] = {"april": 4, "july": 7, "september": 9}
#: Season names, in calendar order.
SEASONS: tuple[str, ...] = tuple(SEASON_MONTHS)
#: A UTC interval; None is an open end.
Interval = tuple[datetime | None, datetime | None]

_MONTH_WINDOW = re.compile(r"\d{2}-\d{2}/\d{2}-\d{2}")


def is_yearly(season: str) -> bool:
    """True for seasons that repeat every year (a month name or ``MM-DD/MM-DD``)."""
    season = season.strip().lower()
    return season in SEASON_MONTHS or bool(_MONTH_WINDOW.fullmatch(season))


def check_season(season: str) -> str:
    """``season`` if it is a season name, ``MM-DD/MM-DD`` or ``START/END``; else ConfigError."""
    if season.strip().lower() not in SEASON_MONTHS and "/" not in season:
        raise ConfigError(
            f"season {season!r} is not one of {', '.join(SEASONS)}, MM-DD/MM-DD or START/END "
            "(ISO dates)."
        )
    return season


def season_intervals(season: str, years: Sequence[int] = ()) -> list[Interval]:
    """Date intervals (UTC, inclusive) for a season in each of ``years``.

    Args:
        season: ``april``, ``july``, ``september`` (the whole month); ``MM-DD/MM-DD`` (one
            interval per year; an end before the start runs into the next year); or
            ``START/END`` as ISO dates/datetimes (then ``years`` must be empty).
        years: calendar years, e.g. ``[2018, 2019]``.
    """
    season = season.strip().lower()
    years = sorted(set(int(y) for y in years))
    if is_yearly(season):
        if not years:
            raise ConfigError(f"Season {season!r} needs at least one year: give `years` (e.g. [2018]).")
        return [_yearly_interval(season, year) for year in years]
    if "/" in season:
        if years:
            raise ConfigError(
                f"Season {season!r} gives full dates: drop `years`, or give MM-DD/MM-DD to "
                "repeat it in several years."
            )
        return [parse_interval(season)]
    raise ConfigError(
        f"Unknown season {season!r}: use april, july, september, MM-DD/MM-DD or "
        "YYYY-MM-DD/YYYY-MM-DD."
    )


def _yearly_interval(season: str, year: int) -> tuple[datetime, datetime]:
    if season in SEASON_MONTHS:
        start = datetime(year, SEASON_MONTHS[season], 1, tzinfo=UTC)
        return start, start + relativedelta(months=1, seconds=-1)
    (sm, sd), (em, ed) = (map(int, part.split("-")) for part in season.split("/"))
    start = _date(year, sm, sd, season)
    end = _date(year, em, ed, season)
    if end < start:
        end = _date(year + 1, em, ed, season)
    return start, end + timedelta(days=1, seconds=-1)


def season_window(season: str, year: int) -> tuple[datetime, datetime]:
    """Start and end (UTC, inclusive) of a run's season in ``year`` (a full ``START/END``
    range ignores ``year``)."""
    (start, end), *_ = season_intervals(season, [year] if is_yearly(season) else [])
    if start is None or end is None:
        raise ConfigError(f"Season {season!r} is open-ended: give both a start and an end.")
    return start, end


def season_search(season: str, year: int) -> dict[str, object]:
    """:func:`clc_dask.search.search_items` keywords for a run's season in ``year``."""
    return {"season": season, "years": [year] if is_yearly(season) else []}


def _date(year: int, month: int, day: int, season: str) -> datetime:
    try:
        return datetime(year, month, day, tzinfo=UTC)
    except ValueError as exc:
        raise ConfigError(f"Season {season!r} has an invalid date: {exc}.") from None


def parse_interval(text: str) -> Interval:
    """``START/END`` (or a single date) → UTC ``(start, end)``; ``..`` or empty = open.

    Dates without a time cover whole periods, as STAC APIs read them: ``2023-08`` is the
    whole of August, an end date ``2023-08-20`` runs to 23:59:59.
    """
    parts = text.strip().split("/")
    if len(parts) == 1:
        return _parse_instant(parts[0], end=False), _parse_instant(parts[0], end=True)
    if len(parts) != 2:
        raise ConfigError(f"Datetime {text!r} is not START/END (ISO 8601, '..' for open).")
    start, end = _parse_instant(parts[0], end=False), _parse_instant(parts[1], end=True)
    if start is None and end is None:
        raise ConfigError(f"Datetime {text!r} is open at both ends: give a start or an end.")
    if start is not None and end is not None and end < start:
        raise ConfigError(f"Datetime {text!r} ends before it starts.")
    return start, end


def _parse_instant(text: str, end: bool) -> datetime | None:
    text = text.strip()
    if text in ("", ".."):
        return None
    partial = re.fullmatch(r"(\d{4})(?:-(\d{2}))?(?:-(\d{2}))?", text)
    try:
        if partial:
            year, month, day = int(partial[1]), int(partial[2] or 1), int(partial[3] or 1)
            start = datetime(year, month, day, tzinfo=UTC)
            if not end:
                return start
            step = relativedelta(days=1) if partial[3] else (
                relativedelta(months=1) if partial[2] else relativedelta(years=1))
            return start + step - timedelta(seconds=1)
        value = isoparse(text)
    except ValueError as exc:
        raise ConfigError(f"Cannot read the date {text!r}: {exc}. Use ISO 8601 (2023-08-10).") from None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def format_interval(interval: Interval) -> str:
    """An interval as the ``datetime`` string STAC APIs expect (``…Z/…Z``, ``..`` = open)."""
    return "/".join(
        ".." if t is None else t.astimezone(UTC).replace(tzinfo=None).isoformat() + "Z"
        for t in interval
    )
