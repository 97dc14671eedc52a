"""Every metric the suite exports, named as the seed's Grafana dashboards name them.

One module holds them all so dashboards can be checked against the code's metric set
(`METRIC_NAMES`). Each service process exposes them on its Prometheus scrape port.
Labels are bounded: service, method (from the contract, never user input), code, layer.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Iterator

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

REGISTRY = CollectorRegistry(auto_describe=True)

_LATENCY_BUCKETS = (
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip


# --- api_performance (seed dashboard) ---------------------------------------------------
class RpcCounts:
    """One (service, method, code)'s calls: how many, their total seconds, and how many
    fell in each latency bucket (not cumulative; the last one is +Inf)."""

    __slots__ = ("buckets", "count", "sum")

    def __init__(self) -> None:
        self.count = 0
        self.sum = 0.0
        self.buckets = [0] * (len(_LATENCY_BUCKETS) + 1)

    def add(self, seconds: float) -> None:
        self.count += 1
        self.sum += seconds
        self.buckets[bisect_left(_LATENCY_BUCKETS, seconds)] += 1  # `le`: a bound counts


class RpcMethod:
    """One (service, method)'s RPC metrics: its calls in flight and each status code's
    counts. Written by its event loop's thread alone, read by a scrape."""

    __slots__ = ("by_code", "in_flight")

    def __init__(self) -> None:
        self.in_flight = 0
        self.by_code: dict[grpc.StatusCode, RpcCounts] = {}


class RpcMetrics(Collector):
    """The seed's four RPC metrics (`request_duration_histogram`, `request_rate_counter`,
    `error_rate`, `concurrent_requests`), kept as plain numbers and rendered at scrape.

    Why not prometheus_client's own: every call updates five of them, and each update
    takes a lock and two checks in Python (~8% of the gateway relay's work per call);
    here a call costs a few additions. A scrape may see one call's counts half added,
    as it may with prometheus_client's per-value locks."""

    def __init__(self) -> None:
        self._methods: dict[tuple[str, str], RpcMethod] = {}

    def method(self, service: str, method: str) -> RpcMethod:
        """The series of (service, method), shared by all who record it."""
        found = self._methods.get((service, method))
        if found is None:
            found = self._methods[(service, method)] = RpcMethod()
        return found

    def describe(self) -> Iterator[Metric]:
        yield from _rpc_families()

    def collect(self) -> Iterator[Metric]:
        duration, rate, errors, in_flight = families = _rpc_families()
        for (service, method), series in list(self._methods.items()):
            in_flight.add_metric((service, method), series.in_flight)
            for code, counts in list(series.by_code.items()):
                labels = (service, method, code.name)
                cumulative, buckets = 0, []
                for bound, n in zip((*_LATENCY_BUCKETS, math.inf), counts.buckets, strict=True):
                    cumulative += n
                    buckets.append((floatToGoString(bound), cumulative))
                duration.add_metric(labels, buckets, counts.sum)
                rate.add_metric(labels, counts.count)
                if code is not grpc.StatusCode.OK:
                    errors.add_metric(labels, counts.count)
        yield from families


_CODE = ("service", "method", "code")  # the labels
_RPC_HELP = {
    "duration": "Server-side RPC latency in seconds.",
    "rate": "RPCs handled.",
    "errors": "RPCs that ended with a non-OK status.",
    "in_flight": "RPCs in flight.",
}


def _rpc_families() -> tuple[
    HistogramMetricFamily, CounterMetricFamily, CounterMetricFamily, GaugeMetricFamily
]:
    return (
        HistogramMetricFamily("request_duration_histogram", _RPC_HELP["duration"], labels=_CODE),
        CounterMetricFamily("request_rate_counter", _RPC_HELP["rate"], labels=_CODE),
        CounterMetricFamily("error_rate", _RPC_HELP["errors"], labels=_CODE),
        GaugeMetricFamily("concurrent_requests", _RPC_HELP["in_flight"], labels=_CODE[:2]),
    )


