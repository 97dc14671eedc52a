"""OpenTelemetry traces and the seed's RPC metrics for every service.

One server interceptor (outermost, so rejected calls still produce spans and metrics)
joins the caller's W3C trace context, records `request_duration_histogram`,
`request_rate_counter`, `error_rate` and `concurrent_requests`, and keeps the span current
while the handler runs, so `Upstream` calls and the gateway's byte proxy inject the same
trace into their metadata. grpc.aio instrumentation from OpenTelemetry creates spans but
no metrics; one combined wrapper costs less per call than two.

Exporters follow the standard `OTEL_*` variables: `OTEL_TRACES_EXPORTER=otlp` (or an
`OTEL_EXPORTER_OTLP_*ENDPOINT`) exports over OTLP/gRPC, `console` prints; nothing is
exported by default and the API's no-op tracer then keeps the cost near zero while still
propagating an incoming trace context. PostgreSQL and Redis calls get client spans from
the official psycopg and redis instrumentations.

Background loops run in `quiet_context()` (unsampled, instrumentation suppressed), so they
export nothing from any service unless `telemetry.trace_polling`; `continued` says where
work that continues a stored trace (a workflow step) starts its span: the stored span's
child, or a new root linked to it when it starts much later.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import random
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, MutableMapping
from contextvars import Token
from typing import Any

import grpc
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.context import _SUPPRESS_INSTRUMENTATION_KEY, Context
from opentelemetry.propagators.textmap import Getter
from opentelemetry.trace import (
    Link,
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
)
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from aiwfe.runtime import metrics
from aiwfe.runtime.interceptors import Behavior, HandlerCache, MethodInterceptor

log = logging.getLogger("aiwfe.telemetry")
_INSTRUMENTATION = "aiwfe"
_configured = False


class _MetadataGetter(Getter[Any]):
    """Reads W3C headers from gRPC invocation metadata (a sequence of pairs)."""

    def get(self, carrier: Any, key: str) -> list[str] | None:
        values = [v for k, v in carrier or () if k == key]
        return values or None

    def keys(self, carrier: Any) -> list[str]:
        return [k for k, _ in carrier or ()]


_GETTER = _MetadataGetter()
_W3C = TraceContextTextMapPropagator()


def inject_metadata(metadata: tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], ...]:
    """`metadata` plus the current trace context (traceparent/tracestate) when there is one."""
    carrier: MutableMapping[str, str] = {}
    propagate.inject(carrier)
    return metadata + tuple(carrier.items()) if carrier else metadata


def quiet_context() -> Context:
    """The context background polling runs in: an unsampled span of a trace of its own, with
    instrumentation suppressed.

    Two standard OpenTelemetry mechanisms, one per side of a call. In this process the
    suppress-instrumentation key makes the official instrumentations (psycopg, redis) skip
    their spans, and the unsampled span makes our own client spans non-recording. Across
    processes the W3C `traceparent` carries the sampled flag 00: the callee's server span
    and everything under it are not recorded (the SDK's default `ParentBased` sampler), and
    `TelemetryInterceptor` suppresses the callee's instrumentations too. Nothing is
    exported for the loop's calls, from any service.
    """
    span = NonRecordingSpan(
        SpanContext(
            trace_id=random.getrandbits(128) or 1,
            span_id=random.getrandbits(64) or 1,
            is_remote=False,
            trace_flags=TraceFlags(TraceFlags.DEFAULT),
        )
    )
    return otel_context.set_value(
        _SUPPRESS_INSTRUMENTATION_KEY, True, trace.set_span_in_context(span, Context())
    )


@contextlib.contextmanager
def quiet(enabled: bool = True) -> Iterator[None]:
    """Runs the block (and the tasks it creates, which copy the context) in
    `quiet_context()`; `enabled=False` (config `telemetry.trace_polling`) leaves it traced."""
    if not enabled:
        yield
        return
    token = otel_context.attach(quiet_context())
    try:
        yield
    finally:
        otel_context.detach(token)


def current_trace_context() -> tuple[str, str]:
    """The current span's W3C (traceparent, tracestate); ("", "") without a valid one."""
    carrier: dict[str, str] = {}
    _W3C.inject(carrier)
    return carrier.get("traceparent", ""), carrier.get("tracestate", "")


def continued(
    traceparent: str, tracestate: str, age_seconds: float, link_after: float
) -> tuple[Context, list[Link]]:
    """Where work that continues a stored trace starts its span (a workflow step attempt):
    the parent context and the links. Within `link_after` seconds of the stored span it is
    that span's child; later it is a new root linked to it (a trace stretched over hours of
    timers and signals is unreadable, and viewers bound a trace's duration); with nothing
    stored, a root without links. Never the current context: a polling loop's quiet one
    must not leak into the work it hands out."""
    root = Context()
    if not traceparent:
        return root, []
    carrier = {"traceparent": traceparent}
    if tracestate:
        carrier["tracestate"] = tracestate
    stored = _W3C.extract(carrier, context=root)
    span_context = trace.get_current_span(stored).get_span_context()
    if not span_context.is_valid:
        return root, []
    if age_seconds <= link_after:
        return stored, []
    return root, [Link(span_context, {"aiwfe.link": "workflow.submit"})]


def exporter_from_env(env: Mapping[str, str]) -> str:
    """'otlp', 'console' or 'none', from the standard OTEL_* variables."""
    chosen = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if chosen:
        return chosen.split(",")[0]
    if env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        return "otlp"
    return "none"


def configure_tracing(service: str, env: Mapping[str, str] | None = None) -> None:
    """Installs the SDK tracer provider and the client instrumentations when an exporter
    is configured (once per process). Without one every span is a no-op, yet the psycopg
    instrumentation would still wrap each query (its operation name parsed, a span
    started and ended): CPU on the queue's every statement for nothing."""
    global _configured
    if _configured:
        return
    _configured = True
    env = os.environ if env is None else env
    exporter_name = exporter_from_env(env)
    if exporter_name in ("none", ""):
        return
    instrument_clients()
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    resource = Resource.create({"service.name": env.get("OTEL_SERVICE_NAME", f"aiwfe-{service}")})
    provider = TracerProvider(resource=resource)
    if exporter_name == "otlp":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    elif exporter_name == "console":
        provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
    else:
        log.warning("unknown OTEL_TRACES_EXPORTER %r; traces are not exported", exporter_name)
    trace.set_tracer_provider(provider)


def instrument_clients() -> None:
    """Client spans for PostgreSQL (psycopg) and Redis calls."""
    try:
        from opentelemetry.instrumentation.psycopg import PsycopgInstrumentor
        from opentelemetry.instrumentation.redis import RedisInstrumentor
    except ImportError:  # pragma: no cover - both are dependencies
        return
    if not PsycopgInstrumentor().is_instrumented_by_opentelemetry:
        PsycopgInstrumentor().instrument(enable_commenter=False)
    if not RedisInstrumentor().is_instrumented_by_opentelemetry:
        RedisInstrumentor().instrument()


def flush_telemetry() -> None:
    provider = trace.get_tracer_provider()
    shutdown = getattr(provider, "force_flush", None)
    if shutdown is not None:
        shutdown()


def _code_of(context: grpc.aio.ServicerContext) -> grpc.StatusCode:
    code = context.code()
    if code is None:
        return grpc.StatusCode.OK
    if isinstance(code, grpc.StatusCode):
        return code
    for candidate in grpc.StatusCode:  # the aio context may hold the raw integer
        if candidate.value[0] == code:
            return candidate
    return grpc.StatusCode.UNKNOWN


def rpc_attributes(service: str, method: str) -> dict[str, str]:
    """A server span's attributes for `method` ("/package.Service/Method") in `service`."""
    rpc_service, _, rpc_method = method.lstrip("/").partition("/")
    return {
        "rpc.system": "grpc",
        "rpc.service": rpc_service,
        "rpc.method": rpc_method,
        "aiwfe.service": service,
    }


def end_span(span: Any, code: grpc.StatusCode) -> None:
    span.set_attribute("rpc.grpc.status_code", code.value[0])
    if code is not grpc.StatusCode.OK:
        span.set_status(Status(StatusCode.ERROR, code.name))
    span.end()


class RpcSeries:
    """The seed's RPC metrics for one method of one service (`metrics.RpcMetrics`)."""

    __slots__ = ("_code", "_counts", "_method")

    def __init__(self, service: str, method: str) -> None:
        self._method = metrics.rpc.method(service, method)
        # The last code's counts, at hand: a grpc.StatusCode hashes in Python (enum).
        self._code: grpc.StatusCode | None = None
        self._counts: metrics.RpcCounts | None = None

    def start(self) -> None:
        """One call started: it is in flight."""
        self._method.in_flight += 1

    def finish(self, code: grpc.StatusCode, seconds: float) -> None:
        """One call ended with `code` after `seconds` (it was counted in flight)."""
        method = self._method
        method.in_flight -= 1
        counts = self._counts
        if code is not self._code or counts is None:
            counts = method.by_code.get(code)
            if counts is None:
                counts = method.by_code[code] = metrics.RpcCounts()
            self._code, self._counts = code, counts
        counts.add(seconds)


def caller_context(carrier: Any, getter: Getter[Any] = _GETTER) -> Context | None:
    """The caller's W3C trace context from its metadata, parsed only when it sent one."""
    for key, _ in carrier or ():
        if key == "traceparent":
            return propagate.extract(carrier, getter=getter)
    return None


def _sampled(parent: Context | None) -> bool:
    """False only for a caller that sent a valid trace context with the sampled flag off."""
    if parent is None:
        return True
    span_context = trace.get_current_span(parent).get_span_context()
    return not span_context.is_valid or span_context.trace_flags.sampled


def call_context(span: Any, parent: Context | None) -> Context | None:
    """The context a call runs in and passes on: our span's when recording, else the
    caller's own (so an unrecorded hop still carries the caller's trace)."""
    if span is not None:
        return trace.set_span_in_context(span, parent)
    return parent


class ServerRecorder:
    """A server span and the seed's RPC metrics for one method's calls: what the
    interceptor records around every handler, and the gateway's relay around each call it
    passes on itself (so both record alike)."""

    __slots__ = ("_attributes", "_method", "_series", "_tracer", "recording")

    def __init__(self, service: str, method: str, tracer: Any, recording: bool) -> None:
        self._method = method
        self._attributes = rpc_attributes(service, method)
        self._series = RpcSeries(service, method)
        self._tracer = tracer
        self.recording = recording

    def start(self, parent: Context | None, start_time: int | None = None) -> Any:
        """Counts the call in flight; its span (a child of `parent`) when recording."""
        self._series.start()
        if not self.recording:
            return None
        return self._tracer.start_span(
            self._method, context=parent, kind=SpanKind.SERVER, attributes=self._attributes,
            record_exception=False, set_status_on_exception=False, start_time=start_time,
        )  # fmt: skip

    def finish(self, span: Any, code: grpc.StatusCode, seconds: float) -> None:
        """The call ended with `code` after `seconds`."""
        self._series.finish(code, seconds)
        if span is not None:
            end_span(span, code)


class TelemetryInterceptor(MethodInterceptor):
    """Server span + RPC metrics around every non-exempt call.

    Per-call work is kept small: metric series are resolved once per (method, code), the
    caller's trace context is parsed only when it sent one, and without an SDK tracer
    provider (no exporter configured) no span is created at all — the caller's context is
    still made current, so downstream calls carry the same trace.
    """

    def __init__(self, service: str) -> None:
        self._service = service
        self._tracer = trace.get_tracer(_INSTRUMENTATION)
        self._recording = not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)
        self._cache = HandlerCache(self._make_guard)

    def _make_guard(self, method: str) -> Callable[[Behavior, bool], Behavior]:
        recorder = ServerRecorder(self._service, method, self._tracer, self._recording)

        def start(context: grpc.aio.ServicerContext) -> tuple[Any, Token[Context] | None]:
            """Makes the caller's trace (and our span, when recording) current; an
            unsampled caller (a quiet polling loop) also suppresses instrumentation."""
            parent = caller_context(context.invocation_metadata())
            span = recorder.start(parent)
            current = call_context(span, parent)
            if current is not None and not _sampled(parent):
                current = otel_context.set_value(_SUPPRESS_INSTRUMENTATION_KEY, True, current)
            return span, None if current is None else otel_context.attach(current)

        def finish(
            span: Any,
            token: Token[Context] | None,
            context: grpc.aio.ServicerContext,
            started: float,
        ) -> None:
            recorder.finish(span, _code_of(context), time.perf_counter() - started)
            if token is not None:
                otel_context.detach(token)

        def guard(behavior: Behavior, streaming: bool) -> Behavior:
            if streaming:

                async def traced_stream(
                    request: Any, context: grpc.aio.ServicerContext
                ) -> AsyncIterator:
                    started = time.perf_counter()
                    span, token = start(context)
                    try:
                        result = behavior(request, context)
                        if inspect.isawaitable(result):
                            await result
                        else:
                            async for item in result:
                                yield item
                    finally:
                        finish(span, token, context, started)

                return traced_stream

            async def traced(request: Any, context: grpc.aio.ServicerContext) -> Any:
                started = time.perf_counter()
                span, token = start(context)
                try:
                    result = behavior(request, context)
                    return await result if inspect.isawaitable(result) else result
                finally:
                    finish(span, token, context, started)

            return traced

        return guard

    async def intercept(
        self, method: str, handler: grpc.RpcMethodHandler, details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler:
        return self._cache.get(method, handler)
