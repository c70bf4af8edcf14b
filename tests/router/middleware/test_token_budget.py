"""Token budgets through the real router on loopback (fake transport behind it): refusals, settling, flags."""

from __future__ import annotations

import datetime as dt
import math
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from router import settings as settings_mod
from router.middleware import token_budget as budget_mw
from router.stores import base as stores_base
from tests.router.middleware.budget_support import (
    auth,
    budget_router,
    budgets_of,
    chat,
    chat_body,
    token,
    window,
    write_policy,
)
from tests.support import waiting

MakeSettings = Callable[..., settings_mod.Settings]


def reset_seconds(value: str) -> int:
    """OpenAI's ``x-ratelimit-reset-tokens`` form (``13h0m5s``, ``59s``) in seconds."""
    match = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(\d+)s", value)
    assert match, value
    h, m, s = (int(g or 0) for g in match.groups())
    return h * 3600 + m * 60 + s


def seconds_to_midnight() -> float:
    now = dt.datetime.now(dt.UTC)
    midnight = (now + dt.timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
    return (midnight - now).total_seconds()


def test_budget_exceeded_is_429_with_retry_headers(policy_dir: Path, make_settings: MakeSettings) -> None:
    write_policy(policy_dir, dailyTokens=1000)
    with budget_router(make_settings()) as srv:
        assert chat(srv, chat_body(600)).status_code == 200
        resp = chat(srv, chat_body(500))
        assert resp.status_code == 429, resp.text
        err = resp.json()["error"]
        assert (err["type"], err["code"]) == ("token_budget_exceeded", "budget_exceeded")
        assert "team-a/budget" in err["message"]
        assert resp.headers["x-ratelimit-remaining-tokens"] == "400"
        retry = int(resp.headers["retry-after"])
        assert abs(retry - math.ceil(seconds_to_midnight())) <= 2
        assert abs(reset_seconds(resp.headers["x-ratelimit-reset-tokens"]) - retry) <= 2
        assert resp.headers["x-should-retry"] == "false"
        assert srv.transport.calls == 1  # the refused request never reached the transport
        # What still fits goes through: the refusal was about that request's size, not a lockout.
        assert chat(srv, chat_body(400)).status_code == 200
        day = window(budgets_of(srv), "day")
        assert (day["used"], day["reserved"], day["limit"]) == (1000, 0, 1000)


def test_openai_sdk_sees_a_rate_limit_error_and_does_not_retry(policy_dir: Path, make_settings: MakeSettings) -> None:
    write_policy(policy_dir, dailyTokens=300)
    with budget_router(make_settings()) as srv:
        client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key=token(srv), max_retries=2, timeout=10)
        body = chat_body(200)
        client.chat.completions.create(model="exact", messages=body["messages"], max_tokens=body["max_tokens"])
        with pytest.raises(openai.RateLimitError) as info:
            client.chat.completions.create(model="exact", messages=body["messages"], max_tokens=body["max_tokens"])
        assert info.value.code == "budget_exceeded"
        assert srv.transport.calls == 1
        metrics = httpx.get(f"{srv.url}/metrics", timeout=5).text
        assert 'kars_budget_rejections_total{code="budget_exceeded"} 1.0' in metrics  # x-should-retry: no retries


def test_per_request_cap_is_checked_first_and_needs_no_counter(policy_dir: Path, make_settings: MakeSettings) -> None:
    write_policy(policy_dir, perRequestTokens=500, dailyTokens=10_000)
    with budget_router(make_settings()) as srv:
        resp = chat(srv, chat_body(501))
        assert resp.status_code == 429
        err = resp.json()["error"]
        assert (err["type"], err["code"]) == ("token_budget_exceeded", "per_request_tokens_exceeded")
        assert "retry-after" not in resp.headers
        assert window(budgets_of(srv), "day")["used"] == 0
        assert chat(srv, chat_body(500)).status_code == 200
        # No maximum named: the policy's perRequestTokens is the worst case, reserved and (no usage) kept.
        body = chat_body(100, model="nousage")
        del body["max_tokens"]
        assert chat(srv, body).status_code == 200
        assert window(budgets_of(srv), "day")["used"] == 500 + 500
        metrics = httpx.get(f"{srv.url}/metrics", timeout=5).text
        assert 'kars_budget_rejections_total{code="per_request_tokens_exceeded"} 1.0' in metrics
        assert 'kars_budget_tokens_rejected_total{scope="sandbox",window="request"} 501.0' in metrics


