"""Raw-ASGI plumbing for the fakes and bench upstreams: a no-op lifespan and a body reader."""

from __future__ import annotations

from starlette.types import Receive, Send


async def lifespan(receive: Receive, send: Send) -> None:
    """Acknowledge startup and shutdown; the fake owns nothing to open or close."""
    while True:
        kind = (await receive())["type"]
        await send({"type": kind + ".complete"})
        if kind == "lifespan.shutdown":
            return


async def read_body(receive: Receive) -> bytes:
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            return body
