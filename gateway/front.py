"""The gateway's front door: an HTTP/2 relay on the public port that decides each call.

Why: proxying through grpc-python costs a whole server call plus a whole client call per
RPC, which put the gateway hop at 0.6 to 1.0 ms and its throughput at 0.4 to 0.6 of a
direct call's, against nginx's ~0.1 ms. The relay moves frames instead (gateway/relay.py).

Admission is the gateway's one policy (gateway/authn.py), forwarding its one table
(gateway/forwarding.py), recording its one recorder (`ServerRecorder` in
aiwfe/runtime/telemetry.py, and `forwarding.Deadline` for the breaker). The relay's fast path is
the case where all of them finish without waiting: a method a back end owns, a token
already in the in-process cache, a role that allows it (for a permission that names
resources of the request, PollTask's queues, once the request is read), locally reserved
rate-limit quota, the back end's breaker closed (where the proxy's `before_call` would let it pass
without a probe), no response cache to consult, only headers gRPC allows. Such a call goes straight
to that back end with the headers the table keeps, the identity assertion and the
deadline. Every other call goes unchanged, plus the client's address, to the gateway's own
gRPC server on a private Unix socket, whose interceptors and proxy decide it with the same
code: AuthService, health, reflection, a token seen for the first time, an exhausted local
quota, every denial, cacheable responses, an open breaker.

The front's one refusal of its own is load shedding, decided from the HEADERS frame before
the call can wait in any queue (a gRPC server queues calls before its interceptors run:
refusals made there took ~0.5 s under 10x overload). Each back end has a
`ConcurrencyLimiter` (aiwfe/runtime/resilience/limiter.py, the class and `load_shedding` settings
every gRPC server's shedding interceptor uses) over the unary calls the fast path sends
it; one over the limit is answered at once, trailers only, with the interceptor's own
status (RESOURCE_EXHAUSTED, reason OVERLOADED, RetryInfo), spending no quota. A slot is
held until the back end's response is out, so the latency the limit adapts to includes
the back end's queue, which the back end cannot see. Streams are not counted, as in the
interceptor. Nor are full-path calls: most are answered by the gateway itself (response
cache, denials, AuthService), whose latency would teach a back end's limit nothing; the
rest pass the gateway server's own limiter and the back end's, and the load they add shows
in the latency of the fast calls the front's limiter measures.
"""

from __future__ import annotations

import ssl
import time
from collections.abc import Callable

import grpc
from opentelemetry import propagate, trace

from aiwfe.runtime.channels import Upstream
from aiwfe.runtime.config import Settings, TlsSettings
from aiwfe.runtime.errors import AiwfeError
from aiwfe.runtime.identity import (
    IDENTITY_METADATA_KEY,
    INTERNAL_METADATA_PREFIX,
    InternalIdentity,
    Principal,
)
from aiwfe.runtime.interceptors import is_long_poll
from aiwfe.runtime.resilience.breaker import BreakerState, CircuitBreaker
from aiwfe.runtime.resilience.limiter import ConcurrencyLimiter
from aiwfe.runtime.telemetry import ServerRecorder, call_context, caller_context
from gateway import h2
from gateway.authn import AuthInterceptor, bearer_token
from gateway.forwarding import (
    RELAY_USER_AGENT,
    Deadline,
    deadline_cap,
    grpc_timeout,
    parse_grpc_timeout,
    relayed_headers,
)
from gateway.policies import MethodInfo
from gateway.ratelimit import RELAYED_PEER_KEY
from gateway.relay import Decision, Endpoint, Headers, Relay, RelayLimits, Share
from gateway.response_cache import ResponseCache, cache_directive

