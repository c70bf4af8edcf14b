"""A stand-in for the Foundry inference transport, for token-budget tests. Test code only.

It honours the transport's contract with the layers above it (router/usage.py, router/_asgi.py):
it reads the replayed body, answers in the OpenAI chat shape, puts ``Usage`` in
``scope["state"]["kars.usage"]`` when it reports usage and sets ``kars.upstream_output`` once
output reached the caller. The ``model`` field picks the behaviour:

- ``exact``: usage = the router's own worst case (prompt estimate + ``max_tokens``), so actual == reserved
- ``half``: usage = half the worst case
- ``over``: usage = the worst case + 1000 (an upstream that uses more than was reserved)
- ``nousage``: a stream whose output reaches the caller but which ends without usage
- ``fail``: an upstream failure before any output (502)
- ``gated``: like ``exact``, but streamed: the response starts, then waits (bounded) for
  ``FakeTransport.gate`` before it finishes with its usage
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from starlette.applications import Starlette
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from router import _asgi, _body, budgets, errors
from router.usage import Usage

GATE_WAIT_S = 10.0
PATHS = ("/openai/deployments/{deployment}/chat/completions", "/v1/chat/completions", "/v1/embeddings")


def worst_case(body: dict[str, Any]) -> int:
    out = budgets.requested_output(body)
    return budgets.estimate_prompt_tokens(body) + (out or 0)


class FakeTransport:
    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.calls = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = await _body.read_json(scope, receive)
        self.calls += 1
        st = scope["state"]
        mode = body.get("model", "exact")
        worst = worst_case(body)
        if mode == "fail":
            raise errors.UpstreamError("upstream unreachable", code="upstream_unavailable")
        total = {"exact": worst, "half": worst // 2, "over": worst + 1000, "gated": worst}.get(mode)
        streamed = mode in ("nousage", "gated")
        headers = [(b"content-type", b"text/event-stream" if streamed else b"application/json")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        st[_asgi.UPSTREAM_OUTPUT] = True
        if streamed:
            await send({"type": "http.response.body", "body": b'data: {"choices":[]}\n\n', "more_body": True})
        if mode == "nousage":
            await send({"type": "http.response.body", "body": b""})  # ends without a usage chunk
            return
        if mode == "gated":
            await asyncio.wait_for(self.gate.wait(), GATE_WAIT_S)
        assert total is not None, mode
        usage = {"prompt_tokens": total // 2, "completion_tokens": total - total // 2, "total_tokens": total}
        st[_asgi.USAGE] = Usage.from_payload(usage)
        reply = {"object": "chat.completion", "choices": [], "usage": usage}
        await send({"type": "http.response.body", "body": json.dumps(reply).encode()})


def mount(app: Starlette, transport: FakeTransport) -> None:
    """Put the fake in front of every other route (the real transport's catch-alls included)."""
    for path in reversed(PATHS):
        app.router.routes.insert(0, Route(path, transport, methods=["POST"]))
