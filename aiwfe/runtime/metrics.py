"""Every metric the suite exports, named as the seed's Grafana dashboards name them.

One module holds them all so dashboards can be checked against the code's metric set
(`METRIC_NAMES`). Each service process exposes them on its Prometheus scrape port.
Labels are bounded: service, method (from the contract, never user input), code, layer.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

REGISTRY = CollectorRegistry(auto_describe=True)

_LATENCY_BUCKETS = (
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip

# --- api_performance (seed dashboard) ---------------------------------------------------
request_duration_histogram = Histogram(
    "request_duration_histogram",
    "Server-side RPC latency in seconds.",
    ["service", "method", "code"],
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)
request_rate_counter = Counter(
    "request_rate_counter", "RPCs handled.", ["service", "method", "code"], registry=REGISTRY
)
error_rate = Counter(
    "error_rate", "RPCs that ended with a non-OK status.", ["service", "method", "code"],
    registry=REGISTRY,
)  # fmt: skip
concurrent_requests = Gauge(
    "concurrent_requests", "RPCs in flight.", ["service", "method"], registry=REGISTRY
)

# --- authentication_performance (seed dashboard) ----------------------------------------
jwt_validation_time = Histogram(
    "jwt_validation_time",
    "Access-token validation latency in seconds, by cache outcome.",
    ["cache"],
    buckets=(0.00001, 0.00005, 0.0001, 0.0005, 0.001, 0.005, 0.01, 0.02, 0.05),
    registry=REGISTRY,
)
session_cache_hit_rate = Counter(
    "session_cache_hit_rate", "Validated-token cache lookups by layer and result.",
    ["layer", "result"], registry=REGISTRY,
)  # fmt: skip
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
        request_duration_histogram, request_rate_counter, error_rate, concurrent_requests,
        jwt_validation_time, session_cache_hit_rate, authentication_success_rate,
        database_connection_pool_usage, redis_cache_hit_rate, qdrant_query_latency,
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


def serve_metrics(port: int, host: str = "127.0.0.1") -> int:
    """Starts the Prometheus scrape endpoint; returns the bound port (0 picks a free one)."""
    server, _ = start_http_server(port, addr=host, registry=REGISTRY)
    return server.server_port
