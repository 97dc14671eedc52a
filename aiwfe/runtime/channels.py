"""The one factory for inter-service channels, and `Upstream`: a channel plus the
caller's identity, deadline and circuit breaker applied to every call.
"""

from __future__ import annotations

import math
import time
from collections.abc import AsyncIterator, Iterable
from typing import Any, TypeVar

import grpc
from google.protobuf.descriptor import FileDescriptor
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from aiwfe.runtime.config import Settings, TlsSettings
from aiwfe.runtime.errors import attribute
from aiwfe.runtime.identity import (
    IDENTITY_METADATA_KEY,
    InternalIdentity,
    current_principal,
    request_deadline,
)
from aiwfe.runtime.resilience.breaker import CircuitBreaker
from aiwfe.runtime.telemetry import inject_metadata
from aiwfe.sdk.channel import (
    channel_credentials,
    channel_options,
    read_pem,
    service_config,
    shared_options,
)

T = TypeVar("T")
_tracer = trace.get_tracer("aiwfe")
# dataplatform's WatchWorkflowEventsMany answers with this header ("1") when it takes runs
# as well as watches; taskproc sends a run to no other (an older one would ignore it).
MANY_RUNS_HEADER = "x-aiwfe-many-runs"


def _method_name(rpc: Any) -> str:
    method = getattr(rpc, "_method", b"")
    return method.decode() if isinstance(method, bytes) else str(method)


_DEADLINE_MARGIN = 0.005  # leave the caller a few ms to turn our failure into its answer
# A channel whose back end went away reconnects at most this far apart (gRPC's default
# backoff grows to 120 s), so a back end that is back is reached within about a second.
_MAX_RECONNECT_BACKOFF_MS = 1000
_HEALTH_CHECK_TIMEOUT = 1.0


def server_options(settings: Settings) -> list[tuple[str, Any]]:
    """A server's keepalive (it pings idle clients too), its enforcement of the clients'
    pings, and message-size limits. The seed's `min_ping_interval_without_data` is this
    enforcement's knob, but at 300 s it refused the suite's own 30 s pings (GOAWAY
    too_many_pings after two strikes), so servers take `server_min_ping_interval_ms`."""
    g = settings.grpc
    return [
        *shared_options(g),
        ("grpc.http2.min_ping_interval_without_data_ms", g.server_min_ping_interval_ms),
        ("grpc.http2.max_ping_strikes", g.server_max_ping_strikes),
    ]


