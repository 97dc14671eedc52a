"""The gateway's front door: an HTTP/2 relay on the public port that decides each call.

Why: proxying through grpc-python costs a whole server call plus a whole client call per
RPC, which put the gateway hop at 0.6 to 1.0 ms and its throughput at 0.4 to 0.6 of a
direct call's, against nginx's ~0.1 ms. The relay moves frames instead (gateway/relay.py).

A call the gateway can admit at once — a method a back end owns, a token already in the
in-process cache, a role that allows it, locally reserved rate-limit quota, the back end's
breaker closed, no response cache to consult (`AuthInterceptor.admit_at_once`) — goes
straight to that back end: credentials and client `x-aiwfe-*` metadata dropped, the
internal identity assertion and a deadline added, the gateway's span and RPC metrics
recorded here. Every other call goes unchanged, plus the client's address, to the
gateway's own gRPC server on a private Unix socket, whose interceptors decide it as they
always did: AuthService, health, reflection, a token seen for the first time, an
exhausted local quota, every denial, cacheable responses, an open breaker. So each policy
is written once, and the relay itself never refuses a call.
"""

from __future__ import annotations

import ssl
import time
from collections.abc import Callable

import grpc
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind

from aiwfe.channels import Downstream
from aiwfe.config import Settings, TlsSettings
from aiwfe.identity import (
    IDENTITY_METADATA_KEY,
    INTERNAL_METADATA_PREFIX,
    InternalIdentity,
    Principal,
)
from aiwfe.resilience.breaker import BreakerState, CircuitBreaker
from aiwfe.telemetry import RpcSeries, end_span, rpc_attributes
from gateway.authn import AuthInterceptor
from gateway.policies import MethodInfo
from gateway.ratelimit import RELAYED_PEER_KEY
from gateway.relay import Decision, Endpoint, Headers, Relay, RelayLimits
from gateway.response_cache import ResponseCache, cache_directive

GATEWAY = "gateway"  # the upstream name of the gateway's own gRPC server
_INTERNAL = INTERNAL_METADATA_PREFIX.encode()
_IDENTITY = IDENTITY_METADATA_KEY.encode()
_PEER = RELAYED_PEER_KEY.encode()
# Request headers the fast path rebuilds or must not pass on (credentials, hop-by-hop).
_REPLACED = frozenset(
    {
        b"authorization",
        b"te",
        b"grpc-timeout",
        b"host",
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"transfer-encoding",
        b"upgrade",
    }
)
_TRACE = frozenset({b"traceparent", b"tracestate"})


def _grpc_timeout(seconds: float) -> bytes:
    """A grpc-timeout value (at most 8 digits, as the spec allows)."""
    millis = max(1, round(seconds * 1000))
    if millis < 10**8:
        return f"{millis}m".encode()
    return f"{min(10**8 - 1, round(seconds))}S".encode()


def server_tls(tls: TlsSettings) -> ssl.SSLContext | None:
    """The public port's TLS (ALPN h2; client certificates required with client_ca_file).
    The files were read once already, by the bootstrap, which names an unreadable one."""
    if not tls.server_enabled:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    assert tls.cert_file and tls.key_file
    context.load_cert_chain(tls.cert_file, tls.key_file)
    if tls.client_ca_file:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(cafile=tls.client_ca_file)
    context.set_alpn_protocols(["h2"])
    return context


def client_tls(tls: TlsSettings) -> ssl.SSLContext | None:
    """TLS to the back ends, as their gRPC channels use it (CA, optional client cert)."""
    if not tls.channel_enabled:
        return None
    context = ssl.create_default_context(cafile=tls.ca_file)
    if tls.client_cert_file and tls.client_key_file:
        context.load_cert_chain(tls.client_cert_file, tls.client_key_file)
    context.set_alpn_protocols(["h2"])
    return context


class _Route:
    """A back end as the fast path sees it."""

    __slots__ = ("authority", "breaker", "scheme")

    def __init__(self, downstream: Downstream, tls: bool) -> None:
        self.authority = downstream.target.encode()
        self.breaker: CircuitBreaker = downstream.breaker
        self.scheme = b"https" if tls else b"http"


def _endpoint(target: str, tls: ssl.SSLContext | None) -> Endpoint:
    host, _, port = target.rpartition(":")
    return Endpoint(authority=target.encode(), host=host.strip("[]"), port=int(port), tls=tls)


