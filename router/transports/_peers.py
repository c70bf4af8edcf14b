"""WebSocket peers and the pump a mesh bridge is made of: one message at a time, close codes passed on.

A pump holds one message and awaits the receiving side's ``send`` (which waits while that socket's
write buffer is full) before it reads the next, so a slow reader slows its writer and nothing
buffers without bound. Payloads are opaque: text stays text, bytes stay bytes, nothing is parsed.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import Iterable
from typing import Protocol

import websockets
from starlette.types import Message, Receive, Send
from websockets.asyncio.client import ClientConnection

from router.observability import metrics as metrics_mod

CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001  # pair timeout, router shutdown, a peer that vanished (RFC 6455 §7.4.1)
CLOSE_NO_STATUS = 1005  # a close frame without a status code (RFC 6455 §7.1.5)
CLOSE_ABNORMAL = 1006  # no close frame at all: the connection was lost (RFC 6455 §7.1.5)
# Codes that may not be sent in a close frame (RFC 6455 §7.4.1), and what the other side gets
# instead: a close without a code was still a close (1000); a peer that vanished went away (1001).
_UNSENDABLE = {CLOSE_NO_STATUS: CLOSE_NORMAL, CLOSE_ABNORMAL: CLOSE_GOING_AWAY, 1015: CLOSE_GOING_AWAY}


@dataclasses.dataclass(frozen=True, slots=True)
class Closed:
    code: int
    reason: str


class Peer(Protocol):
    async def recv(self) -> str | bytes | Closed: ...
    async def send(self, data: str | bytes) -> None: ...
    async def close(self, code: int, reason: str = "") -> None: ...


class AsgiPeer:
    """A caller's accepted WebSocket, as raw ASGI messages (no framework object in the way)."""

    def __init__(self, receive: Receive, send: Send) -> None:
        self._receive = receive
        self._send = send
        self.closed = False

    async def recv(self) -> str | bytes | Closed:
        while True:
            message = await self._receive()
            kind = message["type"]
            if kind == "websocket.receive":
                data = message.get("bytes")
                return data if data is not None else message.get("text") or ""
            if kind == "websocket.disconnect":
                self.closed = True
                return _disconnect(message)

    async def send(self, data: str | bytes) -> None:
        if self.closed:
            raise ConnectionError("peer closed")
        key = "bytes" if isinstance(data, bytes) else "text"
        await self._send({"type": "websocket.send", key: data})

    async def close(self, code: int, reason: str = "") -> None:
        if self.closed:
            return
        self.closed = True
        with contextlib.suppress(OSError, RuntimeError):
            await self._send({"type": "websocket.close", "code": code, "reason": reason})


def _disconnect(message: Message) -> Closed:
    """What ended the caller's connection; a lost connection is 1006, whatever the server said."""
    code = int(message.get("code", CLOSE_NO_STATUS))
    # uvicorn's websockets-sansio (its default) and wsproto report a lost connection (TCP gone,
    # even mid-frame) as 1005 too, the code of a close frame without a status; only the
    # "reason" key tells them apart: a close frame always brings one, a lost connection none.
    if code == CLOSE_NO_STATUS and "reason" not in message:
        code = CLOSE_ABNORMAL
    return Closed(code, message.get("reason") or "")


class RelayPeer:
    """The relay's side of a bridge: a ``websockets`` client connection."""

    def __init__(self, conn: ClientConnection) -> None:
        self._conn = conn

    async def recv(self) -> str | bytes | Closed:
        try:
            return await self._conn.recv()
        except websockets.ConnectionClosed as exc:
            rcvd = exc.rcvd
            return Closed(rcvd.code, rcvd.reason) if rcvd is not None else Closed(1006, "")

    async def send(self, data: str | bytes) -> None:
        await self._conn.send(data)

    async def close(self, code: int, reason: str = "") -> None:
        await self._conn.close(code, reason)


async def pump(
    source: Peer,
    sink: Peer,
    metrics: metrics_mod.Metrics,
    *,
    held: Iterable[str | bytes] = (),
    reading: asyncio.Task[str | bytes | Closed] | None = None,
) -> None:
    """Relay ``source`` -> ``sink`` one message at a time until ``source`` closes; pass its close on.

    ``held`` are frames read from ``source`` before the bridge stood, ``reading`` a read of it
    already under way: both are delivered first, in that order.
    """
    queued = iter(held)
    while True:
        item: str | bytes | Closed | None = next(queued, None)
        if item is None:
            if reading is not None:
                item, reading = await reading, None
            else:
                item = await source.recv()
        if isinstance(item, Closed):
            await sink.close(_UNSENDABLE.get(item.code, item.code), item.reason)
            return
        try:
            await sink.send(item)
        except (OSError, RuntimeError, websockets.ConnectionClosed):
            # The sink is gone; its own pump passes its close back to ``source``.
            return
        # Bytes on the wire: text is UTF-8 (RFC 6455 §5.6). The sinks encode it themselves, so it is
        # encoded here only to be counted, and not at all when it is ASCII (one byte a character).
        metrics.mesh_bytes.inc(len(item) if isinstance(item, bytes) or item.isascii() else len(item.encode()))
