# Over 600 lines on purpose: one HTTP/2 state machine (connections, streams, flow control
# both ways, upstream pools) whose parts share per-stream state on the per-frame hot path;
# it reads in sections: frames and windows, the client side (_Client), the upstream side.
"""An HTTP/2 relay for gRPC: client streams forwarded to upstream connections as frames.

The gateway's front (gateway/front.py) decides, per call, which upstream gets it and with
which request headers, or a status the relay answers at once (trailers only, as it answers
a malformed request); this module does the HTTP/2 around that decision (RFC 9113, checked
by tests/gateway/conformance). Messages are never parsed: DATA frames move between
connections with their stream ids remapped, under flow control of the relay's own on each
side, so memory stays bounded whatever a peer does:

- toward an upstream, a client gets credit back only once its bytes were written on (its
  connection window is half the connection's buffer cap);
- toward a client, every upstream stream starts with a first window of 16 KiB (the
  SETTINGS_INITIAL_WINDOW_SIZE the relay announces upstream), paid from its client
  connection's budget (the other half of the cap) before the stream is opened (a stream
  waits while the budget is short), and is granted more from that budget as the client's
  socket takes the bytes; a client whose socket does not drain (pause_writing) gets
  nothing written, so its streams' upstreams stop sending.

Request header blocks are decoded (`h2.HeaderDecoder`), validated (`h2.request_error`: a
malformed request is a stream error and never reaches `decide`), and the decided headers
re-encoded as literals without indexing. Response header blocks are relayed as they are:
the relay asks every upstream for no HPACK dynamic table (SETTINGS_HEADER_TABLE_SIZE 0) and
decodes each block with a decoder that has none (memoised), so a block that uses one fails
that upstream connection instead of reaching a client. Floods of frames that do no work,
cancelled streams and PINGs end in GOAWAY(ENHANCE_YOUR_CALM).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import hashlib
import logging
import ssl
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, NamedTuple, cast
from urllib.parse import unquote

import grpc
from google.protobuf.message import DecodeError
from google.rpc import status_pb2

from aiwfe.runtime.aio import wait_event
from aiwfe.runtime.config import GatewayHttp2Settings, GrpcSettings
from aiwfe.runtime.errors import Status, rpc_error_of
from aiwfe.runtime.resilience.breaker import has_details
from aiwfe.taskproc.v1 import workflow_service_pb2 as wf_pb
from gateway import h2
from gateway.h2 import ProtocolViolation

log = logging.getLogger("aiwfe.gateway.relay")

STREAM_WINDOW = 1 << 20  # per stream, each way: the most a sender may have in flight
# An upstream stream's first window, announced as the upstream's initial one (no frame per
# stream) and paid from the client's budget before the stream opens; doubles as it is used.
_FIRST_GRANT = h2.MAX_FRAME
_MAX_HEADER_BLOCK = 64 * 1024
_MAX_HEADER_FIELDS = 256  # more in one block: GOAWAY(ENHANCE_YOUR_CALM)
_MAX_CONTINUATIONS = 16  # per header block (a full 64 KiB block needs 4)
# Frames that do no work (SETTINGS, PING, WINDOW_UPDATE, PRIORITY, empty DATA, HEADERS or
# CONTINUATION, unknown types): a connection may send this many at once, and this many per
# second more, plus one per frame that does work (a stream opened, a non-empty DATA frame
# either way), before GOAWAY(ENHANCE_YOUR_CALM).
_IDLE_FRAMES_BURST = 1000.0
_IDLE_FRAMES_PER_SECOND = 100.0
_SETTINGS_BURST = 100.0  # SETTINGS frames, on top of the budget above
_SETTINGS_PER_SECOND = 10.0
# "Rapid reset" (CVE-2023-44487): streams opened and cancelled at once cost the upstream
# work while never counting against the concurrent-stream limit. A connection may end this
# many streams early per second on average (its own RST_STREAMs, and streams the relay had
# to refuse or reset for it) before it is closed.
_RESETS_PER_SECOND = 100.0
_RESET_BURST = 200.0
_CLOSED_MEMORY = 2048  # closed stream ids remembered (§5.1: which late frames are ignored)
_CONTROL_BACKLOG = 1 << 20  # bytes unwritten to a peer that stopped reading: then closed
_HOLD_BYTES = STREAM_WINDOW // 4  # a request longer than this is sent on, not answered
_DOWN_SECONDS = 1.0  # an upstream that refused a connection is not offered calls this long
_CONNECT_SECONDS = 5.0
_RETRIES = 8  # a stream the upstream refused is sent again at most this often
# An upstream connection that refused a stream (REFUSED_STREAM: full by its own count, which
# grpc-core keeps a little after streams close, longer the busier its process) takes no new
# stream for this long: the refused one and those after it go to another connection, a new
# one if need be, or wait for the pause to end.
_REFUSED_PAUSE_SECONDS = 0.1
_UPSTREAM_FIRST_STREAMS = 100  # an upstream's stream limit until its SETTINGS say otherwise
_DRAIN_PING = b"drain\x00\x00\x00"
_DRAIN_PING_SECONDS = 1.0  # the final GOAWAY at the latest this long after the first
_STATUS = {code.value[0]: code for code in grpc.StatusCode}
_UNKNOWN = grpc.StatusCode.UNKNOWN  # read once: an Enum class attribute costs a slow lookup
_STATUS_MEMO_BLOCK, _STATUS_MEMO_ENTRIES = 512, 32  # trailers blocks whose status is kept
_FRAME_HEAD = h2.FRAME_HEAD.pack
# A fan-out keeps the frames it brought for late joiners up to this many bytes, then takes
# no new caller (they open their own); a caller with this many bytes unwritten (a client
# that does not read) is reset alone (ENHANCE_YOUR_CALM: RESOURCE_EXHAUSTED to gRPC).
_FANOUT_HISTORY = 1 << 20
_FANOUTS_HISTORY = 64 << 20  # all fan-outs' kept frames together, in the whole relay
_WATCHER_LAG = STREAM_WINDOW
_RECHECK_SECONDS = 0.5  # a revoked caller's shared streams end within a second
# Watches of different requests (`_Many`): per upstream stream; a back end without
# WatchWorkflows is asked again after this long; the largest message taken from it.
_MANY_WATCHES = 1000
_MANY_REFUSED_SECONDS = 60.0
_MANY_MESSAGE = 4 << 20
_RST_STATUS = {h2.CANCEL: grpc.StatusCode.CANCELLED, h2.REFUSED_STREAM: grpc.StatusCode.UNAVAILABLE}

# What the relay says itself when it answers a call.
_RESPONSE_BLOCK = h2.header_block(h2.RESPONSE_HEADERS)
_OK_BLOCK = h2.header_block(h2.grpc_status_headers(0, "", response_started=True))

Headers = h2.Headers
Finish = Callable[[grpc.StatusCode, bool], None]  # (status, trailers carried details)


@dataclass(frozen=True)
class RelayLimits:
    """Connection management on the relay's port (config: gateway.http2)."""

    max_connections: int = 10_000
    idle_timeout: float = 300.0
    max_buffer_bytes: int = 8 << 20
    min_ping_interval: float = 5.0  # PINGs without data closer than this are strikes
    max_ping_strikes: int = 2
    upstream_connections: int = 32

    @classmethod
    def from_settings(cls, settings: GatewayHttp2Settings, grpc_: GrpcSettings) -> RelayLimits:
        """The public port's limits; its keepalive enforcement is the gRPC servers' own
        (grpc.server_min_ping_interval_ms, grpc.server_max_ping_strikes): one policy."""
        return cls(
            max_connections=settings.max_connections,
            idle_timeout=settings.idle_timeout_seconds,
            max_buffer_bytes=settings.max_buffer_bytes,
            min_ping_interval=grpc_.server_min_ping_interval_ms / 1000,
            max_ping_strikes=grpc_.server_max_ping_strikes,
            upstream_connections=settings.max_upstream_connections,
        )


class _Bucket:
    """A token bucket: `take` fails once more was taken than the burst plus the refill."""

    __slots__ = ("at", "burst", "rate", "tokens")

    def __init__(self, burst: float, rate: float) -> None:
        self.burst, self.rate, self.tokens = burst, rate, burst
        self.at = time.monotonic()

    def take(self) -> bool:
        self.tokens -= 1
        if self.tokens >= 0:
            return True
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        return self.tokens >= 0


class Decision(NamedTuple):
    """Where one call goes and what it carries there."""

    upstream: str
    headers: Headers
    finish: Finish | None = None  # told once how the call ended
    # Asked with the request message once it is whole (a unary call): a response message
    # the relay sends back itself, another decision for the call (a check that needed the
    # request), or None to send the call on as decided. Not asked when the request is not
    # one plain message or longer than the relay holds: then it goes on as decided.
    answer: Callable[[bytes], bytes | Decision | None] | None = None
    # A status the relay answers at once (trailers only, its details included), never
    # opening the call upstream: a refusal the front door decides from the headers alone.
    status: grpc.Status | None = None
    block: bytes | None = None  # `headers` encoded already (h2.header_block), if at hand
    share: Share | None = None  # the call may join others' upstream stream (a watch)


class Share(NamedTuple):
    """How a call may share one upstream stream with equal calls (a fan-out): calls
    whose `key` and whole request message are equal get the same response, so the relay
    opens one upstream stream for all of them and copies its frames to each, from the
    first one on for a late joiner. Each keeps its own deadline, flow control and finish;
    a call whose request is not one plain message goes on by itself, as decided."""

    key: bytes  # who asks, and with which headers (never two principals: see the front)
    block: bytes  # the shared stream's request headers: no deadline (each caller has one)
    deadline: float  # this caller's, in seconds: then DEADLINE_EXCEEDED, as a back end says
    # Asked every `_RECHECK_SECONDS` while the shared stream is open: the status that would
    # refuse its key's caller now (its token revoked, its role gone), which ends them all.
    refusal: Callable[[], grpc.Status | None] = lambda: None
    # The request headers of the upstream stream that carries watches of different
    # requests of this key, each as a watch of its own (`_Many`: taskproc's
    # WatchWorkflows), instead of a stream each; None: a stream each.
    many: bytes | None = None


@dataclass(frozen=True)
class Endpoint:
    """How to reach one upstream: host and port, or a Unix socket path."""

    authority: bytes
    host: str | None = None
    port: int | None = None
    path: str | None = None
    tls: ssl.SSLContext | None = None

    async def connect(self, factory: Callable[[], asyncio.Protocol]) -> None:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(_CONNECT_SECONDS):
            if self.path is not None:
                await loop.create_unix_connection(factory, self.path)
            else:
                if self.host is None or self.port is None:
                    raise ValueError("an upstream needs a unix path or a host and port")
                await loop.create_connection(
                    factory,
                    self.host,
                    self.port,
                    ssl=self.tls,
                    server_hostname=self.host if self.tls else None,
                )


