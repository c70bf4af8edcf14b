"""``/mcp/{server}``: the Streamable HTTP transport (MCP 2025-03-26, 2025-06-18, 2025-11-25).

- POST: one JSON-RPC message (or a 2025-03-26 batch). Only notifications and responses: 202
  with no body. Requests: a ``text/event-stream`` that carries whatever the upstream sends
  about them (progress, server-to-client requests) and ends after the last response.
- GET: the session's standalone stream (server requests and notifications tied to no request);
  with ``Last-Event-ID`` it resumes the stream that id came from. A second one at once: 409.
- DELETE: ends the session (and its upstream session).

Status codes follow the spec: 400 (no session id, unsupported ``MCP-Protocol-Version``, not
JSON-RPC, a ``Last-Event-ID`` that is no event id of ours), 403 (Origin), 404 (unknown session
or server), 405 (other methods, with ``Allow``), 406 (``Accept``), 415 (``Content-Type``).
"""

from __future__ import annotations

import re
from typing import Any

from starlette.types import Receive, Scope, Send

from router import _asgi, _body, errors
from router.transports.mcp import _out, _wire, gateway, sessions

ALLOW = "GET, POST, DELETE"
EVENT_ID = re.compile(rb"([0-9]{1,18})\.([0-9]{1,18})")  # "<stream>.<seq>" (sessions.Stream), ASCII digits


class NotAcceptable(errors.InvalidRequest):
    status = 406
    default_code = "not_acceptable"


class UnsupportedMediaType(errors.InvalidRequest):
    status = 415
    default_code = "unsupported_media_type"


def messages_of(body: Any) -> list[dict[str, Any]]:
    """The client's JSON-RPC messages in a POST body; one that is not valid is a 400 (nothing is forwarded)."""
    try:
        return _wire.client_messages(body)
    except ValueError as exc:
        raise errors.InvalidRequest(str(exc)) from None


