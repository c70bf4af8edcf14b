"""``build_app(settings)``: wires policy, identity, observability and routes into one Starlette app.

The middleware stack is built once here and frozen; the lifespan opens and closes everything
the app owns (HTTP clients, the policy watcher). Nothing happens at import time.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import sys
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.routing import BaseRoute, Route, WebSocketRoute
from starlette.types import ASGIApp, Receive, Scope, Send

from router import budget_api, ops, stores
from router.identity import devtokens, jwks, verifier
from router.middleware import admin, body_limit, identity, jws, observe, trust_graph
from router.middleware import content_safety as safety_mw
from router.middleware import errors as error_mw
from router.middleware import token_budget as budget_mw
from router.observability import logs
from router.observability import metrics as metrics_mod
from router.policy import store as store_mod
from router.safety import providers as safety_providers
from router.settings import Settings
from router.transports import a2a, foundry, mesh
from router.transports import mcp as mcp_transport
from router.transports.mcp import audit as mcp_audit
from router.upstream import credentials
from router.upstream import http as upstream_http

log = logging.getLogger("kars.app")


@dataclasses.dataclass
class Runtime:
    """What one app owns; reachable as ``app.state.kars`` (tests and later layers use it)."""

    settings: Settings
    metrics: metrics_mod.Metrics
    policy: store_mod.PolicyStore
    verifier: verifier.TokenVerifier
    dev_key: Any
    http: httpx.AsyncClient
    ops: ops.Ops
    mcp: mcp_transport.Gateway | None = None
    budget_store: stores.base.CounterStore | None = None
    safety: safety_providers.Safety | None = None
    mesh: mesh.MeshHub | None = None
    a2a: a2a.A2ATransport | None = None
    foundry: foundry.FoundryTransport | None = None
    access_log: logs.JsonLines | None = None
    audit_log: logs.JsonLines | None = None


def _read_secret(path: Any) -> str | None:
    if path is None:
        return None
    value: str = path.read_text(encoding="utf-8").strip()
    return value or None


class _App(Starlette):
    """Starlette without its own two error layers (``ServerErrorMiddleware``, ``ExceptionMiddleware``).

    ``ErrorMiddleware`` is the one error boundary and renders Starlette's 404/405 too; the two
    would only wrap every request and every ``send`` twice more on the hot path.
    """

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope["app"] = self
        if "state" not in scope and scope["type"] != "lifespan":
            # Every layer keeps its per-request values in scope["state"] (ASGI's lifespan-state
            # extension, which uvicorn provides); a server without it gets one here.
            scope["state"] = {}
        if self.middleware_stack is None:
            self.middleware_stack = self.build_middleware_stack()
        await self.middleware_stack(scope, receive, send)

    def build_middleware_stack(self) -> ASGIApp:
        app: ASGIApp = self.router
        for cls, args, kwargs in reversed(self.user_middleware):
            app = cls(app, *args, **kwargs)
        return app


async def _flush_every(lines: list[logs.JsonLines], stop: asyncio.Event) -> None:
    """Flush buffered log lines of an idle router (busy ones flush as they write)."""
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=logs.FLUSH_INTERVAL_S)
        for log in lines:
            log.flush()


def build_app(settings: Settings) -> Starlette:
    metrics = metrics_mod.Metrics()
    access_log = logs.JsonLines(sys.stdout if settings.log.access else None)
    audit_log = logs.JsonLines(sys.stderr, logger=mcp_audit.LOGGER, msg="tools/call")
    buffered = [access_log, audit_log]  # flushed by one ticker, and at shutdown
    policy = store_mod.PolicyStore(
        settings.policy.dir,
        settings.safety.floor,
        on_reload=lambda result: metrics.policy_reloads.labels(result).inc(),
    )
    http = httpx.AsyncClient(follow_redirects=False, timeout=httpx.Timeout(10.0, connect=5.0))
    dev_key = devtokens.load_or_create_key(settings.identity.dev_key_file)
    jwks_cache = None
    if settings.identity.jwks_url:
        token_file = settings.identity.jwks_token_file
        jwks_cache = jwks.JwksCache(
            settings.identity.jwks_url,
            http
            if settings.identity.jwks_ca_file is None
            else httpx.AsyncClient(verify=str(settings.identity.jwks_ca_file), follow_redirects=False),
            bearer=(lambda: _read_secret(token_file)) if token_file else None,
        )
    token_verifier = verifier.TokenVerifier(
        audience=settings.identity.audience,
        dev_key=dev_key,
        jwks_cache=jwks_cache,
        issuer=settings.identity.issuer,
    )
    operations = ops.Ops(metrics, policy)
    runtime = Runtime(settings, metrics, policy, token_verifier, dev_key, http, operations)
    mcp_gateway = runtime.mcp = mcp_transport.Gateway(settings.mcp, policy, metrics, audit_log)
    budget_store = runtime.budget_store = stores.create(settings.budgets)
    budget_routes = budget_api.BudgetApi(budget_store, policy)
    budget_retries: set[asyncio.Task[None]] = set()  # settles the store failed, being retried
    operations.ready_checks["budget store reachable"] = budget_routes.ready
    safety = runtime.safety = safety_providers.build(settings.safety)
    mesh_hub = mesh.MeshHub(
        policy=policy, metrics=metrics, relay_url=settings.mesh.relay_url, pair_timeout_s=settings.mesh.pair_timeout_s
    )
    runtime.mesh = mesh_hub
    a2a_transport = runtime.a2a = a2a.A2ATransport(
        policy=policy,
        connect_timeout_s=settings.a2a.upstream_connect_timeout_s,
        read_timeout_s=settings.a2a.upstream_read_timeout_s,
        max_card_bytes=settings.a2a.max_card_bytes,
    )
    foundry_client, foundry_broker = None, None
    if settings.foundry.endpoint:
        timeouts = upstream_http.Timeouts(
            connect_s=settings.foundry.connect_timeout_s, read_s=settings.foundry.read_timeout_s
        )
        foundry_client = upstream_http.Client(settings.foundry.endpoint, timeouts=timeouts)
        foundry_broker = credentials.build(settings.foundry)
        operations.ready_checks["upstream credential obtainable"] = foundry_broker.check
    runtime.foundry = foundry.FoundryTransport(
        client=foundry_client, broker=foundry_broker, policy=policy, metrics=metrics
    )
    runtime.access_log = access_log
    runtime.audit_log = audit_log

    # Starlette tries routes in order: the busiest first (inference, then MCP), probes and ops last.
    routes: list[BaseRoute] = [
        *mcp_transport.routes(mcp_gateway),
        *a2a_transport.routes(),
        Route("/healthz", operations.healthz, methods=["GET"]),
        Route("/readyz", operations.readyz, methods=["GET"]),
        Route("/metrics", operations.metrics_endpoint, methods=["GET"]),
        Route("/internal/policy-status", operations.policy_status, methods=["GET"]),
        Route("/v1/whoami", operations.whoami, methods=["GET"]),
        Route("/v1/budgets", budget_routes.budgets, methods=["GET"]),
        WebSocketRoute("/mesh/{ns}/{name}", mesh_hub),
    ]
    route_names: dict[Callable[..., Any], str] = {}

    def names() -> dict[Callable[..., Any], str]:
        if not route_names:
            for r in app.routes:
                endpoint = getattr(r, "endpoint", None) or getattr(r, "app", None)
                if endpoint is not None:
                    route_names[endpoint] = getattr(r, "path", "")
        return route_names

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        stop = asyncio.Event()
        async with contextlib.AsyncExitStack() as stack:
            stack.push_async_callback(http.aclose)
            await mcp_gateway.start()
            stack.push_async_callback(mcp_gateway.aclose)
            await budget_store.open()
            stack.push_async_callback(budget_store.close)
            stack.push_async_callback(budget_mw.cancel_retries, budget_retries)  # before the close
            await safety.start()
            stack.push_async_callback(safety.aclose)
            stack.push_async_callback(mesh_hub.aclose)
            stack.push_async_callback(a2a_transport.aclose)
            if foundry_client is not None and foundry_broker is not None:
                await foundry_client.start()
                stack.push_async_callback(foundry_client.aclose)
                await foundry_broker.start()
                stack.push_async_callback(foundry_broker.aclose)
            if jwks_cache is not None and jwks_cache._client is not http:
                stack.push_async_callback(jwks_cache._client.aclose)
            await policy.reload()
            watcher = None
            if settings.policy.watch and settings.policy.dir is not None:
                watcher = asyncio.create_task(policy.watch(stop), name="kars-policy-watch")
            flusher = asyncio.create_task(_flush_every(buffered, stop), name="kars-log-flush")
            try:
                yield
            finally:
                stop.set()
                await asyncio.gather(flusher, return_exceptions=True)
                for lines in buffered:
                    lines.flush()
                if watcher is not None:
                    await asyncio.gather(watcher, return_exceptions=True)

    middleware = [
        Middleware(
            observe.ObserveMiddleware,
            metrics=metrics,
            access_log=access_log,
            route_names=names,
            routes=lambda: routes,  # the list the app is built from, complete by the first request
        ),
        Middleware(error_mw.ErrorMiddleware),
        Middleware(body_limit.BodyLimitMiddleware, max_body_bytes=settings.limits.max_body_bytes),
        Middleware(
            admin.AdminGateMiddleware,
            token=_read_secret(settings.admin.token_file),
            loopback_is_admin=settings.server.sandbox is None,
        ),
        Middleware(
            identity.IdentityMiddleware,
            verifier=token_verifier,
            sidecar_sandbox=settings.server.sandbox,
            trusted_proxies=settings.identity.trusted_proxies,
            metrics=metrics,
            policy=policy,
        ),
        Middleware(
            jws.JwsMiddleware,
            policy=policy,
            metrics=metrics,
            jku_allowed_hosts=settings.a2a.jku_allowed_hosts,
            max_card_bytes=settings.a2a.max_card_bytes,
            public_urls=settings.a2a.public_urls,
            # Replicas share Redis for budgets: a signed request's jti is claimed there too.
            shared_replay=stores.shared_claim(budget_store),
        ),
        Middleware(trust_graph.TrustGraphMiddleware, policy=policy, metrics=metrics),
        Middleware(
            budget_mw.TokenBudgetMiddleware,
            store=budget_store,
            policy=policy,
            metrics=metrics,
            retries=budget_retries,
        ),
        Middleware(safety_mw.ContentSafetyMiddleware, safety=safety, policy=policy, metrics=metrics),
    ]
    own_v1 = frozenset(p for r in routes if (p := getattr(r, "path", "")).startswith("/v1/"))
    hot, catch_all = runtime.foundry.routes(reserved=own_v1)
    routes[:0] = hot  # /openai/..., /models/...: the hot path, matched first (no other route starts so)
    routes.extend(catch_all)  # /v1/...: after every other route, and never on their paths (/v1/whoami, /v1/budgets)
    app = _App(routes=routes, middleware=middleware, lifespan=lifespan)
    app.state.kars = runtime
    return app
