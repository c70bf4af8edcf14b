"""The router's Prometheus metrics, on a registry owned by one app (so tests can run many)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


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