def server_credentials(tls: TlsSettings) -> grpc.ServerCredentials:
    """TLS for a server port; with client_ca_file, clients must present a certificate."""
    client_ca = read_pem(tls.client_ca_file, "tls.client_ca_file")
    return grpc.ssl_server_credentials(
        [(read_pem(tls.key_file, "tls.key_file"), read_pem(tls.cert_file, "tls.cert_file"))],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


def create_channel(
    target: str,
    settings: Settings,
    files: Iterable[FileDescriptor] = (),
    extra_options: Iterable[tuple[str, Any]] = (),
) -> grpc.aio.Channel:
    """A cluster channel with keepalive, limits and the retry policy; TLS (and a client
    certificate for mTLS) when `tls.ca_file` is configured, plaintext otherwise.
    `extra_options` are more channel arguments (e.g. a connection of its own)."""
    options = [
        *channel_options(settings.grpc),
        ("grpc.service_config", service_config(files, settings.grpc.retry_max_attempts)),
        ("grpc.enable_retries", 1),
        ("grpc.initial_reconnect_backoff_ms", _MAX_RECONNECT_BACKOFF_MS // 4),
        ("grpc.min_reconnect_backoff_ms", _MAX_RECONNECT_BACKOFF_MS // 4),
        ("grpc.max_reconnect_backoff_ms", _MAX_RECONNECT_BACKOFF_MS),
        *extra_options,
    ]
    tls = settings.tls
    if tls.channel_enabled:
        creds = channel_credentials(tls.ca_file, tls.client_cert_file, tls.client_key_file)
        return grpc.aio.secure_channel(target, creds, options=options)
    return grpc.aio.insecure_channel(target, options=options)


def remaining_timeout(cap: float) -> float:
    """What remains of the current RPC's deadline (less a margin), at most `cap` seconds.

    Every outbound call (gRPC or HTTP) takes its timeout from here, so a callee never
    works on after its caller has given up.
    """
    return timeout_and_origin(cap)[0]


def timeout_and_origin(cap: float) -> tuple[float, bool]:
    """`remaining_timeout(cap)`, and True when the caller's deadline (shorter than `cap`)
    set it: a DEADLINE_EXCEEDED then is the caller's, not the back end's failure."""
    deadline = request_deadline.get()
    if deadline is None:
        return cap, False
    remaining = deadline - time.monotonic() - _DEADLINE_MARGIN
    if remaining < cap:
        return max(0.001, remaining), True
    return cap, False


class Upstream:
    """A back end as a caller sees it: one channel, one breaker, identity and deadlines."""

    def __init__(
        self,
        name: str,
        target: str,
        settings: Settings,
        identity: InternalIdentity,
        caller: str,
        files: Iterable[FileDescriptor] = (),
    ) -> None:
        self.name = name
        self.target = target
        self.channel = create_channel(target, settings, files)
        self._health = health_pb2_grpc.HealthStub(self.channel)
        self.breaker = CircuitBreaker(
            name,
            settings.circuit_breaker.failure_threshold,
            settings.circuit_breaker.timeout,
            service=caller,
            health_check=self.serving,
        )
        self._identity = identity
        self._caller = caller
        self._default_deadline = settings.grpc.default_deadline_seconds

    async def serving(self) -> bool:
        """Whether the back end's grpc.health.v1 answers SERVING (the breaker's probe). It
        waits for the channel to connect, within a short timeout."""
        reply = await self._health.Check(
            health_pb2.HealthCheckRequest(), timeout=_HEALTH_CHECK_TIMEOUT, wait_for_ready=True
        )
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """This service's assertion, acting for the current user if there is one."""
        principal = current_principal.get()
        if principal is not None and not principal.is_user:
            principal = None
        return inject_metadata(
            ((IDENTITY_METADATA_KEY, self._identity.assertion(principal, self._caller)),)
        )

    async def call(self, rpc: Any, request: Any, timeout: float | None = None) -> Any:
        """Calls a unary stub method through the breaker with identity and deadline."""
        self.breaker.before_call()
        caller_deadline = False
        if not timeout:
            timeout, caller_deadline = timeout_and_origin(self._default_deadline)
        with _tracer.start_as_current_span(
            f"{self.name} {_method_name(rpc)}", kind=SpanKind.CLIENT
        ) as span:
            try:
                response = await rpc(request, timeout=timeout, metadata=self.metadata())
            except grpc.aio.AioRpcError as exc:
                self.breaker.record_error(exc, caller_deadline=caller_deadline)
                span.set_status(Status(StatusCode.ERROR, exc.code().name))
                attribute(exc, self.name)
                raise
        self.breaker.record_success()
        return response

    async def stream(
        self, rpc: Any, request: Any, timeout: float | None = None
    ) -> AsyncIterator[Any]:
        """Reads a server stream through the breaker, with identity and a client span. With
        no `timeout` only the caller's deadline bounds it (its expiry is never the back
        end's fault); a `timeout` of our own that expires counts against the back end, as
        in `call`. The first message is the back end's success (a long stream must not
        hold a half-open breaker's probe slot)."""
        self.breaker.before_call()
        caller_deadline = not timeout
        if caller_deadline:
            timeout = None if request_deadline.get() is None else remaining_timeout(math.inf)
        span = _tracer.start_span(f"{self.name} {_method_name(rpc)}", kind=SpanKind.CLIENT)
        with trace.use_span(span, end_on_exit=False):  # the trace context goes in metadata
            call = rpc(request, timeout=timeout, metadata=self.metadata())
        answered = False
        try:
            async for message in call:
                if not answered:
                    answered = True
                    self.breaker.record_success()
                yield message
        except grpc.aio.AioRpcError as exc:
            self.breaker.record_error(exc, caller_deadline=caller_deadline)
            span.set_status(Status(StatusCode.ERROR, exc.code().name))
            attribute(exc, self.name)
            raise
        else:
            if not answered:
                self.breaker.record_success()
        finally:
            call.cancel()  # the reader stopped early: end the stream upstream too
            span.end()

    async def close(self) -> None:
        self.breaker.retire()
        await self.channel.close()
