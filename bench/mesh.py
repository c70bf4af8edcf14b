"""Mesh bridge and TrustGraph admission: what a WebSocket frame and an admission decision cost.

``python -m bench mesh [--seconds N] [--window W]``:

1. 1 KB binary frames echoed a -> b -> a with W frames in flight, through the router's mesh bridge
   (``kars router``, uvloop + httptools, pinned to core 0) and, for comparison, through a direct
   WebSocket to a bare ASGI echo app on the same uvicorn stack (also pinned to core 0). The clients
   run in this process, pinned to core 1. Each round trip crosses the bridge twice.
2. TrustGraph admission decisions per second, in process: the admission middleware over a
   10,000-edge graph and over a 10-edge graph (O(1): the two rates should match), plus the graph's
   load time (every edge's Ed25519 signature is verified once, at load).
3. Signed requests and signed agent cards verified per second (EdDSA, ES256), in process.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import datetime as dt
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import websockets
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from bench import _load
from router.identity import devtokens
from router.identity.principal import Principal
from router.middleware import trust_graph
from router.observability import metrics as metrics_mod
from router.policy import model, snapshot, store, trustgraph

FRAME_BYTES = 1024
DECISIONS = 200_000

ECHO_APP = """
async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] == "http":
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})
        return
    await receive()
    await send({"type": "websocket.accept"})
    while True:
        message = await receive()
        if message["type"] != "websocket.receive":
            return
        await send({"type": "websocket.send", "bytes": message.get("bytes")})
