"""The schedule ticker polls PostgreSQL several times a second per replica: it exports no
spans for it (issue #20: idle polling loops must not flood the trace exporter)."""

from __future__ import annotations

import asyncio

import grpc
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from aiwfe.app.suite import start_suite
from aiwfe.taskproc.v1 import schedule_service_pb2 as pb
from tests.observability.test_tracing import exporter
from tests.taskproc.helpers import new_user
from tests.taskproc.test_schedules import STUCK, create, delete_all_schedules, keys, pause

__all__ = ["exporter"]  # the fixture, shared with test_tracing.py


async def test_the_ticker_exports_no_spans(exporter: InMemorySpanExporter, base_overrides) -> None:
    """Two seconds of a per-second schedule ticking record no span of the ticker's queries
    (its claims, its look for the next tick, the workflows it creates)."""
    suite = await start_suite(base_overrides)
    try:
        async with grpc.aio.insecure_channel(suite.address("gateway")) as channel:
            token = await new_user(suite, channel)
            s = await create(
                channel, token, STUCK, overlap_policy=pb.OVERLAP_POLICY_ALLOW_ALL, paused=True
            )
            exporter.clear()
            await asyncio.sleep(1.2)  # idle: no schedule due
            idle = exporter.get_finished_spans()
            await pause(channel, token, s.schedule_id, False)
            exporter.clear()
            await asyncio.sleep(2)
            ticking = exporter.get_finished_spans()
            assert len(await keys(suite, s.schedule_id)) >= 1
    finally:
        await delete_all_schedules(suite.settings.database.postgres.dsn)
        await suite.stop()
    for spans in (idle, ticking):
        texts = [" ".join(str(v) for v in (sp.attributes or {}).values()) for sp in spans]
        assert not [t for t in texts if "schedules" in t], texts
