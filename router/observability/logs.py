"""JSON log lines: one object per line on stderr, access lines on stdout.

Nothing here logs secrets, prompts or tool arguments; callers pass only what may be shown.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import sys
from typing import Any

ACCESS_LOGGER = "kars.access"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": dt.datetime.fromtimestamp(record.created, dt.UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry.update(fields)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, separators=(",", ":"))


def configure(level: str, *, access: bool = True) -> None:
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

    access_logger = logging.getLogger(ACCESS_LOGGER)
    out = logging.StreamHandler(sys.stdout)
    out.setFormatter(formatter)
    access_logger.handlers[:] = [out]
    access_logger.setLevel(logging.INFO if access else logging.CRITICAL)
    access_logger.propagate = False
