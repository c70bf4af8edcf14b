"""The mesh WebSocket bridge on a real router, driven by the ``websockets`` client (SPEC.md §6)."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets
from websockets.asyncio.client import ClientConnection
from websockets.asyncio.server import ServerConnection, serve

from router.app import build_app
from router.identity import devtokens
from router.transports import mesh
from tests.support import servers, trustgraphs, waiting

WAIT_S = 10.0


def token(srv: Any, principal: str) -> str:
    return devtokens.issue(srv.app.state.kars.dev_key, principal, audience="kars-router")


def ws_url(srv: Any, peer: str) -> str:
    return srv.url.replace("http://", "ws://") + f"/mesh/{peer}"


async def dial(srv: Any, caller: str, peer: str, **kw: Any) -> ClientConnection:
    return await websockets.connect(
        ws_url(srv, peer), additional_headers={"Authorization": f"Bearer {token(srv, caller)}"}, **kw
    )


async def pair(srv: Any, x: str, y: str) -> tuple[ClientConnection, ClientConnection]:
    a = await dial(srv, x, y)
    b = await dial(srv, y, x)
    return a, b


async def refused(srv: Any, caller: str, peer: str) -> tuple[int, dict[str, Any]]:
    with pytest.raises(websockets.InvalidStatus) as info:
        await dial(srv, caller, peer)
    response = info.value.response
    return response.status_code, json.loads(response.body or b"{}")


@pytest.fixture
def graph() -> trustgraphs.Graph:
    return trustgraphs.Graph().edge("team/a", "team/b", both=True).edge("team/c", "team/d", both=True)


@pytest.fixture
def mesh_router(router_server: Callable[..., Any], policy_dir: Path, graph: trustgraphs.Graph) -> Any:
    graph.write(policy_dir)
    return router_server(mesh={"pairTimeoutS": 5})


async def test_frames_keep_their_bytes_and_their_type(mesh_router: Any) -> None:
    a, b = await pair(mesh_router, "team/a", "team/b")
    text = "héllo ✓ \x00 {not json"
    blob = bytes(range(256)) * 3 + os.urandom(1000)
    await a.send(text)
    await a.send(blob)
    await b.send(b"")
    await b.send("")
    got_text = await asyncio.wait_for(b.recv(), WAIT_S)
    got_blob = await asyncio.wait_for(b.recv(), WAIT_S)
    assert isinstance(got_text, str) and got_text == text
    assert isinstance(got_blob, bytes) and got_blob == blob
    back_bytes, back_text = await asyncio.wait_for(a.recv(), WAIT_S), await asyncio.wait_for(a.recv(), WAIT_S)
    assert back_bytes == b"" and isinstance(back_bytes, bytes)
    assert back_text == "" and isinstance(back_text, str)
    await a.close()
    await b.close()


async def test_no_edge_is_403_before_the_upgrade(mesh_router: Any) -> None:
    status, body = await refused(mesh_router, "team/a", "team/c")
    assert status == 403
    assert body["error"]["code"] == "trust_edge_missing"


async def test_unauthenticated_caller_is_401_before_the_upgrade(mesh_router: Any) -> None:
    with pytest.raises(websockets.InvalidStatus) as info:
        await websockets.connect(ws_url(mesh_router, "team/b"))
    assert info.value.response.status_code == 401


async def test_second_connection_for_the_same_pair_is_409(mesh_router: Any) -> None:
    first = await dial(mesh_router, "team/a", "team/b")
    status, body = await refused(mesh_router, "team/a", "team/b")
    assert status == 409 and body["error"]["code"] == "conflict"
    b = await dial(mesh_router, "team/b", "team/a")
    status, _ = await refused(mesh_router, "team/b", "team/a")  # bridged now: still one per pair
    assert status == 409
    await first.send("still works")
    assert await asyncio.wait_for(b.recv(), WAIT_S) == "still works"
    await first.close()
    await b.close()


async def test_unpaired_caller_is_closed_with_1001_after_the_timeout(
    router_server: Callable[..., Any], policy_dir: Path, graph: trustgraphs.Graph
) -> None:
    graph.write(policy_dir)
    srv = router_server(mesh={"pairTimeoutS": 0.3})
    lonely = await dial(srv, "team/a", "team/b")
    with pytest.raises(websockets.ConnectionClosed) as info:
        await asyncio.wait_for(lonely.recv(), WAIT_S)
    assert info.value.rcvd is not None and info.value.rcvd.code == 1001
    # The slot is free again: a new attempt is accepted (not 409).
    again = await dial(srv, "team/a", "team/b")
    await again.close()


async def test_a_message_sent_while_waiting_is_delivered_after_pairing(mesh_router: Any) -> None:
    a = await dial(mesh_router, "team/a", "team/b")
    await a.send(b"early")
    b = await dial(mesh_router, "team/b", "team/a")
    assert await asyncio.wait_for(b.recv(), WAIT_S) == b"early"
    await a.close()
    await b.close()


async def test_messages_sent_while_waiting_arrive_in_order_after_pairing(mesh_router: Any) -> None:
    a = await dial(mesh_router, "team/a", "team/b")
    early = [f"early {i}" if i % 2 else f"early {i}".encode() for i in range(mesh.WAIT_HELD_FRAMES + 5)]
    for frame in early:  # more than the router holds: the rest waits in the socket
        await a.send(frame)
    b = await dial(mesh_router, "team/b", "team/a")
    assert [await asyncio.wait_for(b.recv(), WAIT_S) for _ in early] == early
    await b.send("and back")
    assert await asyncio.wait_for(a.recv(), WAIT_S) == "and back"
    await a.close()
    await b.close()


async def dial_when_free(srv: Any, caller: str, peer: str, timeout_s: float) -> ClientConnection:
    """Dial until the router stops answering 409 for (caller, peer), for at most ``timeout_s``."""

    async def attempt() -> ClientConnection | None:
        try:
            return await dial(srv, caller, peer)
        except websockets.InvalidStatus as exc:
            assert exc.response.status_code == 409
            return None

    return await waiting.until_async(attempt, timeout_s=timeout_s, what=f"{caller} -> {peer} to be free")


@pytest.mark.parametrize("leaving", ["close", "abort"])
async def test_a_waiting_caller_that_sent_a_message_and_left_frees_its_place_at_once(
    router_server: Callable[..., Any], policy_dir: Path, graph: trustgraphs.Graph, leaving: str
) -> None:
    """Only an open connection holds (X, Y) (SPEC.md §6): a caller that left is never paired with."""
    graph.write(policy_dir)
    srv = router_server(mesh={"pairTimeoutS": 60})  # the timeout is not what frees the place
    gone = await dial(srv, "team/a", "team/b")
    await gone.send("stale")
    if leaving == "close":
        await gone.close()
    else:
        gone.transport.abort()  # no close frame: the TCP connection just drops
    a = await dial_when_free(srv, "team/a", "team/b", timeout_s=5)
    b = await dial(srv, "team/b", "team/a")
    await a.send("fresh")
    assert await asyncio.wait_for(b.recv(), WAIT_S) == "fresh"  # not the stale one, and not a close
    await b.send("and back")
    assert await asyncio.wait_for(a.recv(), WAIT_S) == "and back"
    await a.close()
    await b.close()


async def test_a_counterpart_arriving_after_the_waiter_left_waits_for_a_new_one(
    router_server: Callable[..., Any], policy_dir: Path, graph: trustgraphs.Graph
) -> None:
    graph.write(policy_dir)
    srv = router_server(mesh={"pairTimeoutS": 60})
    gone = await dial(srv, "team/a", "team/b")
    await gone.send("stale")
    gone.transport.abort()
    hub = srv.app.state.kars.mesh
    assert ("team/a", "team/b") in hub._claimed
    await waiting.until_async(lambda: not hub._claimed, timeout_s=5, what="the router to notice the waiter left")
    b = await dial(srv, "team/b", "team/a")
    a = await dial(srv, "team/a", "team/b")
    await a.send("fresh")
    assert await asyncio.wait_for(b.recv(), WAIT_S) == "fresh"
    await a.close()
    await b.close()


async def test_close_code_and_reason_reach_the_other_side(mesh_router: Any) -> None:
    a, b = await pair(mesh_router, "team/a", "team/b")
    await a.close(4001, "done here")
    with pytest.raises(websockets.ConnectionClosed) as info:
        await asyncio.wait_for(b.recv(), WAIT_S)
    assert info.value.rcvd is not None
    assert (info.value.rcvd.code, info.value.rcvd.reason) == (4001, "done here")


def masked_frame_start(opcode: int, length: int, sent: bytes) -> bytes:
    """A client frame (RFC 6455 §5.2) announcing ``length`` payload bytes, of which ``sent`` follow."""
    mask = os.urandom(4)
    body = bytes(byte ^ mask[i % 4] for i, byte in enumerate(sent))
    return bytes([0x80 | opcode, 0x80 | 126]) + length.to_bytes(2, "big") + mask + body


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore:The `websockets` implementation is deprecated")
@pytest.mark.parametrize("implementation", ["websockets-sansio", "websockets"])
@pytest.mark.parametrize("vanishing", ["between frames", "mid-frame"])
async def test_peer_vanishing_is_going_away_for_the_other_side(
    make_settings: Callable[..., Any], policy_dir: Path, graph: trustgraphs.Graph, implementation: str, vanishing: str
) -> None:
    """No close frame came: the peer vanished, and the other side is told 1001, not a clean 1000."""
    graph.write(policy_dir)
    app = build_app(make_settings())
    with servers.serve(app, ws=implementation) as srv:
        srv.app = app  # type: ignore[attr-defined]
        a, b = await pair(srv, "team/a", "team/b")
        if vanishing == "mid-frame":
            a.transport.write(masked_frame_start(0x2, 1000, b"0123456789"))
        a.transport.abort()  # no close frame: the TCP connection just drops
        with pytest.raises(websockets.ConnectionClosed) as info:
            await asyncio.wait_for(b.recv(), WAIT_S)
        assert info.value.rcvd is not None and info.value.rcvd.code == 1001


async def test_a_close_frame_without_a_code_is_a_normal_close_for_the_other_side(mesh_router: Any) -> None:
    a, b = await pair(mesh_router, "team/a", "team/b")
    a.transport.write(bytes([0x88, 0x80]) + os.urandom(4))  # a masked close frame, no status (RFC 6455 §5.5.1)
    with pytest.raises(websockets.ConnectionClosed) as info:
        await asyncio.wait_for(b.recv(), WAIT_S)
    # 1005 may not be sent on (RFC 6455 §7.4.1); the peer did close, so the other side gets 1000.
    assert info.value.rcvd is not None and (info.value.rcvd.code, info.value.rcvd.reason) == (1000, "")
    a.transport.abort()


async def test_pings_are_answered_across_the_bridge(mesh_router: Any) -> None:
    a, b = await pair(mesh_router, "team/a", "team/b")
    latency = await asyncio.wait_for(await a.ping(b"are you there"), WAIT_S)
    assert latency >= 0
    await a.close()
    await b.close()


async def test_metrics_count_bridges(mesh_router: Any) -> None:
    a, b = await pair(mesh_router, "team/a", "team/b")
    await a.send("x")
    await asyncio.wait_for(b.recv(), WAIT_S)
    async with httpx.AsyncClient() as http:
        text = (await http.get(f"{mesh_router.url}/metrics", timeout=5)).text
    assert 'kars_mesh_bridges_total{outcome="paired"} 1.0' in text
    assert "kars_mesh_bridges_active 1.0" in text
    assert 'kars_trust_admissions_total{result="admitted"} 2.0' in text
    await a.close()
    await b.close()


async def mesh_bytes(srv: Any) -> float:
    async with httpx.AsyncClient() as http:
        text = (await http.get(f"{srv.url}/metrics", timeout=5)).text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith("kars_mesh_bytes_total "))


async def test_metrics_count_payload_bytes_not_characters(mesh_router: Any) -> None:
    a, b = await pair(mesh_router, "team/a", "team/b")
    before = await mesh_bytes(mesh_router)
    frames: list[str | bytes] = ["héllo ✓", "plain", b"\x00\xff\x10", "", "𝄞"]
    for frame in frames:
        await a.send(frame)
        assert await asyncio.wait_for(b.recv(), WAIT_S) == frame
    expected = before + sum(len(f.encode() if isinstance(f, str) else f) for f in frames)  # 10 + 5 + 3 + 0 + 4

    async def counted() -> bool:
        return await mesh_bytes(mesh_router) == expected

    await waiting.until_async(counted, timeout_s=5, what=f"kars_mesh_bytes_total to reach {expected}")
    await a.close()
    await b.close()


# -- live policy changes --------------------------------------------------------------------


async def test_dropping_an_edge_closes_only_the_bridges_on_it(
    mesh_router: Any, policy_dir: Path, graph: trustgraphs.Graph
) -> None:
    a, b = await pair(mesh_router, "team/a", "team/b")
    c, d = await pair(mesh_router, "team/c", "team/d")
    generation = mesh_router.app.state.kars.policy.snapshot.generation

    graph.without("team/a", "team/b").write(policy_dir)
    loop = asyncio.get_running_loop()
    closes = []
    for side in (a, b):
        with pytest.raises(websockets.ConnectionClosed) as info:
            await asyncio.wait_for(side.recv(), WAIT_S)
        closes.append((info.value.rcvd.code if info.value.rcvd else None, loop.time()))
    swapped = mesh_router.app.state.kars.policy.snapshot.generation
    assert swapped == generation + 1
    assert [code for code, _ in closes] == [1008, 1008]

    # The other bridge is untouched.
    await c.send(b"still here")
    assert await asyncio.wait_for(d.recv(), WAIT_S) == b"still here"
    await d.send("and back")
    assert await asyncio.wait_for(c.recv(), WAIT_S) == "and back"
    # And the dropped edge is now refused before the upgrade.
    status, _ = await refused(mesh_router, "team/a", "team/b")
    assert status == 403
    await c.close()
    await d.close()


async def test_edge_removal_closes_within_one_second_of_the_swap(
    mesh_router: Any, policy_dir: Path, graph: trustgraphs.Graph
) -> None:
    a, _b = await pair(mesh_router, "team/a", "team/b")
    store = mesh_router.app.state.kars.policy
    graph.without("team/b", "team/a").write(policy_dir)
    # Reload now on the router's loop (the watcher would too) and time the close from the swap.
    swap = asyncio.get_running_loop().time()
    await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(store.reload(), mesh_router.loop))
    with pytest.raises(websockets.ConnectionClosed) as info:
        await asyncio.wait_for(a.recv(), 1.0)
    assert info.value.rcvd is not None and info.value.rcvd.code == 1008
    assert asyncio.get_running_loop().time() - swap < 1.0 + 1.0  # reload itself + the 1 s budget


# -- relay ---------------------------------------------------------------------------------


@pytest.fixture
async def relay() -> AsyncIterator[dict[str, Any]]:
    """A stand-in relay: records the X-Kars-* headers and echoes every frame back unchanged."""
    seen: dict[str, Any] = {"headers": []}

    async def handler(conn: ServerConnection) -> None:
        assert conn.request is not None
        seen["headers"].append((conn.request.headers.get("X-Kars-From"), conn.request.headers.get("X-Kars-To")))
        try:
            async for message in conn:
                if message == "close-me":
                    await conn.close(4003, "relay says bye")
                    break
                await conn.send(message)
        except websockets.ConnectionClosed:
            pass  # a close code other than 1000/1001 ends the iteration with an error
        seen["closed"] = conn.close_code

    async with serve(handler, "127.0.0.1", 0) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        seen["url"] = f"ws://127.0.0.1:{port}/relay"
        yield seen


async def test_peer_not_here_is_bridged_through_the_relay(
    router_server: Callable[..., Any], policy_dir: Path, graph: trustgraphs.Graph, relay: dict[str, Any]
) -> None:
    graph.write(policy_dir)
    srv = router_server(mesh={"relayUrl": relay["url"]})
    a = await dial(srv, "team/a", "team/b")
    await a.send("über")
    await a.send(b"\x00\xff")
    assert await asyncio.wait_for(a.recv(), WAIT_S) == "über"
    assert await asyncio.wait_for(a.recv(), WAIT_S) == b"\x00\xff"
    assert relay["headers"] == [("team/a", "team/b")]
    await a.send("close-me")
    with pytest.raises(websockets.ConnectionClosed) as info:
        await asyncio.wait_for(a.recv(), WAIT_S)
    assert info.value.rcvd is not None
    assert (info.value.rcvd.code, info.value.rcvd.reason) == (4003, "relay says bye")


async def test_caller_close_code_reaches_the_relay(
    router_server: Callable[..., Any], policy_dir: Path, graph: trustgraphs.Graph, relay: dict[str, Any]
) -> None:
    graph.write(policy_dir)
    srv = router_server(mesh={"relayUrl": relay["url"]})
    a = await dial(srv, "team/a", "team/b")
    await a.send("x")
    assert await asyncio.wait_for(a.recv(), WAIT_S) == "x"
    await a.close(4002, "bye")
    for _ in range(500):  # bounded: up to 5 s for the relay's handler to see the close
        if "closed" in relay:
            break
        await asyncio.sleep(0.01)
    assert relay.get("closed") == 4002


async def test_an_edge_dropped_while_the_relay_is_dialled_is_refused(
    router_server: Callable[..., Any], policy_dir: Path, graph: trustgraphs.Graph
) -> None:
    """Admission is checked again once the relay answers: an edge removed meanwhile opens no bridge."""
    opened = asyncio.Event()

    async def slow_handshake(_conn: ServerConnection, _request: Any) -> None:
        opened.set()
        await asyncio.sleep(1.0)  # the dial is in flight while the policy changes

    async def echo(conn: ServerConnection) -> None:
        async for message in conn:
            await conn.send(message)

    async with serve(echo, "127.0.0.1", 0, process_request=slow_handshake) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        graph.write(policy_dir)
        srv = router_server(mesh={"relayUrl": f"ws://127.0.0.1:{port}/relay"})
        dialling = asyncio.ensure_future(refused(srv, "team/a", "team/b"))
        await asyncio.wait_for(opened.wait(), WAIT_S)
        graph.without("team/a", "team/b").write(policy_dir)
        store = srv.app.state.kars.policy
        await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(store.reload(), srv.loop))
        status, body = await asyncio.wait_for(dialling, WAIT_S)
        assert (status, body["error"]["code"]) == (403, "trust_edge_missing")
        assert srv.app.state.kars.mesh.open_bridges == 0


async def test_unreachable_relay_is_502_before_the_upgrade(
    router_server: Callable[..., Any], policy_dir: Path, graph: trustgraphs.Graph
) -> None:
    graph.write(policy_dir)
    srv = router_server(mesh={"relayUrl": "ws://127.0.0.1:9/nothing-listens"})
    status, body = await refused(srv, "team/a", "team/b")
    assert status == 502 and body["error"]["code"] == "upstream_unavailable"


# -- volume --------------------------------------------------------------------------------


async def test_ten_megabytes_cross_the_bridge_intact(mesh_router: Any) -> None:
    a, b = await pair(mesh_router, "team/a", "team/b")
    chunk = 256 * 1024
    payload = os.urandom(10 * 1024 * 1024)

    async def write() -> None:
        for i in range(0, len(payload), chunk):
            await a.send(payload[i : i + chunk])

    writer = asyncio.create_task(write())
    digest = hashlib.sha256()
    received = 0
    while received < len(payload):
        frame = await asyncio.wait_for(b.recv(), WAIT_S)
        assert isinstance(frame, bytes)
        digest.update(frame)
        received += len(frame)
    await asyncio.wait_for(writer, WAIT_S)
    assert received == len(payload)
    assert digest.digest() == hashlib.sha256(payload).digest()
    await a.close()
    await b.close()


# -- bounded memory: the real `kars router` in its own process -----------------------------


def _rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@pytest.fixture
def router_process(tmp_path: Path, policy_dir: Path, graph: trustgraphs.Graph) -> Iterator[tuple[str, Any, Any]]:
    """``python -m router router`` on a free port; yields its ws base URL and the Popen."""
    graph.write(policy_dir)
    key_file = tmp_path / "dev-key.pem"
    key = devtokens.load_or_create_key(key_file)
    config = tmp_path / "kars.yaml"
    config.write_text(json.dumps({"identity": {"devKeyFile": str(key_file)}, "budgets": {"store": "memory"}}))
    port = servers.free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("KARS_")}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "router",
            "router",
            "--config",
            str(config),
            "--policy-dir",
            str(policy_dir),
            "--port",
            str(port),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        waiting.until(lambda: _ready(port), timeout_s=20, what="the router process to answer /healthz")
        yield f"ws://127.0.0.1:{port}", key, proc
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _ready(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


async def test_slow_reader_slows_its_writer_and_the_router_buffers_little(router_process: Any) -> None:
    base, key, proc = router_process

    def auth(principal: str) -> dict[str, str]:
        return {"Authorization": "Bearer " + devtokens.issue(key, principal, audience="kars-router")}

    a = await websockets.connect(f"{base}/mesh/team/b", additional_headers=auth("team/a"), max_size=None)
    b = await websockets.connect(f"{base}/mesh/team/a", additional_headers=auth("team/b"), max_size=None, max_queue=4)
    chunk, total = 256 * 1024, 40 * 1024 * 1024
    payload = os.urandom(total)
    sent = 0

    async def write() -> None:
        nonlocal sent
        for i in range(0, total, chunk):
            await a.send(payload[i : i + chunk])
            sent += chunk

    baseline = peak = _rss_bytes(proc.pid)
    writer = asyncio.create_task(write())
    # b reads nothing: the writer must stall once the (bounded) buffers along the way are full.
    loop = asyncio.get_running_loop()
    deadline, last, steady = loop.time() + 30, -1, 0
    while steady < 3:
        assert loop.time() < deadline, "the writer never stalled: nothing pushes back"
        await asyncio.sleep(0.2)  # sampling interval of the probe, not a synchronisation
        peak = max(peak, _rss_bytes(proc.pid))
        steady = steady + 1 if sent == last else 0
        last = sent
    assert not writer.done() and sent < total
    assert sent >= 4 * 1024 * 1024  # megabytes are in flight, unread ...
    assert peak - baseline < 8 * 1024 * 1024, f"router grew by {(peak - baseline) >> 20} MiB"  # ... not in the router

    digest, received = hashlib.sha256(), 0
    while received < total:
        frame = await asyncio.wait_for(b.recv(), WAIT_S)
        assert isinstance(frame, bytes)
        digest.update(frame)
        received += len(frame)
        peak = max(peak, _rss_bytes(proc.pid))
    await asyncio.wait_for(writer, WAIT_S)
    assert digest.digest() == hashlib.sha256(payload).digest()
    assert peak - baseline < 8 * 1024 * 1024, f"router grew by {(peak - baseline) >> 20} MiB"
    await a.close()
    await b.close()


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore:The `websockets` implementation is deprecated")
@pytest.mark.parametrize("implementation", ["websockets", "websockets-sansio"])
async def test_refusal_before_the_upgrade_on_each_uvicorn_websocket_implementation(
    make_settings: Callable[..., Any], policy_dir: Path, graph: trustgraphs.Graph, implementation: str
) -> None:
    """The 403 is a real HTTP answer (ASGI ``websocket.http.response``), whichever implementation runs."""
    graph.write(policy_dir)
    app = build_app(make_settings())
    with servers.serve(app, ws=implementation) as srv:
        srv.app = app  # type: ignore[attr-defined]
        status, body = await refused(srv, "team/a", "team/c")
        assert status == 403 and body["error"]["code"] == "trust_edge_missing"
        a, b = await pair(srv, "team/a", "team/b")
        await a.send(b"\x01\x02")
        assert await asyncio.wait_for(b.recv(), WAIT_S) == b"\x01\x02"
        await a.close()
        await b.close()


async def test_bridge_closes_when_its_edge_expires(router_server: Callable[..., Any], policy_dir: Path) -> None:
    soon = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=1.5)
    trustgraphs.Graph().edge("team/a", "team/b", not_after=soon).edge("team/b", "team/a").write(policy_dir)
    srv = router_server()
    a, b = await pair(srv, "team/a", "team/b")
    await a.send("before")
    assert await asyncio.wait_for(b.recv(), WAIT_S) == "before"
    for side in (a, b):
        with pytest.raises(websockets.ConnectionClosed) as info:
            await asyncio.wait_for(side.recv(), WAIT_S)
        assert info.value.rcvd is not None and info.value.rcvd.code == 1008
    assert dt.datetime.now(dt.UTC) >= soon


async def test_simultaneous_duplicates_get_one_connection_and_one_409(mesh_router: Any) -> None:
    results = await asyncio.gather(*(dial(mesh_router, "team/a", "team/b") for _ in range(4)), return_exceptions=True)
    opened = [r for r in results if isinstance(r, ClientConnection)]
    refused_ = [r for r in results if isinstance(r, websockets.InvalidStatus)]
    assert len(opened) == 1 and len(refused_) == 3, results
    assert all(r.response.status_code == 409 for r in refused_)
    await opened[0].close()