class FrontDoor:
    """The relay plus the decision it asks for on every call."""

    def __init__(
        self,
        settings: Settings,
        methods: dict[str, MethodInfo],
        admission: AuthInterceptor,
        cache: ResponseCache,
        identity: InternalIdentity,
        downstreams: dict[str, Downstream],
    ) -> None:
        self._methods = methods
        self._admission = admission
        self._cache = cache
        self._identity = identity
        tls = client_tls(settings.tls)
        self._routes = {pkg: _Route(d, tls is not None) for pkg, d in downstreams.items()}
        self._unary_timeout = _grpc_timeout(settings.grpc.default_deadline_seconds)
        self._stream_timeout = _grpc_timeout(settings.grpc.stream_deadline_seconds)
        self._metrics = settings.telemetry.enabled
        self._series: dict[str, RpcSeries] = {}
        self._tracer = trace.get_tracer("aiwfe")
        self._recording = self._metrics and not isinstance(
            trace.get_tracer_provider(), trace.ProxyTracerProvider
        )
        self.fast_calls = 0  # went straight to a back end
        self.answered_calls = 0  # answered by the relay from the in-process response cache
        self.full_calls = 0  # sent to the gateway's gRPC server (if not answered)
        self._upstreams = {p: _endpoint(d.target, tls) for p, d in downstreams.items()}
        self._max_streams = settings.grpc.max_concurrent_streams
        self._tls = server_tls(settings.tls)
        self._limits = RelayLimits.from_settings(settings.gateway.http2)
        self._relay: Relay | None = None

    async def start(self, host: str, port: int, server_socket: str) -> int:
        gateway = Endpoint(authority=b"localhost", path=server_socket)
        upstreams = {GATEWAY: gateway, **self._upstreams}
        self._relay = Relay(self.decide, upstreams, self._max_streams, self._tls, self._limits)
        return await self._relay.start(host, port)

    async def stop(self, grace: float) -> None:
        if self._relay is not None:
            await self._relay.stop(grace)

    def decide(self, headers: Headers, peer: str, up: Callable[[str], bool]) -> Decision:
        path = authorization = cache_control = timeout = None
        for name, value in headers:
            if name == b":path":
                path = value
            elif name == b"authorization":
                authorization = value
            elif name == b"cache-control":
                cache_control = value
            elif name == b"grpc-timeout":
                timeout = value
        info = self._methods.get(path.decode("latin-1")) if path else None
        route = self._routes.get(info.package) if info is not None else None
        if (
            info is not None
            and route is not None
            and route.breaker.state is BreakerState.CLOSED
            and up(info.package)
        ):
            admission = self._admission
            principal = admission.known_caller(
                info, authorization.decode("latin-1") if authorization else None
            )
            control = cache_control.decode("latin-1") if cache_control else None
            if principal is not None and admission.consults_cache(info, principal, control):
                if cache_directive(control) is None:  # "no-cache" wants a fresh answer
                    return self._full(headers, peer)._replace(
                        answer=self._cached_answer(info, principal)
                    )
            elif principal is not None and admission.spend_at_once(principal):
                assert path is not None
                self.fast_calls += 1
                streaming = info.server_streaming or info.client_streaming
                default = self._stream_timeout if streaming else self._unary_timeout
                return self._fast(info, route, path, headers, timeout or default, principal)
        return self._full(headers, peer)

    def _full(self, headers: Headers, peer: str) -> Decision:
        """To the gateway's gRPC server, as the client sent it plus the client's address."""
        self.full_calls += 1
        forwarded = [(n, v) for n, v in headers if not n.startswith(_INTERNAL)]
        forwarded.append((_PEER, peer.encode()))
        return Decision(GATEWAY, forwarded)

    def _cached_answer(
        self, info: MethodInfo, principal: Principal
    ) -> Callable[[bytes], bytes | None]:
        """The relay's question once the request is whole: an answer in the gateway's
        in-process response cache (spending quota), or None for the full path."""
        started = time.perf_counter()
        started_ns = time.time_ns()

        def answer(request: bytes) -> bytes | None:
            reply = self._cache.answer_at_once(info, principal.user_id, request)
            if reply is None or not self._admission.spend_at_once(principal):
                return None
            self.answered_calls += 1
            if self._metrics:
                series = self._series_for(info.path)
                series.in_flight.inc()
                series.finish(grpc.StatusCode.OK, time.perf_counter() - started)
            if self._recording:
                span = self._tracer.start_span(
                    info.path, kind=SpanKind.SERVER, start_time=started_ns,
                    attributes=rpc_attributes(GATEWAY, info.path),
                )  # fmt: skip
                end_span(span, grpc.StatusCode.OK)
            return reply

        return answer

    def _fast(
        self,
        info: MethodInfo,
        route: _Route,
        path: bytes,
        headers: Headers,
        timeout: bytes,
        principal: Principal,
    ) -> Decision:
        out: Headers = [
            (b":method", b"POST"),
            (b":scheme", route.scheme),
            (b":path", path),
            (b":authority", route.authority),
            (b"te", b"trailers"),
            (b"grpc-timeout", timeout),
            (_IDENTITY, self._identity.assertion(principal, GATEWAY).encode()),
        ]
        span = None
        for name, value in headers:
            if name[:1] == b":" or name in _REPLACED or name.startswith(_INTERNAL):
                continue
            if name in _TRACE and self._recording:
                continue  # replaced by the gateway span's context below
            out.append((name, value))
        if self._recording:
            carrier = {n.decode(): v.decode("latin-1") for n, v in headers if n in _TRACE}
            parent = propagate.extract(carrier) if carrier else None
            span = self._tracer.start_span(
                info.path, context=parent, kind=SpanKind.SERVER,
                attributes=rpc_attributes(GATEWAY, info.path),
                record_exception=False, set_status_on_exception=False,
            )  # fmt: skip
            injected: dict[str, str] = {}
            propagate.inject(injected, context=trace.set_span_in_context(span))
            out.extend((k.encode(), v.encode()) for k, v in injected.items())
        breaker = route.breaker
        series = self._series_for(info.path) if self._metrics else None
        if series is not None:
            series.in_flight.inc()
        started = time.perf_counter()

        def finish(code: grpc.StatusCode, details: bool) -> None:
            breaker.record_status(code, details)
            if series is not None:
                series.finish(code, time.perf_counter() - started)
            if span is not None:
                end_span(span, code)

        return Decision(info.package, out, finish)

    def _series_for(self, path: str) -> RpcSeries:
        series = self._series.get(path)
        if series is None:
            series = self._series[path] = RpcSeries(GATEWAY, path)
        return series
