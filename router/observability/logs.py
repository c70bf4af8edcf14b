"""JSON log lines: one object per line on stderr (audit records too), access lines on stdout.

Access lines and MCP audit records bypass the ``logging`` machinery: at one line per request it
cost ~20 us a line (record, formatter, a flush per line), a fifth of a request's budget. ``JsonLines`` keeps the
lines in its own buffer and writes them in one call at most every ``FLUSH_INTERVAL_S`` (or
every ``MAX_PENDING_LINES``; and on a ticker from the app's lifespan, so an idle router's last
lines still appear). The buffer is its own, not the stream's: with ``PYTHONUNBUFFERED=1``, which
container images commonly set, every ``sys.stdout.write`` is a system call that releases the
GIL, and a busy event loop then waits to get it back from any other thread (~100 us a request
here).

Nothing here logs secrets, prompts or tool arguments; callers pass only what may be shown.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import sys
import time
from collections.abc import Mapping
from typing import Any, TextIO

import orjson

ACCESS_LOGGER = "kars.access"
FLUSH_INTERVAL_S = 0.25
MAX_PENDING_LINES = 512

_last_second: tuple[int, str] = (-1, "")  # the last second formatted (one assignment: thread-safe)
_MILLIS = tuple(f"{ms:03d}Z" for ms in range(1000))  # a lookup, not a format spec, per line


def iso_now(now: float | None = None) -> str:
    """``2026-11-22T21:59:17.931Z``: RFC 3339, UTC, milliseconds."""
    global _last_second
    if now is None:
        now = time.time()
    second = int(now)
    known, text = _last_second
    if second != known:  # one datetime a second, not one per line
        text = dt.datetime.fromtimestamp(second, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.")
        _last_second = (second, text)
    return text + _MILLIS[min(999, int((now - second) * 1000))]


class JsonLines:
    """One JSON line per event (a request's access line, a tool call's audit record), buffered.

    The lines have the shape of the ``kars`` loggers' (``ts``, ``level``, ``logger``, ``msg``, then
    the fields), so one log pipeline reads both.
    """

    def __init__(self, stream: TextIO | None, *, logger: str = ACCESS_LOGGER, msg: str = "request") -> None:
        self.stream = stream
        self._head = f'","level":"info","logger":"{logger}","msg":"{msg}"'
        self._lines: list[str] = []
        self._flushed_at = time.monotonic()

    @property
    def enabled(self) -> bool:
        return self.stream is not None

    def emit(self, fields: Mapping[str, Any]) -> None:
        if self.stream is None:
            return
        head = '{"ts":"' + iso_now() + self._head
        body = orjson.dumps(fields, default=str).decode()
        lines = self._lines
        lines.append(head + ("," + body[1:] if len(body) > 2 else "}") + "\n")
        if len(lines) >= MAX_PENDING_LINES or time.monotonic() - self._flushed_at >= FLUSH_INTERVAL_S:
            self.flush()

    def flush(self) -> None:
        self._flushed_at = time.monotonic()
        if self.stream is None or not self._lines:
            return
        text, self._lines = "".join(self._lines), []
        # A closed or broken stdout must not fail requests.
        with contextlib.suppress(OSError, ValueError):
            self.stream.write(text)
            self.stream.flush()


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": iso_now(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry.update(fields)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


def configure(level: str) -> None:
    """Route the ``kars`` loggers to JSON lines. Called by the CLI at start, never on import."""
    formatter = JsonFormatter()
    main = logging.StreamHandler(sys.stderr)
    main.setFormatter(formatter)
    root = logging.getLogger("kars")
    root.handlers[:] = [main]
    root.setLevel(level.upper())
    root.propagate = False

    # uvicorn's own start/stop and error lines, in the same JSON shape.
    for name in ("uvicorn", "uvicorn.error"):
        server = logging.getLogger(name)
        server.handlers[:] = [main]
        server.setLevel(level.upper())
        server.propagate = False
