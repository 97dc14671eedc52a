"""An HTTP/2 relay for gRPC: client streams forwarded to upstream connections as frames.

The gateway's front (gateway/front.py) decides, per call, which upstream gets it and with
which request headers; this module does the HTTP/2 around that decision. Messages are never
parsed: DATA frames move between connections with their stream ids remapped, under flow
control of the relay's own on each side (credit goes back to a sender only once its bytes
were passed on, so a slow receiver holds back its sender and buffers stay bounded by the
windows advertised).

Response header blocks are relayed as they are: the relay asks every upstream for no HPACK
dynamic table (SETTINGS_HEADER_TABLE_SIZE 0), so their blocks reference nothing
connection-specific and mean the same to the client. Trailers are decoded for the status.
Request blocks are decoded (`h2.HeaderDecoder`) and the decided headers re-encoded as
literals without indexing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple, cast

import grpc

from gateway import h2
from gateway.h2 import ProtocolViolation

log = logging.getLogger("aiwfe.gateway.relay")

STREAM_WINDOW = 1 << 20  # per stream, each way: what a sender may have in flight
CONNECTION_WINDOW = 8 << 20
_STREAM_CREDIT = STREAM_WINDOW // 4  # credit is returned in batches of at least this much
_CONNECTION_CREDIT = CONNECTION_WINDOW // 4
_MAX_HEADER_BLOCK = 64 * 1024
_MAX_PINGS_WITHOUT_DATA = 100
# "Rapid reset" (CVE-2023-44487): streams opened and cancelled at once cost the upstream
# work while never counting against the concurrent-stream limit. A connection may cancel
# this many calls per second, on average, before it is closed.
_RESETS_PER_SECOND = 200.0
_RESET_BURST = 1000.0
_HOLD_BYTES = STREAM_WINDOW // 4  # a request longer than this is sent on, not answered
_DOWN_SECONDS = 1.0  # an upstream that refused a connection is not offered calls this long
_CONNECT_SECONDS = 5.0
_STATUS = {code.value[0]: code for code in grpc.StatusCode}
_RST_STATUS = {h2.CANCEL: grpc.StatusCode.CANCELLED, h2.REFUSED_STREAM: grpc.StatusCode.UNAVAILABLE}

# What the relay says itself when it answers a call.
_RESPONSE_BLOCK = h2.header_block(h2.RESPONSE_HEADERS)
_OK_BLOCK = h2.header_block(h2.grpc_status_headers(0, "", response_started=True))

Headers = h2.Headers
Finish = Callable[[grpc.StatusCode, bool], None]  # (status, trailers carried details)


class Decision(NamedTuple):
    """Where one call goes and what it carries there."""

    upstream: str
    headers: Headers
    finish: Finish | None = None  # told once how the call ended
    # Asked with the request message once it is whole (a unary call): a response message
    # the relay sends back itself, or None to send the call on after all.
    answer: Callable[[bytes], bytes | None] | None = None


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
                assert self.host is not None and self.port is not None
                await loop.create_connection(
                    factory,
                    self.host,
                    self.port,
                    ssl=self.tls,
                    server_hostname=self.host if self.tls else None,
                )


Decide = Callable[[Headers, str, Callable[[str], bool]], Decision]


class Relay:
    """Listens for clients and relays each of their calls where `decide` says."""

    def __init__(
        self,
        decide: Decide,
        upstreams: dict[str, Endpoint],
        max_streams: int,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.decide = decide
        self.max_streams = max_streams
        self.tls = tls
        self.pools = {name: _Pool(self, endpoint) for name, endpoint in upstreams.items()}
        self.clients: set[_Client] = set()
        self.dirty: list[_Connection] = []
        self.later: list[Callable[[], None]] = []
        self._server: asyncio.Server | None = None
        self._quiet = asyncio.Event()  # set while draining once no call is in flight
        self._draining = False

    def up(self, upstream: str) -> bool:
        return self.pools[upstream].down_until <= time.monotonic()

    async def start(self, host: str, port: int) -> int:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _Client(self), host, port, ssl=self.tls, reuse_address=True
        )
        return int(self._server.sockets[0].getsockname()[1])

    async def stop(self, grace: float) -> None:
        """Stops accepting, lets calls in flight finish within `grace`, then closes."""
        if self._server is not None:
            self._server.close()
        self._draining = True
        for client in list(self.clients):
            client.drain()
        self.flush()
        self.check_quiet()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._quiet.wait(), grace)
        for client in list(self.clients):
            client.close()
        for pool in self.pools.values():
            for conn in list(pool.conns):
                conn.close()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)

    def check_quiet(self) -> None:
        if self._draining and not any(c.streams for c in self.clients):
            self._quiet.set()

    def flush(self) -> None:
        """Writes what the connections have to send, then does the bookkeeping that was
        put off so as not to delay it (trailer statuses, metrics, breakers)."""
        dirty, self.dirty = self.dirty, []
        for conn in dirty:
            conn.flush()
        later, self.later = self.later, []
        for work in later:
            work()


class _Half:
    """One direction of one stream: frames waiting for the receiver's window."""

    __slots__ = ("queue", "window")

    def __init__(self) -> None:
        self.queue: deque[tuple[int, int, bytes]] = deque()  # (frame type, flags, payload)
        self.window = 0


