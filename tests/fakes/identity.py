"""A fake Azure managed-identity token endpoint, in both wire shapes azure-identity speaks. Test code only.

IMDS (``GET /metadata/identity/oauth2/token?api-version=2018-02-01&resource=...`` with
``Metadata: true``; reached through ``AZURE_POD_IDENTITY_AUTHORITY_HOST``) and App Service
(``GET {IDENTITY_ENDPOINT}?api-version=2019-08-01&resource=...`` with ``X-IDENTITY-HEADER``;
``expires_on`` required). Tokens are ``tok-1``, ``tok-2``...; ``expires_in_s`` and
``refresh_in_s`` (the optional member MSAL honours) shape their lifetime. ``fail`` makes it
answer 400 as IMDS does for an unknown identity.
"""

from __future__ import annotations

import json
import time
from typing import Any
from urllib.parse import parse_qs

from starlette.types import Receive, Scope, Send

from tests.support import asgi

IMDS_PATH = "/metadata/identity/oauth2/token"
APP_SERVICE_PATH = "/msi/token"
APP_SERVICE_SECRET = "app-service-secret"


class FakeIdentityEndpoint:
    def __init__(self, *, expires_in_s: int = 3600, refresh_in_s: int | None = None) -> None:
        self.expires_in_s = expires_in_s
        self.refresh_in_s = refresh_in_s
        self.fail = False
        self.issued = 0
        self.requests: list[dict[str, Any]] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            return await asgi.lifespan(receive, send)
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        query = {k: v[0] for k, v in parse_qs(scope["query_string"].decode()).items()}
        self.requests.append({"path": scope["path"], "query": query, "headers": headers})
        imds = scope["path"] == IMDS_PATH and headers.get("metadata") == "true"
        app_service = scope["path"] == APP_SERVICE_PATH and headers.get("x-identity-header") == APP_SERVICE_SECRET
        if not (imds or app_service):
            return await _reply(send, 401, {"error": "unauthorized", "error_description": "missing header"})
        if self.fail or "resource" not in query:
            error = {"error": "invalid_request", "error_description": "Identity not found"}
            return await _reply(send, 400, error)
        self.issued += 1
        now = int(time.time())
        body: dict[str, Any] = {
            "access_token": f"tok-{self.issued}",
            "expires_on": str(now + self.expires_in_s),
            "resource": query["resource"],
            "token_type": "Bearer",
        }
        if imds:
            body |= {"expires_in": str(self.expires_in_s), "ext_expires_in": str(self.expires_in_s)}
            body |= {"not_before": str(now), "client_id": "00000000-0000-0000-0000-000000000001"}
        if self.refresh_in_s is not None:
            body["refresh_in"] = self.refresh_in_s
        await _reply(send, 200, body)


async def _reply(send: Send, status: int, doc: Any) -> None:
    raw = json.dumps(doc).encode()
    headers = [(b"content-type", b"application/json; charset=utf-8"), (b"content-length", str(len(raw)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": raw})
