"""Tool-policy decisions and origin matching of the MCP gateway, as pure functions."""

from __future__ import annotations

from typing import Any

import pytest

from router.policy import model
from router.transports.mcp import admission, policy
from tests.support import waiting


def server(**spec: Any) -> model.McpServer:
    return model.McpServer.model_validate(
        {
            "apiVersion": "kars.azure.com/v1alpha1",
            "kind": "McpServer",
            "metadata": {"name": "tools", "namespace": "team-a"},
            "spec": {"url": "http://127.0.0.1:9/mcp", **spec},
        }
    )


def tool_policy(name: str, tool: str, decision: str, **applies: Any) -> model.ToolPolicy:
    return model.ToolPolicy.model_validate(
        {
            "apiVersion": "kars.azure.com/v1alpha1",
            "kind": "ToolPolicy",
            "metadata": {"name": name, "namespace": "team-a"},
            "spec": {"appliesTo": {"mcpServer": "tools", "tool": tool, **applies}, "decision": decision},
        }
    )


def test_allowed_tools_is_an_allow_list_that_policies_cannot_widen() -> None:
    gate = policy.Gate(server(allowedTools=["echo"]), (tool_policy("all", "*", "allow"),), {})
    assert gate.decide("echo").allowed
    refused = gate.decide("other")
    assert not refused.allowed and refused.policy == "McpServer team-a/tools allowedTools"
    assert not policy.Gate(server(allowedTools=[]), (), {}).decide("echo").allowed


def test_specific_policy_beats_wildcard_and_deny_wins_among_equals() -> None:
    policies = (
        tool_policy("deny-all", "*", "deny"),
        tool_policy("echo-ok", "echo", "allow"),
        tool_policy("risky-ok", "risky", "allow"),
        tool_policy("risky-no", "risky", "deny"),
    )
    gate = policy.Gate(server(), policies, {})
    assert gate.decide("echo") == policy.Decision(True, "ToolPolicy team-a/echo-ok")
    assert gate.decide("risky") == policy.Decision(False, "ToolPolicy team-a/risky-no")
    assert gate.decide("anything") == policy.Decision(False, "ToolPolicy team-a/deny-all")
    assert policy.Gate(server(), (), {}).decide("anything") == policy.Decision(True, "default")


def test_policies_apply_only_to_matching_sandbox_labels() -> None:
    deny_gold = tool_policy("no-gold", "echo", "deny", sandboxMatchLabels={"tier": "gold"})
    assert not policy.Gate(server(), (deny_gold,), {"tier": "gold"}).decide("echo").allowed
    assert policy.Gate(server(), (deny_gold,), {"tier": "free"}).decide("echo").allowed


def test_a_gate_names_the_tools_its_policies_name() -> None:
    gate = policy.Gate(server(allowedTools=["echo", "count"]), (tool_policy("no-x", "x", "deny"),), {})
    assert [t for t in ("echo", "count", "x", "y", "*") if gate.names(t)] == ["echo", "count", "x"]
    assert not policy.Gate(server(allowedTools=["*"]), (tool_policy("all", "*", "allow"),), {}).names("*")


def test_tools_list_filtering_keeps_the_cursor() -> None:
    gate = policy.Gate(server(), (tool_policy("no-x", "x", "deny"),), {})
    result = {"tools": [{"name": "x"}, {"name": "y"}], "nextCursor": "abc"}
    assert gate.filter_tools(result) == {"tools": [{"name": "y"}], "nextCursor": "abc"}
    assert policy.Gate.closed("team-a/tools").filter_tools(result)["tools"] == []


@pytest.mark.parametrize(
    ("origin", "allowed"),
    [
        ("http://localhost:3000", True),
        ("http://127.0.0.1:8443", True),
        ("http://localhost", True),
        ("http://localhost.evil.example:80", False),
        ("http://localhost:80abc", False),
        ("https://app.example.com", True),
        ("https://app.example.com:8443", False),
        ("null", False),
    ],
)
def test_origin_patterns(origin: str, allowed: bool) -> None:
    patterns = (*admission.LOOPBACK_ORIGINS, "https://app.example.com")
    assert admission.origin_allowed(origin, patterns) is allowed


async def test_rate_limit_bucket_gives_a_retry_hint() -> None:
    limiters = policy.Limiters()
    limit = model.RateLimit(rps=2.0, burst=2)
    assert await limiters.try_acquire("p", "team-a/a", limit) is None
    assert await limiters.try_acquire("p", "team-a/a", limit) is None
    assert await limiters.try_acquire("p", "team-a/a", limit) == 0.5
    assert await limiters.try_acquire("p", "team-a/b", limit) is None  # per caller


async def test_no_caller_can_reset_a_rate_limit_by_filling_the_table() -> None:
    """Many other callers (here more than the table holds) leave a limited caller limited; the
    table stays bounded, and a newcomer waits while every bucket is still refilling."""
    limiters = policy.Limiters(max_buckets=4)
    slow = model.RateLimit(rps=0.01, burst=1)  # one call per 100 s
    assert await limiters.try_acquire("p", "team-a/victim", slow) is None
    assert await limiters.try_acquire("p", "team-a/victim", slow) == 100.0
    refused = [await limiters.try_acquire("p", f"team-a/other-{i}", slow) for i in range(10)]
    assert refused[:3] == [None] * 3 and refused[3:] == [100.0] * 7  # no room: nobody's bucket dropped
    assert len(limiters) == 4
    assert await limiters.try_acquire("p", "team-a/victim", slow) == 100.0


async def test_full_buckets_make_room_for_new_callers() -> None:
    limiters = policy.Limiters(max_buckets=2)
    fast = model.RateLimit(rps=100.0, burst=1)  # full again 10 ms after a call
    slow = model.RateLimit(rps=0.01, burst=1)
    assert await limiters.try_acquire("p", "team-a/a", fast) is None
    assert await limiters.try_acquire("q", "team-a/victim", slow) is None

    async def admitted() -> bool:
        return await limiters.try_acquire("p", "team-a/b", fast) is None

    # team-a/a's bucket refills; then it is dropped (it behaves as a new one would) for team-a/b.
    await waiting.until_async(admitted, what="a full bucket to make room")
    assert len(limiters) == 2
    assert await limiters.try_acquire("q", "team-a/victim", slow) == 100.0  # still limited