Decide = Callable[[Headers, str, Callable[[str], bool]], Decision]
_UNDECIDED = Decision("", [])  # a stream's decision until the read that opened it is handled
# Deciding raised: INTERNAL, no message (the log has the exception).
_FAILED = Decision("", [], status=Status(grpc.StatusCode.INTERNAL, "", ()))


class Relay:
    """Listens for clients and relays each of their calls where `decide` says."""

    def __init__(
        self,
        decide: Decide,
        upstreams: dict[str, Endpoint],
        max_streams: int,
        tls: ssl.SSLContext | None = None,
        limits: RelayLimits | None = None,
    ) -> None:
        self.decide = decide
        self.max_streams = max_streams
        self.limits = limits or RelayLimits()
        self.tls = tls
        self.pools = {name: _Pool(self, endpoint) for name, endpoint in upstreams.items()}
        self.clients: set[_Client] = set()
        self.dirty: list[_Connection] = []
        self.opening: list[_Stream] = []  # calls to open upstream once this read is handled
        self.fanouts: dict[bytes, _Fanout] = {}  # shared upstream streams a call may join
        self.admissions: dict[bytes, _Admission] = {}  # their callers', by Share.key
        self.fanout_bytes = 0  # the frames they keep for late joiners
        self.manys: dict[bytes, _Many] = {}  # by Share.key: the one new watches go on
        self.many_refused: dict[str, float] = {}  # upstream -> when to ask it again
        self.later: list[Callable[[], None]] = []
        self._server: asyncio.Server | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._quiet = asyncio.Event()  # set while draining once no call is in flight
        self._draining = False

    def up(self, upstream: str) -> bool:
        return self.pools[upstream].down_until <= time.monotonic()

    async def start(self, host: str, port: int, reuse_port: bool = False) -> int:
        """Listens on host:port; `reuse_port` shares it with the service's other processes."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _Client(self), host, port, ssl=self.tls, reuse_address=True,
            reuse_port=reuse_port,
        )  # fmt: skip
        self._sweeper = asyncio.ensure_future(self._sweep())
        return int(self._server.sockets[0].getsockname()[1])

    async def _sweep(self) -> None:
        """Closes client connections idle (no call in flight) for the idle timeout."""
        timeout = self.limits.idle_timeout
        while True:
            await asyncio.sleep(min(timeout / 4, 5.0))
            now = time.monotonic()
            for client in list(self.clients):
                if not client.streams and now - client.active_at > timeout:
                    client.fail(h2.NO_ERROR, "idle")
            self.flush()

    async def stop(self, grace: float) -> None:
        """Stops accepting, lets calls in flight finish within `grace` (two-phase GOAWAY:
        streams the client opened before it saw the first are still served), then closes."""
        if self._server is not None:
            self._server.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
        self._draining = True
        for client in list(self.clients):
            client.drain()
        self.flush()
        self.check_quiet()
        await wait_event(self._quiet, grace)
        for client in list(self.clients):
            client.close()
        for pool in self.pools.values():
            if pool.waking is not None:  # nothing is sent again after the stop
                pool.waking.cancel()
                pool.waking = None
            for conn in list(pool.conns):
                conn.close()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)

    def check_quiet(self) -> None:
        if self._draining and not any(c.streams or c.drain_phase < 2 for c in self.clients):
            self._quiet.set()

    def flush(self) -> None:
        """Writes what the connections have to send, then does the bookkeeping that was
        put off so as not to delay it (trailer statuses, metrics, breakers).

        Calls are decided and opened upstream here, after the whole read was handled: one
        the client opened and reset in the same read (rapid reset), or on a connection that
        failed, costs neither the front door's decision nor an upstream stream."""
        while self.opening:
            opening, self.opening = self.opening, []
            for stream in opening:
                if stream.done or stream.client.closing:
                    continue
                if stream.decision is _UNDECIDED:
                    stream.client.decide(stream)
                else:
                    self.pools[stream.decision.upstream].open(stream)
        if self.dirty:
            dirty, self.dirty = self.dirty, []
            for conn in dirty:
                conn.flush()
        if self.later:
            later, self.later = self.later, []
            for work in later:
                work()


class _Half(deque[tuple[int, int, bytes]]):
    """One direction of one stream: the frames (type, flags, payload) waiting for the
    receiver's window, and that window. A deque itself: making one (two per call) runs no
    Python, where an __init__ of its own ran through C."""

    __slots__ = ("window",)
    window: int


class _Stream:
    __slots__ = (
        "cid", "client", "client_credit", "client_ended", "client_recv", "code", "decision",
        "details", "done", "fanout", "finished", "headers", "held", "kept", "queued", "replay",
        "request", "resent",
        "response_started", "retries", "target", "to_client", "to_upstream", "trailers", "uid",
        "upstream", "upstream_ended", "upstream_recv",
    )  # fmt: skip

    def __init__(self, client: _Client, cid: int, decision: Decision, request: bytes) -> None:
        self.client = client
        self.headers: Headers | None = None  # the request's, until it is decided
        self.cid = cid
        self.upstream: _Upstream | None = None
        self.uid = 0
        self.decision = decision
        self.finished = False  # decision.finish was told how the call ended
        self.request = request  # the header block to open the upstream stream with
        self.to_upstream = _Half()
        self.to_upstream.window = 0
        self.to_client = _Half()
        self.to_client.window = client.peer_initial_window
        self.client_ended = False
        self.upstream_ended = False
        self.response_started = False
        self.code = _UNKNOWN
        self.details = False
        self.done = False
        self.client_credit = 0  # owed to the client for bytes passed on
        self.client_recv = STREAM_WINDOW  # what the client may still send us
        # Toward the client: the window granted to the upstream (from the client
        # connection's budget), the response bytes received and not yet written, and the
        # window this stream is granted up to.
        self.upstream_recv = 0
        self.queued = 0
        self.target = _FIRST_GRANT
        self.held = -1  # request bytes held for decision.answer; -1 when not held
        # What went upstream (after the `request` block) until the response starts, kept
        # while short so a stream the upstream refused (REFUSED_STREAM: never processed)
        # can be sent again; None once the response started or the request grew long.
        self.replay: list[tuple[int, int, bytes]] | None = []
        self.kept = 0  # bytes in `replay`
        self.resent = 0  # bytes of a replay not yet written again (credited once already)
        self.retries = 0
        self.trailers = b""  # the upstream's trailers block, once it sent them
        self.fanout: _Fanout | None = None  # the shared upstream stream it watches


def _send(stream: _Stream, to_upstream: bool) -> None:
    """Writes what the receiver's windows (and socket) allow of one direction's queue."""
    if to_upstream:
        dest: _Connection | None = stream.upstream
        sid, half = stream.uid, stream.to_upstream
    else:
        dest, sid, half = stream.client, stream.cid, stream.to_client
    if dest is None or not sid or stream.done:
        return
    if dest.paused:  # its socket is not draining: nothing more until it does
        dest.blocked[stream] = None
        return
    queue = half
    while queue:
        ftype, flags, payload = queue[0]
        if ftype == h2.HEADERS:
            dest.write_headers(sid, payload, flags)
            queue.popleft()
        else:
            size = len(payload)
            n = min(size, half.window, dest.send_window, h2.MAX_FRAME)
            if n <= 0 and size:
                dest.blocked[stream] = None
                return
            last = n == size
            chunk = payload[:n] if not last else payload
            dest.write_frame(h2.DATA, flags if last else 0, sid, chunk)
            if to_upstream and stream.replay is not None:
                _keep(stream, flags if last else 0, chunk)
            half.window -= n
            dest.send_window -= n
            if n:
                dest.useful += 1
                _passed(stream, to_upstream, n)
            if last:
                queue.popleft()
            else:
                queue[0] = (ftype, flags, payload[n:])
        if flags & h2.END_STREAM and not to_upstream:
            _complete(stream)
            return


def _keep(stream: _Stream, flags: int, chunk: bytes) -> None:
    """Keeps a DATA frame sent upstream for a replay, while the request stays short."""
    replay = stream.replay
    if replay is None:
        raise RuntimeError("a DATA frame kept for a replay on a stream that keeps none")
    replay.append((h2.DATA, flags, chunk))
    stream.kept += len(chunk)
    if stream.kept > _HOLD_BYTES:
        stream.replay = None


def _passed(stream: _Stream, to_upstream: bool, n: int) -> None:
    """`n` bytes the client (`to_upstream`) or the upstream sent were written on: credit."""
    if to_upstream:
        if stream.resent:  # replayed bytes: the client had its credit the first time
            again = min(n, stream.resent)
            stream.resent -= again
            n -= again
            if not n:
                return
        client = stream.client
        client.credit(n)
        if not stream.client_ended:
            stream.client_credit += n
            if stream.client_credit >= STREAM_WINDOW // 4:
                client.write(h2.window_update(stream.cid, stream.client_credit))
                stream.client_recv += stream.client_credit
                stream.client_credit = 0
        return
    stream.queued -= n
    client = stream.client
    client.budget += n
    if not stream.upstream_ended:
        _grant(stream)
    if client.starved:
        client.feed_starved()


def _grant(stream: _Stream) -> None:
    """Tops up the upstream's window for the stream from its client connection's budget,
    once half of it was used (each top-up once data flows doubles the stream's window, up
    to 1 MiB)."""
    inflight = stream.upstream_recv + stream.queued
    want = stream.target - inflight
    if (
        want < stream.target // 2
        or stream.upstream is None
        or not stream.uid
        or stream.done
        or stream.upstream_ended
    ):
        return
    client = stream.client
    grant = min(want, client.budget)
    if grant < want:
        client.starved[stream] = None
    if grant <= 0:
        return
    stream.upstream.write(h2.window_update(stream.uid, grant))
    stream.upstream_recv += grant
    client.budget -= grant
    if stream.target < STREAM_WINDOW and stream.response_started:
        stream.target *= 2


def _complete(stream: _Stream) -> None:
    """The client has the whole response (trailers included): the call is over."""
    client, upstream = stream.client, stream.upstream
    stream.done = True
    client.forget(stream)
    if upstream is not None:
        upstream.forget(stream)
    if not stream.client_ended:  # the server ended early: the client may stop sending
        client.reset(stream.cid, h2.NO_ERROR, peer_caused=False)
        if upstream is not None and stream.uid:
            upstream.write(h2.rst_stream(stream.uid, h2.NO_ERROR))
    client.relay.later.append(functools.partial(_finish_after, stream))  # no frame of its own


