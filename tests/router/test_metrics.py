"""The router's lock-free metric families expose exactly what prometheus_client's own would."""

from __future__ import annotations

import prometheus_client
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from router.observability import metrics

BUCKETS = (0.001, 0.01, 0.1, 1)
OBSERVED = (0.0, 0.001, 0.0011, 0.05, 0.1, 0.5, 1.0, 2.0, 100.0)


def samples(registry: CollectorRegistry) -> set[tuple[str, tuple[tuple[str, str], ...], float]]:
    text = generate_latest(registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items())), s.value)
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if not s.name.endswith("_created")  # prometheus_client's creation timestamps: not kept here
    }


def test_exposition_matches_prometheus_client() -> None:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    for mod, registry in ((metrics, ours), (prometheus_client, theirs)):
        counter = mod.Counter("c", "a counter", ["route", "status"], registry=registry)
        counter.labels("/v1/x", "200").inc()
        counter.labels("/v1/x", "200").inc(2.5)
        counter.labels("/v1/y", "500").inc()
        plain = mod.Counter("plain", "unlabelled", registry=registry)
        plain.inc(3)
        gauge = mod.Gauge("g", "a gauge", registry=registry)
        gauge.inc()
        gauge.inc()
        gauge.dec()
        gauge.set(7)
        gauge.inc(0.5)
        hist = mod.Histogram("h", "a histogram", ["route"], buckets=BUCKETS, registry=registry)
        for value in OBSERVED:
            hist.labels("/v1/x").observe(value)
    assert samples(ours) == samples(theirs)
    hist_buckets = {s for s in samples(ours) if s[0] == "h_bucket"}
    assert (("h_bucket", (("le", "0.001"), ("route", "/v1/x")), 2.0)) in hist_buckets  # le is inclusive


def test_counters_refuse_to_go_down_and_labels_are_checked() -> None:
    counter = metrics.Counter("c", "a counter", ["route"], registry=CollectorRegistry())
    with pytest.raises(ValueError, match="only go up"):
        counter.labels("/x").inc(-1)
    with pytest.raises(ValueError, match="takes labels"):
        counter.labels("/x", "extra")


def test_label_values_are_one_child_however_they_are_spelled() -> None:
    registry = CollectorRegistry()
    counter = metrics.Counter("c", "a counter", ["status"], registry=registry)
    counter.labels("200").inc()
    counter.labels(200).inc()  # type: ignore[arg-type]  # rendered as "200": the same series, not a reset
    assert counter.labels("200").value == 2
    assert ("c_total", (("status", "200"),), 2.0) in samples(registry)
