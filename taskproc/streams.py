"""Long-lived streams to dataplatform, kept apart from the worker's control calls.

- `WatchSlots`: the explicit capacity of one process, `taskproc.max_watch_streams` watch
  streams (WatchWorkflow + RunWorkflow) at once; the next one is refused at once with
  RESOURCE_EXHAUSTED + RetryInfo, and nothing else notices (gauge `workflow_watch_streams`).
- `StreamPool`: the channels those watches are relayed on. Each is an HTTP/2 connection of
  its own (a local subchannel pool, so grpc does not share one connection between
  channels with equal arguments) carrying at most `taskproc.streams_per_connection`
  streams, never more than the server's `grpc.max_concurrent_streams`: a stream is never
  queued behind others nor refused (REFUSED_STREAM) at the HTTP/2 level. Connections are
  added as streams grow, up to what `max_watch_streams` needs. The control connection (the
  `Upstream`: unary calls, claims, completions, lease extensions, the wake-up stream)
  carries no watch.
- Streams pass no circuit breaker: a watch lives for minutes, so it could not be a
  half-open breaker's probe, and a failed watch is already cheap (the channel fails fast
  while dataplatform is unreachable) and bounded by the slots. Control calls keep theirs.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.descriptor import FileDescriptor
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import SpanKind, Status, StatusCode

from aiwfe.data.v1 import workflow_store_service_pb2_grpc as store_grpc
from aiwfe.runtime import metrics
from aiwfe.runtime.channels import Upstream, create_channel, remaining_timeout
from aiwfe.runtime.config import Settings
from aiwfe.runtime.errors import ResourceExhausted, attribute
from aiwfe.runtime.identity import current_principal, request_deadline

_tracer = trace.get_tracer("aiwfe")
# When a refused watcher may try again: watches last seconds to minutes, so slots free up
# continually; a second keeps a crowd of retries from arriving at once.
RETRY_AFTER_SECONDS = 1.0
# Each stream channel is a connection of its own (see the module docstring).
# dataplatform's longest re-read interval for a watch (WatchWorkflowEvents' limit).
MAX_POLL_SECONDS = 30.0
_OWN_CONNECTION = (("grpc.use_local_subchannel_pool", 1),)
# A long-lived call to dataplatform that writes (the completion stream, the multiplexed
# watches' call, which carries runs) takes nothing new after this long: its identity
# assertion was checked once, at its open, and must stay fresh (its lifetime: 60 s by
# default). A new call takes over.
RENEW_SECONDS = 30.0


class WatchSlots:
    """At most `limit` watch streams in flight in this process. `with slots:` holds one
    for the body, or raises ResourceExhausted at once when none is free; it allocates
    nothing per stream (a generator-based context manager cost each open watch ~0.3 KB)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_flight = 0

    def __enter__(self) -> None:
        if self.in_flight >= self.limit:
            raise ResourceExhausted(
                f"this taskproc replica is serving its limit of {self.limit} watch streams;"
                f" retry in {RETRY_AFTER_SECONDS:g} s",
                retry_after=RETRY_AFTER_SECONDS,
                quota_violations=[("taskproc.max_watch_streams", f"at most {self.limit}")],
                reason="WATCH_STREAMS_EXHAUSTED",
                metadata={"limit": str(self.limit)},
            )
        self.in_flight += 1
        metrics.workflow_watch_streams.inc()

    def __exit__(self, *exc_info: object) -> None:
        self.in_flight -= 1
        metrics.workflow_watch_streams.dec()


@dataclass(eq=False)
class _Connection:
    channel: grpc.aio.Channel
    stub: store_grpc.WorkflowStoreServiceStub
    streams: int = 0


