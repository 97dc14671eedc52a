"""The relay's limits with real peers: memory bounded whatever a client does, an
upstream's stream limit never overrun, its HPACK use checked, rapid resets that cost the
back end nothing, idle connections closed and a connection cap."""

from __future__ import annotations

import asyncio
import ctypes
import gc
import sys
import time
from pathlib import Path

import grpc
import pytest

from gateway import h2
from gateway.relay import RelayLimits
from tests.gateway.conformance.raw import REQUEST, RawClient, literal_block
from tests.gateway.test_relay import Harness, _backend

MB = 1 << 20
_HANG = [(n, b"/t.T/Hang" if n == b":path" else v) for n, v in REQUEST]


def _rss() -> int:
    """This process's resident set, in bytes, after giving freed memory back."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096


async def test_a_client_that_never_reads_holds_at_most_the_buffer_cap() -> None:
    """A client with 2^31-1 windows that asks for 20 downloads of 16 MiB and never reads:
    the relay stops reading from the upstream streams once its response budget (half the
    8 MiB cap) is out; memory grows by less than the cap and comes back after close."""
    server, _, port = await _backend()
    harness = Harness(port)
    relay = harness.relay
    relay_port = await relay.start("127.0.0.1", 0)
    cap = RelayLimits().max_buffer_bytes
    try:
        before = _rss()
        client = await RawClient.connect(relay_port, ((h2.INITIAL_WINDOW_SIZE, h2.MAX_WINDOW),))
        client.send(h2.window_update(0, h2.MAX_WINDOW - h2.DEFAULT_WINDOW))
        for sid in range(1, 41, 2):
            client.call(sid, b"16777216", path=b"/t.T/Download")
        await asyncio.sleep(2.0)
        (conn,) = relay.clients
        assert conn.transport is not None

        def held() -> int:
            queued = sum(s.queued for s in conn.streams.values())
            return queued + len(conn.out) + conn.transport.get_write_buffer_size()  # type: ignore[union-attr]

        first = held()
        granted = sum(s.upstream_recv + s.queued for s in conn.streams.values())
        assert granted <= cap // 2 and conn.budget >= 0
        assert first <= cap  # the configured cap; the response budget itself is half of it
        await asyncio.sleep(0.5)
        assert held() == first  # nothing more is read from the upstream streams
        during = _rss()
        print(f"\nheld {first / MB:.2f} MiB, RSS +{(during - before) / MB:.1f} MiB")
        assert during - before < cap + 16 * MB
        client.close()
        await asyncio.sleep(0.5)
        assert not relay.clients
        assert all(not c.streams for c in relay.pools["up"].conns)
        after = _rss()
        print(f"RSS after close +{(after - before) / MB:.1f} MiB")
        assert after - before < 8 * MB
    finally:
        await relay.stop(0.2)
        await server.stop(0)


async def test_a_client_that_reads_slowly_gets_everything() -> None:
    """Granting windows from the budget as the socket drains loses nothing: a client with
    a cap of 256 KiB still receives 3 MiB downloads on several streams at once, in order."""
    server, _, port = await _backend()
    harness = Harness(port, limits=RelayLimits(max_buffer_bytes=256 * 1024))
    relay_port = await harness.relay.start("127.0.0.1", 0)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{relay_port}") as channel:
            download = channel.unary_stream("/t.T/Download")

            async def fetch() -> list[bytes]:
                return [m async for m in download(b"3145728", timeout=30)]

            results = await asyncio.gather(*(fetch() for _ in range(4)))
        for received in results:
            assert sum(map(len, received)) == 3 * MB
            assert all(m == bytes([m[0]]) * len(m) for m in received)
    finally:
        await harness.relay.stop(0.2)
        await server.stop(0)


async def test_an_upstream_stream_limit_is_never_overrun() -> None:
    """An upstream allowing 4 concurrent streams, one connection to it: 24 calls at once
    all succeed (none refused at the HTTP/2 level, which would be UNAVAILABLE), at most 4
    running upstream at a time; the rest wait in the relay."""
    server, backend, port = await _backend(max_streams=4)
    harness = Harness(port, limits=RelayLimits(upstream_connections=1))
    relay_port = await harness.relay.start("127.0.0.1", 0)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{relay_port}") as channel:
            slow = channel.unary_unary("/t.T/Slow")
            assert await slow(b"first", timeout=5) == b"first"  # the upstream's SETTINGS in
            replies = await asyncio.gather(*(slow(str(i).encode(), timeout=10) for i in range(24)))
        assert replies == [str(i).encode() for i in range(24)]
        assert backend.most_active <= 4
        assert harness.finished.count(grpc.StatusCode.OK) == 25
    finally:
        await harness.relay.stop(0.2)
        await server.stop(0)


async def test_a_stream_opens_upstream_only_once_its_client_can_pay_its_first_window() -> None:
    """Each upstream stream opens with a 16 KiB window (the relay's initial window there)
    paid from its client connection's response budget: with the smallest cap, 256 KiB (a
    128 KiB budget), at most eight of a client's calls run upstream at once, the others
    wait in the relay for budget to come back, and all of them succeed."""
    server, backend, port = await _backend()
    harness = Harness(port, limits=RelayLimits(max_buffer_bytes=256 * 1024))
    relay_port = await harness.relay.start("127.0.0.1", 0)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{relay_port}") as channel:
            slow = channel.unary_unary("/t.T/Slow")
            replies = await asyncio.gather(*(slow(str(i).encode(), timeout=10) for i in range(24)))
        assert replies == [str(i).encode() for i in range(24)]
        assert backend.most_active == 8
        assert harness.finished.count(grpc.StatusCode.OK) == 24
        (conn,) = harness.relay.pools["up"].conns
        assert not conn.streams
    finally:
        await harness.relay.stop(0.2)
        await server.stop(0)


class _LaggingUpstream:
    """A raw HTTP/2 server counting streams as grpc-core does under load: a stream counts
    against its limit of `limit` until `lag` seconds after it closed, and one beyond is
    refused (REFUSED_STREAM). Its first stream is held open; the others are answered
    trailers-only, OK."""

    def __init__(self, limit: int, lag: float) -> None:
        self.limit, self.lag = limit, lag
        self.refused = self.served = 0
        self.holding = False  # the first stream came

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        frames = h2.FrameReader()
        await reader.readexactly(len(h2.PREFACE))
        writer.write(h2.settings([(h2.MAX_CONCURRENT_STREAMS, self.limit)]))
        held, open_, closed = 0, set(), []  # closed: when each stream closed (here)
        while data := await reader.read(65536):
            for ftype, flags, sid, _ in frames.feed(data):
                now = time.monotonic()
                if ftype == h2.SETTINGS and not flags & h2.ACK:
                    writer.write(h2.frame(h2.SETTINGS, h2.ACK, 0))
                elif ftype == h2.HEADERS:
                    counted = len(open_) + sum(now - t < self.lag for t in closed)
                    if counted >= self.limit:
                        self.refused += 1
                        writer.write(h2.rst_stream(sid, h2.REFUSED_STREAM))
                        continue
                    open_.add(sid)
                    if not self.holding:
                        self.holding, held = True, sid
                        writer.write(
                            h2.frame(
                                h2.HEADERS,
                                h2.END_HEADERS,
                                sid,
                                h2.header_block(h2.RESPONSE_HEADERS),
                            )
                        )
                elif ftype == h2.DATA and flags & h2.END_STREAM and sid in open_ and sid != held:
                    block = h2.header_block(h2.grpc_status_headers(0, "", response_started=False))
                    writer.write(h2.frame(h2.HEADERS, h2.END_HEADERS | h2.END_STREAM, sid, block))
                    open_.discard(sid)
                    closed.append(now)
                    self.served += 1
        writer.close()


@pytest.mark.parametrize("connections", [32, 1])
async def test_a_stream_refused_by_a_full_upstream_is_sent_again_not_failed(
    connections: int,
) -> None:
    """An upstream that counts closed streams against its limit for 0.3 s (grpc-core keeps
    counting a stream until its busy process releases the call) refuses the calls that
    follow one that ended: each refused call goes to another connection (or, with one
    allowed, waits for the refusing connection's pause) and succeeds; none is UNAVAILABLE."""
    upstream = _LaggingUpstream(limit=2, lag=0.3)
    server = await asyncio.start_server(upstream.serve, "127.0.0.1", 0)
    harness = Harness(
        server.sockets[0].getsockname()[1],
        limits=RelayLimits(upstream_connections=connections),
    )
    relay_port = await harness.relay.start("127.0.0.1", 0)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{relay_port}") as channel:
            watch = channel.unary_stream("/t.T/Watch")
            held = watch(b"", timeout=20)
            await held.initial_metadata()  # one stream open for the whole test
            for _ in range(4):
                assert [m async for m in watch(b"x", timeout=10)] == []
            held.cancel()
        assert upstream.served == 4
        assert upstream.refused >= 1  # the situation under test did arise
        assert grpc.StatusCode.UNAVAILABLE not in harness.finished
    finally:
        await harness.relay.stop(0.2)
        server.close()


async def test_after_a_rapid_reset_flood_calls_are_served_at_once() -> None:
    """Streams a client opens and resets in the same read never reach the back end, so
    right after a rapid-reset flood the next calls are served at once, none UNAVAILABLE."""
    server, backend, port = await _backend(max_streams=100)
    harness = Harness(port)
    relay_port = await harness.relay.start("127.0.0.1", 0)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{relay_port}") as channel:
            echo = channel.unary_unary("/t.T/Echo")
            assert await echo(b"warm", timeout=5) == b"warm"
            for _ in range(5):
                attacker = await RawClient.connect(relay_port)
                block = literal_block(_HANG)
                attacker.send(
                    *(
                        h2.frame(h2.HEADERS, h2.END_HEADERS, sid, block)
                        + h2.rst_stream(sid, h2.CANCEL)
                        for sid in range(1, 2 * 300, 2)
                    )
                )
                assert (await attacker.goaway())[1] == h2.ENHANCE_YOUR_CALM
                attacker.close()
                started = time.perf_counter()
                replies = await asyncio.gather(*(echo(b"next", timeout=5) for _ in range(10)))
                assert replies == [b"next"] * 10
                assert time.perf_counter() - started < 0.2
        assert backend.hangs < 50  # of 1,000 streams opened (at most a read's tail goes on)
    finally:
        await harness.relay.stop(0.2)
        await server.stop(0)


class _BadUpstream:
    """A raw HTTP/2 server answering every request with one fixed response header block."""

    def __init__(self, block: bytes) -> None:
        self.block = block
        self.goaways: list[int] = []

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        frames = h2.FrameReader()
        await reader.readexactly(len(h2.PREFACE))
        writer.write(h2.settings([]))
        while data := await reader.read(65536):
            for ftype, flags, sid, payload in frames.feed(data):
                if ftype == h2.SETTINGS and not flags & h2.ACK:
                    writer.write(h2.frame(h2.SETTINGS, h2.ACK, 0))
                elif ftype == h2.DATA and flags & h2.END_STREAM:
                    writer.write(
                        h2.frame(h2.HEADERS, h2.END_HEADERS | h2.END_STREAM, sid, self.block)
                    )
                elif ftype == h2.GOAWAY:
                    self.goaways.append(h2.u32(payload, 4))
        writer.close()


@pytest.mark.parametrize(
    "block",
    [b"\x88\xbe", b"\x3f\xe1\x1f\x88"],
    ids=["dynamic_table_index", "table_size_update"],
)
async def test_an_upstream_using_an_hpack_dynamic_table_is_cut_off(block: bytes) -> None:
    """Upstream response blocks are relayed verbatim, which is only safe without a dynamic
    table: a block that indexes one or resizes it fails that upstream connection
    (GOAWAY COMPRESSION_ERROR), the call is UNAVAILABLE, and the block never reaches the
    client."""
    upstream = _BadUpstream(block)
    server = await asyncio.start_server(upstream.serve, "127.0.0.1", 0)
    harness = Harness(server.sockets[0].getsockname()[1])
    relay_port = await harness.relay.start("127.0.0.1", 0)
    try:
        client = await RawClient.connect(relay_port)
        client.call(1)
        headers = await client.expect(lambda fr: fr[0] == h2.HEADERS and fr[2] == 1)
        fields = dict(client.decoder.decode(headers[3], raw=True))
        assert fields[b"grpc-status"] == b"14"  # UNAVAILABLE, from the relay itself
        assert headers[3] != block
        await asyncio.sleep(0.1)
        assert upstream.goaways == [h2.COMPRESSION_ERROR]
    finally:
        await harness.relay.stop(0.2)
        server.close()


async def test_idle_connections_are_closed() -> None:
    """A connection with no call in flight for the idle timeout gets GOAWAY(NO_ERROR)
    and is closed; one with a call in flight is kept."""
    server, _, port = await _backend()
    harness = Harness(port, limits=RelayLimits(idle_timeout=0.4))
    relay_port = await harness.relay.start("127.0.0.1", 0)
    try:
        idle, busy = await RawClient.connect(relay_port), await RawClient.connect(relay_port)
        idle.call(1)
        await idle.response(1)
        busy.headers(1, _HANG)
        busy.send(h2.frame(h2.DATA, h2.END_STREAM, 1, b"\0\0\0\0\0"))
        assert await idle.goaway(3) == (1, h2.NO_ERROR)
        assert await idle.closed()
        await asyncio.sleep(0.5)
        await busy.ping_ack()
    finally:
        await harness.relay.stop(0.2)
        await server.stop(0)


async def test_connections_over_the_cap_are_refused() -> None:
    """Past max_connections a new connection gets GOAWAY and is closed; once one closes,
    a new one is served."""
    server, _, port = await _backend()
    harness = Harness(port, limits=RelayLimits(max_connections=2))
    relay_port = await harness.relay.start("127.0.0.1", 0)
    try:
        first, second = await RawClient.connect(relay_port), await RawClient.connect(relay_port)
        await first.ping_ack()
        await second.ping_ack()
        third = await RawClient.connect(relay_port)
        assert (await third.goaway())[1] == h2.NO_ERROR
        assert await third.closed()
        first.close()
        await asyncio.sleep(0.2)
        fourth = await RawClient.connect(relay_port)
        fourth.call(1)
        body, _ = await fourth.response(1)
        assert body.endswith(b"hi")
    finally:
        await harness.relay.stop(0.2)
        await server.stop(0)


async def test_the_relay_process_rss_stays_within_the_cap_against_a_client_that_never_reads() -> (
    None
):
    """The same attack against a relay in a process of its own, measured from outside:
    its RSS grows by less than the 8 MiB cap and is back near where it was after close.
    The back end runs here, so its own send buffers (a chunk in flight per stream) are not
    counted as the relay's."""
    backend, _, backend_port = await _backend()
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.gateway.conformance.relay_process", str(backend_port),
        stdout=asyncio.subprocess.PIPE, cwd=Path(__file__).parents[2],
    )  # fmt: skip
    try:
        assert process.stdout is not None
        port = int(await asyncio.wait_for(process.stdout.readline(), 30))

        def rss() -> int:
            with open(f"/proc/{process.pid}/statm") as statm:
                return int(statm.read().split()[1]) * 4096

        warm = await RawClient.connect(port)
        for sid in range(1, 101, 2):  # the steady state first (50 calls: within its window)
            warm.call(sid, b"x" * 100)
            assert (await warm.response(sid))[1][b"grpc-status"] == b"0"
        warm.close()
        await asyncio.sleep(0.5)
        before = rss()
        client = await RawClient.connect(port, ((h2.INITIAL_WINDOW_SIZE, h2.MAX_WINDOW),))
        client.send(h2.window_update(0, h2.MAX_WINDOW - h2.DEFAULT_WINDOW))
        for sid in range(1, 41, 2):
            client.call(sid, b"16777216", path=b"/t.T/Download")
        await asyncio.sleep(3.0)
        during = rss()
        await client.expect(lambda fr: fr[0] == h2.DATA and len(fr[3]) == h2.MAX_FRAME)
        client.close()
        await asyncio.sleep(1.0)
        after = rss()
        print(f"\nrelay process RSS {before / MB:.1f} MiB, +{(during - before) / MB:.1f} MiB "
              f"while attacked, +{(after - before) / MB:.1f} MiB after close")  # fmt: skip
        assert during - before < RelayLimits().max_buffer_bytes
        assert after - before < during - before + MB
    finally:
        process.kill()
        await process.wait()
        await backend.stop(None)
