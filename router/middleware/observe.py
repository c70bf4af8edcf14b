"""Per-request metrics and the JSON access log line (SPEC.md §7).

The outermost layer, so it sees the status the error layer rendered for every refusal.
Layers add fields to the log line through ``scope["state"]["kars.log"]`` (tokens, decisions);
``decision`` is ``allow``, or the ``error.code`` of the refusal the error layer rendered;
the line never holds secrets, prompts, query strings or tool arguments.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from router import _asgi
from router.observability import logs
from router.observability import metrics as metrics_mod

UNMATCHED = "unrouted"  # no route (404), or refused before routing on a path no route takes


class ObserveMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        *,
        metrics: metrics_mod.Metrics,
        access_log: logs.JsonLines,
        route_names: Mapping[Callable[..., Any], str] | Callable[[], Mapping[Any, str]],
        routes: Callable[[], Iterable[BaseRoute]] = tuple,
    ) -> None:
        self.app = app
        self._metrics = metrics
        self._route_names = route_names
        self._routes = routes
        self._access = access_log

    def _route(self, scope: Scope) -> str:
        endpoint = scope.get("endpoint")
        if endpoint is not None:
            names = self._route_names() if callable(self._route_names) else self._route_names
            return names.get(endpoint, UNMATCHED)
        # Refused before routing (a 401, a budget 429, a prompt the safety floor blocked): named
        # by the route it was on its way to, so the refusals show on that route's series.
        for route in self._routes():
            if route.matches(scope)[0] is not Match.NONE:
                return getattr(route, "path", UNMATCHED)
        return UNMATCHED

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        fields: dict[str, Any] = {}
        scope["state"][_asgi.LOG_FIELDS] = fields
        status = 0
        sent = 0

        async def observing_send(message: Message) -> None:
            nonlocal status, sent
            kind = message["type"]
            if kind == "http.response.start" or kind == "websocket.http.response.start":
                status = message["status"]
            elif kind == "http.response.body":
                sent += len(message.get("body", b""))
            elif kind == "websocket.accept":
                status = 101
            await send(message)

        self._metrics.in_flight.inc()
        try:
            await self.app(scope, receive, observing_send)
        except BaseException:
            if status == 0:
                status = 500  # the error layer outside renders it
            raise
        finally:
            self._metrics.in_flight.dec()
            elapsed = time.perf_counter() - start
            route = self._route(scope)
            method = scope.get("method", "WS")
            self._metrics.requests.labels(route, method, str(status)).inc()
            self._metrics.latency.labels(route).observe(elapsed)
            if self._access.enabled:
                principal = scope["state"].get(_asgi.PRINCIPAL)
                line = {
                    "principal": principal.id if principal is not None else None,
                    "method": method,
                    "route": route,
                    "path": scope["path"],
                    "status": status,
                    "latencyMs": round(elapsed * 1000, 3),
                    "bytesOut": sent,
                }
                line.update(fields)
                line.setdefault("decision", "allow")  # else the error code that refused it (error layer)
                self._access.emit(line)