class StreamPool:
    """Connections to dataplatform for watch streams, each below its concurrency limit."""

    def __init__(
        self, store: Upstream, settings: Settings, files: Iterable[FileDescriptor] = ()
    ) -> None:
        self._store = store  # identity and span naming; its channel carries no watch
        self._settings = settings
        self._files = list(files)
        self.per_connection = min(
            settings.taskproc.streams_per_connection, settings.grpc.max_concurrent_streams
        )
        self._poll = settings.taskproc.watch_poll_interval
        self._reads_per_second = settings.taskproc.watch_reads_per_second
        self.connections: list[_Connection] = []
        self.multiplexed = 0  # watches carried by WatchWorkflowEventsMany calls

    @property
    def store_name(self) -> str:
        """The upstream's name, the dependency its failures are attributed to."""
        return self._store.name

    @property
    def in_flight(self) -> int:
        return sum(conn.streams for conn in self.connections)

    def poll_interval(self) -> float:
        """How often the next watch stream has dataplatform re-read PostgreSQL when nothing
        was pushed to it: `watch_poll_interval`, stretched so that this process's streams
        ask for at most `watch_reads_per_second` re-reads. Commits reach a watch by push
        (in process, or from another replica through Redis); the re-read is the safety
        net, and thousands of them a second would starve dataplatform's other queries."""
        watches = self.in_flight + self.multiplexed
        return min(MAX_POLL_SECONDS, max(self._poll, (watches + 1) / self._reads_per_second))

    def _acquire(self) -> _Connection:
        for conn in self.connections:
            if conn.streams < self.per_connection:
                break
        else:
            channel = create_channel(
                self._store.target, self._settings, self._files, _OWN_CONNECTION
            )
            conn = _Connection(channel, store_grpc.WorkflowStoreServiceStub(channel))
            self.connections.append(conn)
        conn.streams += 1
        return conn

    def stream(self, method: str, request: Any, *, bounded: bool = True) -> AsyncIterator[Any]:
        """Reads the server stream `method` (a WorkflowStoreService method name) on a
        connection with room, with the service identity (acting for the current user).
        `bounded`: its deadline is the current RPC's (none when the caller set none);
        otherwise it has none (a stream shared by several callers)."""
        timeout = None
        if bounded and request_deadline.get() is not None:
            timeout = remaining_timeout(math.inf)
        return self._read(
            method, lambda stub: stub(request, timeout=timeout, metadata=self._store.metadata())
        )

    def bidi(
        self,
        method: str,
        requests: AsyncIterator[Any],
        answered: Callable[[grpc.aio.Metadata], None] | None = None,
    ) -> AsyncIterator[Any]:
        """Reads the bidirectional stream `method`, sending `requests`, on a connection with
        room; `answered` gets the server's headers before the first request is sent. It
        carries many users' watches and lives as long as they come and go: it acts for no
        user and roots a trace (span) of its own, never a watcher's."""
        call: grpc.aio.StreamStreamCall

        async def sending() -> AsyncIterator[Any]:
            # Nothing is sent before the server has answered the call (its handler sends
            # headers first): a message written while the server ends the call (an older
            # dataplatform's UNIMPLEMENTED) makes grpc report INTERNAL ("Internal error
            # from Core") instead of the status about half the time.
            headers = await call.initial_metadata()
            if answered is not None:
                answered(headers)
            async for request in requests:
                yield request

        def start(stub: Any) -> Any:
            nonlocal call
            token = current_principal.set(None)
            try:
                call = stub(sending(), metadata=self._store.metadata())
            finally:
                current_principal.reset(token)
            return call

        return self._read(method, start, Context())

    async def _read(
        self, method: str, start: Callable[[Any], Any], span_context: Context | None = None
    ) -> AsyncIterator[Any]:
        """The messages of the call `start` makes with `method`'s stub method, on a
        connection with room and in a client span (a child of `span_context`, or of the
        current one); its failure passed on as dataplatform's; the call ended and its
        place on the connection freed however the reader stops."""
        conn = self._acquire()
        span = _tracer.start_span(
            f"{self._store.name} {method}", context=span_context, kind=SpanKind.CLIENT
        )
        try:
            with trace.use_span(span, end_on_exit=False):  # the trace context goes in metadata
                call = start(getattr(conn.stub, method))
            try:
                async for message in call:
                    yield message
            except grpc.aio.AioRpcError as exc:
                span.set_status(Status(StatusCode.ERROR, exc.code().name))
                attribute(exc, self._store.name)  # passed on as dataplatform's, not ours
                raise
            finally:
                call.cancel()  # the reader stopped early: end the stream upstream too
        finally:
            conn.streams -= 1
            span.end()

    async def close(self) -> None:
        for conn in self.connections:
            await conn.channel.close()
        self.connections.clear()