def _finish_after(stream: _Stream) -> None:
    """How a completed call ended, read from its trailers once the response is out."""
    if stream.trailers and stream.upstream is not None:
        stream.code, stream.details = stream.upstream.status(stream.trailers)
    _finish(stream, stream.code, stream.details)


def _finish(stream: _Stream, code: grpc.StatusCode, details: bool = False) -> None:
    finish = stream.decision.finish
    if finish is not None and not stream.finished:
        stream.finished = True
        finish(code, details)


def _fail(
    stream: _Stream,
    code: grpc.StatusCode,
    message: str,
    metadata: Iterable[tuple[str, str | bytes]] = (),
) -> None:
    """Ends a call the relay cannot complete with a gRPC status, after what was queued."""
    if stream.done:
        return
    if stream.upstream is not None:
        stream.upstream.forget(stream)
        if stream.uid:
            stream.upstream.write(h2.rst_stream(stream.uid, h2.CANCEL))
    stream.upstream_ended = True
    fields = h2.grpc_status_headers(code.value[0], message, stream.response_started, metadata)
    stream.response_started = True
    stream.to_client.append((h2.HEADERS, h2.END_STREAM, h2.header_block(fields)))
    stream.code = code
    _send(stream, False)


class _Connection(asyncio.Protocol):
    """What both sides share: framing, output batching, windows, PING and SETTINGS."""

    toward_upstream = False  # which direction of a stream this connection receives

    def __init__(self, relay: Relay, recv_window: int) -> None:
        self.relay = relay
        self.transport: asyncio.Transport | None = None
        self.reader = h2.FrameReader()
        self.out = bytearray()
        self.send_window = h2.DEFAULT_WINDOW  # the peer's connection window for our DATA
        self.peer_initial_window = h2.DEFAULT_WINDOW
        self.recv_window = recv_window  # what the peer may still send us
        self.credit_batch = recv_window // 4  # credit is returned in batches this large
        self.owed = 0
        self.streams: dict[int, _Stream] = {}
        self.blocked: dict[_Stream, None] = {}  # streams waiting for this peer's window
        self.closed = False
        self.closing = False  # closed, or about to be: no new calls from it
        self.paused = False  # the transport's buffer is full: the peer is not reading
        self.useful = 0  # frames that did work since the idle-frame budget was last topped up
        self.expect_settings = False  # the next frame must be a SETTINGS (not an ACK)
        self._continuing: tuple[int, int, bytearray, int] | None = None  # a header block so far

    # --- output -----------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if not self.out:
            self.relay.dirty.append(self)
        self.out += data

    def write_frame(self, ftype: int, flags: int, sid: int, payload: bytes) -> None:
        """`write(h2.frame(...))` without the frame's own copy of the payload (the hot
        path's DATA and HEADERS: the payload is copied once, into the buffer)."""
        out = self.out
        if not out:
            self.relay.dirty.append(self)
        n = len(payload)
        out += _FRAME_HEAD(n >> 16, n & 0xFFFF, ftype, flags, sid)
        out += payload

    def write_headers(self, sid: int, block: bytes, flags: int) -> None:
        """A header block as HEADERS (+ CONTINUATION frames when it exceeds one frame);
        framed here like `write_frame` does (three per call: a call less each)."""
        n = len(block)
        if n > h2.MAX_FRAME:
            self.write(h2.headers_frames(sid, block, flags))
            return
        out = self.out
        if not out:
            self.relay.dirty.append(self)
        out += _FRAME_HEAD(0, n, h2.HEADERS, flags | h2.END_HEADERS, sid)
        out += block

    def flush(self) -> None:
        transport = self.transport
        if self.out and not self.closed and transport is not None:
            transport.write(bytes(self.out))
            if self.paused and transport.get_write_buffer_size() > _CONTROL_BACKLOG:
                # Only frames the relay must answer (ACKs, RST_STREAM) were written while
                # paused: a peer that sends work and never reads is cut off.
                log.info("closing an HTTP/2 connection: the peer does not read")
                transport.abort()
        self.out.clear()

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self.unblock()
        self.relay.flush()

    def credit(self, n: int) -> None:
        self.owed += n
        if self.owed >= self.credit_batch:
            self.write(h2.window_update(0, self.owed))
            self.recv_window += self.owed
            self.owed = 0

    def close(self) -> None:
        self.closing = True
        if not self.closed and self.transport is not None:
            self.flush()
            self.transport.close()

    def fail(self, code: int, reason: str) -> None:
        """A connection error: GOAWAY, then close (connection_lost cleans up)."""
        log.info("closing an HTTP/2 connection: %s", reason)
        self.write(h2.goaway(self._last_stream(), code))
        self.close()

    def _last_stream(self) -> int:
        return 0

    # --- input ------------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        try:
            if not self.closed:  # (connection_lost is always called later, never mid-read)
                self.reader.parse(data, self._frame)
        except ProtocolViolation as exc:
            self.fail(exc.code, str(exc))
        except Exception:  # a bug must cost one connection, never the relay
            log.exception("relay connection failed")
            self.fail(h2.INTERNAL_ERROR, "internal error")
        self.relay.flush()

    def _frame(self, ftype: int, flags: int, sid: int, payload: bytes) -> None:
        if self.expect_settings:
            if ftype != h2.SETTINGS or flags & h2.ACK:
                raise ProtocolViolation(h2.PROTOCOL_ERROR, "the preface lacks SETTINGS")
            self.expect_settings = False
        if self._continuing is not None:
            csid, cflags, pieces, count = self._continuing
            if ftype != h2.CONTINUATION or sid != csid:
                raise ProtocolViolation(h2.PROTOCOL_ERROR, "a header block was interrupted")
            pieces += payload
            if len(pieces) > _MAX_HEADER_BLOCK:
                raise ProtocolViolation(h2.ENHANCE_YOUR_CALM, "a header block over 64 KiB")
            if count >= _MAX_CONTINUATIONS:
                raise ProtocolViolation(h2.ENHANCE_YOUR_CALM, "too many CONTINUATION frames")
            if not payload:
                self.idle_frame()
            if flags & h2.END_HEADERS:
                self._continuing = None
                self.on_headers(sid, cflags, bytes(pieces))
            else:
                self._continuing = (csid, cflags, pieces, count + 1)
            return
        # The frames of every call first: HEADERS and WINDOW_UPDATE (three each), DATA (two).
        if ftype == h2.HEADERS:
            if not sid:
                raise ProtocolViolation(h2.PROTOCOL_ERROR, "HEADERS on stream 0")
            block = h2.unpad(flags, payload)
            if flags & h2.PRIORITY_FLAG:
                if len(block) < 5:
                    raise ProtocolViolation(h2.FRAME_SIZE_ERROR, "a HEADERS priority cut short")
                if h2.u32(block) & 0x7FFFFFFF == sid:
                    self.self_dependent(sid)
                block = block[5:]
            if not block and not flags & h2.END_HEADERS:
                self.idle_frame()
            if flags & h2.END_HEADERS:
                self.on_headers(sid, flags, block)
            else:
                self._continuing = (sid, flags, bytearray(block), 0)
        elif ftype == h2.WINDOW_UPDATE:
            if len(payload) != 4:
                raise ProtocolViolation(h2.FRAME_SIZE_ERROR, "a WINDOW_UPDATE not 4 bytes")
            self.idle_frame()
            self.on_window_update(sid, int.from_bytes(payload, "big") & 0x7FFFFFFF)
        elif ftype == h2.DATA:
            if not sid:
                raise ProtocolViolation(h2.PROTOCOL_ERROR, "DATA on stream 0")
            self.recv_window -= len(payload)
            if self.recv_window < 0:
                raise ProtocolViolation(h2.FLOW_CONTROL_ERROR, "more DATA than the window")
            if payload:
                self.useful += 1
            elif not flags & h2.END_STREAM:
                self.idle_frame()
            self.on_data(sid, flags, payload)
        elif ftype == h2.SETTINGS:
            if sid:
                raise ProtocolViolation(h2.PROTOCOL_ERROR, "SETTINGS on a stream")
            if flags & h2.ACK:
                if payload:
                    raise ProtocolViolation(h2.FRAME_SIZE_ERROR, "a SETTINGS ACK with a payload")
                return
            self.settings_frame()
            for key, value in h2.parse_settings(payload):
                self.on_setting(key, value)
            self.write(h2.frame(h2.SETTINGS, h2.ACK, 0))
        elif ftype == h2.RST_STREAM:
            if not sid:
                raise ProtocolViolation(h2.PROTOCOL_ERROR, "RST_STREAM on stream 0")
            if len(payload) != 4:
                raise ProtocolViolation(h2.FRAME_SIZE_ERROR, "a RST_STREAM not 4 bytes")
            self.on_reset(sid, h2.u32(payload))
        elif ftype == h2.PING:
            if sid:
                raise ProtocolViolation(h2.PROTOCOL_ERROR, "PING on a stream")
            if len(payload) != 8:
                raise ProtocolViolation(h2.FRAME_SIZE_ERROR, "a PING not 8 bytes")
            if flags & h2.ACK:
                self.on_ping_ack(payload)
            else:
                self.idle_frame()
                self.on_ping()
                self.write(h2.frame(h2.PING, h2.ACK, 0, payload))
        elif ftype == h2.GOAWAY:
            if sid:
                raise ProtocolViolation(h2.PROTOCOL_ERROR, "GOAWAY on a stream")
            if len(payload) < 8:
                raise ProtocolViolation(h2.FRAME_SIZE_ERROR, "a GOAWAY under 8 bytes")
            self.on_goaway(h2.u32(payload) & 0x7FFFFFFF)
        elif ftype == h2.PRIORITY:
            if not sid:
                raise ProtocolViolation(h2.PROTOCOL_ERROR, "PRIORITY on stream 0")
            self.idle_frame()
            if len(payload) != 5:
                self.stream_error(sid, h2.FRAME_SIZE_ERROR)
            elif h2.u32(payload) & 0x7FFFFFFF == sid:
                self.self_dependent(sid)
        elif ftype == h2.PUSH_PROMISE or ftype == h2.CONTINUATION:
            raise ProtocolViolation(h2.PROTOCOL_ERROR, "an unexpected frame")
        else:
            self.idle_frame()  # unknown frame types are ignored, as the protocol asks

    def on_setting(self, key: int, value: int) -> None:
        if key == h2.INITIAL_WINDOW_SIZE:
            if value > h2.MAX_WINDOW:
                raise ProtocolViolation(h2.FLOW_CONTROL_ERROR, "an initial window too large")
            delta = value - self.peer_initial_window
            self.peer_initial_window = value
            for stream in self.streams.values():
                half = self.half(stream)
                half.window += delta
                if half.window > h2.MAX_WINDOW:
                    raise ProtocolViolation(h2.FLOW_CONTROL_ERROR, "a window over 2^31-1")
            self.unblock()
        elif key == h2.ENABLE_PUSH:
            if value > 1:
                raise ProtocolViolation(h2.PROTOCOL_ERROR, "SETTINGS_ENABLE_PUSH not 0 or 1")
        elif key == h2.MAX_FRAME_SIZE:
            # Honoured by construction: the relay never writes frames over 16 KiB.
            if not h2.MAX_FRAME <= value <= 0xFFFFFF:
                raise ProtocolViolation(h2.PROTOCOL_ERROR, "a SETTINGS_MAX_FRAME_SIZE out of range")
        # HEADER_TABLE_SIZE is honoured by construction too: the relay's own blocks use no
        # dynamic table, and the upstream blocks it relays are checked to use none.

    def on_window_update(self, sid: int, increment: int) -> None:
        if sid == 0:
            if increment == 0:
                raise ProtocolViolation(h2.PROTOCOL_ERROR, "a zero WINDOW_UPDATE")
            self.send_window += increment
            if self.send_window > h2.MAX_WINDOW:
                raise ProtocolViolation(h2.FLOW_CONTROL_ERROR, "a window over 2^31-1")
            if self.blocked:
                self.unblock()
            return
        stream = self.streams.get(sid)
        if stream is None:
            self.unknown_stream_frame(sid, h2.WINDOW_UPDATE)
            return
        if increment == 0:
            self.stream_error(sid, h2.PROTOCOL_ERROR)
            return
        half = self.half(stream)
        half.window += increment
        if half.window > h2.MAX_WINDOW:
            self.stream_error(sid, h2.FLOW_CONTROL_ERROR)
            return
        if half:  # (a client's grant ahead of the response, as C-core sends: nothing)
            self.blocked.pop(stream, None)
            _send(stream, self.toward_upstream)

    def unblock(self) -> None:
        if not self.blocked:
            return
        blocked, self.blocked = self.blocked, {}
        for stream in blocked:
            _send(stream, self.toward_upstream)

    def half(self, stream: _Stream) -> _Half:
        """The direction of `stream` this connection receives."""
        return stream.to_upstream if self.toward_upstream else stream.to_client

    # What a side does differently (the client side checks and limits, the upstream trusts).

    def idle_frame(self) -> None:
        """A frame that did no work arrived."""

    def settings_frame(self) -> None:
        """A SETTINGS frame (not an ACK) arrived."""

    def on_ping(self) -> None:
        """A PING (not an ACK) arrived."""

    def on_ping_ack(self, payload: bytes) -> None:
        """A PING ACK arrived."""

    def self_dependent(self, sid: int) -> None:
        """A stream was made to depend on itself (RFC 9113 §5.3.1: a stream error)."""
        self.stream_error(sid, h2.PROTOCOL_ERROR)

    def stream_error(self, sid: int, code: int) -> None:
        raise NotImplementedError

    def unknown_stream_frame(self, sid: int, ftype: int) -> None:
        """WINDOW_UPDATE or RST_STREAM for a stream the relay has no state for."""

    def forget(self, stream: _Stream) -> None:
        raise NotImplementedError

    def on_headers(self, sid: int, flags: int, block: bytes) -> None:
        raise NotImplementedError

    def on_data(self, sid: int, flags: int, payload: bytes) -> None:
        raise NotImplementedError

    def on_reset(self, sid: int, code: int) -> None:
        raise NotImplementedError

    def on_goaway(self, last_stream_id: int) -> None:
        raise NotImplementedError