"""


def _b64u(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def graph_document(pairs: list[tuple[str, str]], name: str = "bench") -> dict[str, Any]:
    """A TrustGraph whose edges are signed by their ``from`` vertex (SPEC.md §3 bytes)."""
    keys: dict[str, ed25519.Ed25519PrivateKey] = {}
    edges = []
    issued = "2026-01-01T00:00:00Z"
    for source, target in pairs:
        for vertex in (source, target):
            keys.setdefault(vertex, ed25519.Ed25519PrivateKey.generate())
        edge = model.Edge.model_validate(
            {"from": source, "to": target, "score": 900, "issuedAt": issued, "signature": "x"}
        )
        signature = _b64u(keys[source].sign(trustgraph.signing_input(edge)))
        edges.append({"from": source, "to": target, "score": 900, "issuedAt": issued, "signature": signature})
    raw = serialization.Encoding.Raw, serialization.PublicFormat.Raw
    vertices = [
        {"id": v, "alg": "EdDSA", "publicKeyB64u": _b64u(k.public_key().public_bytes(*raw))} for v, k in keys.items()
    ]
    return {
        "apiVersion": model.API_VERSION,
        "kind": "TrustGraph",
        "metadata": {"name": name},
        "spec": {"vertices": vertices, "edges": edges, "minScore": 500},
    }


# -- 1. frames through the bridge vs direct -------------------------------------------------


@contextlib.contextmanager
def mesh_router(work: Path) -> Iterator[tuple[str, ed25519.Ed25519PrivateKey]]:
    policy = work / "policy"
    policy.mkdir()
    (policy / "graph.json").write_text(json.dumps(graph_document([("bench/a", "bench/b"), ("bench/b", "bench/a")])))
    key_file = work / "dev-key.pem"
    key = devtokens.load_or_create_key(key_file)
    port = _load.free_port()
    argv = [sys.executable, "-m", "router", "router", "--policy-dir", str(policy), "--port", str(port)]
    env = {"KARS_LOG_ACCESS": "false", "KARS_BUDGETS_STORE": "memory", "KARS_IDENTITY_DEV_KEY_FILE": str(key_file)}
    url = f"http://127.0.0.1:{port}"
    with _load.process(_load.pinned(_load.SERVER_CORE, argv), ready_url=f"{url}/readyz", env=env, cwd=work):
        yield url.replace("http://", "ws://"), key


@contextlib.contextmanager
def echo_server(work: Path) -> Iterator[str]:
    (work / "echo_app.py").write_text(ECHO_APP)
    port = _load.free_port()
    argv = [sys.executable, "-m", "uvicorn", "echo_app:app", "--port", str(port), "--loop", "uvloop"]
    argv += ["--http", "httptools", "--no-access-log", "--log-level", "warning", "--ws-ping-interval", "0"]
    with _load.process(_load.pinned(_load.SERVER_CORE, argv), ready_url=f"http://127.0.0.1:{port}/", cwd=work):
        yield f"ws://127.0.0.1:{port}/echo"


async def _echo(conn: Any) -> None:
    with contextlib.suppress(websockets.ConnectionClosed):
        async for message in conn:
            await conn.send(message)


async def round_trips(sender: Any, seconds: float, window: int) -> tuple[float, list[float]]:
    """Round trips per second and their latencies (s), keeping ``window`` 1 KB frames in flight."""
    payload = os.urandom(FRAME_BYTES - 8)
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds
    done = 0

    async def send_one() -> None:
        await sender.send(time.perf_counter_ns().to_bytes(8, "big") + payload)

    for _ in range(window):
        await send_one()
    start = time.perf_counter()
    while True:
        frame = await sender.recv()
        now = time.perf_counter_ns()
        latencies.append((now - int.from_bytes(frame[:8], "big")) / 1e9)
        done += 1
        if time.perf_counter() >= deadline:
            break
        await send_one()
    elapsed = time.perf_counter() - start
    for _ in range(window - 1):  # drain what is still in flight
        await asyncio.wait_for(sender.recv(), 10)
    return done / elapsed, latencies


@contextlib.asynccontextmanager
async def bridged(base: str, key: ed25519.Ed25519PrivateKey) -> AsyncIterator[Any]:
    def auth(who: str) -> dict[str, str]:
        return {"Authorization": "Bearer " + devtokens.issue(key, who, audience="kars-router")}

    a = await websockets.connect(f"{base}/mesh/bench/b", additional_headers=auth("bench/a"), compression=None)
    b = await websockets.connect(f"{base}/mesh/bench/a", additional_headers=auth("bench/b"), compression=None)
    echo = asyncio.create_task(_echo(b))
    try:
        yield a
    finally:
        await a.close()
        await b.close()
        await echo


def frames_table(seconds: float, window: int) -> list[str]:
    rows = []

    async def measure(name: str, conn_cm: Any) -> None:
        async with conn_cm as conn:
            await round_trips(conn, 1.0, window)  # warm-up
            rate, lat = await round_trips(conn, seconds, window)
        lat.sort()
        p50, p99 = statistics.median(lat) * 1000, lat[int(len(lat) * 0.99) - 1] * 1000
        rows.append((name, rate, p50, p99))

    @contextlib.asynccontextmanager
    async def direct(url: str) -> AsyncIterator[Any]:
        conn = await websockets.connect(url, compression=None)
        try:
            yield conn
        finally:
            await conn.close()

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        with echo_server(work) as url:
            asyncio.run(measure("direct WebSocket (uvicorn echo app)", direct(url)))
        with mesh_router(work) as (base, key):
            asyncio.run(measure("through the kars mesh bridge", bridged(base, key)))

    direct_rate = rows[0][1]
    out = [
        f"| path (1 KB frames, {window} in flight) | round trips/s | frames relayed/s | vs direct | p50 ms | p99 ms |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, rate, p50, p99 in rows:
        relayed = rate * 2 if "bridge" in name else rate
        out.append(f"| {name} | {rate:,.0f} | {relayed:,.0f} | {rate / direct_rate:.2f}x | {p50:.2f} | {p99:.2f} |")
    return out


# -- 2. admission decisions -----------------------------------------------------------------


def _snapshot_with(edges: int) -> tuple[snapshot.Snapshot, float, list[tuple[str, str]]]:
    pairs = [(f"ns/agent-{i}", f"ns/agent-{(i * 7919 + 1) % edges}") for i in range(edges)]
    doc = graph_document(pairs)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "graph.json").write_text(json.dumps(doc))
        started = time.perf_counter()
        policy = store.PolicyStore(Path(tmp), model.SafetyFloor())
        asyncio.run(policy.reload())
        loaded = time.perf_counter() - started
    assert len(policy.snapshot.dropped_edges) == 0
    return policy.snapshot, loaded, pairs


async def _decide(layer: Any, scopes: list[dict[str, Any]]) -> float:
    """Admission decisions per second through the middleware (an admitted request costs no more)."""
    started = time.perf_counter()
    for i in range(DECISIONS):
        await layer(scopes[i % len(scopes)], None, None)
    return DECISIONS / (time.perf_counter() - started)


def admission_table() -> list[str]:
    out = [
        "| graph | load + verify | admission middleware decisions/s | trust_edge lookups/s |",
        "|---|---:|---:|---:|",
    ]
    for edges in (10, 10_000):
        snap, loaded, pairs = _snapshot_with(edges)
        policy = store.PolicyStore(None, model.SafetyFloor())
        policy.snapshot = snap

        async def admitted(scope: Any, receive: Any, send: Any) -> None:
            return None

        layer = trust_graph.TrustGraphMiddleware(admitted, policy=policy, metrics=metrics_mod.Metrics())
        scopes = [
            {
                "type": "websocket",
                "path": f"/mesh/{dst}",
                "headers": [],
                "state": {"kars.principal": Principal("agent", src, "signed-request")},
            }
            for src, dst in pairs[:1000]
        ]

        rate = asyncio.run(_decide(layer, scopes))
        now = dt.datetime.now(dt.UTC)
        started = time.perf_counter()
        for i in range(DECISIONS):
            src, dst = pairs[i % len(pairs)]
            assert snap.trust_edge(src, dst, now) is not None
        lookups = DECISIONS / (time.perf_counter() - started)
        out.append(f"| {edges:,} edges | {loaded:.2f} s | {rate:,.0f} | {lookups:,.0f} |")
    return out


def signatures_table(count: int = 2000) -> list[str]:
    """Signed-request and signed-card verifications per second (EdDSA and ES256), in process."""
    import hashlib
    import uuid

    import jwt
    import rfc8785
    from cryptography.hazmat.primitives.asymmetric import ec

    from router.identity import cards
    from router.identity import jws as jws_mod

    ed, es = ed25519.Ed25519PrivateKey.generate(), ec.generate_private_key(ec.SECP256R1())
    raw = serialization.Encoding.Raw, serialization.PublicFormat.Raw
    point = serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    agent = model.A2AAgent.model_validate(
        {
            "apiVersion": model.API_VERSION,
            "kind": "A2AAgent",
            "metadata": {"name": "caller", "namespace": "bench"},
            "spec": {
                "endpointUrl": "http://127.0.0.1:9/",
                "signingKeys": [
                    {"kid": "ed", "alg": "EdDSA", "publicKeyB64u": _b64u(ed.public_key().public_bytes(*raw))},
                    {"kid": "es", "alg": "ES256", "publicKeyB64u": _b64u(es.public_key().public_bytes(*point))},
                ],
            },
        }
    )
    snap = snapshot.Snapshot([snapshot.Entry(agent, "sha256:x", None)], generation=1, now=dt.datetime.now(dt.UTC))  # type: ignore[arg-type]
    body, aud = b'{"jsonrpc":"2.0","id":1,"method":"tasks/get"}', "http://127.0.0.1/a2a/echo"
    card = {"name": "echo", "description": "d", "version": "1", "skills": [{"id": "s", "name": "s", "tags": ["t"]}]}
    out = ["| verification | EdDSA per second | ES256 per second |", "|---|---:|---:|"]
    requests, card_rates = [], []
    for key, alg, kid in ((ed, "EdDSA", "ed"), (es, "ES256", "es")):
        now = int(time.time())
        tokens = [
            jwt.encode(
                {
                    "iss": "bench/caller",
                    "aud": aud,
                    "iat": now,
                    "exp": now + 60,
                    "jti": uuid.uuid4().hex,
                    "body_sha256": _b64u(hashlib.sha256(body).digest()),
                },
                key,
                algorithm=alg,
                headers={"kid": kid},
            )
            for _ in range(count)
        ]
        replay = jws_mod.ReplayCache()
        started = time.perf_counter()
        for token in tokens:
            jws_mod.verify_request(token, body=body, audience=aud, snapshot=snap, replay=replay)
        requests.append(count / (time.perf_counter() - started))
        payload = rfc8785.dumps(card)
        head, _, sig = jwt.api_jws.encode(payload, key, algorithm=alg, headers={"kid": kid}).split(".")
        signed = json.dumps({**card, "signatures": [{"protected": head, "signature": sig}]}).encode()
        keys = jws_mod.trusted_keys(agent)
        started = time.perf_counter()
        for _ in range(count):
            cards.verify_card(signed, keys, now=dt.datetime.now(dt.UTC))
        card_rates.append(count / (time.perf_counter() - started))
    out.append(f"| signed request (JWS bearer, claims, body_sha256, jti) | {requests[0]:,.0f} | {requests[1]:,.0f} |")
    out.append(f"| signed agent card (JCS + detached JWS) | {card_rates[0]:,.0f} | {card_rates[1]:,.0f} |")
    return out


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench mesh")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--window", type=int, default=32)
    args = parser.parse_args(argv)
    with contextlib.suppress(AttributeError, OSError):
        os.sched_setaffinity(0, {int(_load.LOAD_CORE)})  # clients and in-process timing on the load core
    print("\n".join(frames_table(args.seconds, args.window)))
    print()
    print("\n".join(admission_table()))
    print()
    print("\n".join(signatures_table()))
    return 0
