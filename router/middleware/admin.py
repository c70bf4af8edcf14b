"""The admin gate for ``/internal/*``: loopback, or the admin bearer token (constant-time).

In sidecar mode the sandbox itself is on loopback, so loopback alone is not enough there:
the admin token is required.
"""

from __future__ import annotations

import hmac

from starlette.types import ASGIApp, Receive, Scope, Send

from router import _asgi, errors
from router.identity import principal

ADMIN_PREFIX = "/internal/"


class AdminGateMiddleware:
    def __init__(self, app: ASGIApp, *, token: str | None, loopback_is_admin: bool) -> None:
        self.app = app
        self._token = token.encode() if token else None
        self._loopback_is_admin = loopback_is_admin

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(ADMIN_PREFIX):
            return await self.app(scope, receive, send)
        if not (self._loopback_is_admin and _asgi.is_loopback(scope)):
            auth = _asgi.header(scope, b"authorization")
            if self._token is None:
                if self._loopback_is_admin:
                    raise errors.Forbidden("the admin API is reachable from loopback only")
                # Sidecar mode: the sandbox shares loopback, so loopback proves nothing here.
                raise errors.Forbidden("in sidecar mode the admin API needs the admin token, and none is configured")
            if auth is None:
                raise errors.Unauthenticated("admin bearer token required", code="missing_credentials")
            scheme, _, presented = auth.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(presented.strip(), self._token):
                raise errors.Unauthenticated("invalid admin token")
        scope["state"][_asgi.PRINCIPAL] = principal.ADMIN
        await self.app(scope, receive, send)
