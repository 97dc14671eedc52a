"""One trace from the client through gateway → cognitive → dataplatform → PostgreSQL, with
parent links and error statuses, recorded by an in-memory exporter."""

from __future__ import annotations

import time
from collections.abc import Iterator

import grpc
import pytest
from opentelemetry import propagate, trace
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from aiwfe.app.suite import start_suite
from aiwfe.auth.v1 import auth_service_pb2 as auth_pb
from aiwfe.auth.v1 import auth_service_pb2_grpc as auth_grpc
from aiwfe.cognitive.v1 import cognitive_service_pb2 as cog_pb
from aiwfe.cognitive.v1 import cognitive_service_pb2_grpc as cog_grpc
from tests.conftest import bearer, login
from tests.observability.memory import record_into

EXPORTER = InMemorySpanExporter()


@pytest.fixture(scope="module")
def exporter() -> Iterator[InMemorySpanExporter]:
    """The process-wide SDK provider (set once) recording into memory."""
    yield record_into(EXPORTER)


def _call_metadata(token: str) -> tuple[tuple[str, str], ...]:
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return bearer(token) + tuple(carrier.items())


def _by_id(spans: list[ReadableSpan]) -> dict[int, ReadableSpan]:
    return {s.context.span_id: s for s in spans}


def _server_span(spans: list[ReadableSpan], service: str, method: str) -> ReadableSpan:
    matches = [
        s for s in spans
        if s.kind == SpanKind.SERVER and s.attributes.get("aiwfe.service") == service
        and s.name == method
    ]  # fmt: skip
    assert len(matches) == 1, (service, method, [s.name for s in spans])
    return matches[0]


async def test_embed_miss_is_one_trace_down_to_postgres(exporter, base_overrides) -> None:
    """An Embed miss yields client→gateway→cognitive→dataplatform→PostgreSQL spans, one trace."""
    suite = await start_suite(base_overrides)
    tracer = trace.get_tracer("test")
    try:
        async with grpc.aio.insecure_channel(suite.address("gateway")) as ch:
            token = await login(ch)
            exporter.clear()
            with tracer.start_as_current_span("client call", kind=SpanKind.CLIENT) as root:
                await cog_grpc.CognitiveServiceStub(ch).Embed(
                    cog_pb.EmbedRequest(texts=[f"trace me {time.time_ns()}"]),
                    metadata=_call_metadata(token),
                    timeout=10,
                )
    finally:
        await suite.stop()
    trace_id = root.get_span_context().trace_id
    spans = [s for s in exporter.get_finished_spans() if s.context.trace_id == trace_id]
    by_id = _by_id(spans)
    embed = "/aiwfe.cognitive.v1.CognitiveService/Embed"
    gateway = _server_span(spans, "gateway", embed)
    cognitive = _server_span(spans, "cognitive", embed)
    dp_get = _server_span(spans, "dataplatform", "/aiwfe.data.v1.CacheStoreService/GetCacheEntries")
    assert gateway.parent.span_id == root.get_span_context().span_id
    assert cognitive.parent.span_id == gateway.context.span_id
    # cognitive → its client span → dataplatform's server span
    client = by_id[dp_get.parent.span_id]
    assert client.kind == SpanKind.CLIENT and client.parent.span_id == cognitive.context.span_id
    db_spans = [s for s in spans if s.attributes.get("db.system") == "postgresql"]
    assert db_spans, [s.name for s in spans]
    assert any(by_id.get(s.parent.span_id) is dp_get for s in db_spans if s.parent)
    for span in (gateway, cognitive, dp_get):
        assert span.attributes["rpc.grpc.status_code"] == 0
        assert span.status.status_code != StatusCode.ERROR


async def test_rejected_call_produces_error_spans(exporter, base_overrides) -> None:
    """An INVALID_ARGUMENT Embed marks the gateway and cognitive spans as errors with code 3."""
    suite = await start_suite(base_overrides)
    tracer = trace.get_tracer("test")
    try:
        async with grpc.aio.insecure_channel(suite.address("gateway")) as ch:
            token = await login(ch)
            with tracer.start_as_current_span("client call") as root:
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await cog_grpc.CognitiveServiceStub(ch).Embed(
                        cog_pb.EmbedRequest(texts=[]), metadata=_call_metadata(token), timeout=10
                    )
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            with tracer.start_as_current_span("unauthenticated call") as anon_root:
                carrier: dict[str, str] = {}
                propagate.inject(carrier)
                with pytest.raises(grpc.aio.AioRpcError):
                    await cog_grpc.CognitiveServiceStub(ch).Embed(
                        cog_pb.EmbedRequest(texts=["x"]),
                        metadata=tuple(carrier.items()),
                        timeout=10,
                    )
    finally:
        await suite.stop()
    spans = exporter.get_finished_spans()
    embed = "/aiwfe.cognitive.v1.CognitiveService/Embed"
    mine = [s for s in spans if s.context.trace_id == root.get_span_context().trace_id]
    for service in ("gateway", "cognitive"):
        span = _server_span(mine, service, embed)
        assert span.status.status_code == StatusCode.ERROR
        assert span.attributes["rpc.grpc.status_code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    anon = [s for s in spans if s.context.trace_id == anon_root.get_span_context().trace_id]
    rejected = _server_span(anon, "gateway", embed)
    assert rejected.attributes["rpc.grpc.status_code"] == grpc.StatusCode.UNAUTHENTICATED.value[0]
    assert not [s for s in anon if s.attributes.get("aiwfe.service") == "cognitive"]


async def test_a_call_the_relay_admits_at_once_keeps_the_trace(exporter, base_overrides) -> None:
    """A call the gateway's relay sends straight to cognitive still has the gateway's
    server span between the client's span and cognitive's, in the client's trace."""
    suite = await start_suite(base_overrides)
    tracer = trace.get_tracer("test")
    try:
        async with grpc.aio.insecure_channel(suite.address("gateway")) as ch:
            token = await login(ch)
            # A first call validates the token (full path) and caches it.
            await auth_grpc.AuthServiceStub(ch).WhoAmI(
                auth_pb.WhoAmIRequest(), metadata=bearer(token), timeout=10
            )
            front = suite.running["gateway"].front
            fast_before = front.fast_calls
            with tracer.start_as_current_span("client call", kind=SpanKind.CLIENT) as root:
                await cog_grpc.CognitiveServiceStub(ch).Embed(
                    cog_pb.EmbedRequest(texts=[f"fast trace {time.time_ns()}"]),
                    metadata=(*_call_metadata(token), ("cache-control", "no-store")),
                    timeout=10,
                )
            assert front.fast_calls == fast_before + 1
    finally:
        await suite.stop()
    trace_id = root.get_span_context().trace_id
    spans = [s for s in exporter.get_finished_spans() if s.context.trace_id == trace_id]
    embed = "/aiwfe.cognitive.v1.CognitiveService/Embed"
    gateway = _server_span(spans, "gateway", embed)
    cognitive = _server_span(spans, "cognitive", embed)
    assert gateway.parent.span_id == root.get_span_context().span_id
    assert cognitive.parent.span_id == gateway.context.span_id
    assert gateway.attributes["rpc.grpc.status_code"] == 0
