"""Write one session ``Stream`` to the client as an SSE response, with keep-alive comments.

The response ends when the stream closes (a POST's last response went out, the session
ended) or the client goes away; what was not yet sent stays in the stream for a resumption.
A POST's stream usually ends within milliseconds, so its disconnect watcher starts only once
the stream has been idle for a keep-alive period (``watch_now=False``): the common call costs
no extra task. Long-lived streams (GET, legacy SSE) watch from the start.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from starlette.types import Receive, Send

from router.transports.mcp import _wire, gateway, sessions


async def serve(
    stream: sessions.Stream,
    session: sessions.Session,
    receive: Receive,
    send: Send,
    *,
    after: int,
    keep_alive_s: float,
    headers: list[tuple[bytes, bytes]],
    preamble: bytes = b"",
    watch_now: bool = True,
) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": [*_wire.SSE_HEADERS, *headers]})
    if preamble:
        await send({"type": "http.response.body", "body": preamble, "more_body": True})
    gone: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    watcher: asyncio.Task[None] | None = None

    async def watch() -> None:
        await gateway.wait_disconnect(receive)
        if not gone.done():
            gone.set_result(None)

    if watch_now:
        watcher = asyncio.create_task(watch())
    if stream.reader is not None and not stream.reader.done():
        stream.reader.set_result(None)  # a resumption replaces a reader whose client went away
    stream.reader = gone
    session.busy += 1
    try:
        async with contextlib.aclosing(stream.follow(after, keep_alive_s, gone)) as follow:
            async for events in follow:
                if events is None:
                    if watcher is None:
                        watcher = asyncio.create_task(watch())
                    events = _wire.KEEPALIVE_COMMENT
                last = stream.closed and not stream.has_more(after=stream.delivered)
                await send({"type": "http.response.body", "body": events, "more_body": not last})
                if last:
                    return
        if not gone.done():
            await send({"type": "http.response.body", "body": b"", "more_body": False})
    finally:
        if stream.reader is gone:
            stream.reader = None
        session.busy -= 1
        session.touch()
        if watcher is not None:
            watcher.cancel()


async def json_reply(send: Send, data: str, headers: list[tuple[bytes, bytes]]) -> None:
    """The whole answer to a POST in one JSON body (Streamable HTTP allows JSON or SSE)."""
    body = data.encode()
    start = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *headers]
    await send({"type": "http.response.start", "status": 200, "headers": start})
    await send({"type": "http.response.body", "body": body})


async def serve_inline(
    stream: sessions.Stream,
    session: sessions.Session,
    send: Send,
    pump: gateway.Pump,
    *,
    keep_alive_s: float,
    headers: list[tuple[bytes, bytes]],
) -> None:
    """Answer one POSTed request while pumping it: each upstream message goes out as it arrives.

    When the upstream's first message about the request is its response, the answer is plain
    JSON; when anything comes first (progress, a server-to-client request), or nothing has come
    for ``keep_alive_s``, it is an SSE stream, with keep-alive comments while the tool works.
    Events go through ``stream`` (numbered, kept for ``Last-Event-ID``); a resumed GET that
    takes the stream over gets the rest, while this response stops writing. The pump runs to
    the upstream's response even if the client has gone, so a resumption finds it complete.
    """
    loop = asyncio.get_running_loop()
    mine: asyncio.Future[Any] = loop.create_future()
    stream.reader = mine
    session.busy += 1
    mode = "undecided"  # then "json" or "sse"
    writing = asyncio.Lock()  # the pump and the keep-alive ticker both write

    async def start_sse() -> None:
        nonlocal mode
        mode = "sse"
        await send({"type": "http.response.start", "status": 200, "headers": [*_wire.SSE_HEADERS, *headers]})

    async def tick() -> None:
        while True:
            async with writing:
                if mode == "json":
                    return  # answered in full already
                if mode == "undecided":
                    await start_sse()
                await send({"type": "http.response.body", "body": _wire.KEEPALIVE_COMMENT, "more_body": True})
            await asyncio.sleep(keep_alive_s)

    ticker: asyncio.Task[None] | None = None

    def start_ticker() -> None:
        nonlocal ticker
        if ticker is None:  # only a call that runs this long pays for a task
            ticker = asyncio.create_task(tick())

    idle = loop.call_later(keep_alive_s, start_ticker)

    async def flush(final: bool = False) -> None:
        nonlocal mode, idle
        idle.cancel()
        if mode != "json":
            idle = loop.call_later(keep_alive_s, start_ticker)
        async with writing:
            if mode == "json":
                return
            if mode == "undecided":
                if stream.reader is mine and stream.seq == 1 and pump.answered():
                    mode = "json"
                    stream.take()
                    await json_reply(send, stream.last_data, headers)
                    return
                await start_sse()
            batch = stream.take() if stream.reader is mine else b""
            if batch or final:
                await send({"type": "http.response.body", "body": batch, "more_body": not final})

    task = asyncio.current_task()
    assert task is not None
    session.inline.add(task)
    try:
        try:
            await pump.run(after_each=flush)
        except asyncio.CancelledError:
            if not session.ended:
                raise
            task.uncancel()  # the gateway ended the session: its error answer is in the stream
        if ticker is not None:
            ticker.cancel()
            await asyncio.gather(ticker, return_exceptions=True)
        await flush(final=True)
    finally:
        idle.cancel()
        if ticker is not None:
            ticker.cancel()
        session.inline.discard(task)
        if stream.reader is mine:
            stream.reader = None
        session.busy -= 1
        session.touch()
