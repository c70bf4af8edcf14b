"""Tool policy for one MCP session: who may reach a server, which tools, how fast (SPEC.md §3).

A ``Gate`` is built once per session from the snapshot in force when the session opened and
the caller's sandbox labels; it answers ``decide(tool)`` with a ``Decision`` and filters
``tools/list`` results. Rules, most specific first:

1. ``McpServer.allowedTools`` is the server's allow-list (``["*"]`` = all, ``[]`` = none): a
   tool outside it is denied whatever the ToolPolicies say.
2. ToolPolicies of the namespace whose ``appliesTo`` names this server and matches the
   sandbox's labels: a policy naming the tool beats one with ``tool: "*"``; among equally
   specific ones, ``deny`` wins. No matching policy: allowed.

Rate limits (``rateLimit: {rps, burst}`` of the deciding allow policy) are token buckets
(aiolimiter) kept per (policy, caller) by the ``Limiters`` registry the gateway owns.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
from collections.abc import Mapping
from typing import Any

from aiolimiter import AsyncLimiter

from router.policy import model

MAX_LIMITERS = 65_536  # bound on buckets kept: (policy, caller) pairs, each policy naming its limit
EVICT_SCAN = 16  # buckets looked at, least recently used first, when the table is full


@dataclasses.dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    policy: str  # what decided: "ToolPolicy ns/name", "McpServer ns/name allowedTools" or "default"
    rate_limit: model.RateLimit | None = None


def labels_match(selector: Mapping[str, str] | None, labels: Mapping[str, str]) -> bool:
    return selector is None or all(labels.get(k) == v for k, v in selector.items())


class Limiters:
    """Token buckets per (policy, caller); rebuilt when a policy's limit changes.

    SPEC.md §3 puts ``rateLimit`` on the ToolPolicy, beside ``appliesTo``: it limits the calls
    that policy admits, whichever tool they name. A policy naming one tool limits that tool; one
    with ``tool: "*"`` limits the caller's calls to the server, all tools together (keyed by
    tool, a caller would get a fresh bucket for every tool name it makes up).

    Memory is bounded by ``max_buckets``. Only a full bucket is ever dropped: a full bucket
    behaves exactly like a fresh one, so dropping it changes no caller's limit. When every
    bucket looked at is still refilling, a new (policy, caller) pair waits (the call is refused
    with a retry hint) rather than anyone else's bucket being reset.
    """

    def __init__(self, max_buckets: int = MAX_LIMITERS) -> None:
        self._max_buckets = max_buckets
        # Least recently used first: those are the buckets most likely to be full again.
        self._buckets: collections.OrderedDict[tuple[str, str, float, int], AsyncLimiter] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    async def try_acquire(self, policy: str, caller: str, limit: model.RateLimit) -> float | None:
        """None when the call may go now; else seconds until a token is free (the retry hint)."""
        key = (policy, caller, limit.rps, limit.burst)
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self._max_buckets and not self._evict_full():
                return 1.0 / limit.rps
            bucket = self._buckets[key] = AsyncLimiter(limit.burst, limit.burst / limit.rps)
        else:
            self._buckets.move_to_end(key)
        if not bucket.has_capacity():
            return 1.0 / limit.rps
        await bucket.acquire()  # has capacity: returns at once, never queues behind others
        return None

    def _evict_full(self) -> bool:
        """Drop full buckets among the least recently used few; whether there is room now."""
        for key in list(itertools.islice(self._buckets, EVICT_SCAN)):
            bucket = self._buckets[key]
            if bucket.has_capacity(bucket.max_rate):  # full: indistinguishable from a new one
                del self._buckets[key]
            else:
                self._buckets.move_to_end(key)  # still refilling: look at others next time
        return len(self._buckets) < self._max_buckets


class Gate:
    def __init__(
        self,
        server: model.McpServer,
        policies: tuple[model.ToolPolicy, ...],
        labels: Mapping[str, str],
    ) -> None:
        self.server_id = f"{server.namespace}/{server.name}"
        allowed = server.spec.allowed_tools
        self._all_tools = "*" in allowed
        self._allowed_tools = frozenset(allowed)
        applicable = [p for p in policies if labels_match(p.spec.applies_to.sandbox_match_labels, labels)]
        self._by_tool: dict[str, list[model.ToolPolicy]] = {}
        self._wildcard: list[model.ToolPolicy] = []
        for p in applicable:
            if p.spec.applies_to.tool == "*":
                self._wildcard.append(p)
            else:
                self._by_tool.setdefault(p.spec.applies_to.tool, []).append(p)
        self._memo: dict[str, Decision] = {}

    @classmethod
    def closed(cls, server_id: str) -> Gate:
        """A gate that denies every tool: the server was removed from policy while a session was open."""
        gate = cls.__new__(cls)
        gate.server_id = server_id
        gate._all_tools = False
        gate._allowed_tools = frozenset()
        gate._by_tool, gate._wildcard, gate._memo = {}, [], {}
        return gate

    def names(self, tool: str) -> bool:
        """Whether ``allowedTools`` or a ToolPolicy of this gate names ``tool`` (not by ``"*"``)."""
        return (tool != "*" and tool in self._allowed_tools) or tool in self._by_tool

    def decide(self, tool: str) -> Decision:
        hit = self._memo.get(tool)
        if hit is None:
            hit = self._memo[tool] = self._decide(tool)
        return hit

    def _decide(self, tool: str) -> Decision:
        if not self._all_tools and tool not in self._allowed_tools:
            return Decision(False, f"McpServer {self.server_id} allowedTools")
        for group in (self._by_tool.get(tool, []), self._wildcard):
            if not group:
                continue
            deny = next((p for p in group if p.spec.decision == "deny"), None)
            if deny is not None:
                return Decision(False, f"ToolPolicy {deny.namespace}/{deny.name}")
            first = sorted(group, key=lambda p: p.name)[0]
            return Decision(True, f"ToolPolicy {first.namespace}/{first.name}", first.spec.rate_limit)
        return Decision(True, "default")

    def filter_tools(self, result: Any) -> Any:
        """A ``tools/list`` result without denied tools; ``nextCursor`` kept as the upstream gave it."""
        if not isinstance(result, dict) or not isinstance(result.get("tools"), list):
            return result
        kept = [t for t in result["tools"] if isinstance(t, dict) and self.decide(str(t.get("name"))).allowed]
        return {**result, "tools": kept}
