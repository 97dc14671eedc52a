"""The gateway's HTTP/2 relay between real gRPC peers: a grpc.aio client on one side, a
grpc.aio server on the other, and the relay passing every call between them. Messages
larger than every flow-control window, streams each way, cancellation, an upstream that
is down and comes back or shuts down gracefully, HTTP/2 input that is not, and calls the
decision answers itself."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import hpack
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from aiwfe.app.embedded import free_port
from aiwfe.runtime.errors import ResourceExhausted
from gateway import h2
from gateway.relay import Decision, Endpoint, Relay, RelayLimits

MB = 1024 * 1024
CHUNK = 64 * 1024
_OPTIONS = [("grpc.max_send_message_length", 8 * MB), ("grpc.max_receive_message_length", 8 * MB)]


class Backend(grpc.GenericRpcHandler):
    """Echo, download, upload, chat, a stream that waits forever, a failure, and a slow
    call counting how many run at once."""

    def __init__(self) -> None:
        self.metadata: list[dict[str, str]] = []
        self.cancelled = asyncio.Event()
        self.active = self.most_active = self.hangs = 0

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        return {
            "/t.T/Echo": grpc.unary_unary_rpc_method_handler(self.echo),
            "/t.T/Download": grpc.unary_stream_rpc_method_handler(self.download),
            "/t.T/Upload": grpc.stream_unary_rpc_method_handler(self.upload),
            "/t.T/Chat": grpc.stream_stream_rpc_method_handler(self.chat),
            "/t.T/Hang": grpc.unary_stream_rpc_method_handler(self.hang),
            "/t.T/Fail": grpc.unary_unary_rpc_method_handler(self.fail),
            "/t.T/Slow": grpc.unary_unary_rpc_method_handler(self.slow),
        }.get(details.method)

    async def echo(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        self.metadata.append({k: v for k, v in context.invocation_metadata() or ()})
        return request

    async def download(self, request: bytes, context: Any) -> AsyncIterator[bytes]:
        left = int(request)
        while left > 0:
            yield bytes([left % 251]) * min(CHUNK, left)
            left -= CHUNK

    async def upload(self, requests: AsyncIterator[bytes], context: Any) -> bytes:
        total = 0
        async for chunk in requests:
            total += len(chunk)
        return str(total).encode()

    async def chat(self, requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
        async for message in requests:
            yield message[::-1]

    async def slow(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        self.active += 1
        self.most_active = max(self.most_active, self.active)
        try:
            await asyncio.sleep(0.05)
        finally:
            self.active -= 1
        return request

    async def hang(self, request: bytes, context: Any) -> AsyncIterator[bytes]:
        self.hangs += 1
        yield b"first"
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            self.cancelled.set()
            raise

    async def fail(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        await context.abort(
            grpc.StatusCode.INVALID_ARGUMENT, "bad ü input", (("why-bin", b"\x00\xff"),)
        )
        raise AssertionError("unreachable")


async def _backend(
    port: int = 0, max_streams: int | None = None
) -> tuple[grpc.aio.Server, Backend, int]:
    backend = Backend()
    limit = [("grpc.max_concurrent_streams", max_streams)] if max_streams else []
    server = grpc.aio.server(options=[*_OPTIONS, *limit])
    server.add_generic_rpc_handlers((backend,))
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    return server, backend, bound


class Harness:
    """A relay in front of one upstream port, recording how each call ended."""

    def __init__(
        self, upstream_port: int, max_streams: int = 100, limits: RelayLimits | None = None
    ) -> None:
        self.finished: list[grpc.StatusCode] = []
        self.decided = 0
        endpoint = Endpoint(b"upstream", host="127.0.0.1", port=upstream_port)
        self.relay = Relay(self.decide, {"up": endpoint}, max_streams, limits=limits)

    def decide(self, headers: list[tuple[bytes, bytes]], peer: str, up: Any) -> Decision:
        self.decided += 1
        kept = [(n, v) for n, v in headers if n != b"authorization"]
        return Decision("up", [*kept, (b"x-relayed", peer.encode())], self.finish)

    def finish(self, code: grpc.StatusCode, details: bool) -> None:
        self.finished.append(code)


@pytest.fixture
async def relayed() -> AsyncIterator[tuple[grpc.aio.Channel, Backend, Harness]]:
    server, backend, port = await _backend()
    harness = Harness(port)
    relay_port = await harness.relay.start("127.0.0.1", 0)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{relay_port}", options=_OPTIONS) as channel:
        yield channel, backend, harness
    await harness.relay.stop(0.5)
    await server.stop(0)


async def test_unary_call_metadata_and_a_failure_with_details(relayed) -> None:
    """The decided headers reach the upstream (credentials gone, the client's address
    added); a failure keeps its code, its percent-encoded message and binary trailers."""
    channel, backend, harness = relayed
    reply = await channel.unary_unary("/t.T/Echo")(
        b"hello", metadata=(("authorization", "Bearer x"), ("x-custom", "1")), timeout=5
    )
    assert reply == b"hello"
    seen = backend.metadata[-1]
    assert "authorization" not in seen and seen["x-custom"] == "1"
    assert seen["x-relayed"].startswith("ipv4:127.0.0.1:")
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await channel.unary_unary("/t.T/Fail")(b"x", timeout=5)
    assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert failed.value.details() == "bad ü input"
    assert ("why-bin", b"\x00\xff") in tuple(failed.value.trailing_metadata())
    assert harness.finished == [grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT]


async def test_messages_larger_than_every_window_pass_both_ways(relayed) -> None:
    """3 MiB up (client stream), down (server stream) and both ways in one unary call, far
    beyond the 64 KiB default and the relay's 1 MiB stream windows: nothing lost or
    reordered."""
    channel, _, harness = relayed
    payload = bytes(range(256)) * (3 * MB // 256)
    assert await channel.unary_unary("/t.T/Echo")(payload, timeout=20) == payload

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(12):
            yield bytes([i]) * (MB // 4)

    assert await channel.stream_unary("/t.T/Upload")(chunks(), timeout=20) == b"3145728"
    received = [m async for m in channel.unary_stream("/t.T/Download")(b"3145728", timeout=20)]
    assert sum(map(len, received)) == 3 * MB and len(received) == 48
    assert all(m == bytes([m[0]]) * len(m) for m in received)
    assert harness.finished == [grpc.StatusCode.OK] * 3


async def test_bidirectional_stream_and_many_calls_at_once(relayed) -> None:
    channel, _, _ = relayed
    chat = channel.stream_stream("/t.T/Chat")(timeout=10)
    for i in range(50):
        await chat.write(f"message {i}".encode())
        assert await chat.read() == f"message {i}".encode()[::-1]
    await chat.done_writing()
    assert await chat.read() is grpc.aio.EOF
    echo = channel.unary_unary("/t.T/Echo")
    replies = await asyncio.gather(*(echo(str(i).encode(), timeout=10) for i in range(300)))
    assert replies == [str(i).encode() for i in range(300)]


async def test_a_client_cancelling_cancels_the_upstream_call(relayed) -> None:
    channel, backend, harness = relayed
    stream = channel.unary_stream("/t.T/Hang")(b"", timeout=30)
    assert await stream.read() == b"first"
    stream.cancel()
    await asyncio.wait_for(backend.cancelled.wait(), 5)
    assert harness.finished == [grpc.StatusCode.CANCELLED]


async def test_upstream_down_is_unavailable_then_recovers() -> None:
    """Nothing listening upstream: UNAVAILABLE at once, not a hang. Once the upstream is
    up, calls go through again without restarting the relay."""
    port = free_port()
    harness = Harness(port)
    relay_port = await harness.relay.start("127.0.0.1", 0)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{relay_port}") as channel:
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                await channel.unary_unary("/t.T/Echo")(b"x", timeout=5)
            assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
            assert not harness.relay.up("up")
            server, _, _ = await _backend(port)
            try:
                assert await channel.unary_unary("/t.T/Echo")(b"back", timeout=5) == b"back"
            finally:
                await server.stop(0)
    finally:
        await harness.relay.stop(0.5)
    assert harness.finished == [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.OK]


async def test_upstream_shutting_down_finishes_calls_in_flight() -> None:
    """An upstream stopping gracefully (GOAWAY) lets the relay's call in flight finish;
    the next call gets a fresh connection to the upstream that replaced it."""
    server, _, port = await _backend()
    harness = Harness(port)
    relay_port = await harness.relay.start("127.0.0.1", 0)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{relay_port}") as channel:
            chat = channel.stream_stream("/t.T/Chat")(timeout=10)
            await chat.write(b"before")
            assert await chat.read() == b"erofeb"
            stopping = asyncio.ensure_future(server.stop(5))
            await asyncio.sleep(0.2)
            await chat.write(b"during")
            assert await chat.read() == b"gnirud"
            await chat.done_writing()
            assert await chat.read() is grpc.aio.EOF
            await stopping
            replacement, _, _ = await _backend(port)
            try:
                assert await channel.unary_unary("/t.T/Echo")(b"after", timeout=5) == b"after"
            finally:
                await replacement.stop(0)
    finally:
        await harness.relay.stop(0.5)


async def _raw(port: int, data: bytes) -> bytes:
    """What the relay answers to `data` on a fresh connection, until it closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    try:
        return await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()


