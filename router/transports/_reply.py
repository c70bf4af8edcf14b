"""Relay one upstream reply to the caller, and learn its token usage on the way.

Three shapes: an SSE stream (relayed event by event as it arrives, see ``_sse``), a 2xx JSON
reply (read up to ``MAX_JSON_BYTES`` so a malformed one becomes a 502 before anything is sent;
a larger one is streamed on), anything else (upstream errors, audio, files: streamed as is).
The usage found goes to ``scope["state"]["kars.usage"]`` and ``kars.upstream_output`` is set
when the first byte of a 2xx reply goes out (an upstream's error reply carries no generated
output); the token budget layer reads both after the transport returns.

A caller that disconnects is noticed by a watcher (``Link``) that cancels the transport only while
it waits on the upstream, so the cancellation always lands in the transport's own ``await``.
An upstream that breaks off an SSE stream gets the stream ended in-protocol (an ``error`` event,
then ``data: [DONE]``); any other reply broken off mid-body is re-raised, and the server aborts
the connection so a truncated body never looks complete.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import orjson
from starlette.types import Receive, Scope, Send

from router import _asgi, errors
from router import usage as usage_mod
from router.transports import _sse
from router.upstream import http as http_mod

T = TypeVar("T")

MAX_JSON_BYTES = 4 * 1024 * 1024
TAIL_BYTES = 64 * 1024  # of a JSON reply too large to parse whole: where its "usage" is looked for
_USAGE_KEY = re.compile(rb'(?<!\\)"usage"\s*:\s*')

_DROP_RESPONSE = http_mod.DROP_RESPONSE_HEADERS


class Link:
    """The caller's side of one request: whether it left, and whether we are waiting upstream."""

    __slots__ = ("gone", "waiting")

    def __init__(self) -> None:
        self.gone = False
        self.waiting = False

    async def wait(self, awaitable: Awaitable[T]) -> T:
        self.waiting = True
        try:
            return await awaitable
        finally:
            self.waiting = False

    async def watch(self, receive: Receive, task: asyncio.Task[Any]) -> None:
        """Until the caller disconnects, or the response is complete (then receive() answers
        ``http.disconnect`` too); cancel ``task`` if it is waiting on the upstream then."""
        while (await receive())["type"] != "http.disconnect":
            pass
        self.gone = True
        if self.waiting:
            task.cancel()


def _headers(raw: tuple[tuple[bytes, bytes], ...]) -> list[tuple[bytes, bytes]]:
    """The reply's headers to relay: names lower-cased, hop-by-hop and server-set ones dropped."""
    return [(low, value) for key, value in raw if (low := key.lower()) not in _DROP_RESPONSE]


def _content_type(headers: list[tuple[bytes, bytes]]) -> bytes:
    for key, value in headers:
        if key == b"content-type":
            return value.lower()
    return b""


