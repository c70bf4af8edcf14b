"""The compiled policy snapshot: immutable, indexed for O(1) lookups on the hot path.

``compile`` turns validated resources into a ``Snapshot``. Requests take the snapshot in
force when they start and keep it to the end (it is swapped by reference, never mutated).
Lookups are dictionary hits; the per-sandbox resolution of InferencePolicies is computed
once per (sandbox, action) and memoised inside the snapshot, so it costs a scan only the
first time a sandbox is seen under a given snapshot.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Iterable, Mapping
from types import MappingProxyType

from router.policy import digest, load, model, trustgraph

# The memo of per-sandbox resolutions is bounded so a stream of unknown callers cannot grow it.
MAX_RESOLUTION_MEMO = 65_536


@dataclasses.dataclass(frozen=True, slots=True)
class Entry:
    """One resource in force, with its digest and where it came from."""

    resource: model.Resource
    digest: str
    source: load.Source


def _matches(selector: Mapping[str, str] | None, labels: Mapping[str, str]) -> bool:
    return selector is None or all(labels.get(k) == v for k, v in selector.items())


def _specificity(policy: model.InferencePolicy) -> tuple[int, str]:
    applies = policy.spec.applies_to
    rank = 2 if applies.sandbox_name else 1 if applies.sandbox_match_labels else 0
    return (-rank, policy.name)


class Snapshot:
    """Everything the router knows about policy at one moment."""

    __slots__ = (
        "_a2a_agents",
        "_edges",
        "_inference_by_ns",
        "_mcp_servers",
        "_memo",
        "_sandbox_labels",
        "_tool_policies",
        "dropped_edges",
        "entries",
        "generation",
        "kind_digests",
    )

    def __init__(self, entries: Iterable[Entry], *, generation: int, now: dt.datetime) -> None:
        self.generation = generation
        by_key = {e.resource.key: e for e in entries}
        self.entries: Mapping[tuple[str, str, str], Entry] = MappingProxyType(by_key)

        per_kind: dict[str, list[str]] = {kind: [] for kind in model.KINDS}
        sandbox_labels: dict[tuple[str, str], Mapping[str, str]] = {}
        inference: dict[str, list[model.InferencePolicy]] = {}
        mcp: dict[tuple[str, str], model.McpServer] = {}
        tools: dict[tuple[str, str], list[model.ToolPolicy]] = {}
        agents: dict[tuple[str, str], model.A2AAgent] = {}
        edges: dict[tuple[str, str], list[trustgraph.TrustEdge]] = {}
        dropped: list[trustgraph.DroppedEdge] = []

        for entry in by_key.values():
            res = entry.resource
            per_kind[res.kind].append(entry.digest)
            if isinstance(res, model.KarsSandbox):
                sandbox_labels[(res.namespace, res.name)] = MappingProxyType(dict(res.metadata.labels))
            elif isinstance(res, model.InferencePolicy):
                inference.setdefault(res.namespace, []).append(res)
            elif isinstance(res, model.McpServer):
                mcp[(res.namespace, res.name)] = res
            elif isinstance(res, model.ToolPolicy):
                tools.setdefault((res.namespace, res.spec.applies_to.mcp_server), []).append(res)
            elif isinstance(res, model.A2AAgent):
                agents[(res.namespace, res.name)] = res
            elif isinstance(res, model.TrustGraph):
                kept, gone = trustgraph.verify(res, now)
                dropped.extend(gone)
                for edge in kept:
                    # Several graphs may vouch for one pair: all are kept, the strongest first,
                    # so when one expires the next still counts.
                    edges.setdefault((edge.source, edge.target), []).append(edge)

        for policies in inference.values():
            policies.sort(key=_specificity)
        self.kind_digests: Mapping[str, str] = MappingProxyType(
            {kind: digest.of_digests(ds) for kind, ds in per_kind.items()}
        )
        self.dropped_edges: tuple[trustgraph.DroppedEdge, ...] = tuple(dropped)
        self._sandbox_labels = sandbox_labels
        self._inference_by_ns = {ns: tuple(ps) for ns, ps in inference.items()}
        self._mcp_servers = mcp
        self._tool_policies = {k: tuple(v) for k, v in tools.items()}
        self._a2a_agents = agents
        self._edges = {pair: tuple(sorted(found, key=lambda e: -e.score)) for pair, found in edges.items()}
        self._memo: dict[tuple[str, str, str], tuple[model.InferencePolicy, ...]] = {}

    # -- lookups (all O(1) or memoised) ------------------------------------------------------

    def sandbox_labels(self, namespace: str, name: str) -> Mapping[str, str]:
        return self._sandbox_labels.get((namespace, name), MappingProxyType({}))

    def inference_policies(self, namespace: str, name: str, action: str) -> tuple[model.InferencePolicy, ...]:
        """InferencePolicies that apply to sandbox ``namespace/name`` for ``action``, most specific first."""
        key = (namespace, name, action)
        hit = self._memo.get(key)
        if hit is not None:
            return hit
        labels = self.sandbox_labels(namespace, name)
        result = tuple(
            p
            for p in self._inference_by_ns.get(namespace, ())
            if (p.spec.applies_to.sandbox_name in (None, name))
            and _matches(p.spec.applies_to.sandbox_match_labels, labels)
            and p.spec.applies_to.action in ("*", action)
        )
        if len(self._memo) >= MAX_RESOLUTION_MEMO:
            self._memo.clear()
        self._memo[key] = result
        return result

    def mcp_server(self, namespace: str, name: str) -> model.McpServer | None:
        return self._mcp_servers.get((namespace, name))

    def tool_policies(self, namespace: str, server: str) -> tuple[model.ToolPolicy, ...]:
        return self._tool_policies.get((namespace, server), ())

    def a2a_agent(self, namespace: str, name: str) -> model.A2AAgent | None:
        return self._a2a_agents.get((namespace, name))

    @property
    def has_a2a_agents(self) -> bool:
        """Whether any A2AAgent is in force (lets the identity layer skip its signed-request check)."""
        return bool(self._a2a_agents)

    def trust_edge(self, source: str, target: str, now: dt.datetime) -> trustgraph.TrustEdge | None:
        """The strongest verified, unexpired edge ``source -> target`` that reaches its graph's minScore."""
        for edge in self._edges.get((source, target), ()):
            if edge.live(now):
                return edge
        return None


def semantic_errors(resource: model.Resource, floor: model.SafetyFloor) -> list[str]:
    """Rules that need router config to check (the cluster safety floor)."""
    if isinstance(resource, model.InferencePolicy) and resource.spec.content_safety is not None:
        return floor.loosened_by(resource.spec.content_safety)
    return []
