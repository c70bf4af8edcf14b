"""Window rollover through the budget layer with an injected clock: hour, day and month boundaries,
a leap February, and ``Retry-After`` naming the window that really has to reset."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from router import _asgi, budget_api
from router.identity.principal import Principal
from router.middleware import errors as error_mw
from router.middleware import token_budget
from router.observability import metrics as metrics_mod
from router.policy import model
from router.policy import store as policy_store
from router.stores import memory
from tests.router.middleware.budget_support import SANDBOX, chat_body, window, write_policy
from tests.support import fake_transport, servers


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def set(self, text: str) -> None:
        self.now = dt.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()

    def __call__(self) -> float:
        return self.now


class Caller:
    """Outermost test layer: loads policy at start-up and makes every request come from SANDBOX."""

    def __init__(self, app: Any, policy: policy_store.PolicyStore) -> None:
        self.app = app
        self.policy = policy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                kind = (await receive())["type"]
                if kind == "lifespan.startup":
                    await self.policy.reload()
                await send({"type": kind + ".complete"})
                if kind == "lifespan.shutdown":
                    return
        scope.setdefault("state", {})[_asgi.PRINCIPAL] = Principal("sandbox", SANDBOX, "router-token")
        await self.app(scope, receive, send)


@pytest.fixture
def clocked(policy_dir: Path) -> Iterator[Callable[..., tuple[str, Clock]]]:
    """``clocked(**tokenBudget)`` writes the policy and serves the budget layer with a settable clock."""
    clock = Clock()
    policy = policy_store.PolicyStore(policy_dir, model.SafetyFloor())
    store = memory.MemoryStore()
    api = budget_api.BudgetApi(store, policy, clock=clock)
    inner = Starlette(
        routes=[
            Route("/v1/budgets", api.budgets, methods=["GET"]),
            Route("/v1/chat/completions", fake_transport.FakeTransport(), methods=["POST"]),
        ]
    )
    budgeted = token_budget.TokenBudgetMiddleware(
        inner, store=store, policy=policy, metrics=metrics_mod.Metrics(), clock=clock
    )
    with servers.serve(Caller(error_mw.ErrorMiddleware(budgeted), policy)) as srv:

        def start(**budget: Any) -> tuple[str, Clock]:
            write_policy(policy_dir, **budget)
            assert srv.call(policy.reload()).result == "ok"
            return srv.url, clock

        yield start


def post(url: str, tokens: int) -> httpx.Response:
    return httpx.post(f"{url}/v1/chat/completions", json=chat_body(tokens), timeout=10)


def report(url: str) -> dict[str, Any]:
    resp = httpx.get(f"{url}/v1/budgets", timeout=10)
    assert resp.status_code == 200, resp.text
    out: dict[str, Any] = resp.json()
    return out


def refused_by(resp: httpx.Response, window_name: str, retry_after: int, reset: str) -> None:
    assert resp.status_code == 429, resp.text
    assert f"per {window_name} " in resp.json()["error"]["message"]
    assert resp.headers["retry-after"] == str(retry_after)
    assert resp.headers["x-ratelimit-reset-tokens"] == reset


def test_hour_day_and_month_roll_over_across_a_leap_day(clocked: Callable[..., tuple[str, Clock]]) -> None:
    url, clock = clocked(hourlyTokens=300, dailyTokens=500, monthlyTokens=700)

    clock.set("2028-02-28T23:59:00Z")
    for _ in range(3):
        assert post(url, 100).status_code == 200
    refused_by(post(url, 100), "hour", 60, "1m0s")  # the day and month still have room

    clock.set("2028-02-29T00:00:00Z")  # a new hour and a new (leap) day, the same month
    now = report(url)
    assert (window(now, "hour")["used"], window(now, "day")["used"], window(now, "month")["used"]) == (0, 0, 300)
    assert window(now, "day")["resetsAt"] == "2028-03-01T00:00:00Z"
    assert window(now, "month")["resetsAt"] == "2028-03-01T00:00:00Z"
    for _ in range(2):
        assert post(url, 100).status_code == 200

    clock.set("2028-02-29T01:00:00Z")
    for _ in range(2):
        assert post(url, 100).status_code == 200  # the month is now full: 700
    refused_by(post(url, 100), "month", 23 * 3600, "23h0m0s")

    clock.set("2028-02-29T23:59:59Z")
    refused_by(post(url, 100), "month", 1, "1s")

    clock.set("2028-03-01T00:00:00Z")
    assert post(url, 100).status_code == 200
    now = report(url)
    assert window(now, "month")["used"] == 100
    assert window(now, "month")["resetsAt"] == "2028-04-01T00:00:00Z"


def test_retry_after_names_the_window_that_resets_last(clocked: Callable[..., tuple[str, Clock]]) -> None:
    url, clock = clocked(hourlyTokens=300, dailyTokens=400, monthlyTokens=100_000)

    clock.set("2026-11-22T10:59:00Z")
    for _ in range(3):
        assert post(url, 100).status_code == 200
    refused_by(post(url, 100), "hour", 60, "1m0s")

    clock.set("2026-11-22T11:00:00Z")
    assert post(url, 100).status_code == 200  # the day is now full (400); this hour has 200 left
    refused_by(post(url, 100), "day", 13 * 3600, "13h0m0s")

    resp = post(url, 50)  # smaller requests cannot squeeze in either
    assert resp.status_code == 429 and resp.headers["x-ratelimit-remaining-tokens"] == "0"

    clock.set("2026-11-23T00:00:00Z")
    assert post(url, 300).status_code == 200
    refused_by(post(url, 100), "hour", 3600, "1h0m0s")  # hour full (300), day has 100 left


def test_thirty_and_thirty_one_day_months(clocked: Callable[..., tuple[str, Clock]]) -> None:
    url, clock = clocked(monthlyTokens=100)
    clock.set("2026-04-30T23:59:59Z")
    assert post(url, 100).status_code == 200
    refused_by(post(url, 100), "month", 1, "1s")
    clock.set("2026-05-01T00:00:00Z")
    assert post(url, 100).status_code == 200
    clock.set("2026-05-31T12:00:00Z")
    refused_by(post(url, 100), "month", 12 * 3600, "12h0m0s")
    clock.set("2026-12-31T23:00:00Z")
    assert post(url, 100).status_code == 200
    assert window(report(url), "month")["resetsAt"] == "2027-01-01T00:00:00Z"
