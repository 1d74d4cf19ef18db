"""ServiceMetrics on a private CollectorRegistry: exact counts, the active-plan gauge, exposition."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from service.metrics import ServiceMetrics

EXPECTED_SAMPLE_NAMES = {
    "das_requests_total", "das_request_latency_seconds", "das_flops_full_total", "das_flops_executed_total",
    "das_batch_size", "das_active_plan", "das_plan_swaps_total",
}
EXPECTED_TYPES = {
    "das_requests": "counter", "das_request_latency_seconds": "histogram", "das_flops_full": "counter",
    "das_flops_executed": "counter", "das_batch_size": "histogram", "das_active_plan": "gauge",
    "das_plan_swaps": "counter",
}


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def metrics(registry) -> ServiceMetrics:
    return ServiceMetrics(registry=registry)


def plan(version: int):
    return SimpleNamespace(version=version)


def active(registry, task, name, version):
    return registry.get_sample_value("das_active_plan", {"task": task, "plan": name, "version": str(version)})


def test_observe_request_counts_exactly(metrics, registry):
    full, executed = 29_000_000_123, 21_100_000_457
    metrics.observe_request("vqa", "skip4", "ok", 0.02, full, executed)
    metrics.observe_request("vqa", "skip4", "ok", 0.3, full, executed)
    metrics.observe_request("vqa", "full", "ok", 0.05, 7, 7)
    metrics.observe_request("vqa", "skip4", "client_error")
    metrics.observe_request("nlvr2", "-", "overloaded")

    sample = registry.get_sample_value
    assert sample("das_requests_total", {"task": "vqa", "plan": "skip4", "status": "ok"}) == 2
    assert sample("das_requests_total", {"task": "vqa", "plan": "skip4", "status": "client_error"}) == 1
    assert sample("das_requests_total", {"task": "vqa", "plan": "full", "status": "ok"}) == 1
    assert sample("das_requests_total", {"task": "nlvr2", "plan": "-", "status": "overloaded"}) == 1
    assert sample("das_flops_full_total", {"task": "vqa", "plan": "skip4"}) == 2 * full
    assert sample("das_flops_executed_total", {"task": "vqa", "plan": "skip4"}) == 2 * executed
    assert sample("das_flops_full_total", {"task": "vqa", "plan": "full"}) == 7
    assert sample("das_flops_executed_total", {"task": "vqa", "plan": "full"}) == 7
    # failed requests record no latency and no FLOPs
    assert sample("das_request_latency_seconds_count", {"task": "vqa", "plan": "skip4"}) == 2
    assert sample("das_request_latency_seconds_sum", {"task": "vqa", "plan": "skip4"}) == pytest.approx(0.32)
    assert sample("das_request_latency_seconds_bucket", {"task": "vqa", "plan": "skip4", "le": "0.025"}) == 1
    assert sample("das_request_latency_seconds_count", {"task": "nlvr2", "plan": "-"}) is None
    assert sample("das_flops_full_total", {"task": "nlvr2", "plan": "-"}) is None


def test_set_active_plans(metrics, registry):
    metrics.set_active_plans({
        "vqa": {"active": "a", "plans": {"full": plan(0), "a": plan(1), "b": plan(3)}},
        "nlvr2": {"active": "full", "plans": {"full": plan(0)}},
    })
    assert active(registry, "vqa", "a", 1) == 1
    assert active(registry, "vqa", "full", 0) == 0
    assert active(registry, "vqa", "b", 3) == 0
    assert active(registry, "nlvr2", "full", 0) == 1

    # b unloaded, a replaced by version 2 and made active again, nlvr2 no longer served
    metrics.set_active_plans({"vqa": {"active": "a", "plans": {"full": plan(0), "a": plan(2)}}})
    assert active(registry, "vqa", "b", 3) == 0
    assert active(registry, "vqa", "a", 1) == 0
    assert active(registry, "vqa", "a", 2) == 1
    assert active(registry, "vqa", "full", 0) == 0
    assert active(registry, "nlvr2", "full", 0) == 0

    metrics.set_active_plans({"vqa": {"active": "full", "plans": {"full": plan(0), "a": plan(2)}}})
    assert active(registry, "vqa", "full", 0) == 1 and active(registry, "vqa", "a", 2) == 0
    values = [s.value for f in registry.collect() if f.name == "das_active_plan" for s in f.samples]
    assert sum(values) == 1  # exactly one active label set for the one task served


def test_exposition_parses_and_names(metrics, registry):
    metrics.observe_request("vqa", "a", "ok", 0.01, 100, 60)
    metrics.batch_size.labels("vqa").observe(4)
    metrics.set_active_plans({"vqa": {"active": "a", "plans": {"full": plan(0), "a": plan(1)}}})
    metrics.plan_swaps.labels("vqa", "ok").inc()
    metrics.plan_swaps.labels("vqa", "refused").inc(2)

    text = generate_latest(registry).decode()
    families = {family.name: family for family in text_string_to_metric_families(text)}
    assert {name: families[name].type for name in EXPECTED_TYPES} == EXPECTED_TYPES
    sample_names = {s.name for family in families.values() for s in family.samples}
    for name in EXPECTED_SAMPLE_NAMES:
        assert name in sample_names or f"{name}_count" in sample_names, name
    assert all(name.startswith("das_") for name in sample_names)

    def value(name, **labels):
        return next(s.value for f in families.values() for s in f.samples if s.name == name and s.labels == labels)

    assert value("das_flops_full_total", task="vqa", plan="a") == 100
    assert value("das_flops_executed_total", task="vqa", plan="a") == 60
    assert value("das_batch_size_count", task="vqa") == 1
    assert value("das_batch_size_bucket", task="vqa", le="4.0") == 1
    assert value("das_plan_swaps_total", task="vqa", outcome="refused") == 2
    assert value("das_active_plan", task="vqa", plan="a", version="1") == 1


def test_two_instances_on_separate_registries_do_not_clash():
    one, two = CollectorRegistry(), CollectorRegistry()
    ServiceMetrics(registry=one).observe_request("vqa", "a", "ok")
    ServiceMetrics(registry=two)
    assert one.get_sample_value("das_requests_total", {"task": "vqa", "plan": "a", "status": "ok"}) == 1
    assert two.get_sample_value("das_requests_total", {"task": "vqa", "plan": "a", "status": "ok"}) is None
