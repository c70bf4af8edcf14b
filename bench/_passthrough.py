"""A bare pass-through proxy: the floor any gateway on the same HTTP client library pays.

Raw ASGI, no middleware, no policy: forward the request to ``BENCH_UPSTREAM`` with one pooled
client, relay status, content type and body chunks. ``BENCH_CLIENT`` picks the library:
``aiohttp`` (the one router/upstream/http.py uses) or ``httpx`` (its default transport), so the
bench shows why the router uses the one it does. Run: ``uvicorn bench._passthrough:app``.
"""

from __future__ import annotations

import os
from typing import Any

import aiohttp
import httpx
import yarl

UPSTREAM = os.environ.get("BENCH_UPSTREAM", "http://127.0.0.1:9")
CLIENT = os.environ.get("BENCH_CLIENT", "aiohttp")
_state: dict[str, Any] = {}


async def _read(receive: Any) -> bytes:
    body = b""
    more = True
    while more:
        msg = await receive()
        body += msg.get("body", b"")
        more = msg.get("more_body", False)
    return body


async def app(scope: Any, receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while True:
            kind = (await receive())["type"]
            if kind == "lifespan.startup":
                if CLIENT == "httpx":
                    _state["client"] = httpx.AsyncClient(limits=httpx.Limits(max_connections=1024))
                else:
                    connector = aiohttp.TCPConnector(limit=1024)
                    _state["client"] = aiohttp.ClientSession(connector=connector, auto_decompress=False)
            else:
                await _state["client"].close() if CLIENT == "aiohttp" else await _state["client"].aclose()
            await send({"type": kind + ".complete"})
            if kind == "lifespan.shutdown":
                return
    body = await _read(receive)
    query = scope["query_string"].decode()
    url = UPSTREAM + scope["path"] + ("?" + query if query else "")
    headers = {"content-type": "application/json"}
    client = _state["client"]
    if CLIENT == "httpx":
        req = client.build_request(scope["method"], url, content=body, headers=headers)
        resp = await client.send(req, stream=True)
        out = [(b"content-type", resp.headers.get("content-type", "application/json").encode())]
        await send({"type": "http.response.start", "status": resp.status_code, "headers": out})
        async for chunk in resp.aiter_raw():
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await resp.aclose()
    else:
        async with client.request(scope["method"], yarl.URL(url, encoded=True), data=body, headers=headers) as resp:
            out = [(b"content-type", resp.headers.get("content-type", "application/json").encode())]
            await send({"type": "http.response.start", "status": resp.status, "headers": out})
            async for chunk in resp.content.iter_any():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
    await send({"type": "http.response.body", "body": b""})