class _Client(_Connection):
    """A client's connection (the relay is the HTTP/2 server)."""

    def __init__(self, relay: Relay) -> None:
        limits = relay.limits
        super().__init__(relay, limits.max_buffer_bytes // 2)
        self.decoder = h2.HeaderDecoder(
            _MAX_HEADER_BLOCK, check=h2.request_error, max_fields=_MAX_HEADER_FIELDS
        )
        self.budget = limits.max_buffer_bytes - limits.max_buffer_bytes // 2
        self.starved: dict[_Stream, None] = {}  # streams waiting for budget
        self.peer = "unknown"
        self.last_sid = 0
        self.drain_phase = 0  # 1: first GOAWAY sent, 2: the final one (or the peer's) too
        self.active_at = time.monotonic()
        # Closed streams, oldest first: True if the relay reset it (late frames ignored).
        # An OrderedDict, as the oldest is dropped on every call once it is full: a dict's
        # next(iter()) walks past every entry deleted from its front so far (~18k
        # instructions per call in callgrind).
        self.ended: OrderedDict[int, bool] = OrderedDict()
        self.expect_settings = True  # a client's first frame must be SETTINGS (§3.4)
        self._preface: bytearray | None = bytearray()  # until the client's preface is in
        self._resets = _Bucket(_RESET_BURST, _RESETS_PER_SECOND)
        self._idle_frames = _Bucket(_IDLE_FRAMES_BURST, _IDLE_FRAMES_PER_SECOND)
        self._settings = _Bucket(_SETTINGS_BURST, _SETTINGS_PER_SECOND)
        self._ping_at = -1e9
        self._ping_strikes = 0
        self._drain_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None and ssl_object.selected_alpn_protocol() != "h2":
            transport.close()
            return
        self.peer = _peer(transport.get_extra_info("peername"))
        request_window = self.recv_window
        if len(self.relay.clients) >= self.relay.limits.max_connections:
            log.warning("refusing a connection from %s: too many connections", self.peer)
            self.transport.write(h2.settings([]) + h2.goaway(0, h2.NO_ERROR))
            self.transport.close()
            return
        self.relay.clients.add(self)
        self.write(
            h2.settings(
                [
                    (h2.MAX_CONCURRENT_STREAMS, self.relay.max_streams),
                    (h2.INITIAL_WINDOW_SIZE, STREAM_WINDOW),
                    (h2.MAX_HEADER_LIST_SIZE, _MAX_HEADER_BLOCK),
                ]
            )
            + h2.window_update(0, request_window - h2.DEFAULT_WINDOW)
        )
        self.relay.flush()

    def data_received(self, data: bytes) -> None:
        self.active_at = time.monotonic()
        if self._preface is not None:
            self._preface += data
            if len(self._preface) < len(h2.PREFACE):
                if not h2.PREFACE.startswith(self._preface):
                    self.close()
                return
            if not self._preface.startswith(h2.PREFACE):
                self.close()  # not HTTP/2 (an HTTP/1 client, a port scan): nothing to answer
                return
            data = bytes(self._preface[len(h2.PREFACE) :])
            self._preface = None
        _Connection.data_received(self, data)  # (no super object per read)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.relay.clients.discard(self)
        if self._drain_timer is not None:
            self._drain_timer.cancel()
        for stream in list(self.streams.values()):
            self._cancel(stream)
        self.relay.flush()
        self.relay.check_quiet()

    def _last_stream(self) -> int:
        return self.last_sid

    # --- limits -----------------------------------------------------------------------------

    def idle_frame(self) -> None:
        if not self._idle_frames.take():
            useful, self.useful = self.useful, 0
            self._idle_frames.tokens = min(_IDLE_FRAMES_BURST, self._idle_frames.tokens + useful)
            if self._idle_frames.tokens < 0:
                raise ProtocolViolation(h2.ENHANCE_YOUR_CALM, "a flood of frames doing no work")

    def settings_frame(self) -> None:
        if not self._settings.take():
            raise ProtocolViolation(h2.ENHANCE_YOUR_CALM, "a flood of SETTINGS")

    def on_ping(self) -> None:
        """grpc's keepalive enforcement: a PING without data in between that comes sooner
        than the minimum interval after the last is a strike; too many end the connection."""
        now = time.monotonic()
        if self.useful == 0 and now - self._ping_at < self.relay.limits.min_ping_interval:
            self._ping_strikes += 1
            if self._ping_strikes > self.relay.limits.max_ping_strikes:
                raise ProtocolViolation(h2.ENHANCE_YOUR_CALM, "too_many_pings")
        elif self.useful:
            self._ping_strikes = 0
        self._ping_at = now
        self.useful = 0

    def on_ping_ack(self, payload: bytes) -> None:
        if payload == _DRAIN_PING:
            self._final_goaway()

    def _refused(self, sid: int) -> None:
        """A stream the relay ends for its peer's doing: counted as a rapid reset would be."""
        if not self._resets.take():
            raise ProtocolViolation(h2.ENHANCE_YOUR_CALM, "too many cancelled streams")

    # --- streams ----------------------------------------------------------------------------

    def reset(self, sid: int, code: int, *, peer_caused: bool = True) -> None:
        """RST_STREAM, remembering the id so the client's late frames on it are ignored."""
        self.write(h2.rst_stream(sid, code))
        self._ended(sid, True)
        if peer_caused:
            self._refused(sid)

    def _ended(self, sid: int, reset: bool) -> None:
        ended = self.ended
        ended[sid] = reset
        if len(ended) > _CLOSED_MEMORY:
            ended.popitem(last=False)

    def stream_error(self, sid: int, code: int) -> None:
        stream = self.streams.get(sid)
        if stream is not None:
            self._cancel(stream)
        elif sid > self.last_sid:
            if sid % 2 == 0:
                raise ProtocolViolation(h2.PROTOCOL_ERROR, f"stream {sid} cannot open")
            self.last_sid = sid  # an idle stream errs into closed
        self.reset(sid, code)

    def unknown_stream_frame(self, sid: int, ftype: int) -> None:
        if sid > self.last_sid:
            raise ProtocolViolation(h2.PROTOCOL_ERROR, f"a frame ({ftype}) on idle stream {sid}")
        # A closed stream: WINDOW_UPDATE and RST_STREAM may still arrive (§5.1), ignored.

    def drain(self) -> None:
        """Shutting down: GOAWAY with the highest id and a PING; once it is answered (or
        after a second) GOAWAY with the last stream the relay saw. Calls in flight finish."""
        if self.drain_phase == 0:
            self.drain_phase = 1
            self.write(h2.goaway(h2.MAX_WINDOW, h2.NO_ERROR) + h2.frame(h2.PING, 0, 0, _DRAIN_PING))
            loop = asyncio.get_running_loop()
            self._drain_timer = loop.call_later(_DRAIN_PING_SECONDS, self._final_goaway)

    def _final_goaway(self) -> None:
        if self.drain_phase != 1:
            return
        self.drain_phase = 2
        if self._drain_timer is not None:
            self._drain_timer.cancel()
        self.write(h2.goaway(self.last_sid, h2.NO_ERROR))
        if not self.streams:
            self.close()
        self.relay.flush()
        self.relay.check_quiet()

    def forget(self, stream: _Stream) -> None:
        if stream.fanout is not None:
            stream.fanout.leave(stream)
        if self.streams.pop(stream.cid, None) is not None:
            self._ended(stream.cid, False)
            # Request bytes it never passed on (reset, answered, or failed before they
            # went) were taken from the connection's window: they come back, or a
            # long-lived connection's window shrinks for good. A replay's were credited.
            queue = stream.to_upstream
            if queue:
                unsent = sum(len(payload) for _, _, payload in queue)
                queue.clear()
                if unsent > stream.resent:
                    self.credit(unsent - stream.resent)
        self.blocked.pop(stream, None)
        # The window the stream's upstream was granted and never used goes back.
        self.budget += stream.upstream_recv + stream.queued
        stream.upstream_recv = stream.queued = 0
        if self.starved:
            self.starved.pop(stream, None)
            self.feed_starved()
        if self.drain_phase == 2 and not self.streams:
            self.close()
            self.relay.check_quiet()

    def feed_starved(self) -> None:
        """Budget came back: grant it to the streams that waited for it, oldest first
        (one not opened yet waits for its first window: its pool opens it now)."""
        starved, self.starved = self.starved, {}
        for stream in starved:
            if self.budget <= 0:
                self.starved[stream] = None
            elif stream.done or self.closed or self.closing:
                continue  # (a closing client's streams are cancelled, not opened)
            elif stream.upstream is None:
                self.relay.pools[stream.decision.upstream].open(stream)
            else:
                _grant(stream)

    def on_headers(self, sid: int, flags: int, block: bytes) -> None:
        headers, malformed = self.decoder.checked(block)  # always: the HPACK state moves on
        stream = self.streams.get(sid)
        if stream is not None:  # trailers from the client: only an end of stream means much
            if stream.client_ended:
                self.stream_error(sid, h2.STREAM_CLOSED)
            elif not flags & h2.END_STREAM or h2.trailer_error(headers) is not None:
                self.stream_error(sid, h2.PROTOCOL_ERROR)  # malformed (§8.1)
            else:
                self._end_request(stream, b"")
            return
        if sid <= self.last_sid:
            reset = self.ended.get(sid)
            if reset:
                return  # a stream the relay reset: late frames are ignored (§5.1)
            if reset is None:  # never opened: an unexpected stream id (§5.1.1)
                raise ProtocolViolation(h2.PROTOCOL_ERROR, f"stream {sid} cannot open")
            raise ProtocolViolation(h2.STREAM_CLOSED, f"HEADERS on closed stream {sid}")
        if sid % 2 == 0:
            raise ProtocolViolation(h2.PROTOCOL_ERROR, f"stream {sid} cannot open")
        self.last_sid = sid
        if malformed is not None:
            self._malformed(sid, flags, malformed)
            return
        if self.drain_phase == 2 or len(self.streams) >= self.relay.max_streams:
            self.reset(sid, h2.REFUSED_STREAM)
            return
        self.useful += 1
        stream = _Stream(self, sid, _UNDECIDED, b"")
        stream.headers = headers
        self.streams[sid] = stream
        stream.client_ended = bool(flags & h2.END_STREAM)
        self.relay.opening.append(stream)  # decided once this read is handled

    def decide(self, stream: _Stream) -> None:
        """Asks the front door where the call goes, then opens it upstream or holds its
        request for an answer from the front (DATA of the same read is queued already)."""
        headers, stream.headers = stream.headers, None
        if headers is None:
            raise RuntimeError("a stream decided twice")
        try:
            decision = self.relay.decide(headers, self.peer, self.relay.up)
        except Exception:  # a bug costs this call, not the connection's others
            log.exception("deciding a call failed")
            decision = _FAILED
        stream.decision = decision
        if decision.status is not None:
            self._answer_status(stream, decision.status)
            return
        block = decision.block
        stream.request = block if block is not None else h2.header_block(decision.headers)
        if decision.answer is not None or decision.share is not None:
            # Opened upstream only if the whole request finds no answer (or no fan-out).
            stream.held = sum(len(payload) for _, _, payload in stream.to_upstream)
            if stream.client_ended or stream.held >= _HOLD_BYTES:
                self._pass_on(stream, 0)
        else:
            self.relay.pools[decision.upstream].open(stream)  # deciding is done after the read

    def _malformed(self, sid: int, flags: int, malformed: h2.Malformed) -> None:
        """A malformed request reaches neither `decide` nor an upstream. It is answered
        INVALID_ARGUMENT (trailers only), so a gRPC client sees a precise status rather
        than the INTERNAL it makes of a bare reset, and, when HTTP/2 itself calls it
        malformed, then reset: the stream error RFC 9113 §8.1.1 asks for."""
        log.info("refusing a malformed request from %s: %s", self.peer, malformed.reason)
        message = f"malformed request: {malformed.reason}"
        if malformed.grpc:
            self._refused(sid)
            ended = bool(flags & h2.END_STREAM)
            self._respond(sid, ended, grpc.StatusCode.INVALID_ARGUMENT, message)
        else:
            status = h2.grpc_status_headers(
                grpc.StatusCode.INVALID_ARGUMENT.value[0], message, False
            )
            self.write(h2.headers_frames(sid, h2.header_block(status), h2.END_STREAM))
            self.reset(sid, h2.PROTOCOL_ERROR)

    def _answer_status(self, stream: _Stream, status: grpc.Status) -> None:
        """Answers a decided stream with `status` without opening it upstream."""
        stream.done = True
        self.forget(stream)  # which credits the request bytes that came with its HEADERS
        code = status.code
        trailers = status.trailing_metadata
        self._respond(stream.cid, stream.client_ended, code, status.details, trailers)
        if stream.decision.finish is not None:
            details = has_details(trailers)
            self.relay.later.append(lambda: _finish(stream, code, details))

    def _respond(
        self,
        sid: int,
        ended: bool,
        code: grpc.StatusCode,
        message: str,
        metadata: Iterable[tuple[str, str | bytes]] = (),
    ) -> None:
        """A trailers-only response from the relay itself to a stream it never opened
        upstream (`ended`: the client had sent all of its request)."""
        status = h2.grpc_status_headers(code.value[0], message, False, metadata)
        self.write(h2.headers_frames(sid, h2.header_block(status), h2.END_STREAM))
        if ended:
            self._ended(sid, False)
        else:
            self.reset(sid, h2.NO_ERROR, peer_caused=False)

    def on_data(self, sid: int, flags: int, payload: bytes) -> None:
        stream = self.streams.get(sid)
        if stream is None or stream.client_ended:
            if sid > self.last_sid:
                raise ProtocolViolation(h2.PROTOCOL_ERROR, "DATA on an idle stream")
            self.credit(len(payload))  # nothing to pass on
            if stream is not None:  # half-closed (remote): a stream error (§5.1)
                self.stream_error(sid, h2.STREAM_CLOSED)
            elif not self.ended.get(sid):
                raise ProtocolViolation(h2.STREAM_CLOSED, f"DATA on closed stream {sid}")
            return
        stream.client_recv -= len(payload)
        if stream.client_recv < 0:
            raise ProtocolViolation(h2.FLOW_CONTROL_ERROR, "more DATA than the stream window")
        data = h2.unpad(flags, payload)
        if len(data) < len(payload):
            self.credit(len(payload) - len(data))
        if flags & h2.END_STREAM:
            self._end_request(stream, data)
        elif data:  # an empty DATA frame is never passed on (back ends count them)
            stream.to_upstream.append((h2.DATA, 0, data))
            self._pass_on(stream, len(data))

    def _end_request(self, stream: _Stream, data: bytes) -> None:
        stream.client_ended = True
        stream.to_upstream.append((h2.DATA, h2.END_STREAM, data))
        self._pass_on(stream, len(data))

    def _pass_on(self, stream: _Stream, size: int) -> None:
        if stream.held < 0:
            _send(stream, True)
            return
        stream.held += size
        if stream.client_ended:
            body = b"".join(payload for _, _, payload in stream.to_upstream)
            message = _single_message(body)
            share = stream.decision.share
            if share is not None:
                if message is not None:
                    self.credit(stream.held)  # the request was consumed here
                    stream.held = -1
                    stream.to_upstream.clear()
                    _Fanout.join(stream, share, body)
                    # A watcher keeps neither its request block nor the share's (a fan-out
                    # keeps what its stream needs): thousands of them stay open.
                    stream.request = b""
                    stream.decision = stream.decision._replace(share=None)
                    return
                reply = None
            elif stream.decision.answer is None:
                raise RuntimeError("a held request ended without the front's answer")
            else:
                reply = stream.decision.answer(message) if message is not None else None
            if isinstance(reply, Decision):
                stream.decision = reply
                if reply.status is not None:
                    stream.held = -1
                    self._answer_status(stream, reply.status)
                    return
                block = reply.block
                stream.request = block if block is not None else h2.header_block(reply.headers)
            elif reply is not None:
                self._answer(stream, reply)
                return
        elif stream.held < _HOLD_BYTES:
            return
        stream.held = -1
        self.relay.opening.append(stream)

    def _answer(self, stream: _Stream, reply: bytes) -> None:
        """Responds with `reply` (status OK) without the upstream; DATA frames of at most
        16 KiB, whatever the message's size (SETTINGS_MAX_FRAME_SIZE)."""
        self.credit(stream.held)  # the request was consumed here
        stream.held = -1
        stream.to_upstream.clear()
        stream.upstream_ended = stream.response_started = True
        stream.code = grpc.StatusCode.OK
        message = b"\x00" + len(reply).to_bytes(4, "big") + reply
        stream.queued += len(message)  # buffered here like an upstream's, from the budget
        self.budget -= len(message)
        stream.to_client.extend(
            (
                (h2.HEADERS, 0, _RESPONSE_BLOCK),
                (h2.DATA, 0, message),
                (h2.HEADERS, h2.END_STREAM, _OK_BLOCK),
            )
        )
        _send(stream, False)

    def on_reset(self, sid: int, code: int) -> None:
        stream = self.streams.get(sid)
        if stream is None:
            self.unknown_stream_frame(sid, h2.RST_STREAM)
            return
        self._refused(sid)
        self._cancel(stream)

    def _cancel(self, stream: _Stream) -> None:
        """The client gave up on the call (or broke it): so does the upstream."""
        stream.done = True
        self.forget(stream)
        upstream = stream.upstream
        if upstream is not None:
            upstream.forget(stream)
            if stream.uid:
                upstream.write(h2.rst_stream(stream.uid, h2.CANCEL))
        _finish(stream, grpc.StatusCode.CANCELLED)

    def on_goaway(self, last_stream_id: int) -> None:
        self.drain_phase = 2
        if not self.streams:
            self.close()


class _Host:
    """The client side of a stream the relay opens upstream for itself (a fan-out's shared
    stream, a `_Many`): what `_send`, `_grant`, `_passed` and the pool ask of a client. It
    takes every byte at once (its windows and budget never run out), so the upstream is
    never held back by it; what it passes on is bounded where it goes."""

    __slots__ = ("blocked", "budget", "relay", "send_window", "starved", "useful")
    peer_initial_window = h2.MAX_WINDOW
    paused = closing = closed = False

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self.send_window = h2.MAX_WINDOW
        self.budget = 1 << 62  # the windows granted upstream are used up at once
        self.starved: dict[_Stream, None] = {}
        self.blocked: dict[_Stream, None] = {}
        self.useful = 0

    def write(self, data: bytes) -> None:
        """Frames for the stream's client (window updates): none is needed."""

    def credit(self, n: int) -> None:
        """The stream's request bytes were passed on: nobody waits for credit."""

    def feed_starved(self) -> None:
        """Never starved: its budget is not spent."""


class _Fanout(_Host):
    """One upstream stream shared by equal calls (`Share`): its frames are copied to each
    caller's stream, where the relay's flow control toward that client applies as for a
    relayed stream, and kept (up to `_FANOUT_HISTORY`, and `_FANOUTS_HISTORY` for all) so
    a late joiner gets them all from the first, as a call of its own would. To the relay
    it stands for the shared stream's client (the methods `_send`, `_grant` and the pool
    ask of one): it takes every byte at once, so the upstream is never held back by a slow
    caller; that caller is reset alone once it has `_WATCHER_LAG` bytes unwritten or its
    connection's buffer budget is spent. The last caller leaving cancels the upstream.
    Its stream may be a watch of a `_Many` instead of a stream of its own (`Share.many`)."""

    __slots__ = (
        "admission", "code", "details", "frames", "key", "many", "size", "stream", "watch_id",
        "watchers",
    )  # fmt: skip

    def __init__(self, relay: Relay, key: bytes) -> None:
        super().__init__(relay)
        self.key = key
        self.many: _Many | None = None  # the stream carrying its watch, while it does
        self.watch_id = 0
        self.frames: list[tuple[int, int, bytes]] | None = []  # None: too long, no joiner
        self.size = 0
        self.watchers: dict[_Stream, asyncio.TimerHandle] = {}  # and their deadlines
        self.stream: _Stream | None = None  # the shared one, until it ends
        self.code, self.details = _UNKNOWN, False  # how it ended
        self.admission: _Admission | None = None  # its caller's, while it is open

    @staticmethod
    def join(stream: _Stream, share: Share, body: bytes) -> None:
        """`stream` (its request whole, `body`) watches the fan-out of its key and request,
        opened upstream now if there is none."""
        relay = stream.client.relay
        # A digest, not the bytes (a caller's key holds its identity assertion): thousands
        # of fan-outs stay open. SHA-256: no two keys meet.
        key = hashlib.sha256(share.key + body).digest()
        fanout = relay.fanouts.get(key)
        if fanout is None:
            fanout = relay.fanouts[key] = _Fanout(relay, key)
            upstream = stream.decision.upstream
            shared = _Stream(cast(_Client, fanout), 1, Decision(upstream, []), share.block)
            shared.client_ended = True
            shared.to_upstream.append((h2.DATA, h2.END_STREAM, body))
            fanout.stream = shared
            _Admission.enter(fanout, share)
            if share.many is None or not _Many.carry(fanout, share.key, share.many, body):
                relay.pools[upstream].open(shared)
        stream.fanout = fanout
        loop = asyncio.get_running_loop()
        fanout.watchers[stream] = loop.call_later(share.deadline, fanout.expire, stream)
        for frame in fanout.frames or ():
            fanout.give(stream, frame)

    def give(self, stream: _Stream, frame: tuple[int, int, bytes]) -> None:
        """Queues one of the shared stream's frames to a caller's and writes what it can."""
        if stream.done or stream.upstream_ended:
            return
        ftype, flags, payload = frame
        if ftype == h2.DATA:
            client = stream.client
            stream.queued += len(payload)  # buffered from its connection's budget
            client.budget -= len(payload)
            if stream.queued > _WATCHER_LAG or client.budget < 0:
                self.drop(stream)
                return
        if flags & h2.END_STREAM:
            stream.upstream_ended = True
            stream.code, stream.details = self.code, self.details
        stream.response_started = True
        stream.to_client.append(frame)
        _send(stream, False)

    def drop(self, stream: _Stream) -> None:
        """A caller that does not read: reset, alone."""
        log.info("resetting a watcher of a shared stream: its client does not read")
        stream.done = True
        client = stream.client
        client.forget(stream)
        client.reset(stream.cid, h2.ENHANCE_YOUR_CALM, peer_caused=False)
        _finish(stream, grpc.StatusCode.RESOURCE_EXHAUSTED)

    def expire(self, stream: _Stream) -> None:
        """A caller's deadline passed: it ends as a call of its own would."""
        self.leave(stream)
        if stream.done or stream.upstream_ended:  # its trailers are out or on their way
            return
        _fail(stream, grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")
        self.relay.flush()

    def refuse(self, status: grpc.Status) -> None:
        """Its caller is refused now (revoked): every watcher ends with the refusal's
        status, and the shared stream with the last of them."""
        for stream in list(self.watchers):
            self.leave(stream)
            if not stream.done and not stream.upstream_ended:
                _finish(stream, status.code)
                _fail(stream, status.code, status.details, status.trailing_metadata)

    def leave(self, stream: _Stream) -> None:
        """A caller is gone; the last one takes the shared stream with it (CANCEL)."""
        stream.fanout = None
        timer = self.watchers.pop(stream, None)
        if timer is not None:
            timer.cancel()
        shared = self.stream
        if self.watchers or shared is None:
            return
        self._forget()
        shared.done = True
        if self.many is not None:
            self.many.cancel(self.watch_id)
            self.many = None
        upstream = shared.upstream
        if upstream is not None:
            upstream.forget(shared)
            if shared.uid:
                upstream.write(h2.rst_stream(shared.uid, h2.CANCEL))

    def _forget(self) -> None:
        """No new caller joins this one (it ended or is ending), and it is re-admitted no
        more."""
        self.stream = None
        self._closed_to_joiners()
        if self.admission is not None:
            self.admission.leave(self)
            self.admission = None

    def _closed_to_joiners(self) -> None:
        """Its kept frames go: those watching go on, a new caller opens a stream anew."""
        if self.frames is not None:
            self.relay.fanout_bytes -= self.size
            self.frames = None
        if self.relay.fanouts.get(self.key) is self:
            del self.relay.fanouts[self.key]

    def _add(self, frame: tuple[int, int, bytes]) -> None:
        frames = self.frames
        if frames is not None:
            n = len(frame[2])
            relay = self.relay
            if self.size + n > _FANOUT_HISTORY or relay.fanout_bytes + n > _FANOUTS_HISTORY:
                self._closed_to_joiners()
            else:
                frames.append(frame)
                self.size += n
                relay.fanout_bytes += n
        for stream in list(self.watchers):
            self.give(stream, frame)

    # What the relay asks of the shared stream's client.

    def write_headers(self, sid: int, block: bytes, flags: int) -> None:
        shared = self.stream
        if flags & h2.END_STREAM and shared is not None:
            upstream = shared.upstream
            if shared.trailers and upstream is not None:
                self.code, self.details = upstream.status(shared.trailers)
            else:  # the relay's own (`_fail`)
                self.code, self.details = shared.code, shared.details
        self._add((h2.HEADERS, flags, block))

    def write_frame(self, ftype: int, flags: int, sid: int, payload: bytes) -> None:
        self.send_window = h2.MAX_WINDOW  # (`_send` takes the size off after this)
        if self.stream is not None:
            self.stream.to_client.window = h2.MAX_WINDOW
        self._add((ftype, flags, payload))

    def forget(self, stream: _Stream) -> None:
        """The shared stream ended (its trailers were copied) or was reset."""
        self._forget()

    def reset(self, sid: int, code: int, *, peer_caused: bool = True) -> None:
        """The upstream reset the shared stream: so is every caller's, with its code."""
        for stream in list(self.watchers):
            stream.done = True
            stream.client.forget(stream)
            stream.client.reset(stream.cid, code, peer_caused=False)
            _finish(stream, _RST_STATUS.get(code, grpc.StatusCode.INTERNAL))


class _Admission:
    """The admission a caller's fan-outs passed (one `Share.key`: its token, identity and
    headers), made again every `_RECHECK_SECONDS` while any is open, once for all of them:
    refused now (a revoked token, a role taken away), they all end with the refusal."""

    __slots__ = ("fanouts", "key", "refusal", "relay", "timer")

    def __init__(self, relay: Relay, key: bytes, refusal: Callable[[], grpc.Status | None]):
        self.relay = relay
        self.key = key
        self.refusal = refusal
        self.fanouts: dict[_Fanout, None] = {}
        self.timer = asyncio.get_running_loop().call_later(_RECHECK_SECONDS, self.recheck)

    @staticmethod
    def enter(fanout: _Fanout, share: Share) -> None:
        admissions = fanout.relay.admissions
        admission = admissions.get(share.key)
        if admission is None:
            admission = admissions[share.key] = _Admission(fanout.relay, share.key, share.refusal)
        admission.fanouts[fanout] = None
        fanout.admission = admission

    def leave(self, fanout: _Fanout) -> None:
        self.fanouts.pop(fanout, None)
        if not self.fanouts:
            self.timer.cancel()
            if self.relay.admissions.get(self.key) is self:
                del self.relay.admissions[self.key]

    def recheck(self) -> None:
        status = self.refusal()
        if status is None:
            self.timer = asyncio.get_running_loop().call_later(_RECHECK_SECONDS, self.recheck)
            return
        if self.relay.admissions.get(self.key) is self:
            del self.relay.admissions[self.key]
        for fanout in list(self.fanouts):
            fanout.refuse(status)
        self.relay.flush()


class _Many(_Host):
    """One upstream stream carrying the shared streams of many fan-outs (of different
    requests of one `Share.key`) as watches of taskproc's WatchWorkflows, each under a
    watch_id of its own: a watch costs the back end a task, not a stream (≈ 25 KB in
    grpc.aio). Each fan-out's stream is fed here as an upstream stream would feed it:
    response headers before its first events, a gRPC message per event, and trailers
    made of its watch's end (code, message, details), so its callers see what a stream of
    its own would have answered. A watch's end is its alone; the stream's end (the back
    end restarted, its connection lost) is every open watch's, and the next fan-out opens
    a new stream. A back end without the method (UNIMPLEMENTED: an older replica) gets a
    stream per fan-out, for `_MANY_REFUSED_SECONDS`. At most `_MANY_WATCHES` watches per
    stream; the stream ends (its requests' end) once its last watch has."""

    __slots__ = ("broken", "buffer", "key", "next_id", "stream", "upstream", "watches")

    def __init__(self, relay: Relay, key: bytes, upstream: str, block: bytes) -> None:
        super().__init__(relay)
        self.key = key
        self.upstream = upstream
        self.watches: dict[int, _Stream] = {}  # fan-outs' shared streams by watch_id
        self.next_id = 0
        self.buffer = bytearray()  # response bytes not yet a whole message
        self.broken = False  # it sent what no WatchWorkflows sends: ending
        self.stream = _Stream(cast(_Client, self), 1, Decision(upstream, []), block)
        relay.pools[upstream].open(self.stream)

    @staticmethod
    def carry(fanout: _Fanout, key: bytes, block: bytes, body: bytes) -> bool:
        """Opens `fanout`'s stream (its request `body`, one gRPC message) as a watch of
        the `_Many` of `key`; False when its back end does not take them now."""
        shared = fanout.stream
        if shared is None:
            raise RuntimeError("a fan-out carried without its stream")
        relay, upstream = fanout.relay, shared.decision.upstream
        if relay.many_refused.get(upstream, 0.0) > time.monotonic():
            return False
        try:  # one that does not decode fails alone, on its own stream, not the others'
            request = wf_pb.WatchWorkflowRequest.FromString(body[5:])
        except DecodeError:
            return False
        many = relay.manys.get(key)
        if many is None or len(many.watches) >= _MANY_WATCHES:
            many = relay.manys[key] = _Many(relay, key, upstream, block)
        many.next_id += 1
        watch_id = many.next_id
        many.watches[watch_id] = shared
        fanout.many, fanout.watch_id = many, watch_id
        watch = wf_pb.WorkflowWatch(watch_id=watch_id, request=request)
        many.send(wf_pb.WatchWorkflowsRequest(watch=watch))
        return True

    def send(self, request: wf_pb.WatchWorkflowsRequest) -> None:
        stream = self.stream
        if stream.client_ended or stream.done:
            return
        stream.to_upstream.append((h2.DATA, 0, _message(request.SerializeToString())))
        _send(stream, True)

    def cancel(self, watch_id: int) -> None:
        """A fan-out's last caller left: its watch ends with no answer."""
        if self.watches.pop(watch_id, None) is not None:
            self.send(wf_pb.WatchWorkflowsRequest(cancel=watch_id))
            self._end_if_idle()

    def _end_if_idle(self) -> None:
        """No watch left: the stream ends with its requests (the back end answers OK)."""
        if self.watches:
            return
        self._forget()
        stream = self.stream
        if not stream.client_ended and not stream.done:
            stream.client_ended = True
            stream.to_upstream.append((h2.DATA, h2.END_STREAM, b""))
            _send(stream, True)

    def _forget(self) -> None:
        """No new watch goes on this stream."""
        if self.relay.manys.get(self.key) is self:
            del self.relay.manys[self.key]

    # What the relay asks of the stream's client.

    def write_headers(self, sid: int, block: bytes, flags: int) -> None:
        """Its response headers say nothing to pass on; its trailers end every watch."""
        if flags & h2.END_STREAM:
            self._ended(block)

    def write_frame(self, ftype: int, flags: int, sid: int, payload: bytes) -> None:
        self.send_window = h2.MAX_WINDOW  # (`_send` takes the size off after this)
        self.stream.to_client.window = h2.MAX_WINDOW
        if self.broken:
            return
        buffer = self.buffer
        buffer += payload
        while len(buffer) >= 5:
            size = int.from_bytes(buffer[1:5], "big")
            if buffer[0] != 0 or size > _MANY_MESSAGE:
                self._broken("a compressed or oversized WatchWorkflows message")
                return
            if len(buffer) < 5 + size:
                break
            message = bytes(buffer[5 : 5 + size])
            del buffer[: 5 + size]
            try:
                reply = wf_pb.WatchWorkflowsResponse.FromString(message)
            except DecodeError:
                self._broken("an undecodable WatchWorkflows message")
                return
            self._deliver(reply)
        if flags & h2.END_STREAM:  # a response ending without trailers
            self._ended(b"")

    def _deliver(self, reply: wf_pb.WatchWorkflowsResponse) -> None:
        shared = self.watches.get(reply.watch_id)
        if shared is None or shared.done:
            return  # cancelled meanwhile
        if reply.HasField("end"):
            del self.watches[reply.watch_id]
            self._end_watch(shared, reply.end)
            self._end_if_idle()
            return
        data = b"".join(_message(event.SerializeToString()) for event in reply.events.events)
        if not data:
            return
        if not shared.response_started:
            shared.response_started = True
            shared.to_client.append((h2.HEADERS, 0, _RESPONSE_BLOCK))
        shared.queued += len(data)
        shared.to_client.append((h2.DATA, 0, data))
        _send(shared, False)

    @staticmethod
    def _end_watch(shared: _Stream, status: status_pb2.Status) -> None:
        """The trailers a stream of its own would have ended with, for `status`."""
        error = rpc_error_of(status)
        shared.code, shared.details = error.code(), bool(status.details)
        fields = h2.grpc_status_headers(
            status.code, status.message, shared.response_started, error.trailing_metadata()
        )
        shared.upstream_ended = shared.response_started = True
        shared.to_client.append((h2.HEADERS, h2.END_STREAM, h2.header_block(fields)))
        _send(shared, False)

    def _ended(self, trailers: bytes) -> None:
        """The stream ended: its open watches with its status (UNAVAILABLE for an OK with
        watches open); UNIMPLEMENTED sends each on a stream of its own."""
        self._forget()
        status = _trailers_status(trailers)
        if status.code == grpc.StatusCode.UNIMPLEMENTED.value[0]:
            self.relay.many_refused[self.upstream] = time.monotonic() + _MANY_REFUSED_SECONDS
            watches, self.watches = self.watches, {}
            for shared in watches.values():
                fanout = cast(_Fanout, shared.client)
                fanout.many = None
                if not shared.done and not shared.response_started:
                    self.relay.pools[self.upstream].open(shared)
            return
        if status.code == 0:
            status = status_pb2.Status(
                code=grpc.StatusCode.UNAVAILABLE.value[0],
                message="the back end ended WatchWorkflows with watches open",
            )
        self._fail_watches(status)

    def _broken(self, reason: str) -> None:
        """The back end sent what no WatchWorkflows sends: the stream goes, and its
        watches with it (UNAVAILABLE, as a broken connection's streams)."""
        log.warning("ending a WatchWorkflows stream: %s", reason)
        self.broken = True
        self.buffer.clear()
        asyncio.get_running_loop().call_soon(self._fail, reason)  # not inside `_send`

    def _fail(self, reason: str) -> None:
        if not self.stream.done:
            _fail(self.stream, grpc.StatusCode.UNAVAILABLE, reason)  # our trailers: `_ended`
            self.relay.flush()

    def _fail_watches(self, status: status_pb2.Status) -> None:
        watches, self.watches = self.watches, {}
        for shared in watches.values():
            cast(_Fanout, shared.client).many = None
            if not shared.done:
                self._end_watch(shared, status)

    def forget(self, stream: _Stream) -> None:
        """The stream ended (its trailers were read) or was reset."""
        self._forget()

    def reset(self, sid: int, code: int, *, peer_caused: bool = True) -> None:
        """The upstream reset the stream: so is every watch's, as its own would be."""
        watches, self.watches = self.watches, {}
        for shared in watches.values():
            fanout = cast(_Fanout, shared.client)
            fanout.many = None
            if not shared.done:
                shared.done = True
                fanout.forget(shared)
                fanout.reset(shared.cid, code)


def _message(payload: bytes) -> bytes:
    return b"\x00" + len(payload).to_bytes(4, "big") + payload


_TRAILERS = h2.HeaderDecoder(_MAX_HEADER_BLOCK, table_size=0)


def _trailers_status(block: bytes) -> status_pb2.Status:
    """The gRPC status of a trailers block (no dynamic table: an upstream's, or the
    relay's own), with its message and details; UNKNOWN if it has none."""
    unknown = status_pb2.Status(code=_UNKNOWN.value[0], message="no status in the trailers")
    try:
        fields = dict(_TRAILERS.decode(block)) if block else {}
    except ProtocolViolation:
        return unknown
    raw = fields.get(b"grpc-status", b"")
    if not raw.isdigit():
        return unknown
    details = fields.get(b"grpc-status-details-bin")
    if details is not None:
        with contextlib.suppress(ValueError, DecodeError):
            return status_pb2.Status.FromString(
                base64.b64decode(details + b"=" * (-len(details) % 4))
            )
    message = unquote(fields.get(b"grpc-message", b"").decode("utf-8", "replace"))
    return status_pb2.Status(code=int(raw), message=message)


class _Pool:
    """Connections to one upstream, opened as streams need them: never more streams on a
    connection than its SETTINGS_MAX_CONCURRENT_STREAMS, never more connections than the
    limit; a call beyond both waits for a stream to end."""

    def __init__(self, relay: Relay, endpoint: Endpoint) -> None:
        self.relay = relay
        self.endpoint = endpoint
        self.conns: list[_Upstream] = []
        self.queue: deque[_Stream] = deque()
        self.down_until = 0.0
        self.waking: asyncio.TimerHandle | None = None  # the end of a refusal pause

    def open(self, stream: _Stream) -> bool:
        """Opens `stream` on a connection with room; False when none has (it waits in the
        queue). A stream whose client cannot pay its first window waits for budget."""
        client = stream.client
        if client.budget < _FIRST_GRANT:
            client.starved[stream] = None  # opened by feed_starved once budget comes back
            return True
        now = time.monotonic()
        paused_until = 0.0  # the earliest end of a pause among connections with room
        for conn in self.conns:
            if conn.usable and len(conn.streams) + len(conn.waiting) < conn.max_streams:
                if conn.paused_until <= now:
                    break
                paused_until = min(paused_until or conn.paused_until, conn.paused_until)
        else:
            if len(self.conns) >= self.relay.limits.upstream_connections:
                self.queue.append(stream)
                if paused_until and self.waking is None:
                    self.waking = asyncio.get_running_loop().call_later(
                        paused_until - now, self.retry
                    )
                return False
            conn = _Upstream(self.relay, self)
            self.conns.append(conn)
            conn.connecting = asyncio.ensure_future(conn.connect())
        client.budget -= _FIRST_GRANT  # the upstream's initial window for the stream
        stream.upstream_recv = _FIRST_GRANT
        stream.upstream = conn
        conn.open(stream)
        return True

    def next(self) -> None:
        """A stream ended or a connection went: calls that waited may go now."""
        queue = self.queue
        while queue:
            stream = queue.popleft()
            if stream.done:
                continue
            if not self.open(stream):  # still no room: back to the head of the line
                queue.remove(stream)
                queue.appendleft(stream)
                return

    def retry(self) -> None:
        """A refused stream's delay (or a pause) is over: send what waits, if there is
        room now."""
        if self.waking is not None:
            self.waking.cancel()
            self.waking = None
        self.next()
        self.relay.flush()

    def fail_queued(self, message: str) -> None:
        queue, self.queue = self.queue, deque()
        for stream in queue:
            _finish(stream, grpc.StatusCode.UNAVAILABLE)
            _fail(stream, grpc.StatusCode.UNAVAILABLE, message)


class _Upstream(_Connection):
    """One connection to an upstream (the relay is the HTTP/2 client)."""

    toward_upstream = True

    def __init__(self, relay: Relay, pool: _Pool) -> None:
        # The connection window: 1 GiB, credited as DATA arrives; what bounds a client's
        # share of it is the per-stream windows granted from the client's budget.
        super().__init__(relay, 1 << 30)
        self.pool = pool
        # No dynamic table: a response block that uses one fails to decode (item 8 of #16).
        self.decoder = h2.HeaderDecoder(_MAX_HEADER_BLOCK, table_size=0)
        self.next_id = 1
        self.max_streams = _UPSTREAM_FIRST_STREAMS
        self.settled = False  # its first SETTINGS arrived
        self.usable = True
        self.paused_until = 0.0  # it refused a stream: no new ones until then
        self.waiting: list[_Stream] = []  # opened before the connection was up
        self.connecting: asyncio.Future[None] | None = None
        self._statuses: dict[bytes, tuple[grpc.StatusCode, bool]] = {}  # trailers read

    async def connect(self) -> None:
        try:
            await self.pool.endpoint.connect(lambda: self)
        except (TimeoutError, OSError, ssl.SSLError) as exc:
            log.warning("upstream %s unreachable: %s", self.pool.endpoint.authority.decode(), exc)
            self.pool.down_until = time.monotonic() + _DOWN_SECONDS
            # The queued calls first: else the lost connection's streams, as they go, hand
            # them to a new connection to the same unreachable back end.
            self.pool.fail_queued("back end unavailable")
            self._lost("back end unavailable")
            self.relay.flush()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        self.write(
            h2.PREFACE
            + h2.settings(
                [
                    (h2.HEADER_TABLE_SIZE, 0),
                    (h2.ENABLE_PUSH, 0),
                    (h2.INITIAL_WINDOW_SIZE, _FIRST_GRANT),  # paid as each stream opens
                ]
            )
            + h2.window_update(0, self.recv_window - h2.DEFAULT_WINDOW)
        )
        waiting, self.waiting = self.waiting, []
        for stream in waiting:
            if not stream.done:
                self._start(stream)
        self.relay.flush()

    def eof_received(self) -> bool:
        self.usable = False  # no new streams here, even before connection_lost runs
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._lost("connection to the back end lost")
        self.pool.next()
        self.relay.flush()

    def _lost(self, message: str) -> None:
        self.usable = False
        with contextlib.suppress(ValueError):
            self.pool.conns.remove(self)
        for stream in [*self.waiting, *self.streams.values()]:
            _finish(stream, grpc.StatusCode.UNAVAILABLE)
            _fail(stream, grpc.StatusCode.UNAVAILABLE, message)
        self.waiting.clear()
        self.streams.clear()

    def open(self, stream: _Stream) -> None:
        if self.transport is None:
            self.waiting.append(stream)
        else:
            self._start(stream)

    def _start(self, stream: _Stream) -> None:
        sid = self.next_id
        self.next_id += 2
        if self.next_id > h2.MAX_WINDOW:
            self.usable = False  # stream ids run out: new calls take a new connection
        stream.uid = sid
        stream.to_upstream.window = self.peer_initial_window
        self.streams[sid] = stream
        end = h2.END_STREAM if stream.client_ended and not stream.to_upstream else 0
        self.write_headers(sid, stream.request, end)
        if stream.replay is None:
            stream.request = b""
        _send(stream, True)

    def forget(self, stream: _Stream) -> None:
        if stream.uid:
            self.streams.pop(stream.uid, None)
        elif stream in self.waiting:
            self.waiting.remove(stream)
        self.blocked.pop(stream, None)
        if not self.usable and not self.streams and not self.waiting:
            self.close()
        if self.pool.queue:
            self.pool.next()

    def settings_frame(self) -> None:
        if not self.settled:  # no limit in its first SETTINGS: none at all (RFC 9113 §6.5.2)
            self.settled = True
            self.max_streams = 2**31
            if self.pool.queue:
                self.relay.later.append(self.pool.next)

    def on_setting(self, key: int, value: int) -> None:
        if key == h2.MAX_CONCURRENT_STREAMS:
            self.max_streams = value
            if self.pool.queue:
                self.relay.later.append(self.pool.next)
        else:
            super().on_setting(key, value)

    def stream_error(self, sid: int, code: int) -> None:
        stream = self.streams.get(sid)
        self.write(h2.rst_stream(sid, code))
        if stream is not None:
            self._reset_by_upstream(stream, h2.INTERNAL_ERROR)

    def on_headers(self, sid: int, flags: int, block: bytes) -> None:
        self.decoder.checked(block)  # memoised; COMPRESSION_ERROR if it uses a dynamic table
        stream = self.streams.get(sid)
        end = flags & h2.END_STREAM
        if stream is None or stream.upstream_ended:
            return
        if end:
            stream.upstream_ended = True
            stream.trailers = block  # decoded for the status after the response is out
        stream.response_started = True
        stream.replay = None
        stream.request = b""
        stream.to_client.append((h2.HEADERS, end, block))
        _send(stream, False)

    def status(self, block: bytes) -> tuple[grpc.StatusCode, bool]:
        """The gRPC status in a trailers block, and whether it carries details (a back end
        repeats its few trailers blocks: they are read once, like their decoding)."""
        found = self._statuses.get(block)
        if found is not None:
            return found
        try:
            fields = dict(self.decoder.decode(block))
        except ProtocolViolation:
            return grpc.StatusCode.UNKNOWN, False
        raw = fields.get(b"grpc-status", b"")
        code = _STATUS.get(int(raw), grpc.StatusCode.UNKNOWN) if raw.isdigit() else None
        found = code or grpc.StatusCode.UNKNOWN, b"grpc-status-details-bin" in fields
        if len(block) <= _STATUS_MEMO_BLOCK:
            if len(self._statuses) >= _STATUS_MEMO_ENTRIES:
                self._statuses.clear()
            self._statuses[block] = found
        return found

    def on_data(self, sid: int, flags: int, payload: bytes) -> None:
        self.credit(len(payload))  # the connection window: each stream's bounds the buffer
        stream = self.streams.get(sid)
        if stream is None or stream.upstream_ended:
            return
        stream.upstream_recv -= len(payload)
        if stream.upstream_recv < 0:
            raise ProtocolViolation(h2.FLOW_CONTROL_ERROR, "more DATA than the stream window")
        data = h2.unpad(flags, payload)
        stream.queued += len(data)
        if len(data) < len(payload):
            stream.client.budget += len(payload) - len(data)  # padding: released at once
        end = flags & h2.END_STREAM
        if end:
            stream.upstream_ended = True
        stream.response_started = True
        stream.to_client.append((h2.DATA, end, data))
        _send(stream, False)

    def on_reset(self, sid: int, code: int) -> None:
        stream = self.streams.get(sid)
        if stream is None or (stream.upstream_ended and code == h2.NO_ERROR):
            return  # after the trailers: only "stop sending"
        if code == h2.REFUSED_STREAM:
            self.paused_until = time.monotonic() + _REFUSED_PAUSE_SECONDS
            if self._retry(stream):
                return
        self._reset_by_upstream(stream, code)

    def _retry(self, stream: _Stream) -> bool:
        """A stream the upstream refused, never processed: back to the head of the pool's
        queue, to be sent again once a stream ends (or shortly), if its request was kept,
        on another connection while this one's refusal pause lasts. (grpc-core counts a
        stream against its limit until its call is released, a little after it closed;
        tens of milliseconds and more when its process is busy.)"""
        replay = stream.replay
        if replay is None or stream.response_started or stream.retries >= _RETRIES:
            return False
        self.streams.pop(stream.uid, None)
        self.blocked.pop(stream, None)
        stream.retries += 1
        stream.uid = 0
        stream.upstream = None
        stream.resent = stream.kept
        stream.to_upstream.extendleft(reversed(replay))
        stream.replay = []
        stream.kept = 0
        stream.client.budget += stream.upstream_recv  # its grant is void
        stream.upstream_recv = 0
        stream.client.starved.pop(stream, None)  # its first window is paid when it reopens
        self.pool.queue.appendleft(stream)
        loop = asyncio.get_running_loop()
        loop.call_later(0.002 * 2 ** (stream.retries - 1), self.pool.retry)  # 2 ms .. 0.26 s
        if not self.usable and not self.streams and not self.waiting:
            self.close()
        return True

    def _reset_by_upstream(self, stream: _Stream, code: int) -> None:
        stream.done = True
        self.forget(stream)
        stream.client.forget(stream)
        stream.client.reset(stream.cid, code, peer_caused=False)
        _finish(stream, _RST_STATUS.get(code, grpc.StatusCode.INTERNAL))

    def on_goaway(self, last_stream_id: int) -> None:
        """No new streams here; those it never saw were not processed: the client may
        retry them (REFUSED_STREAM)."""
        self.usable = False
        with contextlib.suppress(ValueError):
            self.pool.conns.remove(self)
        for sid, stream in list(self.streams.items()):
            if sid > last_stream_id and not self._retry(stream):
                self._reset_by_upstream(stream, h2.REFUSED_STREAM)
        if not self.streams:
            self.close()
        self.pool.next()


def _single_message(body: bytes) -> bytes | None:
    """The one uncompressed gRPC message `body` holds, if that is what it holds."""
    if len(body) >= 5 and body[0] == 0 and int.from_bytes(body[1:5], "big") == len(body) - 5:
        return body[5:]
    return None


def _peer(address: Any) -> str:
    """A gRPC-style peer string ('ipv4:1.2.3.4:5678', 'ipv6:[::1]:5678')."""
    if isinstance(address, tuple) and len(address) >= 2:
        host, port = address[0], address[1]
        return f"ipv6:[{host}]:{port}" if ":" in str(host) else f"ipv4:{host}:{port}"
    return "unknown"