async def test_input_that_is_not_http2_closes_only_that_connection(relayed) -> None:
    """HTTP/1.1 gets nothing but the relay's own preface before the connection closes; an
    oversized frame and a stream opened with an even id are answered with GOAWAY; the
    relay keeps serving everyone else."""
    channel, _, harness = relayed
    port = harness.relay._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    http1 = h2.FrameReader().feed(await _raw(port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"))
    assert {ftype for ftype, *_ in http1} == {h2.SETTINGS, h2.WINDOW_UPDATE}
    settings = h2.settings([])
    oversized = bytes((0x01, 0x00, 0x00, h2.DATA, 0)) + b"\x00\x00\x00\x01"
    even = h2.frame(h2.HEADERS, h2.END_HEADERS, 2, b"\x82")
    for bad, code in ((oversized, h2.FRAME_SIZE_ERROR), (even, h2.PROTOCOL_ERROR)):
        answer = await _raw(port, h2.PREFACE + settings + bad)
        frames = h2.FrameReader().feed(answer)
        goaways = [payload for ftype, _, _, payload in frames if ftype == h2.GOAWAY]
        assert goaways and h2.u32(goaways[0], 4) == code, frames
    assert await channel.unary_unary("/t.T/Echo")(b"still here", timeout=5) == b"still here"


async def test_rapid_reset_closes_the_connection(relayed) -> None:
    """Streams opened and cancelled at once (CVE-2023-44487) end the connection with
    GOAWAY(ENHANCE_YOUR_CALM) instead of costing the upstream work without end."""
    channel, _, harness = relayed
    port = harness.relay._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    block = hpack.Encoder().encode(
        [(":method", "POST"), (":scheme", "http"), (":path", "/t.T/Hang"),
         (":authority", "x"), ("content-type", "application/grpc"), ("te", "trailers")]
    )  # fmt: skip
    attack = b"".join(
        h2.frame(h2.HEADERS, h2.END_HEADERS, sid, block) + h2.rst_stream(sid, h2.CANCEL)
        for sid in range(1, 2 * 1500, 2)
    )
    frames = h2.FrameReader().feed(await _raw(port, h2.PREFACE + h2.settings([]) + attack))
    goaways = [payload for ftype, _, _, payload in frames if ftype == h2.GOAWAY]
    assert goaways and h2.u32(goaways[0], 4) == h2.ENHANCE_YOUR_CALM
    assert await channel.unary_unary("/t.T/Echo")(b"still here", timeout=5) == b"still here"


async def test_a_grpc_client_sending_a_malformed_field_gets_invalid_argument(relayed) -> None:
    """Metadata a gRPC client may send but HTTP/2 calls malformed (a value with a space at
    its end, a connection-specific name) is answered INVALID_ARGUMENT, never INTERNAL, and
    never reaches the back end or the decision."""
    channel, backend, harness = relayed
    echo = channel.unary_unary("/t.T/Echo")
    for metadata in ((("x-tenant", "acme "),), (("upgrade", "h2c"),), (("connection", "close"),)):
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await echo(b"x", metadata=metadata, timeout=5)
        assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT, metadata
        assert "malformed request" in (failed.value.details() or "")
    assert backend.metadata == [] and harness.decided == 0
    assert await echo(b"fine", timeout=5) == b"fine"


class RefusingHarness(Harness):
    """Answers every Echo with its own status (as the front door sheds load)."""

    status = ResourceExhausted("busy", retry_after=0.25, reason="OVERLOADED").to_status()

    def decide(self, headers: list[tuple[bytes, bytes]], peer: str, up: Any) -> Decision:
        if (b":path", b"/t.T/Echo") in headers:
            self.decided += 1
            return Decision("", [], self.finish, status=self.status)
        return super().decide(headers, peer, up)


async def test_a_decided_status_is_answered_at_once_with_its_details() -> None:
    """A decision carrying a status is answered trailers-only with its code, message,
    google.rpc details and text trailers, never reaches the upstream, is told to `finish`,
    and gives back the request bytes: refusals of more request bytes than the
    connection's window leave the connection working."""
    server, backend, port = await _backend()
    harness = RefusingHarness(port, limits=RelayLimits(max_buffer_bytes=MB))  # 512 KiB window
    relay_port = await harness.relay.start("127.0.0.1", 0)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{relay_port}", options=_OPTIONS) as ch:
            echo = ch.unary_unary("/t.T/Echo")
            for _ in range(64):  # 2 MiB of requests
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await echo(b"r" * (32 * 1024), timeout=5)
                assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert refused.value.details() == "busy"
            status = rpc_status.from_call(refused.value)
            assert status is not None
            retry = error_details_pb2.RetryInfo()
            assert any(d.Unpack(retry) for d in status.details if d.Is(retry.DESCRIPTOR))
            assert retry.retry_delay.ToMilliseconds() == 250
            assert ("retry-after", "1") in tuple(refused.value.trailing_metadata() or ())
            assert await ch.unary_unary("/t.T/Slow")(b"passed", timeout=5) == b"passed"
    finally:
        await harness.relay.stop(0.5)
        await server.stop(0)
    assert backend.metadata == []  # no Echo reached the upstream
    assert harness.finished.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == 64


class CheckingHarness(Harness):
    """Decides every call for an upstream that is down, then reads the request and sends
    "go" to the real one and answers "no" with a status itself (as the front door holds a
    call whose permission names resources of its request)."""

    status = ResourceExhausted("refused", reason="OVERLOADED").to_status()

    def __init__(self, upstream_port: int) -> None:
        super().__init__(upstream_port)
        endpoints = {
            "up": Endpoint(b"upstream", host="127.0.0.1", port=upstream_port),
            "down": Endpoint(b"down", host="127.0.0.1", port=free_port()),
        }
        self.relay = Relay(self.decide, endpoints, 100)

    def decide(self, headers: list[tuple[bytes, bytes]], peer: str, up: Any) -> Decision:
        live = super().decide(headers, peer, up)

        def answer(request: bytes) -> Decision | None:
            if request == b"go":
                return live
            if request == b"no":
                return Decision("", [], self.finish, status=self.status)
            return None

        return Decision("down", headers, answer=answer)


async def test_a_held_request_can_change_where_its_call_goes() -> None:
    """A held request's answer may be another decision: "go" is sent to the upstream that
    decision names (and `finish` told how it ended), "no" is answered with its status
    without an upstream, and an answer of None sends the call where it was decided."""
    server, backend, port = await _backend()
    harness = CheckingHarness(port)
    relay_port = await harness.relay.start("127.0.0.1", 0)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{relay_port}", options=_OPTIONS) as ch:
            echo = ch.unary_unary("/t.T/Echo")
            assert await echo(b"go", timeout=5) == b"go"
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await echo(b"no", timeout=5)
            assert (refused.value.code(), refused.value.details()) == (
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                "refused",
            )
            with pytest.raises(grpc.aio.AioRpcError) as down:
                await echo(b"other", timeout=5)
            assert down.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await harness.relay.stop(0.5)
        await server.stop(0)
    assert len(backend.metadata) == 1  # only "go" reached the upstream
    assert harness.finished == [grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED]
