"""The process-wide SDK tracer provider (installed once per process) recording into
in-memory exporters: each test module attaches its own, whichever module runs first."""

from __future__ import annotations

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from aiwfe.runtime.telemetry import instrument_clients

_attached: set[int] = set()


def record_into(exporter: InMemorySpanExporter) -> InMemorySpanExporter:
    """Makes the process's tracer provider an SDK one that also exports to `exporter`
    (before any suite starts: the servers' interceptors decide at start whether to record)."""
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    if id(exporter) not in _attached:
        _attached.add(id(exporter))
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    instrument_clients()
    return exporter
