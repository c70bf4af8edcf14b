"""Budgets cannot be overspent: 500 simultaneous requests through real routers, with every store.

The gated runs hold every admitted request open (its reservation in force) until all 500 have
an answer, so the store is raced as hard as it can be: exactly ``limit // worst`` may be
admitted, and each refusal must have seen a window that really could not take it. The
two-router runs do the same across two router processes (the second a real ``python -m router
router`` subprocess) sharing one Redis; a SQLite file belongs to one router process, and a
second one pointed at it refuses to start.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from router import budgets, stores
from router import settings as settings_mod
from router.app import build_app
from router.identity import devtokens
from router.policy import model
from router.stores import base
from tests.fakes.foundry import FakeFoundry
from tests.router.middleware.budget_support import (
    SANDBOX,
    budget_router,
    budgets_of,
    chat_body,
    token,
    window,
    write_policy,
)
from tests.support import servers, waiting

MakeSettings = Callable[..., settings_mod.Settings]
REQUESTS = 500
WORST = 100  # tokens each request reserves
STORM_TIMEOUT_S = 60.0
ROUTER_START_TIMEOUT_S = 30.0
UPSTREAM_KEY = "upstream-secret-key"


@dataclasses.dataclass
class Result:
    status: int = 0
    headers: dict[str, str] = dataclasses.field(default_factory=dict)
    body: bytes = b""


async def storm(
    targets: list[tuple[str, str]], bodies: list[dict[str, Any]], release: Callable[[], None] | None
) -> list[Result]:
    """Send every body at once (round-robin over ``(url, token)`` targets); with ``release``, call it
    once every request has its status (admitted streams still open), then let them finish."""
    results = [Result() for _ in bodies]
    answered = asyncio.Event()
    count = 0

    async def one(i: int, body: dict[str, Any], client: httpx.AsyncClient) -> None:
        nonlocal count
        url, bearer = targets[i % len(targets)]
        headers = {"Authorization": f"Bearer {bearer}"}
        async with client.stream("POST", f"{url}/v1/chat/completions", json=body, headers=headers) as resp:
            results[i].status, results[i].headers = resp.status_code, dict(resp.headers)
            count += 1
            if count == len(bodies):
                answered.set()
            results[i].body = await resp.aread()

    limits = httpx.Limits(max_connections=len(bodies), max_keepalive_connections=len(bodies))
    async with httpx.AsyncClient(limits=limits, timeout=STORM_TIMEOUT_S) as client:
        tasks = [asyncio.create_task(one(i, b, client)) for i, b in enumerate(bodies)]
        if release is not None:
            await asyncio.wait_for(answered.wait(), STORM_TIMEOUT_S)
            release()
        await asyncio.wait_for(asyncio.gather(*tasks), STORM_TIMEOUT_S)
    return results


def check_refusals(results: list[Result], worst: int) -> int:
    """Every refusal is a budget refusal that saw a window unable to take ``worst``; returns how many."""
    refused = [r for r in results if r.status == 429]
    for r in refused:
        assert b'"budget_exceeded"' in r.body, r.body
        assert 0 <= int(r.headers["x-ratelimit-remaining-tokens"]) < worst
    assert all(r.status in (200, 429) for r in results), {r.status for r in results}
    return len(refused)


def store_settings(store: str, request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, Any]:
    if store == "redis":
        return {"store": "redis", "redisUrl": request.getfixturevalue("redis_url")}
    if store == "sqlite":
        return {"store": "sqlite", "sqlitePath": str(tmp_path / "budgets.db")}
    return {"store": "memory"}


# -- one router -------------------------------------------------------------------------------


@pytest.mark.parametrize("store", ["memory", "sqlite", "redis"])
async def test_500_simultaneous_requests_never_overspend(
    store: str, request: pytest.FixtureRequest, tmp_path: Path, policy_dir: Path, make_settings: MakeSettings
) -> None:
    limit = 10_050  # not a multiple of WORST: the last 50 tokens can never be reserved
    write_policy(policy_dir, dailyTokens=limit, monthlyTokens=10 * limit)
    with budget_router(make_settings(budgets=store_settings(store, request, tmp_path))) as srv:
        bodies = [chat_body(WORST, model="gated") for _ in range(REQUESTS)]
        gate = srv.transport.gate
        results = await storm([(srv.url, token(srv))], bodies, lambda: srv.loop.call_soon_threadsafe(gate.set))
        refused = check_refusals(results, WORST)
        admitted = REQUESTS - refused
        assert admitted == limit // WORST  # everything that fitted, nothing more
        day = await asyncio.to_thread(lambda: window(budgets_of(srv), "day"))
        assert (day["used"], day["reserved"]) == (admitted * WORST, 0)
        assert day["used"] <= limit


@pytest.mark.parametrize("store", ["memory", "sqlite", "redis"])
async def test_mixed_outcomes_under_concurrency_settle_exactly(
    store: str, request: pytest.FixtureRequest, tmp_path: Path, policy_dir: Path, make_settings: MakeSettings
) -> None:
    limit = 20_000
    write_policy(policy_dir, hourlyTokens=limit, dailyTokens=limit)
    models = ["exact", "half", "nousage", "fail"]
    bodies = [chat_body(WORST, model=models[i % len(models)]) for i in range(REQUESTS)]
    charged = {"exact": WORST, "half": WORST // 2, "nousage": WORST, "fail": 0}
    with budget_router(make_settings(budgets=store_settings(store, request, tmp_path))) as srv:
        results = await storm([(srv.url, token(srv))], bodies, None)
        assert {r.status for r in results} <= {200, 429, 502}  # 502: the "fail" upstream
        refused = [r for r in results if r.status == 429]
        for r in refused:
            assert 0 <= int(r.headers["x-ratelimit-remaining-tokens"]) < WORST
        expected = sum(charged[b["model"]] for b, r in zip(bodies, results, strict=True) if r.status != 429)
        report = await asyncio.to_thread(budgets_of, srv)
        for w in ("hour", "day"):
            assert (window(report, w)["used"], window(report, w)["reserved"]) == (expected, 0)
        assert expected <= limit


# -- restart ----------------------------------------------------------------------------------


@pytest.mark.parametrize("store", ["sqlite", "redis"])
def test_usage_survives_a_router_restart(
    store: str, request: pytest.FixtureRequest, tmp_path: Path, policy_dir: Path, make_settings: MakeSettings
) -> None:
    write_policy(policy_dir, dailyTokens=1000, monthlyTokens=5000)
    settings = make_settings(budgets=store_settings(store, request, tmp_path))
    with budget_router(settings) as srv:
        for _ in range(3):
            assert chat_one(srv, chat_body(WORST)).status_code == 200
        assert window(budgets_of(srv), "day")["used"] == 300
    with budget_router(settings) as srv:
        report = budgets_of(srv)
        assert (window(report, "day")["used"], window(report, "month")["used"]) == (300, 300)
        assert chat_one(srv, chat_body(700)).status_code == 200
        refused = chat_one(srv, chat_body(WORST))
        assert refused.status_code == 429
        assert refused.headers["x-ratelimit-remaining-tokens"] == "0"


def chat_one(srv: Any, body: dict[str, Any]) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token(srv)}"}
    return httpx.post(f"{srv.url}/v1/chat/completions", json=body, headers=headers, timeout=10)


# -- two routers, the real Foundry transport, one shared store ---------------------------------


@contextlib.contextmanager
def router_process(config: Path, port: int, log: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """``python -m router router --config CONFIG`` as a subprocess, ready on loopback."""
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "router", "router", "--config", str(config), "--port", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + ROUTER_START_TIMEOUT_S
            while True:
                assert proc.poll() is None, f"router exited: {log.read_text()}"
                with contextlib.suppress(httpx.TransportError):
                    if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                        break
                assert time.monotonic() < deadline, f"router not ready: {log.read_text()}"
                time.sleep(0.05)
            yield url, proc
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


def write_config(tmp_path: Path, policy_dir: Path, budgets: dict[str, Any], upstream: str) -> Path:
    key_file = tmp_path / "foundry-key"
    key_file.write_text(UPSTREAM_KEY + "\n")
    tree: dict[str, Any] = {
        "policy": {"dir": str(policy_dir)},
        "identity": {"devKeyFile": str(tmp_path / "dev-key.pem")},
        "budgets": budgets,
        "foundry": {"endpoint": upstream, "apiKeyFile": str(key_file)},
        "log": {"access": False, "level": "warning"},
    }
    config = tmp_path / "router.yaml"
    config.write_text(yaml.safe_dump(tree))
    return config


async def test_two_router_processes_share_one_budget(
    request: pytest.FixtureRequest, tmp_path: Path, policy_dir: Path
) -> None:
    limit = 5_000
    write_policy(policy_dir, dailyTokens=limit)
    fake = FakeFoundry(api_key=UPSTREAM_KEY)
    with servers.serve(fake) as upstream:
        config = write_config(tmp_path, policy_dir, store_settings("redis", request, tmp_path), upstream.url)
        app = build_app(settings_mod.load(config))
        bearer = devtokens.issue(app.state.kars.dev_key, SANDBOX, audience="kars-router")
        with (
            servers.serve(app) as first,
            router_process(config, servers.free_port(), tmp_path / "b.log") as (second, _),
        ):
            # Streamed through the real transport; the fake upstream holds every stream open until released.
            bodies = [chat_body(WORST, model="gated", stream=True) for _ in range(REQUESTS)]
            results = await storm([(first.url, bearer), (second, bearer)], bodies, fake.release)
            refused = check_refusals(results, WORST)
            admitted = REQUESTS - refused
            assert admitted == limit // WORST
            assert not fake.gate_timed_out
            for url in (first.url, second):  # both routers read the same counters
                async with httpx.AsyncClient(timeout=10) as client:
                    resp = await client.get(f"{url}/v1/budgets", headers={"Authorization": f"Bearer {bearer}"})
                day = window(resp.json(), "day")
                assert (day["used"], day["reserved"]) == (admitted * 15, 0)  # the fake's usage: 15 per reply
            served = [r for r in results if r.status == 200]
            assert all(r.body.endswith(b"data: [DONE]\n\n") for r in served)


def test_a_second_router_process_on_the_same_sqlite_file_refuses_to_start(tmp_path: Path, policy_dir: Path) -> None:
    write_policy(policy_dir, dailyTokens=5_000)
    fake = FakeFoundry(api_key=UPSTREAM_KEY)
    with servers.serve(fake) as upstream:
        config = write_config(
            tmp_path, policy_dir, {"store": "sqlite", "sqlitePath": str(tmp_path / "b.db")}, upstream.url
        )
        with servers.serve(build_app(settings_mod.load(config))) as first:
            second = subprocess.run(
                [sys.executable, "-m", "router", "router", "--config", str(config), "--port", str(servers.free_port())],
                capture_output=True,
                text=True,
                timeout=ROUTER_START_TIMEOUT_S,
            )
            assert second.returncode != 0
            assert "in use by another router process" in second.stdout + second.stderr
            assert httpx.get(f"{first.url}/readyz").status_code == 200  # the owner is unaffected


def sqlite_reserved(path: Path) -> int:
    """Tokens held by the reservations the SQLite file holds (read as the sqlite3 shell would)."""
    with contextlib.closing(sqlite3.connect(path)) as db:
        row = db.execute("SELECT coalesce(sum(amount), 0) FROM reservations").fetchone()
    return int(row[0])


@pytest.mark.parametrize("store", ["redis", "sqlite"])
async def test_a_killed_routers_reservations_are_swept_after_their_deadline(
    store: str, request: pytest.FixtureRequest, tmp_path: Path, policy_dir: Path
) -> None:
    write_policy(policy_dir, dailyTokens=10_000)
    fake = FakeFoundry(api_key=UPSTREAM_KEY)
    with servers.serve(fake) as upstream:
        budget_settings = store_settings(store, request, tmp_path)
        config = write_config(tmp_path, policy_dir, budget_settings, upstream.url)
        settings = settings_mod.load(config)
        bearer = devtokens.issue(build_app(settings).state.kars.dev_key, SANDBOX, audience="kars-router")
        body = chat_body(WORST, model="gated", stream=True)
        with router_process(config, servers.free_port(), tmp_path / "b.log") as (url, proc):
            async with httpx.AsyncClient(timeout=10) as client:
                for _ in range(3):  # three streams held open upstream: three reservations in force
                    req = client.build_request(
                        "POST", f"{url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {bearer}"}
                    )
                    resp = await client.send(req, stream=True)
                    assert resp.status_code == 200
                if store == "sqlite":  # written behind: wait until the file has them, then die
                    path = Path(budget_settings["sqlitePath"])
                    await waiting.until_async(lambda: sqlite_reserved(path) == 3 * WORST, what="reservations on disk")
                proc.kill()  # the router dies without settling anything
                proc.wait(10)
        fake.release()

        store_obj = stores.create(settings.budgets)
        await store_obj.open()
        try:
            now = time.time()
            lines = budgets.lines(policies_of(policy_dir), "team-a", "agent-1", now)
            counters = [line.counter for line in lines]
            assert await store_obj.read(counters) == [base.Counter(0, 3 * WORST)]
            # Before the deadline nothing is swept; after it, the next reserve on any replica releases them.
            charges = [line.charge() for line in lines]
            later = now + base.RESERVATION_TTL_S + 1
            await store_obj.reserve("live", charges, 1, deadline=later + 60, now=now)
            assert await store_obj.read(counters) == [base.Counter(0, 3 * WORST + 1)]
            await store_obj.reserve("next", charges, 1, deadline=later + 60, now=later)
            assert await store_obj.read(counters) == [base.Counter(0, 2)]
        finally:
            await store_obj.close()


def policies_of(policy_dir: Path) -> list[model.InferencePolicy]:
    return [
        model.InferencePolicy.model_validate(yaml.safe_load(f.read_text())) for f in sorted(policy_dir.glob("*.yaml"))
    ]
