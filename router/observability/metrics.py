"""The router's Prometheus metrics, on a registry owned by one app (so tests can run many).

prometheus_client renders and serves them (``generate_latest`` on the app's registry); the values
live in the small families below rather than in its ``Counter``/``Gauge``/``Histogram``. Theirs
take a lock on every update (they may be shared by threads) and a histogram scans its buckets one
by one in Python: ~2 us an update, a dozen updates a request on the inference path. Every update
here happens on the event loop, so a value is a plain attribute and ``+=`` is enough; a histogram
finds its bucket by bisection. The API is the subset the router uses: ``labels(...)``, ``inc``,
``dec``, ``set``, ``observe``; the exposition is the same (``_total`` counters, cumulative
``_bucket``s with ``le``, ``_count``, ``_sum``).
"""

from __future__ import annotations

import abc
import bisect
import math
from collections.abc import Iterator, Sequence
from typing import Generic, TypeVar

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

LATENCY_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class CounterValue:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        if amount < 0:
            raise ValueError("counters only go up")
        self.value += amount


class GaugeValue:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount

    def dec(self, amount: float = 1.0) -> None:
        self.value -= amount

    def set(self, value: float) -> None:
        self.value = float(value)


class HistogramValue:
    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds  # ascending, the last one +Inf
        self.counts = [0] * len(bounds)  # per bucket, not cumulative
        self.sum = 0.0

    def observe(self, amount: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, amount)] += 1  # le: the first bound >= amount
        self.sum += amount


V = TypeVar("V", CounterValue, GaugeValue, HistogramValue)
S = TypeVar("S", CounterValue, GaugeValue)


