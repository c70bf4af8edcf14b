"""A2A transport (SPEC.md §5): JSON-RPC to a registered A2AAgent, and its Agent Card byte for byte.

``POST /a2a/{agent}`` forwards one JSON-RPC request to the A2AAgent ``{agent}`` of the caller's
own namespace (another namespace's agents do not exist for it: 404). The method must belong to
the protocol version the caller asked for with ``A2A-Version`` (empty means 0.3: slash-named
methods; 1.0: PascalCase ones); anything else is answered in JSON-RPC (-32601, -32009) without
bothering the agent. Replies are relayed as they arrive, so SSE streams (``message/stream``,
``SendStreamingMessage``, ``SubscribeToTask``, ...) reach the caller event by event.

``GET /a2a/{agent}/.well-known/agent-card.json`` (and v0.2's ``agent.json``) serves the agent's
card exactly as the agent served it: a signed card must stay verifiable, so it is never
rewritten. Verifying signed cards is the JWS layer's job, in front of this one.

One pooled upstream client (``router.upstream.http``) per agent origin, for the app's lifetime.
"""

from __future__ import annotations

import asyncio
import logging
import re
from typing import Any
from urllib.parse import urlsplit

import orjson
from starlette.routing import BaseRoute, Route
from starlette.types import Receive, Scope, Send

from router import _asgi, _body, errors
from router.policy import model
from router.policy import store as store_mod
from router.upstream import http as http_mod

log = logging.getLogger("kars.a2a")

VERSION_HEADER = b"a2a-version"
V0_3_METHODS = frozenset(
    {
        "message/send",
        "message/stream",
        "tasks/get",
        "tasks/list",
        "tasks/cancel",
        "tasks/resubscribe",
        "tasks/pushNotificationConfig/set",
        "tasks/pushNotificationConfig/get",
        "tasks/pushNotificationConfig/list",
        "tasks/pushNotificationConfig/delete",
        "agent/getAuthenticatedExtendedCard",
    }
)
V1_0_METHODS = frozenset(
    {
        "SendMessage",
        "SendStreamingMessage",
        "GetTask",
        "ListTasks",
        "CancelTask",
        "SubscribeToTask",
        "CreateTaskPushNotificationConfig",
        "GetTaskPushNotificationConfig",
        "ListTaskPushNotificationConfigs",
        "DeleteTaskPushNotificationConfig",
        "GetExtendedAgentCard",
    }
)
METHODS_BY_VERSION = {"0.3": V0_3_METHODS, "1.0": V1_0_METHODS}
METHOD_NOT_FOUND = -32601
INTERNAL_ERROR = -32603
VERSION_NOT_SUPPORTED = -32009
CARD_PATH = "/.well-known/agent-card.json"
LEGACY_CARD_PATH = "/.well-known/agent.json"  # A2A v0.2

_FORWARD_REQUEST = frozenset(
    {b"content-type", b"accept", b"a2a-version", b"a2a-extensions", b"x-a2a-extensions", b"last-event-id"}
)
_FORWARD_CARD_RESPONSE = frozenset({b"content-type", b"etag", b"cache-control", b"last-modified"})
_DROP_RESPONSE = http_mod.DROP_RESPONSE_HEADERS | {b"content-length"}
_VERSION_RE = re.compile(r"^\s*(\d+)\.(\d+)")


def requested_version(scope: Scope) -> str | None:
    """``major.minor`` of ``A2A-Version`` (empty or absent: 0.3), None when unreadable."""
    raw = (_asgi.header(scope, VERSION_HEADER) or b"").decode("latin-1").strip()
    if not raw:
        return "0.3"
    match = _VERSION_RE.match(raw)
    return f"{int(match.group(1))}.{int(match.group(2))}" if match else None


def _jsonrpc_error(request_id: Any, code: int, message: str) -> bytes:
    return orjson.dumps({"jsonrpc": "2.0", "id": request_id, "error": {"code": code, "message": message}})


class _Endpoint:
    """A raw ASGI endpoint for a Starlette ``Route`` (streams, never a buffered Response)."""

    def __init__(self, handler: Any) -> None:
        self._handler = handler

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._handler(scope, receive, send)


