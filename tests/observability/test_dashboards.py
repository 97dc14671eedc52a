"""The shipped Grafana dashboards query only metrics the code exports, and cover the seed's
dashboard metrics."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from aiwfe.runtime.metrics import METRIC_NAMES, SERIES_NAMES

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
SEED_METRICS = {
    "request_duration_histogram", "request_rate_counter", "error_rate", "concurrent_requests",
    "jwt_validation_time", "session_cache_hit_rate", "authentication_success_rate",
    "database_connection_pool_usage", "redis_cache_hit_rate", "qdrant_query_latency",
}  # fmt: skip
_IDENT = re.compile(r"[a-z_][a-z0-9_]*")
_PROMQL_WORDS = {
    "sum", "by", "rate", "increase", "max", "histogram_quantile", "le", "service", "method",
    "code", "cache", "layer", "result", "kind", "outcome", "state", "operation", "op",
    "downstream", "m", "h", "queue", "type",
}  # fmt: skip


def _queries() -> list[str]:
    out = []
    for path in sorted((DEPLOY / "grafana" / "dashboards").glob("*.json")):
        for panel in json.loads(path.read_text())["panels"]:
            out.extend(t["expr"] for t in panel["targets"])
    return out


def test_every_dashboard_query_uses_existing_metrics() -> None:
    """Each identifier a panel queries is an exported series (or a PromQL word/label)."""
    queries = _queries()
    assert len(queries) >= 15
    for expr in queries:
        stripped = re.sub(r'"[^"]*"', "", expr)  # label values
        stripped = re.sub(r"\[[0-9]+[smh]\]", "", stripped)  # range selectors
        for ident in _IDENT.findall(stripped):
            assert ident in SERIES_NAMES or ident in _PROMQL_WORDS, (ident, expr)


def test_dashboards_cover_the_seed_metrics() -> None:
    """Every metric the seed's dashboards name is exported and charted."""
    assert SEED_METRICS <= METRIC_NAMES
    text = " ".join(_queries())
    for name in SEED_METRICS:
        assert name in text, name


def test_dashboards_are_generated_from_the_table(tmp_path, monkeypatch) -> None:
    """The committed JSON equals what deploy/grafana/generate.py writes (no hand drift)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("gen", DEPLOY / "grafana" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "HERE", tmp_path)
    module.main()
    for path in tmp_path.glob("*.json"):
        committed = DEPLOY / "grafana" / "dashboards" / path.name
        assert committed.read_text() == path.read_text(), path.name


def test_prometheus_scrapes_each_service_metrics_port() -> None:
    """prometheus.yml scrapes the four services on their configured metrics ports."""
    from aiwfe.runtime.config import load_settings

    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    targets = {
        t for job in config["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]
    }
    services = load_settings(env={}).services
    for name in ("gateway", "cognitive", "taskproc", "dataplatform"):
        assert f"{name}:{getattr(services, name).metrics_port}" in targets
