"""Operational endpoints: health, readiness, metrics, policy status, whoami (SPEC.md §7)."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from router import _asgi, errors
from router.observability import metrics as metrics_mod
from router.policy import store as store_mod

READY_CHECK_TIMEOUT_S = 2.0

# A readiness check returns None when ready, or a short reason when not.
ReadyCheck = Callable[[], Awaitable[str | None]]


@dataclasses.dataclass
class Ops:
    metrics: metrics_mod.Metrics
    policy: store_mod.PolicyStore
    ready_checks: dict[str, ReadyCheck] = dataclasses.field(default_factory=dict)

    async def healthz(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(self, request: Request) -> Response:
        names = list(self.ready_checks)
        results = await asyncio.gather(*(self._run_check(self.ready_checks[n]) for n in names), return_exceptions=False)
        failing = {n: r for n, r in zip(names, results, strict=True) if r is not None}
        if not self.policy.loaded:
            failing["policy"] = "policy not loaded yet"
        if failing:
            body = errors.ServiceUnavailable("not ready", code="not_ready", extra={"checks": failing}).body()
            return JSONResponse(body, status_code=503)
        return JSONResponse({"status": "ready", "policyGeneration": self.policy.snapshot.generation})

    @staticmethod
    async def _run_check(check: ReadyCheck) -> str | None:
        try:
            return await asyncio.wait_for(check(), READY_CHECK_TIMEOUT_S)
        except TimeoutError:
            return "check timed out"
        except Exception as exc:  # a failing check is "not ready", never a 500
            return f"{type(exc).__name__}: {exc}"

    async def metrics_endpoint(self, request: Request) -> Response:
        self.metrics.policy_generation.set(self.policy.snapshot.generation)
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def policy_status(self, request: Request) -> Response:
        return JSONResponse(self.policy.status())

    async def whoami(self, request: Request) -> Response:
        principal = request.scope["state"][_asgi.PRINCIPAL]
        return JSONResponse({"principal": principal.id, "kind": principal.kind, "mode": principal.mode})
