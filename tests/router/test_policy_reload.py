"""Hot reload on a running router: picked up without restart, invalid edits keep the last good."""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from tests.support import waiting

POLICY = """\
apiVersion: kars.azure.com/v1alpha1
kind: InferencePolicy
metadata: {{name: budget, namespace: team-a}}
spec:
  tokenBudget: {{dailyTokens: {daily}}}
"""


def status(srv: Any) -> dict[str, Any]:
    resp = httpx.get(f"{srv.url}/internal/policy-status", timeout=5)
    assert resp.status_code == 200
    return resp.json()  # type: ignore[no-any-return]


def entry(srv: Any, name: str) -> dict[str, Any]:
    (found,) = [e for e in status(srv)["entries"] if e["name"] == name]
    return found


def daily_limit(srv: Any) -> int | None:
    policies = srv.app.state.kars.policy.snapshot.inference_policies("team-a", "x", "chat")
    return policies[0].spec.token_budget.daily_tokens if policies else None


def test_edit_is_picked_up_without_restart(router_server: Callable[..., Any], policy_dir: Path) -> None:
    path = policy_dir / "budget.yaml"
    path.write_text(POLICY.format(daily=100))
    srv = router_server()
    first = entry(srv, "budget")
    assert first["digest"].startswith("sha256:") and first["lastError"] is None
    generation = status(srv)["generation"]

    path.write_text(POLICY.format(daily=200))
    waiting.until(lambda: daily_limit(srv) == 200, what="the new daily limit")
    second = entry(srv, "budget")
    assert second["digest"] != first["digest"]
    assert status(srv)["generation"] == generation + 1

    # A new file is a new resource; deleting it removes the resource.
    extra = policy_dir / "extra.yaml"
    extra.write_text(POLICY.format(daily=5).replace("name: budget", "name: extra"))
    waiting.until(lambda: any(e["name"] == "extra" for e in status(srv)["entries"]), what="extra to appear")
    extra.unlink()
    waiting.until(lambda: all(e["name"] != "extra" for e in status(srv)["entries"]), what="extra to go")


def test_invalid_edit_keeps_the_last_good_version(router_server: Callable[..., Any], policy_dir: Path) -> None:
    path = policy_dir / "budget.yaml"
    path.write_text(POLICY.format(daily=100))
    srv = router_server()
    good = entry(srv, "budget")

    path.write_text(POLICY.format(daily="plenty"))
    bad = waiting.until(lambda: (e := entry(srv, "budget"))["lastError"] and e, what="lastError")
    assert "budget.yaml:1: spec.tokenBudget.dailyTokens: Input should be a valid integer" in bad["lastError"]
    assert bad["digest"] == good["digest"] and bad["loadedAt"] == good["loadedAt"]
    assert daily_limit(srv) == 100  # still enforcing the last good version

    path.write_text(POLICY.format(daily=300))
    fixed = waiting.until(lambda: (e := entry(srv, "budget"))["lastError"] is None and e, what="the fix")
    assert fixed["digest"] != good["digest"]
    assert daily_limit(srv) == 300


def test_unparseable_file_keeps_everything_it_held(router_server: Callable[..., Any], policy_dir: Path) -> None:
    path = policy_dir / "budget.yaml"
    path.write_text(POLICY.format(daily=100))
    srv = router_server()
    path.write_text("apiVersion: [this is not yaml\n")
    broken = waiting.until(lambda: (e := entry(srv, "budget"))["lastError"] and e, what="lastError")
    assert "cannot parse" in broken["lastError"]
    assert daily_limit(srv) == 100


def test_one_bad_resource_does_not_block_others(router_server: Callable[..., Any], policy_dir: Path) -> None:
    (policy_dir / "a.yaml").write_text(POLICY.format(daily=100))
    srv = router_server()
    (policy_dir / "b.yaml").write_text(
        textwrap.dedent(POLICY.format(daily="bad")).replace("name: budget", "name: other")
    )
    (policy_dir / "a.yaml").write_text(POLICY.format(daily=150))
    waiting.until(lambda: daily_limit(srv) == 150, what="the valid edit")
    other = entry(srv, "other")
    assert other["digest"] is None and "dailyTokens" in other["lastError"]


def test_reloads_are_counted(router_server: Callable[..., Any], policy_dir: Path) -> None:
    path = policy_dir / "budget.yaml"
    path.write_text(POLICY.format(daily=100))
    srv = router_server()
    path.write_text(POLICY.format(daily="x"))
    waiting.until(lambda: entry(srv, "budget")["lastError"], what="lastError")
    metrics = httpx.get(f"{srv.url}/metrics").text
    assert 'kars_policy_reloads_total{result="ok"} 1.0' in metrics
    assert 'kars_policy_reloads_total{result="error"}' in metrics


def test_an_unreadable_directory_keeps_every_policy(router_server: Callable[..., Any], policy_dir: Path) -> None:
    """The directory gone (a volume remounted, a permission changed) says nothing about what the
    policies are now: all of them stay in force, each saying why they were not reloaded."""
    (policy_dir / "budget.yaml").write_text(POLICY.format(daily=100))
    srv = router_server()
    generation = status(srv)["generation"]
    moved = policy_dir.with_name("policy-moved")
    policy_dir.rename(moved)
    kept = waiting.until(lambda: (e := entry(srv, "budget"))["lastError"] and e, what="lastError")
    assert f"{policy_dir}: " in kept["lastError"] and kept["digest"] is not None
    assert daily_limit(srv) == 100
    assert status(srv)["generation"] == generation  # nothing changed for the layers that enforce it
    moved.rename(policy_dir)
    waiting.until(lambda: entry(srv, "budget")["lastError"] is None, what="the directory back")
    assert daily_limit(srv) == 100
