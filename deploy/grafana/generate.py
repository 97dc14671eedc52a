"""Writes the Grafana dashboards (JSON) from one table of panels, so the queries stay in
step with aiwfe.runtime.metrics; tests/observability/test_dashboards.py checks every query's
metrics exist. Run: python deploy/grafana/generate.py"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent / "dashboards"
Q = "histogram_quantile"

DASHBOARDS = {
    "api-performance": (
        "aiwfe API performance",
        [
            (
                "Request rate by method",
                "sum by (service, method) (rate(request_rate_counter_total[5m]))",
                "reqps",
            ),
            (
                "p50 latency",
                f"{Q}(0.5, sum by (le, service, method) (rate(request_duration_histogram_bucket[5m])))",
                "s",
            ),
            (
                "p95 latency",
                f"{Q}(0.95, sum by (le, service, method) (rate(request_duration_histogram_bucket[5m])))",
                "s",
            ),
            (
                "p99 latency",
                f"{Q}(0.99, sum by (le, service, method) (rate(request_duration_histogram_bucket[5m])))",
                "s",
            ),
            ("Error rate by code", "sum by (service, code) (rate(error_rate_total[5m]))", "reqps"),
            (
                "Error ratio",
                "sum(rate(error_rate_total[5m])) / sum(rate(request_rate_counter_total[5m]))",
                "percentunit",
            ),
            ("Concurrent requests", "sum by (service, method) (concurrent_requests)", "short"),
            (
                "Circuit breakers (1 = open)",
                "max by (service, downstream) (circuit_breaker_state)",
                "short",
            ),
        ],
    ),
    "authentication": (
        "aiwfe authentication",
        [
            (
                "JWT validation p95",
                f"{Q}(0.95, sum by (le, cache) (rate(jwt_validation_time_bucket[5m])))",
                "s",
            ),
            (
                "Session cache hit rate",
                'sum by (layer) (rate(session_cache_hit_rate_total{result="hit"}[5m])) / sum by (layer) (rate(session_cache_hit_rate_total[5m]))',
                "percentunit",
            ),
            (
                "Authentication success rate",
                'sum by (kind) (rate(authentication_success_rate_total{outcome="success"}[5m])) / sum by (kind) (rate(authentication_success_rate_total[5m]))',
                "percentunit",
            ),
            (
                "Authentication outcomes",
                "sum by (kind, outcome) (rate(authentication_success_rate_total[5m]))",
                "reqps",
            ),
        ],
    ),
    "data-platform": (
        "aiwfe data platform",
        [
            ("PostgreSQL pool usage", "sum by (state) (database_connection_pool_usage)", "short"),
            (
                "Redis cache hit rate",
                'sum by (cache, layer) (rate(redis_cache_hit_rate_total{result="hit"}[5m])) / sum by (cache, layer) (rate(redis_cache_hit_rate_total[5m]))',
                "percentunit",
            ),
            (
                "Qdrant query latency p95",
                f"{Q}(0.95, sum by (le, operation) (rate(qdrant_query_latency_bucket[5m])))",
                "s",
            ),
            (
                "Data RPC latency p95",
                f'{Q}(0.95, sum by (le, method) (rate(request_duration_histogram_bucket{{service="dataplatform"}}[5m])))',
                "s",
            ),
        ],
    ),
    "workflows": (
        "aiwfe workflows",
        [
            ("Queue depth", "sum(workflow_queue_depth)", "short"),
            (
                "Step latency p95 by op",
                f"{Q}(0.95, sum by (le, op) (rate(workflow_step_latency_bucket[5m])))",
                "s",
            ),
            ("Step retries", "sum by (op) (rate(workflow_step_retries_total[5m]))", "ops"),
            ("Dead letters", "sum(increase(workflow_dead_letters_total[1h]))", "short"),
            ("Workflows purged (retention)", "sum(increase(workflow_purged_total[1h]))", "short"),
            ("Task queue depth", "sum by (queue) (workflow_task_queue_depth)", "short"),
            # Every replica reports the same database count: max, not sum.
            ("Queued by concurrency key", "max(workflow_concurrency_queued)", "short"),
            (
                "Oldest waiting task",
                "max by (queue) (workflow_task_queue_oldest_age_seconds)",
                "s",
            ),
            *(
                (
                    f"Tasks {what} by queue and type",
                    f"sum by (queue, type) (rate(workflow_tasks_{what}_total[5m]))",
                    "ops",
                )
                for what in ("dispatched", "completed", "failed")
            ),
            (
                "Task heartbeat timeouts",
                "sum by (queue, type) (increase(workflow_task_heartbeat_timeouts_total[1h]))",
                "short",
            ),
        ],
    ),
}


def dashboard(uid: str, title: str, panels: list[tuple[str, str, str]]) -> dict:
    return {
        "uid": f"aiwfe-{uid}",
        "title": title,
        "tags": ["aiwfe"],
        "schemaVersion": 39,
        "time": {"from": "now-1h", "to": "now"},
        "refresh": "30s",
        "panels": [
            {
                "id": i + 1,
                "type": "timeseries",
                "title": name,
                "datasource": {"type": "prometheus", "uid": "prometheus"},
                "gridPos": {"h": 8, "w": 12, "x": (i % 2) * 12, "y": (i // 2) * 8},
                "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
                "targets": [{"refId": "A", "expr": expr, "datasource": {"uid": "prometheus"}}],
            }
            for i, (name, expr, unit) in enumerate(panels)
        ],
    }


def main() -> None:
    HERE.mkdir(exist_ok=True)
    for uid, (title, panels) in DASHBOARDS.items():
        path = HERE / f"{uid}.json"
        path.write_text(json.dumps(dashboard(uid, title, panels), indent=2) + "\n")


if __name__ == "__main__":
    main()