class _Family(abc.ABC, Generic[V]):
    """One metric with its label names; a child value per label values (the unlabelled one is ``()``)."""

    def __init__(
        self, name: str, documentation: str, labelnames: Sequence[str] = (), *, registry: CollectorRegistry
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self._children: dict[tuple[str, ...], V] = {}
        registry.register(self)

    @abc.abstractmethod
    def _new(self) -> V:
        """A new child value."""

    def labels(self, *values: str) -> V:
        """The child for these label values: one dictionary hit (no lock, no per-call-site cache needed)."""
        child = self._children.get(values)
        if child is None:
            if len(values) != len(self.labelnames):
                raise ValueError(f"{self.name} takes labels {self.labelnames}, got {values}")
            key = tuple(str(v) for v in values)  # as rendered: labels(200) and labels("200") are one child
            child = self._children.get(key)
            if child is None:
                child = self._children[key] = self._new()
        return child

    @abc.abstractmethod
    def _family(self) -> Metric:
        """The samples, in prometheus_client's form."""

    def describe(self) -> list[Metric]:
        return [self._family()]

    def collect(self) -> Iterator[Metric]:
        yield self._family()


class _Scalar(_Family[S]):
    """A family whose children hold one value each (counters, gauges)."""

    rendered_as: type[CounterMetricFamily] | type[GaugeMetricFamily]

    def _family(self) -> Metric:
        family = self.rendered_as(self.name, self.documentation, labels=self.labelnames)
        for values, child in list(self._children.items()):
            family.add_metric(values, child.value)
        return family


class Counter(_Scalar[CounterValue]):
    rendered_as = CounterMetricFamily

    def _new(self) -> CounterValue:
        return CounterValue()

    def inc(self, amount: float = 1.0) -> None:
        self.labels().inc(amount)


class Gauge(_Scalar[GaugeValue]):
    rendered_as = GaugeMetricFamily

    def __init__(
        self, name: str, documentation: str, labelnames: Sequence[str] = (), *, registry: CollectorRegistry
    ) -> None:
        super().__init__(name, documentation, labelnames, registry=registry)
        if not self.labelnames:
            self._unlabelled = self.labels()

    def _new(self) -> GaugeValue:
        return GaugeValue()

    def inc(self, amount: float = 1.0) -> None:
        self._unlabelled.value += amount

    def dec(self, amount: float = 1.0) -> None:
        self._unlabelled.value -= amount

    def set(self, value: float) -> None:
        self._unlabelled.set(value)


class Histogram(_Family[HistogramValue]):
    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        *,
        buckets: Sequence[float],
        registry: CollectorRegistry,
    ) -> None:
        bounds = sorted(float(b) for b in buckets)
        self._bounds = tuple(bounds if bounds and math.isinf(bounds[-1]) else [*bounds, math.inf])
        self._les = tuple(floatToGoString(b) for b in self._bounds)  # type: ignore[no-untyped-call]
        super().__init__(name, documentation, labelnames, registry=registry)

    def _new(self) -> HistogramValue:
        return HistogramValue(self._bounds)

    def _family(self) -> Metric:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for values, child in list(self._children.items()):
            cumulative, buckets = 0, []
            for le, count in zip(self._les, child.counts, strict=True):
                cumulative += count
                buckets.append((le, float(cumulative)))
            family.add_metric(values, buckets, child.sum)
        return family


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "kars_requests",
            "Requests answered, by route template, method and status.",
            ["route", "method", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "kars_request_duration_seconds",
            "Time from request start to the last response byte.",
            ["route"],
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.in_flight = Gauge("kars_requests_in_flight", "Requests being served now.", registry=r)
        self.identity_rejections = Counter(
            "kars_identity_rejections",
            "Requests refused by the identity layer, by error code.",
            ["code"],
            registry=r,
        )
        self.policy_reloads = Counter(
            "kars_policy_reloads",
            "Policy reloads, by result (ok, unchanged, error).",
            ["result"],
            registry=r,
        )
        self.policy_generation = Gauge(
            "kars_policy_generation",
            "Generation of the policy snapshot in force.",
            registry=r,
        )
        # Foundry inference transport (router/transports/foundry.py).
        self.tokens = Counter(
            "kars_tokens",
            "Tokens reported by the upstream, by direction (prompt, completion) and deployment.",
            ["direction", "deployment"],
            registry=r,
        )
        self.upstream_latency = Histogram(
            "kars_upstream_duration_seconds",
            "Time from sending a request upstream to its response headers, by upstream.",
            ["upstream"],
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.upstream_errors = Counter(
            "kars_upstream_errors",
            "Upstream failures, by upstream and error code (including 429/5xx replies, as status_NNN).",
            ["upstream", "code"],
            registry=r,
        )
        # -- A2A, TrustGraph, mesh (issue 7) --
        self.trust_admissions = Counter(
            "kars_trust_admissions",
            "TrustGraph admission decisions on /a2a and /mesh, by result (admitted, denied).",
            ["result"],
            registry=r,
        )
        self.mesh_bridges_active = Gauge("kars_mesh_bridges_active", "Mesh bridges open now.", registry=r)
        self.mesh_bridges = Counter(
            "kars_mesh_bridges",
            "Mesh connections by outcome (paired, relayed, pair_timeout, conflict, closed_by_policy).",
            ["outcome"],
            registry=r,
        )
        self.mesh_bytes = Counter("kars_mesh_bytes", "Payload bytes relayed by mesh bridges.", registry=r)
        self.a2a_card_verifications = Counter(
            "kars_a2a_card_verifications",
            "Signed agent card verifications, by result (ok, failed).",
            ["result"],
            registry=r,
        )
        self.signed_request_rejections = Counter(
            "kars_signed_request_rejections",
            "Signed A2A requests refused (401), by reason.",
            ["reason"],
            registry=r,
        )
        # Token budgets (router/middleware/token_budget.py); window "request" is perRequestTokens.
        self.budget_tokens_reserved = Counter(
            "kars_budget_tokens_reserved",
            "Tokens reserved against budget counters before forwarding, by scope and window.",
            ["scope", "window"],
            registry=r,
        )
        self.budget_tokens_settled = Counter(
            "kars_budget_tokens_settled",
            "Tokens charged to budget counters after the response (actual usage), by scope and window.",
            ["scope", "window"],
            registry=r,
        )
        self.budget_tokens_rejected = Counter(
            "kars_budget_tokens_rejected",
            "Tokens of requests refused with 429, by the scope and window that refused them.",
            ["scope", "window"],
            registry=r,
        )
        self.budget_over_limit_allowed = Counter(
            "kars_budget_over_limit_allowed",
            "Requests forwarded past a full budget because its policy has rejectOnExceed: false.",
            ["scope", "window"],
            registry=r,
        )
        self.budget_rejections = Counter(
            "kars_budget_rejections",
            "Requests refused by token budgets, by error code.",
            ["code"],
            registry=r,
        )
        self.budget_store_errors = Counter(
            "kars_budget_store_errors",
            "Budget store operations that failed (store unreachable), by operation.",
            ["operation"],
            registry=r,
        )
        # Content safety (router/middleware/content_safety.py, router/safety).
        self.safety_blocks = Counter(
            "kars_safety_blocks",
            "Prompts and outputs blocked by content safety, by category, provider (foundry, content_safety, "
            "local) and stage (prompt, output).",
            ["category", "provider", "stage"],
            registry=r,
        )
        self.safety_unavailable = Counter(
            "kars_safety_unavailable",
            "Content-safety checks a provider could not answer, by provider and outcome (fail_open, fail_closed).",
            ["provider", "outcome"],
            registry=r,
        )
        # MCP gateway (router/transports/mcp).
        self.mcp_tool_calls = Counter(
            "kars_mcp_tool_calls",
            "MCP tools/call requests, by server (ns/name), tool, decision (allow, deny, rate_limited) and outcome; "
            'tool is "other" unless the upstream listed it in the session or a policy names it.',
            ["server", "tool", "decision", "outcome"],
            registry=r,
        )
        self.mcp_tool_call_latency = Histogram(
            "kars_mcp_tool_call_duration_seconds",
            'Time from a tools/call reaching the router to its response, by server and tool (as above, or "other").',
            ["server", "tool"],
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.mcp_sessions = Gauge(
            "kars_mcp_sessions",
            "MCP client sessions open, by client transport (streamable, sse).",
            ["transport"],
            registry=r,
        )