def _without_length(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    return [h for h in headers if h[0] != b"content-length"]


def _usage_in_tail(tail: bytes) -> usage_mod.Usage | None:
    """The last top-level-looking ``"usage": {...}`` in ``tail`` (a reply too big to parse whole)."""
    matches = list(_USAGE_KEY.finditer(tail))
    if not matches:
        return None
    try:
        value, _ = json.JSONDecoder().raw_decode(tail[matches[-1].end() :].decode("utf-8", "replace"))
    except ValueError:
        return None
    return usage_mod.Usage.from_payload(value) if isinstance(value, dict) else None


async def relay(
    scope: Scope,
    send: Send,
    reply: http_mod.Response,
    link: Link,
    *,
    strip_usage_chunk: bool,
    on_error: Callable[[str], None],
) -> None:
    """Send ``reply`` to the caller, recording the usage it reported (``on_error`` counts a broken stream)."""
    headers = _headers(reply.headers)
    ctype = _content_type(headers)
    ok = 200 <= reply.status < 300
    if ctype.startswith(b"text/event-stream"):
        found = await _relay_sse(
            scope, send, reply, link, _without_length(headers), ok=ok, strip=strip_usage_chunk, on_error=on_error
        )
        if found is not None:
            scope["state"][_asgi.USAGE] = found
    elif ok and _asgi.is_json(ctype):
        await _relay_json(scope, send, reply, link, headers)
    else:
        await _relay_raw(scope, send, reply, link, headers, ok=ok)


async def _chunks(reply: http_mod.Response, link: Link) -> AsyncIterator[bytes]:
    it = reply.iter_chunks().__aiter__()
    while not link.gone:
        try:
            chunk = await link.wait(it.__anext__())
        except StopAsyncIteration:
            return
        yield chunk


async def _relay_json(
    scope: Scope, send: Send, reply: http_mod.Response, link: Link, headers: list[tuple[bytes, bytes]]
) -> None:
    data, complete = await link.wait(reply.read(MAX_JSON_BYTES))
    if complete:
        try:
            doc = orjson.loads(data)
        except ValueError:
            raise errors.UpstreamError("the upstream sent a malformed JSON reply") from None
        found = usage_mod.Usage.from_payload(doc.get("usage")) if isinstance(doc, dict) else None
        headers = _without_length(headers)
        headers.append((b"content-length", str(len(data)).encode()))
        st = scope["state"]
        st[_asgi.REPLY_JSON] = (data, doc)  # the content-safety guard reads this body: no second parse
        if found is not None:
            # Before the send: a reply the guard blocks there was still generated, and is charged.
            st[_asgi.USAGE] = found
        await send({"type": "http.response.start", "status": reply.status, "headers": headers})
        st[_asgi.UPSTREAM_OUTPUT] = True
        await send({"type": "http.response.body", "body": data})
        return
    await send({"type": "http.response.start", "status": reply.status, "headers": headers})
    scope["state"][_asgi.UPSTREAM_OUTPUT] = True
    await send({"type": "http.response.body", "body": data, "more_body": True})
    tail = data[-TAIL_BYTES:]
    async for chunk in _chunks(reply, link):
        await send({"type": "http.response.body", "body": chunk, "more_body": True})
        tail = (tail + chunk)[-TAIL_BYTES:]
    await send({"type": "http.response.body", "body": b""})
    found = _usage_in_tail(tail)
    if found is not None:
        scope["state"][_asgi.USAGE] = found


async def _relay_raw(
    scope: Scope, send: Send, reply: http_mod.Response, link: Link, headers: list[tuple[bytes, bytes]], *, ok: bool
) -> None:
    await send({"type": "http.response.start", "status": reply.status, "headers": headers})
    async for chunk in _chunks(reply, link):
        if ok:
            scope["state"][_asgi.UPSTREAM_OUTPUT] = True
        await send({"type": "http.response.body", "body": chunk, "more_body": True})
    await send({"type": "http.response.body", "body": b""})


async def _relay_sse(
    scope: Scope,
    send: Send,
    reply: http_mod.Response,
    link: Link,
    headers: list[tuple[bytes, bytes]],
    *,
    ok: bool,
    strip: bool,
    on_error: Callable[[str], None],
) -> usage_mod.Usage | None:
    observer = _sse.StreamObserver(strip_usage_chunk=strip)
    await send({"type": "http.response.start", "status": reply.status, "headers": headers})
    st = scope["state"]
    try:
        async for chunk in _chunks(reply, link):
            out = observer.feed(chunk)
            if out:
                if ok:
                    st[_asgi.UPSTREAM_OUTPUT] = True
                await send({"type": "http.response.body", "body": out, "more_body": True})
        rest = observer.finish()
    except (errors.UpstreamError, errors.UpstreamTimeout) as exc:
        # Only whole events were sent, so the error event starts cleanly; a half event is dropped.
        rest = _sse.error_event(exc.body())
        on_error(exc.code)
    await send({"type": "http.response.body", "body": rest})
    return observer.usage