GATEWAY = "gateway"  # the upstream name of the gateway's own gRPC server
_INTERNAL = INTERNAL_METADATA_PREFIX.encode()
_IDENTITY = IDENTITY_METADATA_KEY.encode()
_PEER = RELAYED_PEER_KEY.encode()
_CLOSED = BreakerState.CLOSED  # read once: an Enum class attribute costs a slow lookup
# Calls equal in caller, headers and request get equal responses, so the relay may serve
# them from one upstream stream (`relay.Share`): a watch of a workflow streams its events
# from the first (or after a given sequence) until it is terminal, whoever asks when.
_SHARED = frozenset({"/aiwfe.taskproc.v1.WorkflowService/WatchWorkflow"})
# Calls of one caller and headers with different requests: their shared streams go as
# watches of one upstream stream of this method (`relay._Many`), each a task upstream
# instead of a stream.
_MANY = {path.encode(): b"/aiwfe.taskproc.v1.WorkflowService/WatchWorkflows" for path in _SHARED}


def server_tls(tls: TlsSettings) -> ssl.SSLContext | None:
    """The public port's TLS (ALPN h2; client certificates required with client_ca_file).
    The files were read once already, by the bootstrap, which names an unreadable one."""
    if not tls.server_enabled:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if not (tls.cert_file and tls.key_file):
        raise ValueError("the gateway's TLS needs both tls.cert_file and tls.key_file")
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

    __slots__ = ("authority", "breaker", "limiter", "name", "scheme")

    def __init__(self, downstream: Upstream, tls: bool, limiter: ConcurrencyLimiter | None) -> None:
        self.name = downstream.name
        self.authority = downstream.target.encode()
        self.breaker: CircuitBreaker = downstream.breaker
        self.limiter = limiter  # load shedding of the fast path's unary calls (None: off)
        self.scheme = b"https" if tls else b"http"


