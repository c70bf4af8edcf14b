"""TrustGraph admission (SPEC.md §5, §6): caller -> target needs a verified, live edge.

Applies to ``/a2a/{agent}...`` (target: the A2AAgent ``{agent}`` in the caller's namespace; one
that does not exist goes on to the transport's 404) and
``/mesh/{ns}/{name}`` (target: ``ns/name``), on HTTP and WebSocket scopes alike, so a mesh
caller without an edge is refused with HTTP 403 before any upgrade. Every other route goes
straight through. One decision is one dictionary lookup in the snapshot (``trust_edge``),
whatever the size of the graph; edges were verified (signature, minScore) when it loaded,
and only expiry is checked here.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable

from starlette.types import ASGIApp, Receive, Scope, Send

from router import _asgi, errors
from router.identity.principal import Principal
from router.observability import metrics as metrics_mod
from router.policy import store as store_mod

A2A_PREFIX = "/a2a/"
MESH_PREFIX = "/mesh/"
TRUST_EDGE = "kars.trust_edge"  # the edge that admitted the request (router.policy.trustgraph.TrustEdge)


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def target_of(path: str, principal: Principal) -> str | None:
    """The principal id a request to ``path`` is addressed to, or None when admission does not apply."""
    if path.startswith(A2A_PREFIX):
        agent = path[len(A2A_PREFIX) :].partition("/")[0]
        return f"{principal.namespace}/{agent}" if agent else None
    if path.startswith(MESH_PREFIX):
        parts = path[len(MESH_PREFIX) :].split("/")
        if len(parts) == 2 and all(parts):
            return f"{parts[0]}/{parts[1]}"
    return None


class TrustGraphMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        *,
        policy: store_mod.PolicyStore,
        metrics: metrics_mod.Metrics,
        clock: Callable[[], dt.datetime] = _utcnow,
    ) -> None:
        self.app = app
        self._policy = policy
        self._metrics = metrics
        self._clock = clock

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        path: str = scope["path"]
        if not (path.startswith(A2A_PREFIX) or path.startswith(MESH_PREFIX)):
            return await self.app(scope, receive, send)
        st = scope["state"]
        principal = st.get(_asgi.PRINCIPAL)
        if principal is None:  # identity always sets one on these routes; never admit without it
            raise errors.Unauthenticated("no verified caller", code="missing_credentials")
        target = target_of(path, principal)
        if target is None:  # a malformed path: the router answers 404 for it
            return await self.app(scope, receive, send)
        snap = self._policy.snapshot
        if path.startswith(A2A_PREFIX) and snap.a2a_agent(*target.split("/", 1)) is None:
            # No such A2AAgent in the caller's namespace: the transport answers 404 (SPEC.md §4, §5).
            return await self.app(scope, receive, send)
        edge = snap.trust_edge(principal.id, target, self._clock())
        if edge is None:
            self._metrics.trust_admissions.labels("denied").inc()
            fields = st.get(_asgi.LOG_FIELDS)
            if isinstance(fields, dict):
                fields["decision"] = "trust_edge_missing"
            raise errors.Forbidden(f"no verified TrustGraph edge {principal.id} -> {target}", code="trust_edge_missing")
        self._metrics.trust_admissions.labels("admitted").inc()
        st[TRUST_EDGE] = edge
        await self.app(scope, receive, send)
