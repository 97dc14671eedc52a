"""`cognitive.generate` reads Generate's stream through `Upstream.stream`: the breaker
hears the outcome and the call has its client span, like every unary op."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from aiwfe.cognitive.v1 import cognitive_service_pb2 as cog_pb
from aiwfe.cognitive.v1 import cognitive_service_pb2_grpc as cog_grpc
from aiwfe.runtime.channels import Upstream
from aiwfe.runtime.config import Settings
from aiwfe.runtime.identity import InternalIdentity
from taskproc.ops import OPS, StepContext
from tests.observability.test_tracing import exporter

__all__ = ["exporter"]  # the fixture: the process-wide provider, recording in memory

SPAN = "cognitive /aiwfe.cognitive.v1.CognitiveService/Generate"


class _Cognitive(cog_grpc.CognitiveServiceServicer):
    """Streams two pieces; a prompt of "break" fails after the first."""

    async def Generate(
        self, request: cog_pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[cog_pb.GenerateResponse]:
        yield cog_pb.GenerateResponse(text="Hel", model="m1")
        if request.prompt == "break":
            await context.abort(grpc.StatusCode.UNAVAILABLE, "model went away")
        yield cog_pb.GenerateResponse(text="lo")


@pytest.fixture
async def cognitive() -> AsyncIterator[Upstream]:
    server = grpc.aio.server()
    cog_grpc.add_CognitiveServiceServicer_to_server(_Cognitive(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    downstream = Upstream(
        "cognitive", f"127.0.0.1:{port}", Settings(), InternalIdentity("s" * 32), "taskproc"
    )
    yield downstream
    await downstream.close()
    await server.stop(None)


def _spans(exporter: InMemorySpanExporter) -> list:  # type: ignore[type-arg]
    return [s for s in exporter.get_finished_spans() if s.name == SPAN]


async def test_generate_joins_the_stream_under_a_client_span(
    cognitive: Upstream, exporter: InMemorySpanExporter
) -> None:
    """The pieces are joined into one text; one CLIENT span covers the call."""
    exporter.clear()
    ctx = StepContext(attempt=1, worker_id="w", cognitive=cognitive, timeout=5)
    out = await OPS["cognitive.generate"].run(ctx, {"prompt": "hi"})
    assert out == {"text": "Hello", "model": "m1", "citations": []}
    [span] = _spans(exporter)
    assert span.kind is SpanKind.CLIENT and span.status.status_code is not StatusCode.ERROR
    assert cognitive.breaker.failure_count == 0


async def test_a_stream_failing_midway_counts_against_cognitive(
    cognitive: Upstream, exporter: InMemorySpanExporter
) -> None:
    """UNAVAILABLE after the first piece reaches the breaker and marks the span failed."""
    exporter.clear()
    ctx = StepContext(attempt=1, worker_id="w", cognitive=cognitive, timeout=5)
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await OPS["cognitive.generate"].run(ctx, {"prompt": "break"})
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
    assert cognitive.breaker.failure_count == 1
    [span] = _spans(exporter)
    assert span.status.status_code is StatusCode.ERROR