class StreamableEndpoint:
    def __init__(self, gw: gateway.Gateway) -> None:
        self.gw = gw

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.gw.check_origin(scope)
        method = scope["method"]
        if method == "POST":
            await self._post(scope, receive, send)
        elif method == "GET":
            await self._get(scope, receive, send)
        elif method == "DELETE":
            await self._delete(scope)
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"0")]})
            await send({"type": "http.response.body", "body": b""})
        else:
            raise errors.MethodNotAllowed(f"method {method} not allowed here", headers={"Allow": ALLOW})

    def _session(self, scope: Scope) -> sessions.Session:
        raw = _asgi.header(scope, _wire.MCP_SESSION_ID)
        if not raw:
            raise errors.InvalidRequest("Mcp-Session-Id header is required after initialize")
        version = _asgi.header(scope, _wire.MCP_PROTOCOL_VERSION)
        if version is not None and version.decode("latin-1") not in _wire.STREAMABLE_VERSIONS:
            raise errors.InvalidRequest(f"unsupported MCP-Protocol-Version {version.decode('latin-1')!r}")
        return self.gw.find(scope, scope["path_params"]["server"], raw.decode("latin-1"))

    async def _post(self, scope: Scope, receive: Receive, send: Send) -> None:
        accept = (_asgi.header(scope, b"accept") or b"").decode("latin-1")
        if not (_wire.accepts(accept, _wire.CONTENT_TYPE_JSON) and _wire.accepts(accept, _wire.CONTENT_TYPE_SSE)):
            raise NotAcceptable("Accept must list both application/json and text/event-stream")
        content_type = (_asgi.header(scope, b"content-type") or b"").decode("latin-1")
        if content_type.split(";")[0].strip().lower() != _wire.CONTENT_TYPE_JSON:
            raise UnsupportedMediaType("Content-Type must be application/json")
        body = await _body.read_json(scope, receive)
        if isinstance(body, list) and _asgi.header(scope, _wire.MCP_PROTOCOL_VERSION) not in _wire.BATCH_VERSIONS:
            raise errors.InvalidRequest("JSON-RPC batches were removed in MCP 2025-06-18: send one message a POST")
        messages = messages_of(body)
        is_init = any(m.get("method") == "initialize" for m in messages)
        if is_init:
            if len(messages) != 1 or not _wire.is_request(messages[0]):
                raise errors.InvalidRequest("initialize must be sent alone, as a request")
            if _asgi.header(scope, _wire.MCP_SESSION_ID):
                raise errors.InvalidRequest("initialize opens a session: send it without Mcp-Session-Id")
            version = _asgi.header(scope, _wire.MCP_PROTOCOL_VERSION)
            if version is not None and version.decode("latin-1") not in _wire.STREAMABLE_VERSIONS:
                raise errors.InvalidRequest(f"unsupported MCP-Protocol-Version {version.decode('latin-1')!r}")
            session = await self.gw.open(scope, scope["path_params"]["server"], "streamable")
        else:
            session = self._session(scope)
        raws = [scope["state"][_asgi.BODY]] if len(messages) == 1 else [_wire.dumps(m).encode() for m in messages]
        if not any(_wire.is_request(m) for m in messages):
            for message, raw in zip(messages, raws, strict=True):
                await self.gw.dispatch(session, message, raw, session.main)
            await send(
                {
                    "type": "http.response.start",
                    "status": 202,
                    "headers": [(b"content-length", b"0"), (b"mcp-session-id", session.id.encode())],
                }
            )
            await send({"type": "http.response.body", "body": b""})
            return
        stream = session.new_stream()
        headers = [(b"mcp-session-id", session.id.encode())]
        if len(messages) == 1:
            pump = await self.gw.dispatch(session, messages[0], raws[0], stream, inline=True)
            if pump is not None:
                await _out.serve_inline(
                    stream, session, send, pump, keep_alive_s=self.gw.settings.keep_alive_s, headers=headers
                )
                return
            if stream.seq == 1:  # answered by the router itself (policy): one JSON body
                stream.close()
                await _out.json_reply(send, stream.last_data, headers)
                return
        else:
            for message, raw in zip(messages, raws, strict=True):
                await self.gw.dispatch(session, message, raw, stream)
        if stream.open_requests == 0:
            stream.close()  # every request was answered by the router itself (policy)
        await _out.serve(
            stream,
            session,
            receive,
            send,
            after=0,
            keep_alive_s=self.gw.settings.keep_alive_s,
            headers=headers,
            watch_now=False,
        )

    async def _get(self, scope: Scope, receive: Receive, send: Send) -> None:
        accept = (_asgi.header(scope, b"accept") or b"").decode("latin-1")
        if not _wire.accepts(accept, _wire.CONTENT_TYPE_SSE):
            raise NotAcceptable("Accept must list text/event-stream")
        session = self._session(scope)
        stream, after = session.main, session.main.delivered
        last = _asgi.header(scope, _wire.LAST_EVENT_ID)
        if last is not None:
            # Not one of our ids is bad input (400), not a lost session: a 404 with Mcp-Session-Id
            # tells the client its session is gone (MCP, "Session Management").
            parsed = EVENT_ID.fullmatch(last)
            if parsed is None:
                raise errors.InvalidRequest("Last-Event-ID must be an event id of this server: <stream>.<seq>")
            found = session.streams.get(int(parsed[1]))
            if found is None:
                raise errors.NotFound("Last-Event-ID names no stream of this session")
            stream, after = found, int(parsed[2])
        if stream.attached and last is None:
            raise errors.Conflict("this session already has a GET stream open")
        await _out.serve(
            stream,
            session,
            receive,
            send,
            after=after,
            keep_alive_s=self.gw.settings.keep_alive_s,
            headers=[(b"mcp-session-id", session.id.encode())],
        )

    async def _delete(self, scope: Scope) -> None:
        session = self._session(scope)
        await self.gw.end(session, "client ended the session")
