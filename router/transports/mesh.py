"""Mesh: the agent-to-agent WebSocket bridge of SPEC.md §6.

A bridge is a pair of connections: X at ``/mesh/Y`` and Y at ``/mesh/X``. The first to arrive is
accepted and waits up to ``mesh.pairTimeoutS`` for its counterpart (then closes with 1001); what
it sends meanwhile is held (a bounded amount) and delivered first. A waiter that leaves frees its
place at once and is never paired with. Once paired, each side's frames are handed to the other
as opaque payloads that keep their type; nothing is parsed or logged. With ``mesh.relayUrl`` set,
a caller whose counterpart is not waiting here is bridged to the relay instead (dialled with
``X-Kars-From``/``X-Kars-To``).

Refusals happen before the upgrade (HTTP answers): a second connection for the same (X, Y) is
409, an unreachable relay 502; admission (403) is the TrustGraph layer's. Backpressure: a pump
holds one message at a time and awaits the receiving side's ``send`` (which waits while that
socket's write buffer is full) before it reads the next, so a slow reader slows its writer and
nothing buffers without bound. Pings are answered per hop by the WebSocket implementations
(RFC 6455 §5.5.2); close codes travel to the other side, and a side that vanished (no close
frame) is reported to the other as 1001. When a new policy snapshot drops the edge a bridge
stands on, the bridge is closed with 1008 as soon as the snapshot is swapped in.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import logging
from collections.abc import Callable
from typing import Any

import websockets
from starlette.types import Receive, Scope, Send

from router import _asgi, errors
from router.observability import metrics as metrics_mod
from router.policy import snapshot as snapshot_mod
from router.policy import store as store_mod
from router.transports import _peers

log = logging.getLogger("kars.mesh")

FROM_HEADER = "X-Kars-From"
TO_HEADER = "X-Kars-To"
CLOSE_GOING_AWAY = _peers.CLOSE_GOING_AWAY
CLOSE_POLICY = 1008
RELAY_OPEN_TIMEOUT_S = 5.0
RELAY_MAX_MESSAGE_BYTES = 16 * 1024 * 1024  # the same cap uvicorn puts on the caller's side
RELAY_MAX_QUEUE = 4  # frames the relay client may hold before it stops reading its socket
# What the router holds for a caller still waiting for its counterpart (frame lengths: bytes, or
# characters of text); past either bound it stops reading that caller until it is paired.
WAIT_HELD_FRAMES = 32
WAIT_HELD_LEN = 1024 * 1024

PairKey = tuple[str, str]  # (caller, peer)


@dataclasses.dataclass(eq=False)
class Bridge:
    """One open bridge: the edges it stands on and its two sides."""

    edges: tuple[PairKey, ...]
    sides: tuple[_peers.Peer, _peers.Peer]
    pumps: int = 2
    expiry: asyncio.TimerHandle | None = None

    async def close(self, code: int, reason: str) -> None:
        await asyncio.gather(*(side.close(code, reason) for side in self.sides), return_exceptions=True)


@dataclasses.dataclass(eq=False)
class _Waiter:
    peer: _peers.AsgiPeer
    paired: asyncio.Future[tuple[_peers.Peer, Bridge]]


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class MeshHub:
    """Pairs mesh callers, runs their bridges, and closes the ones a new policy no longer allows."""

    def __init__(
        self,
        *,
        policy: store_mod.PolicyStore,
        metrics: metrics_mod.Metrics,
        relay_url: str | None,
        pair_timeout_s: float,
        clock: Callable[[], dt.datetime] = _utcnow,
    ) -> None:
        self._metrics = metrics
        self._policy = policy
        self._relay_url = relay_url
        self._pair_timeout_s = pair_timeout_s
        self._clock = clock
        self._waiting: dict[PairKey, _Waiter] = {}
        self._bridges: dict[PairKey, Bridge] = {}
        self._claimed: set[PairKey] = set()  # (caller, peer) of every open connection, claimed before any await
        self._closing: set[asyncio.Task[None]] = set()
        policy.subscribe(self.on_snapshot)

    @property
    def open_bridges(self) -> int:
        return len(set(self._bridges.values()))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The ASGI endpoint of ``/mesh/{ns}/{name}`` (a WebSocket route)."""
        principal = scope["state"].get(_asgi.PRINCIPAL)
        if principal is None:
            raise errors.Unauthenticated("no verified caller", code="missing_credentials")
        params = scope.get("path_params", {})
        caller, peer = principal.id, f"{params['ns']}/{params['name']}"
        if caller == peer:
            raise errors.InvalidRequest("a mesh bridge needs two different principals")
        key = (caller, peer)
        if key in self._claimed:
            self._metrics.mesh_bridges.labels("conflict").inc()
            raise errors.Conflict(f"a mesh connection {caller} -> {peer} is already open")
        self._claimed.add(key)
        try:
            if await receive() != {"type": "websocket.connect"}:
                return
            if (peer, caller) in self._waiting or self._relay_url is None:
                await self._meet(key, receive, send)
            else:
                await self._relay(key, receive, send)
        finally:
            self._claimed.discard(key)

    async def _meet(self, key: PairKey, receive: Receive, send: Send) -> None:
        """Accept, then join the counterpart if it is still waiting here, else wait for it."""
        await send({"type": "websocket.accept"})
        me = _peers.AsgiPeer(receive, send)
        # Looked up after the accept, with no await until it is paired: a waiter that left
        # meanwhile is gone from ``_waiting`` and is never paired with.
        counterpart = self._waiting.pop((key[1], key[0]), None)
        if counterpart is not None and not counterpart.paired.done():
            await self._join(key, me, counterpart)
        else:
            await self._wait(key, me)

    async def _join(self, key: PairKey, me: _peers.AsgiPeer, counterpart: _Waiter) -> None:
        bridge = Bridge(edges=(key, (key[1], key[0])), sides=(me, counterpart.peer))
        for edge in bridge.edges:
            self._bridges[edge] = bridge
        self._metrics.mesh_bridges.labels("paired").inc()
        self._metrics.mesh_bridges_active.inc()
        counterpart.paired.set_result((me, bridge))
        self._close_at_expiry(bridge)
        try:
            await _peers.pump(me, counterpart.peer, self._metrics)
        finally:
            self._pump_done(bridge)

    async def _wait(self, key: PairKey, me: _peers.AsgiPeer) -> None:
        loop = asyncio.get_running_loop()
        waiter = _Waiter(me, loop.create_future())
        self._waiting[key] = waiter
        # Keep reading while waiting: a caller that leaves is noticed only by its disconnect, which
        # comes after the frames it sent. Those are held, up to a bound, and delivered first once
        # paired. Past the bound reading stops (backpressure), and a caller that then leaves is
        # noticed only when it is paired or times out.
        held: list[str | bytes] = []
        held_len = 0
        reading: asyncio.Task[str | bytes | _peers.Closed] | None = asyncio.ensure_future(me.recv())
        deadline = loop.time() + self._pair_timeout_s
        try:
            while not waiter.paired.done():
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                watch: set[asyncio.Future[Any]] = {waiter.paired} if reading is None else {reading, waiter.paired}
                await asyncio.wait(watch, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
                if reading is not None and reading.done() and not waiter.paired.done():
                    item = reading.result()
                    if isinstance(item, _peers.Closed):
                        return  # the caller left before its counterpart came: its place is free at once
                    held.append(item)
                    held_len += len(item)
                    within = len(held) < WAIT_HELD_FRAMES and held_len < WAIT_HELD_LEN
                    reading = asyncio.ensure_future(me.recv()) if within else None
        finally:
            if self._waiting.get(key) is waiter:
                del self._waiting[key]
        if not waiter.paired.done() or waiter.paired.cancelled():
            timed_out = not waiter.paired.done()
            waiter.paired.cancel()
            if reading is not None:
                reading.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await reading
            if timed_out:
                self._metrics.mesh_bridges.labels("pair_timeout").inc()
                await me.close(CLOSE_GOING_AWAY, "no counterpart within mesh.pairTimeoutS")
            return  # cancelled: the policy change that dropped the edge is closing it
        other, bridge = waiter.paired.result()
        try:
            await _peers.pump(me, other, self._metrics, held=held, reading=reading)
        finally:
            self._pump_done(bridge)

    async def _relay(self, key: PairKey, receive: Receive, send: Send) -> None:
        assert self._relay_url is not None
        headers = {FROM_HEADER: key[0], TO_HEADER: key[1]}
        try:
            conn = await websockets.connect(
                self._relay_url,
                additional_headers=headers,
                open_timeout=RELAY_OPEN_TIMEOUT_S,
                max_size=RELAY_MAX_MESSAGE_BYTES,
                max_queue=RELAY_MAX_QUEUE,
                compression=None,
            )
        except (OSError, TimeoutError, websockets.InvalidHandshake, websockets.InvalidURI) as exc:
            raise errors.UpstreamError(
                f"mesh relay unreachable: {type(exc).__name__}", code="upstream_unavailable"
            ) from exc
        if not self._edge_still_there(key):  # dropped while the relay was dialled
            await conn.close()
            raise errors.Forbidden(f"the TrustGraph edge {key[0]} -> {key[1]} was removed", code="trust_edge_missing")
        await send({"type": "websocket.accept"})
        me, relay = _peers.AsgiPeer(receive, send), _peers.RelayPeer(conn)
        bridge = Bridge(edges=(key,), sides=(me, relay))
        self._bridges[key] = bridge  # from here on a policy change closes it (on_snapshot)
        if not self._edge_still_there(key):  # dropped during the accept
            self._metrics.mesh_bridges.labels("closed_by_policy").inc()
            self._spawn(bridge.close(CLOSE_POLICY, "trust edge removed"))
        self._close_at_expiry(bridge)
        self._metrics.mesh_bridges.labels("relayed").inc()
        self._metrics.mesh_bridges_active.inc()
        try:
            await asyncio.gather(_peers.pump(me, relay, self._metrics), _peers.pump(relay, me, self._metrics))
        finally:
            bridge.pumps = 1
            self._pump_done(bridge)
            await conn.close()

    def _edge_still_there(self, key: PairKey) -> bool:
        return self._policy.snapshot.trust_edge(key[0], key[1], self._clock()) is not None

    def _close_at_expiry(self, bridge: Bridge) -> None:
        """An edge with ``notAfter`` stops counting then: the bridge on it closes (1008) at that moment."""
        now = self._clock()
        ends = []
        for src, dst in bridge.edges:
            edge = self._policy.snapshot.trust_edge(src, dst, now)
            if edge is not None and edge.not_after is not None:
                ends.append(edge.not_after)
        if ends:
            delay_s = max(0.0, (min(ends) - now).total_seconds())
            bridge.expiry = asyncio.get_running_loop().call_later(
                delay_s, lambda: self._spawn(bridge.close(CLOSE_POLICY, "trust edge expired"))
            )

    def _pump_done(self, bridge: Bridge) -> None:
        bridge.pumps -= 1
        if bridge.pumps == 0:
            if bridge.expiry is not None:
                bridge.expiry.cancel()
            for edge in bridge.edges:
                if self._bridges.get(edge) is bridge:
                    del self._bridges[edge]
            self._metrics.mesh_bridges_active.dec()

    # -- policy changes ---------------------------------------------------------------------

    def on_snapshot(self, snap: snapshot_mod.Snapshot) -> None:
        """Close, with 1008, every bridge and waiter whose edge the new snapshot no longer has."""
        now = self._clock()
        doomed: set[Bridge] = set()
        for bridge in set(self._bridges.values()):
            if any(snap.trust_edge(src, dst, now) is None for src, dst in bridge.edges):
                doomed.add(bridge)
        for key, waiter in list(self._waiting.items()):
            if snap.trust_edge(key[0], key[1], now) is None:
                del self._waiting[key]
                waiter.paired.cancel()
                self._spawn(waiter.peer.close(CLOSE_POLICY, "trust edge removed"))
        for bridge in doomed:
            self._metrics.mesh_bridges.labels("closed_by_policy").inc()
            self._spawn(bridge.close(CLOSE_POLICY, "trust edge removed"))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def aclose(self) -> None:
        """At shutdown: every waiter and bridge is told the router is going away."""
        for waiter in self._waiting.values():
            waiter.paired.cancel()
            self._spawn(waiter.peer.close(CLOSE_GOING_AWAY, "router shutting down"))
        for bridge in set(self._bridges.values()):
            self._spawn(bridge.close(CLOSE_GOING_AWAY, "router shutting down"))
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)