class _Stream:
    __slots__ = (
        "cid", "client", "client_credit", "client_ended", "client_recv", "code", "decision",
        "details", "done", "held", "request", "response_started", "to_client", "to_upstream",
        "trailers", "uid", "upstream", "upstream_credit", "upstream_ended", "upstream_recv",
    )  # fmt: skip

    def __init__(self, client: _Client, cid: int, decision: Decision, request: bytes) -> None:
        self.client = client
        self.cid = cid
        self.upstream: _Upstream | None = None
        self.uid = 0
        self.decision = decision
        self.request = request  # the header block to open the upstream stream with
        self.to_upstream = _Half()
        self.to_client = _Half()
        self.to_client.window = client.peer_initial_window
        self.client_ended = False
        self.upstream_ended = False
        self.response_started = False
        self.code = grpc.StatusCode.UNKNOWN
        self.details = False
        self.done = False
        self.client_credit = 0  # owed to the client for bytes passed on
        self.upstream_credit = 0
        self.client_recv = STREAM_WINDOW  # what each side may still send us
        self.upstream_recv = STREAM_WINDOW
        self.held = -1  # request bytes held for decision.answer; -1 when not held
        self.trailers = b""  # the upstream's trailers block, once it sent them


def _send(stream: _Stream, to_upstream: bool) -> None:
    """Writes what the receiver's windows allow of one direction's queue."""
    if to_upstream:
        dest: _Connection | None = stream.upstream
        sid, half = stream.uid, stream.to_upstream
    else:
        dest, sid, half = stream.client, stream.cid, stream.to_client
    if dest is None or not sid or stream.done:
        return
    queue = half.queue
    while queue:
        ftype, flags, payload = queue[0]
        if ftype == h2.HEADERS:
            dest.write(h2.headers_frames(sid, payload, flags))
            queue.popleft()
        else:
            size = len(payload)
            n = min(size, half.window, dest.send_window)
            if n <= 0 and size:
                dest.blocked[stream] = None
                return
            last = n == size
            dest.write(h2.frame(h2.DATA, flags if last else 0, sid, payload[:n]))
            half.window -= n
            dest.send_window -= n
            if n:
                _credit(stream, not to_upstream, n)
            if last:
                queue.popleft()
            else:
                queue[0] = (ftype, flags, payload[n:])
        if flags & h2.END_STREAM and not to_upstream:
            _complete(stream)
            return