rpc = RpcMetrics()
REGISTRY.register(rpc)


class PlainCount:
    """One labelled series of a `PlainCounter`: a plain number."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount


class PlainCounter(Collector):
    """A counter family whose series are plain numbers rendered at scrape, for counts
    made on a hot path by one event loop's thread (prometheus_client's Counter takes a
    lock and runs two checks in Python per increment, as `RpcMetrics` says)."""

    def __init__(self, name: str, documentation: str, labels: tuple[str, ...]) -> None:
        self._name, self._documentation, self._labels = name, documentation, labels
        self._series: dict[tuple[str, ...], PlainCount] = {}

    def labels(self, *values: str) -> PlainCount:
        """The series of these label values, shared by all who count it."""
        found = self._series.get(values)
        if found is None:
            found = self._series[values] = PlainCount()
        return found

    def _family(self) -> CounterMetricFamily:
        return CounterMetricFamily(self._name, self._documentation, labels=self._labels)

    def describe(self) -> Iterator[Metric]:
        yield self._family()

    def collect(self) -> Iterator[Metric]:
        family = self._family()
        for values, count in list(self._series.items()):
            family.add_metric(values, count.value)
        yield family


# --- authentication_performance (seed dashboard) ----------------------------------------
jwt_validation_time = Histogram(
    "jwt_validation_time",
    "Access-token validation latency in seconds, by cache outcome.",
    ["cache"],
    buckets=(0.00001, 0.00005, 0.0001, 0.0005, 0.001, 0.005, 0.01, 0.02, 0.05),
    registry=REGISTRY,
)
# Counted on every call the relay admits (an in-process hit): plain numbers.
session_cache_hit_rate = PlainCounter(
    "session_cache_hit_rate", "Validated-token cache lookups by layer and result.",
    ("layer", "result"),
)  # fmt: skip
REGISTRY.register(session_cache_hit_rate)
authentication_success_rate = Counter(
    "authentication_success_rate", "Authentication attempts by kind and outcome.",
    ["kind", "outcome"], registry=REGISTRY,
)  # fmt: skip

# --- data_platform_performance (seed dashboard) -----------------------------------------
database_connection_pool_usage = Gauge(
    "database_connection_pool_usage", "PostgreSQL pool connections by state.", ["state"],
    registry=REGISTRY,
)  # fmt: skip
redis_cache_hit_rate = Counter(
    "redis_cache_hit_rate", "Cache lookups by cache, layer and result.",
    ["cache", "layer", "result"], registry=REGISTRY,
)  # fmt: skip
qdrant_query_latency = Histogram(
    "qdrant_query_latency", "Vector store operation latency in seconds.", ["operation"],
    buckets=_LATENCY_BUCKETS, registry=REGISTRY,
)  # fmt: skip
qdrant_engine_starts = Counter(
    "qdrant_engine_starts",
    "Starts of the embedded vector engine's process: the first, then one after each exit.",
    registry=REGISTRY,
)
qdrant_engine_resident_bytes = Gauge(
    "qdrant_engine_resident_bytes",
    "Resident memory of the embedded vector engine's process (0 while none runs).",
    registry=REGISTRY,
)

# --- workflows and resilience -----------------------------------------------------------
workflow_queue_depth = Gauge(
    "workflow_queue_depth", "Runnable steps waiting for a worker.", registry=REGISTRY
)
workflow_concurrency_queued = Gauge(
    "workflow_concurrency_queued",
    "Workflows waiting for a slot of their concurrency key (queued, PENDING).",
    registry=REGISTRY,
)
workflow_task_queue_depth = Gauge(
    "workflow_task_queue_depth", "Runnable task steps waiting for an external worker.",
    ["queue"], registry=REGISTRY,
)  # fmt: skip
workflow_task_queue_oldest_age = Gauge(
    "workflow_task_queue_oldest_age_seconds",
    "Age of the oldest runnable task step of a queue (since it became runnable).",
    ["queue"], registry=REGISTRY,
)  # fmt: skip
workflow_tasks_dispatched = Counter(
    "workflow_tasks_dispatched", "Task steps handed to external workers.", ["queue", "type"],
    registry=REGISTRY,
)  # fmt: skip
workflow_tasks_completed = Counter(
    "workflow_tasks_completed", "Task steps external workers completed.", ["queue", "type"],
    registry=REGISTRY,
)  # fmt: skip
workflow_tasks_failed = Counter(
    "workflow_tasks_failed", "Task attempts external workers failed.", ["queue", "type"],
    registry=REGISTRY,
)  # fmt: skip
task_heartbeat_timeouts = Counter(
    "workflow_task_heartbeat_timeouts",
    "Task attempts whose worker stopped heartbeating (dispatched again).", ["queue", "type"],
    registry=REGISTRY,
)  # fmt: skip
workflow_step_latency = Histogram(
    "workflow_step_latency", "Step attempt duration in seconds.", ["op", "outcome"],
    buckets=_LATENCY_BUCKETS, registry=REGISTRY,
)  # fmt: skip
workflow_step_retries = Counter(
    "workflow_step_retries", "Step attempts that failed and were retried.", ["op"],
    registry=REGISTRY,
)  # fmt: skip
workflow_dead_letters = Counter(
    "workflow_dead_letters", "Workflows failed after a step exhausted its retries.",
    registry=REGISTRY,
)  # fmt: skip
workflow_watch_streams = Gauge(
    "workflow_watch_streams", "Watch streams (WatchWorkflow, RunWorkflow) in flight.",
    registry=REGISTRY,
)  # fmt: skip
workflow_schedule_ticks = Counter(
    "workflow_schedule_ticks",
    "Schedule ticks by outcome: started (a workflow), skipped (overlap, catch-up, owner no"
    " longer allowed), failed (the tick raised; skipped to the next).",
    ["outcome"], registry=REGISTRY,
)  # fmt: skip
workflow_purged = Counter(
    "workflow_purged",
    "Finished workflows deleted (with their steps, attempts, events and signals) once"
    " older than taskproc.retention_seconds.",
    registry=REGISTRY,
)  # fmt: skip
circuit_breaker_state = Gauge(
    "circuit_breaker_state", "Breaker state per downstream: 0 closed, 1 open, 2 half-open.",
    ["service", "downstream"], registry=REGISTRY,
)  # fmt: skip

_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}


def _series() -> tuple[frozenset[str], frozenset[str]]:
    families: set[str] = set()
    series: set[str] = set()
    for collector in (
        rpc,
        jwt_validation_time, session_cache_hit_rate, authentication_success_rate,
        database_connection_pool_usage, redis_cache_hit_rate, qdrant_query_latency,
        qdrant_engine_starts, qdrant_engine_resident_bytes,
        workflow_queue_depth, workflow_step_latency, workflow_step_retries,
        workflow_dead_letters, workflow_watch_streams, circuit_breaker_state,
        workflow_task_queue_depth, workflow_task_queue_oldest_age, workflow_tasks_dispatched,
        workflow_tasks_completed, workflow_tasks_failed, task_heartbeat_timeouts,
        workflow_schedule_ticks, workflow_purged, workflow_concurrency_queued,
    ):  # fmt: skip
        for family in collector.describe():
            families.add(family.name)
            series.update(family.name + suffix for suffix in _SUFFIXES[family.type])
    return frozenset(families), frozenset(series)


# Metric names, and the series names Prometheus sees (what dashboards may query).
METRIC_NAMES, SERIES_NAMES = _series()


def serve_metrics(
    port: int, host: str = "127.0.0.1", registry: CollectorRegistry = REGISTRY
) -> int:
    """Starts the Prometheus scrape endpoint; returns the bound port (0 picks a free one)."""
    server, _ = start_http_server(port, addr=host, registry=registry)
    return server.server_port
