"""Watch an OpenAI-style SSE stream as it passes: find its usage, drop the usage chunk we asked for.

Events are framed per the WHATWG HTML "server-sent events" section (an event ends at a blank
line; ``data:`` lines are joined with ``\\n``; one space after the colon is dropped). Only whole
events are forwarded, byte for byte, each as soon as its blank line arrives. Usage comes from a
chat / completions chunk with a ``usage`` object, or a Responses ``response.completed``
(``response.incomplete``, ``response.failed``) event's ``response.usage``. When the router added
``stream_options.include_usage`` itself, the extra chunk (``choices: []`` plus ``usage``) is
removed (SPEC.md §2).
"""

from __future__ import annotations

import re
from typing import Any

import orjson

from router import usage as usage_mod

_EVENT_END = re.compile(rb"\r\n\r\n|\n\n|\r\r")
_LINE = re.compile(rb"\r\n|\r|\n")
_RESPONSE_DONE_TYPES = frozenset({"response.completed", "response.incomplete", "response.failed"})

DONE_EVENT = b"data: [DONE]\n\n"


def error_event(body: dict[str, Any]) -> bytes:
    """An in-protocol error (the ``error`` event the openai SDK raises ``APIError`` for), then DONE."""
    return b"event: error\ndata: " + orjson.dumps(body) + b"\n\n" + DONE_EVENT


def _data(event: bytes) -> bytes:
    parts = []
    for line in _LINE.split(event):
        if line.startswith(b"data:"):
            value = line[5:]
            parts.append(value[1:] if value.startswith(b" ") else value)
    return b"\n".join(parts)


class StreamObserver:
    """Per response: ``feed`` each upstream chunk, send what it returns; ``finish`` at the end."""

    __slots__ = ("_strip", "_tail", "usage")

    def __init__(self, *, strip_usage_chunk: bool) -> None:
        self._strip = strip_usage_chunk
        self._tail = b""
        self.usage: usage_mod.Usage | None = None

    def feed(self, chunk: bytes) -> bytes:
        buf = self._tail + chunk if self._tail else chunk
        end = 0
        for match in _EVENT_END.finditer(buf):
            end = match.end()
        if end == 0:
            self._tail = buf
            return b""
        self._tail = buf[end:]
        complete = buf[:end]
        if b'"usage"' not in complete:
            return complete  # the common chunk: nothing to look at
        return self._inspect(complete)

    def finish(self) -> bytes:
        """What is left of an upstream that ended without a final blank line (passed on as is)."""
        tail, self._tail = self._tail, b""
        if tail and b'"usage"' in tail:
            self._look(tail)
        return tail

    def _inspect(self, complete: bytes) -> bytes:
        out: list[bytes] = []
        start = 0
        for match in _EVENT_END.finditer(complete):
            event = complete[start : match.end()]
            start = match.end()
            if b'"usage"' in event and self._look(event):
                continue
            out.append(event)
        return b"".join(out)

    def _look(self, event: bytes) -> bool:
        """Record the usage in ``event``; True when the event is the usage chunk to drop."""
        try:
            doc = orjson.loads(_data(event))
        except ValueError:
            return False
        if not isinstance(doc, dict):
            return False
        if doc.get("type") in _RESPONSE_DONE_TYPES:
            response = doc.get("response")
            found = usage_mod.Usage.from_payload(response.get("usage")) if isinstance(response, dict) else None
            if found is not None:
                self.usage = found
            return False
        found = usage_mod.Usage.from_payload(doc.get("usage"))
        if found is None:
            return False
        self.usage = found
        return self._strip and doc.get("choices") == []


def events(chunk: bytes) -> list[bytes]:
    """The events in ``chunk`` as ``feed`` passes them on (whole events; an unterminated rest kept whole)."""
    out = []
    start = 0
    for match in _EVENT_END.finditer(chunk):
        out.append(chunk[start : match.end()])
        start = match.end()
    if start < len(chunk):
        out.append(chunk[start:])
    return out


def event_data(event: bytes) -> bytes:
    """The ``data`` of one event: its ``data:`` lines joined with ``\\n``."""
    return _data(event)