@pytest.mark.parametrize(
    ("model", "status", "used"),
    [
        ("exact", 200, 400),  # usage reported: settled to it
        ("half", 200, 200),  # less than reserved: the rest is released
        ("over", 200, 1400),  # more than reserved: actual usage is what counts
        ("nousage", 200, 400),  # output but no usage (a stream cut short): the whole reservation is kept
        ("fail", 502, 0),  # no output at all: released
    ],
)
def test_settle_follows_the_outcome(
    policy_dir: Path, make_settings: MakeSettings, model: str, status: int, used: int
) -> None:
    write_policy(policy_dir, hourlyTokens=5000, dailyTokens=5000, monthlyTokens=50_000)
    with budget_router(make_settings()) as srv:
        resp = chat(srv, chat_body(400, model=model))
        assert resp.status_code == status, resp.text
        report = budgets_of(srv)
        for w in ("hour", "day", "month"):
            assert (window(report, w)["used"], window(report, w)["reserved"]) == (used, 0)
        metrics = httpx.get(f"{srv.url}/metrics", timeout=5).text
        assert 'kars_budget_tokens_reserved_total{scope="sandbox",window="hour"} 400.0' in metrics
        if used:
            assert f'kars_budget_tokens_settled_total{{scope="sandbox",window="month"}} {float(used)}' in metrics


def test_reservation_is_visible_while_the_request_runs(policy_dir: Path, make_settings: MakeSettings) -> None:
    write_policy(policy_dir, dailyTokens=1000)
    with budget_router(make_settings()) as srv, httpx.Client(timeout=10) as client:
        import threading

        results: list[httpx.Response] = []
        t = threading.Thread(
            target=lambda: results.append(
                client.post(f"{srv.url}/v1/chat/completions", json=chat_body(700, model="gated"), headers=auth(srv))
            )
        )
        t.start()
        deadline = time.monotonic() + 5
        while window(budgets_of(srv), "day")["reserved"] != 700:
            assert time.monotonic() < deadline, "the reservation never showed"
        # While 700 are held, 400 more cannot fit even though nothing is used yet.
        refused = chat(srv, chat_body(400))
        assert refused.status_code == 429
        assert refused.headers["x-ratelimit-remaining-tokens"] == "300"
        srv.loop.call_soon_threadsafe(srv.transport.gate.set)
        t.join(10)
        assert results[0].status_code == 200
        day = window(budgets_of(srv), "day")
        assert (day["used"], day["reserved"]) == (700, 0)


def test_reject_on_exceed_false_forwards_flags_and_counts(
    policy_dir: Path, make_settings: MakeSettings, capsys: pytest.CaptureFixture[str]
) -> None:
    write_policy(policy_dir, dailyTokens=500, rejectOnExceed=False)
    with budget_router(make_settings()) as srv:
        first = chat(srv, chat_body(400))
        assert first.status_code == 200 and "x-kars-budget" not in first.headers
        second = chat(srv, chat_body(400))
        assert second.status_code == 200
        assert second.headers["x-kars-budget"] == "exceeded"
        day = window(budgets_of(srv), "day")
        assert (day["used"], day["reserved"]) == (800, 0)
        metrics = httpx.get(f"{srv.url}/metrics", timeout=5).text
        assert 'kars_budget_over_limit_allowed_total{scope="sandbox",window="day"} 1.0' in metrics
    lines = [line for line in capsys.readouterr().out.splitlines() if '"/v1/chat/completions"' in line]
    assert [('"budget":"ok"' in line, '"budget":"exceeded"' in line) for line in lines] == [
        (True, False),
        (False, True),
    ]


def test_reject_on_exceed_false_also_lets_a_request_over_the_per_request_cap_through(
    policy_dir: Path, make_settings: MakeSettings
) -> None:
    """rejectOnExceed sits in the tokenBudget beside perRequestTokens: false allows, flags and counts."""
    write_policy(policy_dir, perRequestTokens=500, dailyTokens=10_000, rejectOnExceed=False)
    with budget_router(make_settings()) as srv:
        resp = chat(srv, chat_body(800))
        assert resp.status_code == 200 and resp.headers["x-kars-budget"] == "exceeded"
        assert window(budgets_of(srv), "day")["used"] == 800
        metrics = httpx.get(f"{srv.url}/metrics", timeout=5).text
        assert 'kars_budget_over_limit_allowed_total{scope="sandbox",window="request"} 1.0' in metrics
        write_policy(policy_dir, name="strict", perRequestTokens=600)  # enforced: it refuses
        srv.call(srv.app.state.kars.policy.reload())
        resp = chat(srv, chat_body(800))
        assert (resp.status_code, resp.json()["error"]["code"]) == (429, "per_request_tokens_exceeded")
        assert "strict" in resp.json()["error"]["message"]


