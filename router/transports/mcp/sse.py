"""``/mcp/{server}/sse`` + ``/mcp/{server}/messages?sessionId=``: the legacy HTTP+SSE transport.

MCP 2024-11-05 "HTTP with SSE": the client opens the SSE stream; the first event, ``endpoint``,
carries the URL to POST messages to. The router sends a path on its own origin (clients refuse
an endpoint on another origin), so it works behind any host name. Every reply goes down the
SSE stream; each POST is answered 202. The session lives as long as the SSE connection:
when the client disconnects, the session and its upstream session end.
"""

from __future__ import annotations

import urllib.parse

from starlette.types import Receive, Scope, Send

from router import _asgi, _body, errors
from router.transports.mcp import _out, _wire, gateway, streamable


class SseEndpoint:
    def __init__(self, gw: gateway.Gateway) -> None:
        self.gw = gw

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.gw.check_origin(scope)
        accept = (_asgi.header(scope, b"accept") or b"").decode("latin-1")
        if accept and not _wire.accepts(accept, _wire.CONTENT_TYPE_SSE):
            raise streamable.NotAcceptable("Accept must list text/event-stream")
        name = scope["path_params"]["server"]
        if scope["method"] == "HEAD":  # Starlette routes it here: the headers a GET gets, and no session
            self.gw.admit(scope, name)
            await send({"type": "http.response.start", "status": 200, "headers": _wire.SSE_HEADERS})
            await send({"type": "http.response.body", "body": b""})
            return
        session = await self.gw.open(scope, name, "sse")
        root = scope.get("root_path", "")
        endpoint = f"{root}/mcp/{urllib.parse.quote(name)}/messages?sessionId={session.id}"
        try:
            await _out.serve(
                session.main,
                session,
                receive,
                send,
                after=0,
                keep_alive_s=self.gw.settings.keep_alive_s,
                headers=[],
                preamble=_wire.sse_event(endpoint, event="endpoint"),
            )
        finally:
            await self.gw.end(session, "client closed the SSE stream")


class MessagesEndpoint:
    def __init__(self, gw: gateway.Gateway) -> None:
        self.gw = gw

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.gw.check_origin(scope)
        query = urllib.parse.parse_qs(scope.get("query_string", b"").decode("latin-1"))
        session_id = (query.get("sessionId") or query.get("session_id") or [""])[0]
        if not session_id:
            raise errors.InvalidRequest("sessionId query parameter is required")
        session = self.gw.find(scope, scope["path_params"]["server"], session_id)
        content_type = (_asgi.header(scope, b"content-type") or b"").decode("latin-1")
        if content_type.split(";")[0].strip().lower() != _wire.CONTENT_TYPE_JSON:
            raise streamable.UnsupportedMediaType("Content-Type must be application/json")
        body = await _body.read_json(scope, receive)
        for message in streamable.messages_of(body):
            raw = scope["state"][_asgi.BODY] if not isinstance(body, list) else _wire.dumps(message).encode()
            await self.gw.dispatch(session, message, raw, session.main)
        await send({"type": "http.response.start", "status": 202, "headers": [(b"content-length", b"8")]})
        await send({"type": "http.response.body", "body": b"Accepted"})
