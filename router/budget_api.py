"""``GET /v1/budgets``: the caller's own token-budget counters (SPEC.md §7), and the store's readiness check."""

from __future__ import annotations

import time
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from router import _asgi, budgets, errors
from router.middleware import token_budget
from router.policy import model
from router.policy import store as policy_store
from router.stores import base

# Every action a policy can name; a caller's budgets are the union over them.
ACTIONS = ("chat", "responses", "embeddings", "image", "audio")


class BudgetApi:
    def __init__(
        self,
        store: base.CounterStore,
        policy: policy_store.PolicyStore,
        *,
        clock: token_budget.Clock = time.time,
    ) -> None:
        self._store = store
        self._policy = policy
        self._clock = clock

    async def budgets(self, request: Request) -> Response:
        principal = request.scope["state"][_asgi.PRINCIPAL]
        snapshot = self._policy.snapshot
        policies: dict[tuple[str, str, str], model.InferencePolicy] = {}
        for action in ACTIONS:
            for p in token_budget.budget_policies(snapshot, principal, action):
                policies.setdefault(p.key, p)
        lines = budgets.lines(policies.values(), principal.namespace, principal.name, self._clock())
        try:
            counters = await self._store.read([line.counter for line in lines])
        except base.StoreUnavailable:
            raise errors.ServiceUnavailable(
                "the token budget store is unavailable", code="budget_store_unavailable"
            ) from None
        items: list[dict[str, Any]] = [
            {
                "policy": line.policy,
                "scope": line.scope,
                "key": line.key,
                "window": line.span.window,
                "limit": line.limit,
                "used": counter.used,
                "reserved": counter.reserved,
                "resetsAt": line.span.resets_at,
            }
            for line, counter in zip(lines, counters, strict=True)
        ]
        return JSONResponse({"principal": principal.id, "budgets": items})

    async def ready(self) -> str | None:
        """The ``/readyz`` check: None when the budget store answers."""
        return await self._store.ping()