def test_a_per_request_cap_alone_needs_no_store(policy_dir: Path, make_settings: MakeSettings, dead_port: int) -> None:
    """A policy with only perRequestTokens keeps no counter: a store outage does not touch it."""
    write_policy(policy_dir, perRequestTokens=500)
    down = f"redis://127.0.0.1:{dead_port}/0"
    with budget_router(make_settings(budgets={"store": "redis", "redisUrl": down})) as srv:
        resp = chat(srv, chat_body(400))
        assert resp.status_code == 200 and "x-kars-budget" not in resp.headers
        assert chat(srv, chat_body(501)).status_code == 429
        assert srv.transport.calls == 1


def test_scopes_share_counters_as_declared(policy_dir: Path, make_settings: MakeSettings) -> None:
    write_policy(policy_dir, name="per-sandbox", dailyTokens=1000)
    write_policy(policy_dir, name="per-namespace", dailyTokens=1500, scope="namespace")
    write_policy(policy_dir, name="everyone", monthlyTokens=100_000, scope="cluster")
    with budget_router(make_settings()) as srv:
        assert chat(srv, chat_body(900), "team-a/one").status_code == 200
        assert chat(srv, chat_body(500), "team-a/two").status_code == 200
        resp = chat(srv, chat_body(200), "team-a/two")  # its own sandbox budget has room; the namespace has not
        assert resp.status_code == 429
        assert "per-namespace" in resp.json()["error"]["message"]
        assert resp.headers["x-ratelimit-remaining-tokens"] == "100"
        assert chat(srv, chat_body(300), "team-b/other").status_code == 200  # no policy in team-b

        report = budgets_of(srv, "team-a/two")
        assert report["principal"] == "team-a/two"
        items = {(b["policy"], b["scope"], b["key"], b["window"]): b for b in report["budgets"]}
        assert set(items) == {
            ("team-a/per-sandbox", "sandbox", "team-a/two", "day"),
            ("team-a/per-namespace", "namespace", "team-a", "day"),
            ("team-a/everyone", "cluster", "*", "month"),
        }
        assert items[("team-a/per-sandbox", "sandbox", "team-a/two", "day")]["used"] == 500
        assert items[("team-a/per-namespace", "namespace", "team-a", "day")]["used"] == 1400
        assert items[("team-a/everyone", "cluster", "*", "month")]["used"] == 1400
        day = items[("team-a/per-sandbox", "sandbox", "team-a/two", "day")]
        assert set(day) == {"policy", "scope", "key", "window", "limit", "used", "reserved", "resetsAt"}
        assert day["resetsAt"].endswith("T00:00:00Z")
        assert budgets_of(srv, "team-b/other") == {"principal": "team-b/other", "budgets": []}


def test_a_lowered_limit_keeps_usage_and_applies_to_the_next_request(
    policy_dir: Path, make_settings: MakeSettings
) -> None:
    write_policy(policy_dir, dailyTokens=2000)
    with budget_router(make_settings(policy={"watch": False})) as srv:
        assert chat(srv, chat_body(800)).status_code == 200
        write_policy(policy_dir, dailyTokens=500)
        assert srv.call(srv.app.state.kars.policy.reload()).result == "ok"
        day = window(budgets_of(srv), "day")
        assert (day["limit"], day["used"], day["reserved"]) == (500, 800, 0)
        resp = chat(srv, chat_body(50))
        assert resp.status_code == 429
        assert resp.headers["x-ratelimit-remaining-tokens"] == "0"
        write_policy(policy_dir, dailyTokens=900)
        srv.call(srv.app.state.kars.policy.reload())
        assert chat(srv, chat_body(100)).status_code == 200
        assert chat(srv, chat_body(50)).status_code == 429


def test_routes_without_a_budget_are_untouched(policy_dir: Path, make_settings: MakeSettings) -> None:
    write_policy(policy_dir, name="chat-only", dailyTokens=100)
    (policy_dir / "team-a-chat-only.yaml").write_text(
        (policy_dir / "team-a-chat-only.yaml").read_text().replace("spec:\n", "spec:\n  appliesTo: {action: chat}\n")
    )
    with budget_router(make_settings()) as srv:
        big = chat_body(5000)
        resp = httpx.post(f"{srv.url}/v1/embeddings", json={"model": "exact", "input": "x" * 4000}, headers=auth(srv))
        assert resp.status_code == 200, resp.text
        assert chat(srv, big, "team-z/free").status_code == 200  # no policy applies to team-z
        assert chat(srv, big).status_code == 429
        assert window(budgets_of(srv), "day", "team-a/chat-only")["used"] == 0