def _credit(stream: _Stream, to_upstream: bool, n: int) -> None:
    """`n` bytes the client (or, `to_upstream`, the upstream) sent have been passed on."""
    if to_upstream:
        conn: _Connection | None = stream.upstream
        sid, ended = stream.uid, stream.upstream_ended
        stream.upstream_credit += n
        owed = stream.upstream_credit if not ended else 0
    else:
        conn, sid, ended = stream.client, stream.cid, stream.client_ended
        stream.client_credit += n
        owed = stream.client_credit if not ended else 0
    if conn is None:
        return
    conn.credit(n)
    if owed >= _STREAM_CREDIT:
        conn.write(h2.window_update(sid, owed))
        if to_upstream:
            stream.upstream_credit = 0
            stream.upstream_recv += owed
        else:
            stream.client_credit = 0
            stream.client_recv += owed


def _complete(stream: _Stream) -> None:
    """The client has the whole response (trailers included): the call is over."""
    client, upstream = stream.client, stream.upstream
    stream.done = True
    client.forget(stream)
    if upstream is not None:
        upstream.forget(stream)
    if not stream.client_ended:  # the server ended early: the client may stop sending
        client.write(h2.rst_stream(stream.cid, h2.NO_ERROR))
        if upstream is not None and stream.uid:
            upstream.write(h2.rst_stream(stream.uid, h2.NO_ERROR))
    client.relay.later.append(lambda: _finish_after(stream))


def _finish_after(stream: _Stream) -> None:
    """How a completed call ended, read from its trailers once the response is out."""
    if stream.trailers and stream.upstream is not None:
        stream.code, stream.details = stream.upstream.status(stream.trailers)
    _finish(stream, stream.code, stream.details)


def _finish(stream: _Stream, code: grpc.StatusCode, details: bool = False) -> None:
    finish = stream.decision.finish
    if finish is not None:
        stream.decision = stream.decision._replace(finish=None)
        finish(code, details)


def _fail(stream: _Stream, code: grpc.StatusCode, message: str) -> None:
    """Ends a call the relay cannot complete with a gRPC status, after what was queued."""
    if stream.done:
        return
    if stream.upstream is not None:
        stream.upstream.forget(stream)
        if stream.uid:
            stream.upstream.write(h2.rst_stream(stream.uid, h2.CANCEL))
    stream.upstream_ended = True
    fields = h2.grpc_status_headers(code.value[0], message, stream.response_started)
    stream.response_started = True
    stream.to_client.queue.append((h2.HEADERS, h2.END_STREAM, h2.header_block(fields)))
    stream.code = code
    _send(stream, False)