class _Request:
    """What the front door reads from a request's header list alone: the method and its
    route, the credentials, the client's deadline, the headers a back end would get. Kept
    with the list (`h2.DecodedHeaders`), so a block the client repeats is read once per
    connection; what can change between calls (the token's validity, roles, quota,
    breakers, limits) is decided on every call."""

    __slots__ = (
        "authorization", "cap", "client", "control", "full", "info", "limiter", "path",
        "relayed", "route", "sent", "token", "wire",
    )  # fmt: skip

    def __init__(self, front: FrontDoor, headers: Headers) -> None:
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
        self.path = path
        info = self.info = front._methods.get(path.decode("latin-1")) if path else None
        route = self.route = front._routes.get(info.package) if info is not None else None
        self.authorization = authorization.decode("latin-1") if authorization else None
        try:  # the token, read once: the token cache then hashes the same str every call
            self.token = bearer_token(self.authorization)
        except AiwfeError:  # malformed: the full path refuses it, naming it
            self.token = None
        self.control = cache_control.decode("latin-1") if cache_control else None
        client = self.client = parse_grpc_timeout(timeout) if timeout else None
        self.cap = deadline_cap(info, front._grpc) if info is not None else 0.0
        # Streams and long polls are not counted: a watch or a PollTask would hold a slot
        # for its whole life (and teach the limit their wait as latency).
        held_open = info is not None and (
            info.client_streaming or info.server_streaming or is_long_poll(info.path)
        )
        self.limiter = None if held_open or route is None else route.limiter
        # A valid client value is the deadline already; only the gateway's own is written.
        self.wire = (
            timeout if client is not None and timeout is not None else grpc_timeout(self.cap)
        )
        self.relayed = relayed_headers(headers)
        self.sent: tuple[str, Headers, bytes] | None = None  # (assertion, headers, block)
        self.full: tuple[str, Decision] | None = None  # (peer, the full path's decision)


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
        upstreams: dict[str, Upstream],
    ) -> None:
        self._methods = methods
        self._admission = admission
        self._cache = cache
        self._identity = identity
        tls = client_tls(settings.tls)
        shedding = settings.load_shedding
        self._routes = {
            pkg: _Route(
                d, tls is not None, ConcurrencyLimiter(shedding) if shedding.enabled else None
            )
            for pkg, d in upstreams.items()
        }
        self._grpc = settings.grpc
        self._metrics = settings.telemetry.enabled
        self._recorders: dict[str, ServerRecorder] = {}
        self._tracer = trace.get_tracer("aiwfe")
        self._recording = not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)
        self.fast_calls = 0  # went straight to a back end
        self.answered_calls = 0  # answered by the relay from the in-process response cache
        # Sent to the gateway's gRPC server (if not answered); a held call (`_held`) is
        # counted once its request was read, so not when it could not be (not one plain
        # message, or too long to hold).
        self.full_calls = 0
        self.shed_calls = 0  # refused by the relay: the back end was at its limit
        self._upstreams = {p: _endpoint(d.target, tls) for p, d in upstreams.items()}
        self._max_streams = settings.grpc.max_concurrent_streams
        self._tls = server_tls(settings.tls)
        self._limits = RelayLimits.from_settings(settings.gateway.http2, settings.grpc)
        self._relay: Relay | None = None

    async def start(self, host: str, port: int, server_socket: str, reuse_port: bool) -> int:
        gateway = Endpoint(authority=b"localhost", path=server_socket)
        upstreams = {GATEWAY: gateway, **self._upstreams}
        self._relay = Relay(self.decide, upstreams, self._max_streams, self._tls, self._limits)
        return await self._relay.start(host, port, reuse_port)

    async def stop(self, grace: float) -> None:
        if self._relay is not None:
            await self._relay.stop(grace)

    def limiter(self, package: str) -> ConcurrencyLimiter | None:
        """The load-shedding limiter of the back end serving `package` (None: off)."""
        return self._routes[package].limiter

    def decide(self, headers: Headers, peer: str, up: Callable[[str], bool]) -> Decision:
        request: _Request | None = getattr(headers, "derived", None)
        if request is None:
            request = _Request(self, headers)
            if isinstance(headers, h2.DecodedHeaders):  # kept for the block's next call
                headers.derived = request
        info, route = request.info, request.route
        if (
            info is None
            or route is None
            or route.breaker.state is not _CLOSED
            or not up(info.package)
        ):
            return self._full(headers, peer, request)
        admission = self._admission
        try:
            principal = admission.authenticate_now(info, request.authorization, request.token)
            if not isinstance(principal, Principal):  # public, or the token is new
                return self._full(headers, peer, request)
            admission.authorize(info, principal)
        except AiwfeError:  # the full path makes every denial, with its status
            return self._full(headers, peer, request)
        relayed = request.relayed
        if relayed is None:  # a header gRPC forbids: the full path refuses the call
            return self._full(headers, peer, request)
        control = request.control
        if admission.consults_cache(info, principal, control):
            decision = self._full(headers, peer, request)
            if cache_directive(control) is None:  # "no-cache" wants a fresh answer
                answer = self._cached_answer(info, principal)
                return Decision(GATEWAY, decision.headers, None, answer, None, decision.block)
            return decision
        if info.resource_field:  # the permission needs the request (gateway/resources.py)
            return self._held(headers, peer, request, relayed, principal)
        return self._admitted(headers, peer, request, relayed, principal)

    def _admitted(
        self,
        headers: Headers,
        peer: str,
        request: _Request,
        relayed: tuple[Headers, list[tuple[str, str]]],
        principal: Principal,
    ) -> Decision:
        """An allowed call: straight to its back end unless the back end is at its limit
        (shed) or the caller's local quota is spent (the full path waits for more)."""
        info, route = request.info, request.route
        if info is None or route is None:
            raise RuntimeError("an admitted call without its method and route")
        client, limiter = request.client, request.limiter
        slot = 0.0
        if limiter is not None:
            started = limiter.try_acquire(request.cap if client is None else client)
            if started is None:  # before spending quota: a refused call costs none
                return self._shed(info, route.name, limiter)
            slot = started
        if not self._admission.spend_now(principal):
            if limiter is not None:
                limiter.cancel()
            return self._full(headers, peer, request)
        self.fast_calls += 1
        deadline = Deadline(route.breaker, client, request.cap)
        try:
            return self._fast(request, relayed, deadline, principal, slot, limiter)
        except BaseException:  # the relay answers INTERNAL; the slot must not leak
            if limiter is not None:
                limiter.cancel()
            raise

    def _held(
        self,
        headers: Headers,
        peer: str,
        request: _Request,
        relayed: tuple[Headers, list[tuple[str, str]]],
        principal: Principal,
    ) -> Decision:
        """A call whose permission names resources of its request (PollTask's queues):
        held until the request is read, then straight to its back end when the check the
        full path makes (`AuthInterceptor.resource_refusal`) finds nothing to refuse.
        Anything else goes to the full path, which makes the refusal with its status: a
        denial, a request that is not one plain message, or one too long to hold."""
        info = request.info
        if info is None:
            raise RuntimeError("a held call without its method")
        full = self._to_gateway(headers, peer, request)

        def answer(message: bytes) -> Decision | None:
            if self._admission.resource_refusal(info, principal, message) is not None:
                self.full_calls += 1
                return None
            return self._admitted(headers, peer, request, relayed, principal)

        return Decision(GATEWAY, full.headers, None, answer, None, full.block)

    def _full(self, headers: Headers, peer: str, request: _Request) -> Decision:
        """To the gateway's gRPC server, as the client sent it plus the client's address."""
        self.full_calls += 1
        return self._to_gateway(headers, peer, request)

    def _to_gateway(self, headers: Headers, peer: str, request: _Request) -> Decision:
        """The decision sending the call to the gateway's gRPC server, its header block
        encoded once per repeated block (`_Request` lives with it; the peer is the
        connection's, the same for every call of the block, checked all the same). Shared
        by the calls: neither the decision nor its header list is ever changed."""
        full = request.full
        if full is None or full[0] != peer:
            forwarded = self._forwarded(headers, peer)
            decision = Decision(GATEWAY, forwarded, block=h2.header_block(forwarded))
            full = request.full = (peer, decision)
        return full[1]

    @staticmethod
    def _forwarded(headers: Headers, peer: str) -> Headers:
        forwarded = [(n, v) for n, v in headers if not n.lower().startswith(_INTERNAL)]
        forwarded.append((_PEER, peer.encode()))
        return forwarded

    def _shed(self, info: MethodInfo, name: str, limiter: ConcurrencyLimiter) -> Decision:
        """The refusal of a call over its back end's limit, answered by the relay at once:
        the status the services' shedding interceptor gives (one policy)."""
        self.shed_calls += 1
        status = limiter.refusal(f"gateway: {name}").to_status()
        recorder = self._recorder(info.path)
        if recorder is None:
            return Decision("", [], status=status)
        span = recorder.start(None)
        started = time.perf_counter()

        def finish(code: grpc.StatusCode, details: bool) -> None:
            recorder.finish(span, code, time.perf_counter() - started)

        return Decision("", [], finish, status=status)

    def _cached_answer(
        self, info: MethodInfo, principal: Principal
    ) -> Callable[[bytes], bytes | None]:
        """The relay's question once the request is whole: an answer in the gateway's
        in-process response cache (spending quota), or None for the full path."""
        started = time.perf_counter()
        started_ns = time.time_ns()

        def answer(request: bytes) -> bytes | None:
            reply = self._cache.answer_at_once(
                info, principal.user_id, request, lambda: self._admission.spend_now(principal)
            )
            if reply is None:
                return None
            self.answered_calls += 1
            recorder = self._recorder(info.path)
            if recorder is not None:
                span = recorder.start(None, start_time=started_ns)
                recorder.finish(span, grpc.StatusCode.OK, time.perf_counter() - started)
            return reply

        return answer

    def _fast(
        self,
        request: _Request,
        relayed: tuple[Headers, list[tuple[str, str]]],
        deadline: Deadline,
        principal: Principal,
        slot: float,
        limiter: ConcurrencyLimiter | None,
    ) -> Decision:
        info, route = request.info, request.route
        if info is None or route is None or request.path is None:
            raise RuntimeError("a relayed call was decided without its method and route")
        kept, trace_fields = relayed
        assertion = self._identity.assertion(principal, GATEWAY)
        recorder = self._recorder(info.path)
        span = parent = context = None
        if recorder is not None:
            parent = caller_context(trace_fields) if trace_fields else None
            span = recorder.start(parent)
            context = call_context(span, parent)
        sent = request.sent
        if context is None and sent is not None and sent[0] == assertion:
            out, block = sent[1], sent[2]  # the same headers as this block's last call
        else:
            out = [
                (b":method", b"POST"),
                (b":scheme", route.scheme),
                (b":path", request.path),
                (b":authority", route.authority),
                (b"te", b"trailers"),
                (b"grpc-timeout", request.wire),
                (_IDENTITY, assertion.encode()),
                *kept,
                (b"user-agent", RELAY_USER_AGENT),
            ]
            if context is not None:
                injected: dict[str, str] = {}
                propagate.inject(injected, context=context)
                out.extend((k.encode(), v.encode()) for k, v in injected.items())
            block = h2.header_block(out)
            if context is None:  # no trace context of its own: the next call sends the same
                request.sent = (assertion, out, block)
        started = time.perf_counter()

        def finish(code: grpc.StatusCode, details: bool) -> None:
            if limiter is not None:  # once the response is out: the back end's queue counts
                limiter.release(slot)
            deadline.record(code, details)
            if recorder is not None:
                recorder.finish(span, code, time.perf_counter() - started)

        share = None
        if info.path in _SHARED:
            share = self._share(request, kept, assertion, principal)
        return Decision(info.package, out, finish, block=block, share=share)

    def _share(
        self, request: _Request, kept: Headers, assertion: str, principal: Principal
    ) -> Share:
        """One upstream stream for the calls of one principal (its token, its identity
        and roles) with the same headers and request; its own deadline stays each call's."""
        route = request.route
        if route is None or request.path is None:
            raise RuntimeError("a shared call without its route")
        identity = (_IDENTITY, assertion.encode())
        key = h2.header_block(
            [(b":path", request.path), (b"jti", principal.token_id.encode()), identity, *kept]
        )

        def block(path: bytes) -> bytes:
            return h2.header_block(
                [
                    (b":method", b"POST"),
                    (b":scheme", route.scheme),
                    (b":path", path),
                    (b":authority", route.authority),
                    (b"te", b"trailers"),
                    identity,
                    *kept,
                    (b"user-agent", RELAY_USER_AGENT),
                ]
            )

        deadline = request.client if request.client is not None else request.cap
        return Share(
            key, block(request.path), deadline, self._refusal(request), block(_MANY[request.path])
        )

    def _refusal(self, request: _Request) -> Callable[[], grpc.Status | None]:
        """The admission a shared stream's caller passed, made again: the status that
        refuses it now (a revoked token, a role taken away), else None. A token no longer
        in the in-process cache cannot be told without waiting: not refused here."""
        admission, info = self._admission, request.info
        if info is None:
            raise RuntimeError("a shared call without its method")

        def refusal() -> grpc.Status | None:
            try:
                principal = admission.authenticate_now(info, request.authorization, request.token)
                if isinstance(principal, Principal):
                    admission.authorize(info, principal)
            except AiwfeError as exc:
                return exc.to_status()
            return None

        return refusal

    def _recorder(self, path: str) -> ServerRecorder | None:
        """The span and metrics recorder of `path` (None with telemetry off, as the
        gateway's gRPC server then has no telemetry interceptor either)."""
        if not self._metrics:
            return None
        recorder = self._recorders.get(path)
        if recorder is None:
            recorder = self._recorders[path] = ServerRecorder(
                GATEWAY, path, self._tracer, self._recording
            )
        return recorder
