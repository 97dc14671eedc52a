"""The psycopg and redis instrumentations are installed with a trace exporter only: without
one their spans are no-ops that still cost CPU on every query."""

from __future__ import annotations

import subprocess
import sys

import pytest

_PROBE = (
    "from aiwfe.runtime.telemetry import configure_tracing\n"
    "from opentelemetry.instrumentation.psycopg import PsycopgInstrumentor\n"
    "from opentelemetry.instrumentation.redis import RedisInstrumentor\n"
    "configure_tracing('probe')\n"
    "print(PsycopgInstrumentor().is_instrumented_by_opentelemetry,"
    " RedisInstrumentor().is_instrumented_by_opentelemetry)\n"
)


@pytest.mark.parametrize(
    ("env", "expected"),
    [({}, "False False"), ({"OTEL_TRACES_EXPORTER": "console"}, "True True")],
    ids=["no-exporter", "exporter"],
)
def test_clients_are_instrumented_only_with_an_exporter(env: dict[str, str], expected: str) -> None:
    """A fresh process (configure_tracing runs once per process)."""
    done = subprocess.run(
        [sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == expected