class _Connection(asyncio.Protocol):
    """What both sides share: framing, output batching, windows, PING and SETTINGS."""

    toward_upstream = False  # which direction of a stream this connection receives

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self.transport: asyncio.Transport | None = None
        self.reader = h2.FrameReader()
        self.out = bytearray()
        self.send_window = h2.DEFAULT_WINDOW  # the peer's connection window for our DATA
        self.peer_initial_window = h2.DEFAULT_WINDOW
        self.recv_window = CONNECTION_WINDOW  # what the peer may still send us
        self.owed = 0
        self.streams: dict[int, _Stream] = {}
        self.blocked: dict[_Stream, None] = {}  # streams waiting for this peer's window
        self.closed = False
        self._continuing: tuple[int, int, bytearray] | None = None  # a header block so far
        self._pings = 0

    # --- output -----------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if not self.out:
            self.relay.dirty.append(self)
        self.out += data

    def flush(self) -> None:
        if self.out and not self.closed and self.transport is not None:
            self.transport.write(bytes(self.out))
        self.out.clear()

    def credit(self, n: int) -> None:
        self.owed += n
        if self.owed >= _CONNECTION_CREDIT:
            self.write(h2.window_update(0, self.owed))
            self.recv_window += self.owed
            self.owed = 0

    def close(self) -> None:
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
            for ftype, flags, sid, payload in self.reader.feed(data):
                self._frame(ftype, flags, sid, payload)
        except ProtocolViolation as exc:
            self.fail(exc.code, str(exc))
        except Exception:  # a bug must cost one connection, never the relay
            log.exception("relay connection failed")
            self.fail(h2.INTERNAL_ERROR, "internal error")
        self.relay.flush()

    def _frame(self, ftype: int, flags: int, sid: int, payload: bytes) -> None:
        if self._continuing is not None:
            csid, cflags, pieces = self._continuing
            if ftype != h2.CONTINUATION or sid != csid:
                raise ProtocolViolation(h2.PROTOCOL_ERROR, "a header block was interrupted")
            pieces += payload
            if len(pieces) > _MAX_HEADER_BLOCK:
                raise ProtocolViolation(h2.ENHANCE_YOUR_CALM, "a header block over 64 KiB")
            if flags & h2.END_HEADERS:
                self._continuing = None
                self.on_headers(sid, cflags, bytes(pieces))
            return
        if ftype == h2.DATA:
            self._pings = 0
            if not sid:
                raise ProtocolViolation(h2.PROTOCOL_ERROR, "DATA on stream 0")
            self.recv_window -= len(payload)
            if self.recv_window < 0:
                raise ProtocolViolation(h2.FLOW_CONTROL_ERROR, "more DATA than the window")
            self.on_data(sid, flags, payload)
        elif ftype == h2.HEADERS:
            self._pings = 0
            if not sid:
                raise ProtocolViolation(h2.PROTOCOL_ERROR, "HEADERS on stream 0")
            block = h2.unpad(flags, payload)
            if flags & h2.PRIORITY_FLAG:
                block = block[5:]
            if flags & h2.END_HEADERS:
                self.on_headers(sid, flags, block)
            else:
                self._continuing = (sid, flags, bytearray(block))
        elif ftype == h2.SETTINGS:
            if flags & h2.ACK or sid:
                return
            for key, value in h2.parse_settings(payload):
                self.on_setting(key, value)
            self.write(h2.frame(h2.SETTINGS, h2.ACK, 0))
        elif ftype == h2.WINDOW_UPDATE:
            if len(payload) != 4:
                raise ProtocolViolation(h2.FRAME_SIZE_ERROR, "a WINDOW_UPDATE not 4 bytes")
            self.on_window_update(sid, h2.u32(payload) & 0x7FFFFFFF)
        elif ftype == h2.RST_STREAM:
            if len(payload) != 4 or not sid:
                raise ProtocolViolation(h2.PROTOCOL_ERROR, "a malformed RST_STREAM")
            self.on_reset(sid, h2.u32(payload))
        elif ftype == h2.PING:
            if len(payload) != 8 or sid:
                raise ProtocolViolation(h2.FRAME_SIZE_ERROR, "a malformed PING")
            if not flags & h2.ACK:
                self._pings += 1
                if self._pings > _MAX_PINGS_WITHOUT_DATA:
                    raise ProtocolViolation(h2.ENHANCE_YOUR_CALM, "too many PINGs")
                self.write(h2.frame(h2.PING, h2.ACK, 0, payload))
        elif ftype == h2.GOAWAY:
            self.on_goaway(h2.u32(payload) & 0x7FFFFFFF if len(payload) >= 8 else 0)
        elif ftype == h2.PUSH_PROMISE or ftype == h2.CONTINUATION:
            raise ProtocolViolation(h2.PROTOCOL_ERROR, "an unexpected frame")
        # PRIORITY and unknown frame types are ignored, as the protocol asks.

    def on_setting(self, key: int, value: int) -> None:
        if key == h2.INITIAL_WINDOW_SIZE:
            if value > h2.MAX_WINDOW:
                raise ProtocolViolation(h2.FLOW_CONTROL_ERROR, "an initial window too large")
            delta = value - self.peer_initial_window
            self.peer_initial_window = value
            for stream in self.streams.values():
                self.half(stream).window += delta
            self.unblock()

    def on_window_update(self, sid: int, increment: int) -> None:
        if increment == 0:
            raise ProtocolViolation(h2.PROTOCOL_ERROR, "a zero WINDOW_UPDATE")
        if sid == 0:
            self.send_window += increment
            if self.send_window > h2.MAX_WINDOW:
                raise ProtocolViolation(h2.FLOW_CONTROL_ERROR, "a window over 2^31-1")
            self.unblock()
            return
        stream = self.streams.get(sid)
        if stream is not None:
            self.half(stream).window += increment
            self.blocked.pop(stream, None)
            _send(stream, self.toward_upstream)

    def unblock(self) -> None:
        blocked, self.blocked = self.blocked, {}
        for stream in blocked:
            _send(stream, self.toward_upstream)

    def half(self, stream: _Stream) -> _Half:
        """The direction of `stream` this connection receives."""
        return stream.to_upstream if self.toward_upstream else stream.to_client

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
        super().__init__(relay)
        self.decoder = h2.HeaderDecoder(_MAX_HEADER_BLOCK)
        self.peer = "unknown"
        self.last_sid = 0
        self.draining = False
        self._preface: bytearray | None = bytearray()  # until the client's preface is in
        self._reset_budget = _RESET_BURST
        self._reset_at = time.monotonic()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None and ssl_object.selected_alpn_protocol() != "h2":
            transport.close()
            return
        self.peer = _peer(transport.get_extra_info("peername"))
        self.relay.clients.add(self)
        self.write(
            h2.settings(
                [
                    (h2.MAX_CONCURRENT_STREAMS, self.relay.max_streams),
                    (h2.INITIAL_WINDOW_SIZE, STREAM_WINDOW),
                    (h2.MAX_HEADER_LIST_SIZE, _MAX_HEADER_BLOCK),
                ]
            )
            + h2.window_update(0, CONNECTION_WINDOW - h2.DEFAULT_WINDOW)
        )
        self.relay.flush()

    def data_received(self, data: bytes) -> None:
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
        super().data_received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.relay.clients.discard(self)
        for stream in list(self.streams.values()):
            self._cancel(stream)
        self.relay.flush()
        self.relay.check_quiet()

    def _last_stream(self) -> int:
        return self.last_sid

    def drain(self) -> None:
        """Shutting down: no new calls on this connection; those in flight may finish."""
        if not self.draining:
            self.draining = True
            self.write(h2.goaway(self.last_sid, h2.NO_ERROR))
        if not self.streams:
            self.close()

    def forget(self, stream: _Stream) -> None:
        self.streams.pop(stream.cid, None)
        self.blocked.pop(stream, None)
        if self.draining and not self.streams:
            self.close()
            self.relay.check_quiet()

    def on_headers(self, sid: int, flags: int, block: bytes) -> None:
        headers = self.decoder.decode(block)
        stream = self.streams.get(sid)
        if stream is not None:  # trailers from the client: only an end of stream means much
            if not flags & h2.END_STREAM:
                raise ProtocolViolation(h2.PROTOCOL_ERROR, "request trailers without END_STREAM")
            self._end_request(stream, b"")
            return
        if sid % 2 == 0 or sid <= self.last_sid:
            raise ProtocolViolation(h2.PROTOCOL_ERROR, f"stream {sid} cannot open")
        self.last_sid = sid
        if self.draining or len(self.streams) >= self.relay.max_streams:
            self.write(h2.rst_stream(sid, h2.REFUSED_STREAM))
            return
        try:
            decision = self.relay.decide(headers, self.peer, self.relay.up)
        except Exception:  # a bug costs this call, not the connection's others
            log.exception("deciding a call failed")
            status = h2.grpc_status_headers(grpc.StatusCode.INTERNAL.value[0], "", False)
            self.write(h2.headers_frames(sid, h2.header_block(status), h2.END_STREAM))
            if not flags & h2.END_STREAM:
                self.write(h2.rst_stream(sid, h2.NO_ERROR))
            return
        stream = _Stream(self, sid, decision, h2.header_block(decision.headers))
        self.streams[sid] = stream
        stream.client_ended = bool(flags & h2.END_STREAM)
        if decision.answer is not None and not stream.client_ended:
            stream.held = 0  # opened upstream only if the whole request finds no answer
        else:
            self.relay.pools[decision.upstream].open(stream)

    def on_data(self, sid: int, flags: int, payload: bytes) -> None:
        stream = self.streams.get(sid)
        if stream is None or stream.client_ended:
            if sid > self.last_sid:
                raise ProtocolViolation(h2.PROTOCOL_ERROR, "DATA on an idle stream")
            self.credit(len(payload))  # a stream already over: nothing to pass on
            return
        stream.client_recv -= len(payload)
        if stream.client_recv < 0:
            raise ProtocolViolation(h2.FLOW_CONTROL_ERROR, "more DATA than the stream window")
        data = h2.unpad(flags, payload)
        if len(data) < len(payload):
            self.credit(len(payload) - len(data))
        if flags & h2.END_STREAM:
            self._end_request(stream, data)
        else:
            stream.to_upstream.queue.append((h2.DATA, 0, data))
            self._pass_on(stream, len(data))

    def _end_request(self, stream: _Stream, data: bytes) -> None:
        stream.client_ended = True
        stream.to_upstream.queue.append((h2.DATA, h2.END_STREAM, data))
        self._pass_on(stream, len(data))

    def _pass_on(self, stream: _Stream, size: int) -> None:
        if stream.held < 0:
            _send(stream, True)
            return
        stream.held += size
        if stream.client_ended:
            assert stream.decision.answer is not None
            body = b"".join(payload for _, _, payload in stream.to_upstream.queue)
            message = _single_message(body)
            reply = stream.decision.answer(message) if message is not None else None
            if reply is not None:
                self._answer(stream, reply)
                return
        elif stream.held < _HOLD_BYTES:
            return
        stream.held = -1
        self.relay.pools[stream.decision.upstream].open(stream)

    def _answer(self, stream: _Stream, reply: bytes) -> None:
        """Responds with `reply` (status OK) without the upstream."""
        self.credit(stream.held)  # the request was consumed here
        stream.held = -1
        stream.to_upstream.queue.clear()
        stream.upstream_ended = stream.response_started = True
        stream.code = grpc.StatusCode.OK
        stream.to_client.queue.extend(
            (
                (h2.HEADERS, 0, _RESPONSE_BLOCK),
                (h2.DATA, 0, b"\x00" + len(reply).to_bytes(4, "big") + reply),
                (h2.HEADERS, h2.END_STREAM, _OK_BLOCK),
            )
        )
        _send(stream, False)

    def on_reset(self, sid: int, code: int) -> None:
        stream = self.streams.get(sid)
        if stream is None:
            return
        now = time.monotonic()
        self._reset_budget = min(
            _RESET_BURST, self._reset_budget + (now - self._reset_at) * _RESETS_PER_SECOND
        )
        self._reset_at = now
        self._reset_budget -= 1
        if self._reset_budget < 0:
            raise ProtocolViolation(h2.ENHANCE_YOUR_CALM, "too many cancelled streams")
        self._cancel(stream)

    def _cancel(self, stream: _Stream) -> None:
        """The client gave up on the call: so does the upstream."""
        stream.done = True
        self.forget(stream)
        upstream = stream.upstream
        if upstream is not None:
            upstream.forget(stream)
            if stream.uid:
                upstream.write(h2.rst_stream(stream.uid, h2.CANCEL))
        _finish(stream, grpc.StatusCode.CANCELLED)

    def on_goaway(self, last_stream_id: int) -> None:
        self.draining = True
        if not self.streams:
            self.close()


