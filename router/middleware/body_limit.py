"""Request body cap (``limits.maxBodyBytes``, SPEC.md §7): 413 before or while reading."""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from router import _asgi, errors


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, *, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.max_body_bytes
        declared = _asgi.header(scope, b"content-length")
        if declared is not None:
            try:
                length = int(declared)
            except ValueError:
                raise errors.InvalidRequest("Content-Length is not a number") from None
            if length > limit:
                raise errors.PayloadTooLarge(f"request body exceeds {limit} bytes")
            # The HTTP server delivers at most Content-Length bytes of body (what follows is the
            # next request on the connection): nothing left to count.
            return await self.app(scope, receive, send)
        seen = 0

        async def counting_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise errors.PayloadTooLarge(f"request body exceeds {limit} bytes")
            return message

        await self.app(scope, counting_receive, send)
