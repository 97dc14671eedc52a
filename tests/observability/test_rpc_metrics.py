"""The seed's RPC metrics as a scrape sees them (`metrics.RpcMetrics`, plain numbers)."""

from __future__ import annotations

import uuid

import grpc

from aiwfe.runtime import metrics
from aiwfe.runtime.telemetry import RpcSeries


def _sample(name: str, **labels: str) -> float | None:
    return metrics.REGISTRY.get_sample_value(name, labels)


def test_rpc_series_render_as_prometheus_histogram_counters_and_gauge() -> None:
    """Counts, cumulative `le` buckets (a value on a bound counts in it), the sum, errors
    for non-OK codes only, and calls in flight, shared by every recorder of a method."""
    method = f"/test.v1.Rpc/{uuid.uuid4().hex}"
    first, second = RpcSeries("svc", method), RpcSeries("svc", method)
    for _ in range(3):
        first.start()
    first.finish(grpc.StatusCode.OK, 0.001)
    second.finish(grpc.StatusCode.OK, 0.003)
    second.start()
    second.finish(grpc.StatusCode.NOT_FOUND, 20.0)

    ok = {"service": "svc", "method": method, "code": "OK"}
    missing = {**ok, "code": "NOT_FOUND"}
    assert _sample("concurrent_requests", service="svc", method=method) == 1
    assert _sample("request_rate_counter_total", **ok) == 2
    assert _sample("request_rate_counter_total", **missing) == 1
    assert _sample("error_rate_total", **ok) is None
    assert _sample("error_rate_total", **missing) == 1
    assert _sample("request_duration_histogram_count", **ok) == 2
    assert _sample("request_duration_histogram_sum", **ok) == 0.004
    assert _sample("request_duration_histogram_bucket", le="0.0005", **ok) == 0
    assert _sample("request_duration_histogram_bucket", le="0.001", **ok) == 1
    assert _sample("request_duration_histogram_bucket", le="0.002", **ok) == 1
    assert _sample("request_duration_histogram_bucket", le="0.005", **ok) == 2
    assert _sample("request_duration_histogram_bucket", le="+Inf", **ok) == 2
    assert _sample("request_duration_histogram_bucket", le="10.0", **missing) == 0
    assert _sample("request_duration_histogram_bucket", le="+Inf", **missing) == 1


def test_a_recorder_counts_each_code_apart_when_codes_alternate() -> None:
    """A series keeps its last code's counts at hand (`RpcSeries`): a call that ends with
    another code is counted under that code, never under the last one's."""
    method = f"/test.v1.Rpc/{uuid.uuid4().hex}"
    series = RpcSeries("svc", method)
    for code in (grpc.StatusCode.OK, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.OK):
        series.start()
        series.finish(code, 0.001)
    ok = {"service": "svc", "method": method, "code": "OK"}
    assert _sample("request_rate_counter_total", **ok) == 2
    assert _sample("request_rate_counter_total", **{**ok, "code": "NOT_FOUND"}) == 1
    assert _sample("concurrent_requests", service="svc", method=method) == 0


def test_plain_counters_render_as_prometheus_counters() -> None:
    """`metrics.PlainCounter` (the session cache's hit counts, made on every relayed call):
    series shared by label values, rendered as `<name>_total` at scrape."""
    counter = metrics.PlainCounter("test_plain_counter", "A test counter.", ("layer", "result"))
    registry = metrics.CollectorRegistry()
    registry.register(counter)
    hits = counter.labels("l1", "hit")
    hits.inc()
    counter.labels("l1", "hit").inc(2)
    counter.labels("l1", "miss").inc()
    sample = registry.get_sample_value
    assert sample("test_plain_counter_total", {"layer": "l1", "result": "hit"}) == 3
    assert sample("test_plain_counter_total", {"layer": "l1", "result": "miss"}) == 1
    before = _sample("session_cache_hit_rate_total", layer="l1", result="hit") or 0
    metrics.session_cache_hit_rate.labels("l1", "hit").inc()
    assert _sample("session_cache_hit_rate_total", layer="l1", result="hit") == before + 1
