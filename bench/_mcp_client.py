"""A lean MCP load generator: initialize once per session, then raw JSON-RPC ``tools/call`` POSTs.

The ``mcp`` SDK client costs about 1 ms of CPU per call, so it cannot drive a server at
thousands of calls per second on one core; this client does the minimum the protocol asks
(aiohttp, one connection per session, responses read as text and matched by id). Closed loop:
each session sends its next call when the last one is answered.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.parse
from typing import Any

import aiohttp

VERSION = "2025-11-25"
ACCEPT = "application/json, text/event-stream"
INIT = {
    "jsonrpc": "2.0",
    "id": 0,
    "method": "initialize",
    "params": {"protocolVersion": VERSION, "capabilities": {}, "clientInfo": {"name": "bench", "version": "1"}},
}
INITIALIZED = {"jsonrpc": "2.0", "method": "notifications/initialized"}


def _call(rid: int) -> bytes:
    body = {"jsonrpc": "2.0", "id": rid, "method": "tools/call", "params": {"name": "echo", "arguments": {"text": "x"}}}
    return json.dumps(body).encode()


def _last_message(text: str) -> dict[str, Any]:
    """The JSON-RPC message of a one-response SSE body (or a JSON body)."""
    if text.lstrip().startswith("{"):
        return json.loads(text)  # type: ignore[no-any-return]
    data = [line[5:].strip() for line in text.splitlines() if line.startswith("data:") and line[5:].strip()]
    return json.loads(data[-1])  # type: ignore[no-any-return]


class _Streamable:
    def __init__(self, http: aiohttp.ClientSession, url: str, headers: dict[str, str]) -> None:
        self.http, self.url = http, url
        self.headers = {"accept": ACCEPT, "content-type": "application/json", **headers}

    async def open(self) -> None:
        async with self.http.post(self.url, data=json.dumps(INIT), headers=self.headers) as resp:
            resp.raise_for_status()
            await resp.text()
            self.headers["mcp-session-id"] = resp.headers["mcp-session-id"]
        self.headers["mcp-protocol-version"] = VERSION
        async with self.http.post(self.url, data=json.dumps(INITIALIZED), headers=self.headers) as resp:
            resp.raise_for_status()

    async def call(self, rid: int) -> bool:
        async with self.http.post(self.url, data=_call(rid), headers=self.headers) as resp:
            return resp.status == 200 and "result" in _last_message(await resp.text())

    async def close(self) -> None:
        async with self.http.delete(self.url, headers=self.headers):
            pass


class _Legacy:
    """HTTP+SSE: one GET stream per session carries every response; POSTs are answered 202."""

    def __init__(self, http: aiohttp.ClientSession, url: str, headers: dict[str, str]) -> None:
        self.http, self.url, self.headers = http, url, headers
        self.waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.endpoint = ""
        self.reader: asyncio.Task[None] | None = None

    async def open(self) -> None:
        found: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.reader = asyncio.create_task(self._read(found))
        self.endpoint = urllib.parse.urljoin(self.url, await asyncio.wait_for(found, 10))
        init = asyncio.get_running_loop().create_future()
        self.waiting[0] = init
        await self._post(json.dumps(INIT).encode())
        await asyncio.wait_for(init, 10)
        await self._post(json.dumps(INITIALIZED).encode())

    async def _read(self, found: asyncio.Future[str]) -> None:
        headers = {"accept": "text/event-stream", **self.headers}
        async with self.http.get(self.url, headers=headers, timeout=aiohttp.ClientTimeout(total=None)) as resp:
            event = ""
            async for raw in resp.content:
                line = raw.decode().rstrip("\r\n")
                if line.startswith("event:"):
                    event = line[6:].strip()
                elif line.startswith("data:"):
                    data = line[5:].strip()
                    if event == "endpoint" and not found.done():
                        found.set_result(data)
                    elif data.startswith("{"):
                        msg = json.loads(data)
                        waiter = self.waiting.pop(msg.get("id"), None)
                        if waiter is not None and not waiter.done():
                            waiter.set_result(msg)

    async def _post(self, body: bytes) -> None:
        headers = {"content-type": "application/json", **self.headers}
        async with self.http.post(self.endpoint, data=body, headers=headers) as resp:
            if resp.status not in (200, 202):
                raise RuntimeError(f"POST answered {resp.status}")

    async def call(self, rid: int) -> bool:
        waiter = asyncio.get_running_loop().create_future()
        self.waiting[rid] = waiter
        await self._post(_call(rid))
        return "result" in await asyncio.wait_for(waiter, 30)

    async def close(self) -> None:
        if self.reader is not None:
            self.reader.cancel()
            await asyncio.gather(self.reader, return_exceptions=True)


async def run(url: str, transport: str, *, sessions: int, seconds: float, headers: dict[str, str]) -> dict[str, float]:
    """Calls/s, latency percentiles (ms), failures, and this process's CPU use over the run."""
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as http:
        kind = _Streamable if transport == "streamable" else _Legacy
        clients = [kind(http, url, headers) for _ in range(sessions)]
        await asyncio.gather(*(c.open() for c in clients))
        for c in clients[:2]:  # warm-up: connections and code paths
            await c.call(1)
        latencies: list[float] = []
        failures = 0
        stop = time.monotonic() + seconds

        async def loop(client: Any, base: int) -> None:
            nonlocal failures
            rid = base
            while time.monotonic() < stop:
                rid += 1
                t0 = time.perf_counter()
                ok = await client.call(rid)
                latencies.append(time.perf_counter() - t0)
                failures += not ok

        cpu0, wall0 = time.process_time(), time.monotonic()
        await asyncio.gather(*(loop(c, i * 10_000_000) for i, c in enumerate(clients)))
        cpu, wall = time.process_time() - cpu0, time.monotonic() - wall0
        await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)
    latencies.sort()

    def pct(p: float) -> float:
        return latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1000

    return {
        "calls_per_s": len(latencies) / wall,
        "p50_ms": pct(0.50),
        "p99_ms": pct(0.99),
        "failures": failures,
        "client_cpu": cpu / wall,
    }
