"""Write one session ``Stream`` to the client as an SSE response, with keep-alive comments.

The response ends when the stream closes (a POST's last response went out, the session
ended) or the client goes away; what was not yet sent stays in the stream for a resumption.
"""

from __future__ import annotations

import asyncio
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
) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": [*_wire.SSE_HEADERS, *headers]})
    if preamble:
        await send({"type": "http.response.body", "body": preamble, "more_body": True})
    gone: asyncio.Task[Any] = asyncio.ensure_future(gateway.wait_disconnect(receive))
    stream.attached = True
    session.busy += 1
    try:
        async for event in stream.follow(after, keep_alive_s, gone):
            await send({"type": "http.response.body", "body": event or _wire.KEEPALIVE_COMMENT, "more_body": True})
        if not gone.done():
            await send({"type": "http.response.body", "body": b"", "more_body": False})
    finally:
        stream.attached = False
        session.busy -= 1
        session.touch()
        gone.cancel()
