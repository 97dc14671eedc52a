"""A raw HTTP/2 client for the relay's conformance and abuse tests: sockets, our framing
and `hpack`, so a test can send exactly the bytes a broken or hostile peer would."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable

import hpack

from gateway import h2

Frame = h2.Frame
REQUEST = [
    (b":method", b"POST"),
    (b":scheme", b"http"),
    (b":path", b"/t.T/Echo"),
    (b":authority", b"relay"),
    (b"content-type", b"application/grpc"),
    (b"te", b"trailers"),
]


def message(body: bytes) -> bytes:
    """A gRPC length-prefixed message."""
    return b"\x00" + len(body).to_bytes(4, "big") + body


def literal_block(fields: Iterable[tuple[bytes, bytes]]) -> bytes:
    """Fields as literals without indexing (any bytes, even ones `hpack` would refuse)."""
    return h2.header_block(fields)


class Closed(Exception):
    """The relay closed the connection before the awaited frame came."""


class RawClient:
    """One HTTP/2 connection to the relay; frames are read in the order they arrive."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.frames = h2.FrameReader()  # refuses frames over 16 KiB: the default max size
        self.pending: list[Frame] = []
        self.seen: list[Frame] = []
        self.decoder = hpack.Decoder()

    @classmethod
    async def connect(
        cls, port: int, settings: Iterable[tuple[int, int]] = (), preface: bool = True
    ) -> RawClient:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        client = cls(reader, writer)
        if preface:
            client.send(h2.PREFACE + h2.settings(settings))
        return client

    def send(self, *data: bytes) -> None:
        self.writer.write(b"".join(data))

    def headers(
        self,
        sid: int,
        fields: Iterable[tuple[bytes, bytes]] = REQUEST,
        end_stream: bool = False,
        flags: int = h2.END_HEADERS,
    ) -> None:
        block = literal_block(fields)
        self.send(h2.frame(h2.HEADERS, flags | (h2.END_STREAM if end_stream else 0), sid, block))

    def call(self, sid: int, body: bytes = b"hi", path: bytes = b"/t.T/Echo") -> None:
        """A whole unary request on stream `sid`."""
        fields = [(n, path if n == b":path" else v) for n, v in REQUEST]
        self.headers(sid, fields)
        self.send(h2.frame(h2.DATA, h2.END_STREAM, sid, message(body)))

    async def next_frame(self, timeout: float = 5.0) -> Frame:
        while not self.pending:
            data = await asyncio.wait_for(self.reader.read(65536), timeout)
            if not data:
                raise Closed
            self.pending.extend(self.frames.feed(data))
        frame = self.pending.pop(0)
        self.seen.append(frame)
        return frame

    async def expect(self, match: Callable[[Frame], bool], timeout: float = 5.0) -> Frame:
        """The first frame from now that `match`es."""
        async with asyncio.timeout(timeout):
            while True:
                frame = await self.next_frame(timeout)
                if match(frame):
                    return frame

    async def goaway(self, timeout: float = 5.0) -> tuple[int, int]:
        """(last stream id, error code) of the GOAWAY that ends the connection."""
        _, _, _, payload = await self.expect(lambda f: f[0] == h2.GOAWAY, timeout)
        return h2.u32(payload) & 0x7FFFFFFF, h2.u32(payload, 4)

    async def reset_code(self, sid: int, timeout: float = 5.0) -> int:
        frame = await self.expect(lambda f: f[0] == h2.RST_STREAM and f[2] == sid, timeout)
        return h2.u32(frame[3])

    async def ping_ack(self, payload: bytes = b"alive!!!", timeout: float = 5.0) -> None:
        """A PING answered: the connection is still up and everything before it was read."""
        self.send(h2.frame(h2.PING, 0, 0, payload))
        await self.expect(lambda f: f[0] == h2.PING and f[1] & h2.ACK and f[3] == payload, timeout)

    async def response(self, sid: int, timeout: float = 5.0) -> tuple[bytes, dict[bytes, bytes]]:
        """The response body and the trailers (or trailers-only headers) of stream `sid`."""
        body = b""
        fields: dict[bytes, bytes] = {}
        async with asyncio.timeout(timeout):
            while True:
                ftype, flags, fsid, payload = await self.next_frame(timeout)
                if ftype == h2.HEADERS and fsid == sid:
                    fields.update(self.decoder.decode(h2.unpad(flags, payload), raw=True))
                elif ftype == h2.DATA and fsid == sid:
                    body += h2.unpad(flags, payload)
                elif ftype == h2.RST_STREAM and fsid == sid:
                    raise AssertionError(f"stream {sid} reset: {h2.u32(payload)}")
                if fsid == sid and flags & h2.END_STREAM:
                    return body, fields

    async def closed(self, timeout: float = 5.0) -> bool:
        """Whether the relay closes the connection (reading whatever comes before)."""
        try:
            async with asyncio.timeout(timeout):
                while True:
                    await self.next_frame(timeout)
        except Closed:
            return True
        except (TimeoutError, ConnectionError):
            return False

    def close(self) -> None:
        self.writer.close()