class _Pool:
    """Connections to one upstream, opened as streams need them."""

    def __init__(self, relay: Relay, endpoint: Endpoint) -> None:
        self.relay = relay
        self.endpoint = endpoint
        self.conns: list[_Upstream] = []
        self.down_until = 0.0

    def open(self, stream: _Stream) -> None:
        for conn in self.conns:
            if conn.usable and len(conn.streams) + len(conn.waiting) < conn.max_streams:
                break
        else:
            conn = _Upstream(self.relay, self)
            self.conns.append(conn)
            conn.connecting = asyncio.ensure_future(conn.connect())
        stream.upstream = conn
        conn.open(stream)


class _Upstream(_Connection):
    """One connection to an upstream (the relay is the HTTP/2 client)."""

    toward_upstream = True

    def __init__(self, relay: Relay, pool: _Pool) -> None:
        super().__init__(relay)
        self.pool = pool
        self.decoder = h2.HeaderDecoder(_MAX_HEADER_BLOCK, table_size=0)  # for trailers
        self.next_id = 1
        self.max_streams = 2**31
        self.usable = True
        self.waiting: list[_Stream] = []  # opened before the connection was up
        self.connecting: asyncio.Future[None] | None = None

    async def connect(self) -> None:
        try:
            await self.pool.endpoint.connect(lambda: self)
        except (TimeoutError, OSError, ssl.SSLError) as exc:
            log.warning("upstream %s unreachable: %s", self.pool.endpoint.authority.decode(), exc)
            self.pool.down_until = time.monotonic() + _DOWN_SECONDS
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
                    (h2.INITIAL_WINDOW_SIZE, STREAM_WINDOW),
                ]
            )
            + h2.window_update(0, CONNECTION_WINDOW - h2.DEFAULT_WINDOW)
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
        end = h2.END_STREAM if stream.client_ended and not stream.to_upstream.queue else 0
        self.write(h2.headers_frames(sid, stream.request, end))
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

    def on_setting(self, key: int, value: int) -> None:
        if key == h2.MAX_CONCURRENT_STREAMS:
            self.max_streams = value
        else:
            super().on_setting(key, value)

    def on_headers(self, sid: int, flags: int, block: bytes) -> None:
        stream = self.streams.get(sid)
        end = flags & h2.END_STREAM
        if stream is None or stream.upstream_ended:
            return
        if end:
            stream.upstream_ended = True
            stream.trailers = block  # decoded for the status after the response is out
        stream.response_started = True
        stream.to_client.queue.append((h2.HEADERS, end, block))
        _send(stream, False)

    def status(self, block: bytes) -> tuple[grpc.StatusCode, bool]:
        """The gRPC status in a trailers block, and whether it carries details."""
        try:
            fields = dict(self.decoder.decode(block))
        except ProtocolViolation:
            return grpc.StatusCode.UNKNOWN, False
        raw = fields.get(b"grpc-status", b"")
        code = _STATUS.get(int(raw), grpc.StatusCode.UNKNOWN) if raw.isdigit() else None
        return code or grpc.StatusCode.UNKNOWN, b"grpc-status-details-bin" in fields

    def on_data(self, sid: int, flags: int, payload: bytes) -> None:
        stream = self.streams.get(sid)
        if stream is None or stream.upstream_ended:
            self.credit(len(payload))
            return
        stream.upstream_recv -= len(payload)
        if stream.upstream_recv < 0:
            raise ProtocolViolation(h2.FLOW_CONTROL_ERROR, "more DATA than the stream window")
        data = h2.unpad(flags, payload)
        if len(data) < len(payload):
            self.credit(len(payload) - len(data))
        end = flags & h2.END_STREAM
        if end:
            stream.upstream_ended = True
        stream.response_started = True
        stream.to_client.queue.append((h2.DATA, end, data))
        _send(stream, False)

    def on_reset(self, sid: int, code: int) -> None:
        stream = self.streams.get(sid)
        if stream is None or (stream.upstream_ended and code == h2.NO_ERROR):
            return  # after the trailers: only "stop sending"
        stream.done = True
        self.forget(stream)
        stream.client.forget(stream)
        stream.client.write(h2.rst_stream(stream.cid, code))
        _finish(stream, _RST_STATUS.get(code, grpc.StatusCode.INTERNAL))

    def on_goaway(self, last_stream_id: int) -> None:
        """No new streams here; those it never saw were not processed: the client may
        retry them (REFUSED_STREAM)."""
        self.usable = False
        with contextlib.suppress(ValueError):
            self.pool.conns.remove(self)
        for sid, stream in list(self.streams.items()):
            if sid > last_stream_id:
                stream.done = True
                self.forget(stream)
                stream.client.forget(stream)
                stream.client.write(h2.rst_stream(stream.cid, h2.REFUSED_STREAM))
                _finish(stream, grpc.StatusCode.UNAVAILABLE)
        if not self.streams:
            self.close()


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