class A2ATransport:
    def __init__(
        self,
        *,
        policy: store_mod.PolicyStore,
        connect_timeout_s: float = 5.0,
        read_timeout_s: float = 300.0,
        max_card_bytes: int = 1024 * 1024,
    ) -> None:
        self._policy = policy
        self._timeouts = http_mod.Timeouts(connect_s=connect_timeout_s, read_s=read_timeout_s)
        self._max_card_bytes = max_card_bytes
        self._clients: dict[str, http_mod.Client] = {}
        self._starting: dict[str, asyncio.Task[None]] = {}

    def routes(self) -> list[BaseRoute]:
        card = _Endpoint(self.card)
        return [
            Route("/a2a/{agent}", _Endpoint(self.rpc), methods=["POST"]),
            Route("/a2a/{agent}" + CARD_PATH, card, methods=["GET"]),
            Route("/a2a/{agent}" + LEGACY_CARD_PATH, card, methods=["GET"]),
        ]

    async def aclose(self) -> None:
        clients, self._clients = self._clients, {}
        await asyncio.gather(*(c.aclose() for c in clients.values()), return_exceptions=True)

    # -- helpers ----------------------------------------------------------------------------

    def _agent(self, scope: Scope) -> model.A2AAgent:
        principal = scope["state"].get(_asgi.PRINCIPAL)
        name = scope["path_params"]["agent"]
        agent = self._policy.snapshot.a2a_agent(principal.namespace, name) if principal is not None else None
        if agent is None:
            raise errors.NotFound(f"no A2AAgent {name!r} in your namespace")
        return agent

    async def _client(self, endpoint_url: str) -> tuple[http_mod.Client, str]:
        """The pooled client for the endpoint's origin, and the endpoint's path."""
        parts = urlsplit(endpoint_url)
        origin = f"{parts.scheme}://{parts.netloc}"
        client = self._clients.get(origin)
        if client is None:
            client = http_mod.Client(origin, timeouts=self._timeouts)
            await client.start()
            if origin in self._clients:  # another request won the race: keep one client per origin
                await client.aclose()
                client = self._clients[origin]
            else:
                self._clients[origin] = client
        return client, (parts.path or "/") + (f"?{parts.query}" if parts.query else "")

    # -- JSON-RPC ---------------------------------------------------------------------------

    async def rpc(self, scope: Scope, receive: Receive, send: Send) -> None:
        agent = self._agent(scope)
        request = await _body.read_json(scope, receive)
        body = await _body.read(scope, receive)
        if not isinstance(request, dict) or not isinstance(request.get("method"), str):
            raise errors.InvalidRequest("an A2A request is one JSON-RPC request object with a method")
        request_id, method = request.get("id"), request["method"]
        version = requested_version(scope)
        methods = METHODS_BY_VERSION.get(version or "")
        if methods is None:
            return await self._answer(send, _jsonrpc_error(request_id, VERSION_NOT_SUPPORTED, "version not supported"))
        if method not in methods:
            message = f"method {method!r} is not an A2A {version} method"
            return await self._answer(send, _jsonrpc_error(request_id, METHOD_NOT_FOUND, message))
        fields = scope["state"].get(_asgi.LOG_FIELDS)
        if isinstance(fields, dict):
            fields["a2aMethod"] = method

        client, path = await self._client(agent.spec.endpoint_url)
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"] if k in _FORWARD_REQUEST]
        headers.append(("accept-encoding", "identity"))
        reply = await client.request("POST", path, headers=headers, body=body)
        try:
            await self._relay(scope, receive, send, reply, request_id)
        finally:
            reply.close()

    async def _relay(
        self, scope: Scope, receive: Receive, send: Send, reply: http_mod.Response, request_id: Any
    ) -> None:
        """Stream ``reply`` to the caller as it arrives; stop reading upstream if the caller leaves.

        An SSE stream the agent breaks off between two events ends with one more event, a JSON-RPC
        error for the request, so the client learns why; broken off inside an event (or any other
        reply broken off), the error is re-raised and the server aborts the reply, so a truncated
        body never looks complete.
        """
        out = [(k.lower(), v) for k, v in reply.headers if k.lower() not in _DROP_RESPONSE]
        await send({"type": "http.response.start", "status": reply.status, "headers": out})
        sse = any(k == b"content-type" and v.lower().startswith(b"text/event-stream") for k, v in out)

        async def pump() -> None:
            tail = b"\n\n"  # what the last bytes sent were: an event ends with a blank line
            try:
                async for chunk in reply.iter_chunks():
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                    tail = (tail + chunk)[-4:]
            except (errors.UpstreamError, errors.UpstreamTimeout) as exc:
                if not (sse and (tail.endswith((b"\n\n", b"\r\r")) or tail == b"\r\n\r\n")):
                    raise
                log.warning("the agent's event stream broke off: %s", exc.message)
                error = _jsonrpc_error(request_id, INTERNAL_ERROR, f"the agent's stream broke off: {exc.message}")
                await send({"type": "http.response.body", "body": b"data: " + error + b"\n\n", "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass

        pumping, watching = asyncio.ensure_future(pump()), asyncio.ensure_future(watch())
        try:
            await asyncio.wait({pumping, watching}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (pumping, watching):
                task.cancel()
            await asyncio.gather(watching, return_exceptions=True)
        if not pumping.cancelled():
            pumping.result()  # an upstream broken off mid-body: re-raised, the server aborts the reply

    @staticmethod
    async def _answer(send: Send, body: bytes) -> None:
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    # -- agent card -------------------------------------------------------------------------

    async def card(self, scope: Scope, receive: Receive, send: Send) -> None:
        agent = self._agent(scope)
        client, path = await self._client(agent.spec.endpoint_url)
        base = path.split("?", 1)[0].rstrip("/")
        wanted = LEGACY_CARD_PATH if scope["path"].endswith(LEGACY_CARD_PATH) else CARD_PATH
        other = CARD_PATH if wanted == LEGACY_CARD_PATH else LEGACY_CARD_PATH
        candidates = list(dict.fromkeys([base + wanted, base + other, wanted]))
        for candidate in candidates:
            reply = await client.request("GET", candidate, headers=[("accept", "application/json")], body=None)
            try:
                if reply.status == 404:
                    continue
                if reply.status != 200:
                    raise errors.UpstreamError(f"the agent answered {reply.status} for its card")
                raw, whole = await reply.read(self._max_card_bytes)
                if not whole:
                    raise errors.UpstreamError(f"the agent card is larger than {self._max_card_bytes} bytes")
                headers = [(k.lower(), v) for k, v in reply.headers if k.lower() in _FORWARD_CARD_RESPONSE]
            finally:
                reply.close()
            headers.append((b"content-length", str(len(raw)).encode()))
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": raw})
            return
        raise errors.UpstreamError("the agent serves no agent card")
