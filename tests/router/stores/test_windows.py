"""UTC calendar windows: boundaries, month lengths, leap Februaries, time zones never leaking in."""

from __future__ import annotations

import datetime as dt

import pytest

from router.stores import windows


def ts(text: str) -> float:
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


@pytest.mark.parametrize(
    ("window", "now", "start", "end", "name"),
    [
        ("hour", "2026-11-22T20:59:59.999Z", "2026-11-22T20:00:00Z", "2026-11-22T21:00:00Z", "h2026112220"),
        ("hour", "2026-11-22T21:00:00Z", "2026-11-22T21:00:00Z", "2026-11-22T22:00:00Z", "h2026112221"),
        ("hour", "2026-12-31T23:30:00Z", "2026-12-31T23:00:00Z", "2027-01-01T00:00:00Z", "h2026123123"),
        ("day", "2026-11-22T23:59:59Z", "2026-11-22T00:00:00Z", "2026-11-23T00:00:00Z", "d20261122"),
        ("day", "2026-11-23T00:00:00Z", "2026-11-23T00:00:00Z", "2026-11-24T00:00:00Z", "d20261123"),
        ("day", "2028-02-28T12:00:00Z", "2028-02-28T00:00:00Z", "2028-02-29T00:00:00Z", "d20280228"),
        ("day", "2028-02-29T12:00:00Z", "2028-02-29T00:00:00Z", "2028-03-01T00:00:00Z", "d20280229"),
        ("month", "2026-01-31T23:59:59Z", "2026-01-01T00:00:00Z", "2026-02-01T00:00:00Z", "m202601"),
        ("month", "2026-02-15T00:00:00Z", "2026-02-01T00:00:00Z", "2026-03-01T00:00:00Z", "m202602"),
        ("month", "2028-02-29T23:59:59Z", "2028-02-01T00:00:00Z", "2028-03-01T00:00:00Z", "m202802"),
        ("month", "2026-04-30T23:00:00Z", "2026-04-01T00:00:00Z", "2026-05-01T00:00:00Z", "m202604"),
        ("month", "2026-12-31T23:59:59Z", "2026-12-01T00:00:00Z", "2027-01-01T00:00:00Z", "m202612"),
        ("month", "2027-01-01T00:00:00Z", "2027-01-01T00:00:00Z", "2027-02-01T00:00:00Z", "m202701"),
    ],
)
def test_span(window: windows.Window, now: str, start: str, end: str, name: str) -> None:
    s = windows.span(window, ts(now))
    assert (s.start, s.end, s.name) == (ts(start), ts(end), name)
    assert s.resets_at == end


@pytest.mark.parametrize(
    ("month", "days"),
    [("2026-01", 31), ("2026-02", 28), ("2027-02", 28), ("2028-02", 29), ("2100-02", 28), ("2000-02", 29),
     ("2026-04", 30), ("2026-06", 30), ("2026-07", 31), ("2026-09", 30), ("2026-11", 30), ("2026-12", 31)],
)  # fmt: skip
def test_month_lengths(month: str, days: int) -> None:
    s = windows.span("month", ts(f"{month}-10T00:00:00Z"))
    assert (s.end - s.start) == days * 86400


def test_every_hour_of_a_day_is_its_own_window_and_the_day_is_one() -> None:
    day_start = ts("2026-03-29T00:00:00Z")  # a DST change day in Europe: irrelevant in UTC
    hours = {windows.span("hour", day_start + h * 3600 + 1800).name for h in range(24)}
    days = {windows.span("day", day_start + h * 3600 + 1800).name for h in range(24)}
    assert len(hours) == 24
    assert days == {"d20260329"}
    assert windows.span("day", day_start).end - windows.span("day", day_start).start == 86400


def test_local_time_zone_does_not_matter(monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    now = ts("2026-11-22T23:30:00Z")
    before = windows.span("day", now)
    monkeypatch.setenv("TZ", "Pacific/Kiritimati")  # UTC+14: local date is already Nov 23
    time.tzset()
    windows._span.cache_clear()  # computed afresh under the new zone
    try:
        assert windows.span("day", now) == before
    finally:
        monkeypatch.undo()
        time.tzset()


def test_seconds_left() -> None:
    s = windows.span("hour", ts("2026-11-22T20:59:30Z"))
    assert s.seconds_left(ts("2026-11-22T20:59:30Z")) == 30
    assert s.seconds_left(ts("2026-11-22T21:00:30Z")) == 0