def test_malformed_json_is_400_before_any_reservation(policy_dir: Path, make_settings: MakeSettings) -> None:
    write_policy(policy_dir, dailyTokens=1000)
    with budget_router(make_settings()) as srv:
        headers = {**auth(srv), "content-type": "application/json"}
        resp = httpx.post(f"{srv.url}/v1/chat/completions", content=b'{"messages": [', headers=headers, timeout=5)
        assert resp.status_code == 400
        assert resp.json()["error"]["code"] == "invalid_request"
        for odd in (b"[]", b'"text"', b"null", b'{"max_tokens": -5, "n": "three", "messages": 7}'):
            resp = httpx.post(f"{srv.url}/v1/chat/completions", content=odd, headers=headers, timeout=5)
            assert resp.status_code in (200, 429), resp.text  # the fake answers; the budget never crashes
        day = window(budgets_of(srv), "day")
        assert day["reserved"] == 0


def test_store_down_fails_closed_and_readyz_says_so(
    policy_dir: Path, make_settings: MakeSettings, dead_port: int
) -> None:
    write_policy(policy_dir, dailyTokens=1000)
    down = f"redis://127.0.0.1:{dead_port}/0"
    with budget_router(make_settings(budgets={"store": "redis", "redisUrl": down})) as srv:
        resp = chat(srv, chat_body(100))
        assert resp.status_code == 503
        assert resp.json()["error"]["code"] == "budget_store_unavailable"
        assert srv.transport.calls == 0
        ready = httpx.get(f"{srv.url}/readyz", timeout=10)
        assert ready.status_code == 503
        assert "budget store reachable" in ready.json()["error"]["checks"]
        resp = httpx.get(f"{srv.url}/v1/budgets", headers=auth(srv), timeout=10)
        assert resp.status_code == 503 and resp.json()["error"]["code"] == "budget_store_unavailable"


def test_store_down_fails_open_only_when_every_budget_allows_it(
    policy_dir: Path, make_settings: MakeSettings, dead_port: int
) -> None:
    write_policy(policy_dir, dailyTokens=1000, failOpen=True)
    down = f"redis://127.0.0.1:{dead_port}/0"
    with budget_router(make_settings(budgets={"store": "redis", "redisUrl": down})) as srv:
        resp = chat(srv, chat_body(100))
        assert resp.status_code == 200
        assert resp.headers["x-kars-budget"] == "unavailable"
        write_policy(policy_dir, name="strict", monthlyTokens=100_000)
        srv.call(srv.app.state.kars.policy.reload())
        assert chat(srv, chat_body(100)).status_code == 503


def test_readyz_with_a_reachable_store(policy_dir: Path, make_settings: MakeSettings, tmp_path: Path) -> None:
    settings = make_settings(budgets={"store": "sqlite", "sqlitePath": str(tmp_path / "b.db")})
    with budget_router(settings) as srv:
        ready = httpx.get(f"{srv.url}/readyz", timeout=10)
        assert ready.status_code == 200, ready.text


def test_unauthenticated_budget_report_is_401(make_settings: MakeSettings) -> None:
    with budget_router(make_settings()) as srv:
        assert httpx.get(f"{srv.url}/v1/budgets", timeout=5).status_code == 401


@pytest.mark.parametrize("landed", [False, True])
def test_a_settle_the_store_failed_is_retried_and_counted_once(
    policy_dir: Path,
    make_settings: MakeSettings,
    redis_url: str,
    monkeypatch: pytest.MonkeyPatch,
    landed: bool,
) -> None:
    """Redis did not answer the settle (down, or stalled after doing it: ``landed``): the router
    settles again until it lands, and a settle that had landed is not counted twice. The fault
    is injected at the store's boundary; the store is the real one on a real Redis."""
    monkeypatch.setattr(budget_mw, "RETRY_FIRST_S", 0.05)
    write_policy(policy_dir, dailyTokens=10_000)
    with budget_router(make_settings(budgets={"store": "redis", "redisUrl": redis_url})) as srv:
        store = srv.app.state.kars.budget_store
        real_settle = store.settle
        calls: list[int] = []

        async def flaky_settle(*args: Any) -> None:
            calls.append(1)
            if len(calls) == 1:
                if landed:
                    await real_settle(*args)
                raise stores_base.StoreUnavailable("Redis budget store: TimeoutError")
            await real_settle(*args)

        monkeypatch.setattr(store, "settle", flaky_settle)
        assert chat(srv, chat_body(400)).status_code == 200
        waiting.until(lambda: len(calls) == 2, what="the retried settle")
        settled = waiting.until(lambda: (d := window(budgets_of(srv), "day"))["reserved"] == 0 and d, what="settle")
        assert settled["used"] == 400  # once
        metrics = httpx.get(f"{srv.url}/metrics", timeout=5).text
        assert 'kars_budget_store_errors_total{operation="settle"} 1.0' in metrics
