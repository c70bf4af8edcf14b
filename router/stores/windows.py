"""UTC calendar windows (hour, day, month) for token budgets (SPEC.md §3).

A window is named by its kind and its start: ``day`` starting 2026-11-22T00:00Z is
``d20261122``. Windows are calendar windows in UTC, never sliding and never local time, so
every replica and every restart agrees on which counter a moment belongs to. Pure: the
caller passes ``now`` (epoch seconds) from an injectable clock.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import math
from typing import Literal

Window = Literal["hour", "day", "month"]
WINDOWS: tuple[Window, ...] = ("hour", "day", "month")
_TAGS: dict[Window, str] = {"hour": "h", "day": "d", "month": "m"}
HOUR_S = 3600


@dataclasses.dataclass(frozen=True, slots=True)
class Span:
    """One concrete window: ``[start, end)`` in epoch seconds, and its stable name."""

    window: Window
    start: float
    end: float
    name: str

    def seconds_left(self, now: float) -> float:
        return max(0.0, self.end - now)

    @property
    def resets_at(self) -> str:
        """RFC 3339 UTC timestamp of the window's end (``2026-11-23T00:00:00Z``)."""
        return dt.datetime.fromtimestamp(self.end, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def span(window: Window, now: float) -> Span:
    """The ``window`` that contains the instant ``now`` (epoch seconds, UTC)."""
    # Every window starts and ends on a UTC hour (POSIX time has no leap seconds), so the
    # answer depends only on the hour ``now`` falls in: computed once per hour, not per request.
    return _span(window, math.floor(now / HOUR_S))


@functools.lru_cache(maxsize=256)
def _span(window: Window, hour: int) -> Span:
    t = dt.datetime.fromtimestamp(hour * HOUR_S, dt.UTC)
    if window == "hour":
        start = t.replace(minute=0, second=0, microsecond=0)
        end = start + dt.timedelta(hours=1)
        label = start.strftime("%Y%m%d%H")
    elif window == "day":
        start = t.replace(hour=0, minute=0, second=0, microsecond=0)
        end = start + dt.timedelta(days=1)
        label = start.strftime("%Y%m%d")
    elif window == "month":
        start = t.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        # The first of the next month: month lengths and leap Februaries come from the calendar.
        end = start.replace(year=start.year + 1, month=1) if start.month == 12 else start.replace(month=start.month + 1)
        label = start.strftime("%Y%m")
    else:  # pragma: no cover - Literal exhausts the cases
        raise ValueError(f"unknown window {window!r}")
    return Span(window, start.timestamp(), end.timestamp(), _TAGS[window] + label)
