"""The error boundary: renders every ``KarsError`` (and anything unexpected) in one place.

Starlette's own refusals (its router's 404, a route's 405 with ``Allow``) arrive as its
``HTTPException`` and are rendered here too, in the same shape: the app runs without Starlette's
two error layers (``router.app``), this one is the only one.

A wrapped ``send`` remembers whether the response started; an error after the first byte
cannot be turned into a new response, so it is re-raised and the server aborts the
connection (a truncated body must never look complete). Streaming transports end their
streams in their own protocol before that happens.
"""

from __future__ import annotations

import logging

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from router import _asgi, errors

log = logging.getLogger("kars.errors")

# After any of these, a new response can no longer be sent.
_STARTS = frozenset({"http.response.start", "websocket.accept", "websocket.http.response.start", "websocket.close"})


class ErrorMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] in _STARTS:
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except errors.KarsError as exc:
            if started:
                raise
            await self._render(scope, send, exc)
        except HTTPException as exc:
            if started:
                raise
            await self._render(scope, send, _from_starlette(scope, exc))
        except Exception:
            if started:
                raise
            log.exception("unhandled error on %s %s", scope.get("method", "WS"), scope.get("path"))
            await self._render(scope, send, errors.InternalError("internal error"))

    @staticmethod
    async def _render(scope: Scope, send: Send, exc: errors.KarsError) -> None:
        fields = scope.get("state", {}).get(_asgi.LOG_FIELDS)
        if fields is not None:
            fields["decision"] = exc.code  # the access line says what refused the request
        status, headers, body = exc.render()
        if scope["type"] == "http":
            await send({"type": "http.response.start", "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": body})
            return
        # WebSocket refused before the upgrade: an HTTP answer where the server supports it
        # (ASGI "websocket.http.response" extension), a policy-violation close otherwise.
        if "websocket.http.response" in scope.get("extensions", {}):
            await send({"type": "websocket.http.response.start", "status": status, "headers": headers})
            await send({"type": "websocket.http.response.body", "body": body})
        else:
            await send({"type": "websocket.close", "code": 1008, "reason": exc.code})


def _from_starlette(scope: Scope, exc: HTTPException) -> errors.KarsError:
    messages = {404: f"no route for {scope['path']}", 405: f"method {scope.get('method')} not allowed here"}
    return errors.for_status(exc.status_code, messages.get(exc.status_code, str(exc.detail)), headers=exc.headers)
