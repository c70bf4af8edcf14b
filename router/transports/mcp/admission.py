"""Who may open an MCP session to which server, and with what upstream credential.

Checked before any upstream contact (SPEC.md §3-4): the browser ``Origin`` (MCP 2025-11-25
"Security Warning": DNS rebinding), the caller's principal, ``{server}`` as an McpServer of the
caller's own namespace (another namespace's does not exist: 404), ``allowedSandboxes``
(403), then the upstream bearer from ``mcp.secretsDir/<auth.bearerFromSecret>``.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from router import _asgi, errors
from router.identity import principal as principal_mod
from router.policy import model
from router.policy import snapshot as snapshot_mod
from router.transports.mcp import policy

LOOPBACK_ORIGINS = ("http://localhost:*", "http://127.0.0.1:*", "http://[::1]:*")


def origin_allowed(origin: str, patterns: tuple[str, ...]) -> bool:
    """Exact origins, or ``scheme://host:*`` for any port of a host."""
    for pattern in patterns:
        if pattern == origin:
            return True
        if pattern.endswith(":*"):
            base = pattern[:-2]
            if origin == base or (origin.startswith(base + ":") and origin[len(base) + 1 :].isdigit()):
                return True
    return False


def check_origin(scope: Any, patterns: tuple[str, ...]) -> None:
    raw = _asgi.header(scope, b"origin")
    if raw is not None and not origin_allowed(raw.decode("latin-1"), patterns):
        raise errors.Forbidden("Origin not allowed for MCP", code="origin_not_allowed")


def principal(scope: Any) -> principal_mod.Principal:
    who = scope["state"].get(_asgi.PRINCIPAL)
    if who is None:
        raise errors.Unauthenticated("no principal", code="missing_credentials")
    return who  # type: ignore[no-any-return]


def admit(
    snapshot: snapshot_mod.Snapshot, who: principal_mod.Principal, name: str
) -> tuple[model.McpServer, policy.Gate]:
    """The server ``name`` for ``who`` and the tool gate of a new session, or 404/403."""
    server = snapshot.mcp_server(who.namespace, name) if who.namespace else None
    if server is None:
        raise errors.NotFound(f"no MCP server {name!r} in namespace {who.namespace!r}")
    labels = snapshot.sandbox_labels(who.namespace, who.name)
    selector = server.spec.allowed_sandboxes
    if selector is not None and not policy.labels_match(selector.match_labels, labels):
        raise errors.Forbidden(f"{who.id} is not in McpServer {who.namespace}/{name} allowedSandboxes")
    return server, policy.Gate(server, snapshot.tool_policies(who.namespace, name), labels)


def regate(snapshot: snapshot_mod.Snapshot, principal_id: str, server: tuple[str, str]) -> policy.Gate:
    """The gate of an open session under a newer snapshot: closed if the server went or the sandbox left."""
    ns, name = server
    found = snapshot.mcp_server(ns, name)
    labels = snapshot.sandbox_labels(ns, principal_id.partition("/")[2])
    selector = found.spec.allowed_sandboxes if found is not None else None
    if found is None or (selector is not None and not policy.labels_match(selector.match_labels, labels)):
        return policy.Gate.closed(f"{ns}/{name}")
    return policy.Gate(found, snapshot.tool_policies(ns, name), labels)


async def upstream_bearer(server: model.McpServer, secrets_dir: Path | None) -> str | None:
    """The content of ``secrets_dir/<auth.bearerFromSecret>`` (never the caller's credential)."""
    secret = server.spec.auth.bearer_from_secret if server.spec.auth else None
    if not secret:
        return None
    where = f"McpServer {server.namespace}/{server.name}"
    if secrets_dir is None or "/" in secret or secret.startswith("."):
        raise errors.ServiceUnavailable(
            f"{where}: secret {secret!r} not available (mcp.secretsDir)", code="upstream_not_configured"
        )
    try:
        value = await asyncio.to_thread((secrets_dir / secret).read_text, encoding="utf-8")
    except OSError as exc:
        raise errors.ServiceUnavailable(
            f"{where}: cannot read secret {secret!r}", code="upstream_not_configured"
        ) from exc
    return value.strip() or None
