"""HTTP/2 framing for the gateway's relay (RFC 9113): what relaying gRPC needs, no more.

A frame reader, frame writers, and header blocks that never touch an HPACK dynamic table
(every field a literal without indexing), so a block means the same on any connection.
Decoding the blocks clients send is the `hpack` library's job.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from urllib.parse import quote

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

# Frame types.
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY = range(8)
WINDOW_UPDATE, CONTINUATION = 8, 9
# Flags.
END_STREAM = ACK = 0x1
END_HEADERS = 0x4
PADDED = 0x8
PRIORITY_FLAG = 0x20
# Settings.
HEADER_TABLE_SIZE, ENABLE_PUSH, MAX_CONCURRENT_STREAMS, INITIAL_WINDOW_SIZE = 1, 2, 3, 4
MAX_FRAME_SIZE, MAX_HEADER_LIST_SIZE = 5, 6
# Error codes.
NO_ERROR, PROTOCOL_ERROR, INTERNAL_ERROR, FLOW_CONTROL_ERROR = 0, 1, 2, 3
STREAM_CLOSED, FRAME_SIZE_ERROR, REFUSED_STREAM, CANCEL = 5, 6, 7, 8
COMPRESSION_ERROR, ENHANCE_YOUR_CALM = 9, 11

DEFAULT_WINDOW = 65_535
MAX_WINDOW = 2**31 - 1
MAX_FRAME = 16_384  # the default SETTINGS_MAX_FRAME_SIZE; the relay never raises it

RESPONSE_HEADERS = ((b":status", b"200"), (b"content-type", b"application/grpc"))
_PRINTABLE = " !\"#$&'()*+,-./:;<=>?@[\\]^_`{|}~"  # kept as they are in grpc-message (not %)
_U32 = struct.Struct(">I")
_SETTING = struct.Struct(">HI")


class ProtocolViolation(Exception):
    """The peer broke the protocol: the connection ends with GOAWAY(code)."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code


Frame = tuple[int, int, int, bytes]  # (type, flags, stream id, payload)


class FrameReader:
    """Splits a byte stream into frames (payloads up to MAX_FRAME bytes)."""

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[Frame]:
        buf = self._buf
        buf += data
        frames: list[Frame] = []
        pos, size = 0, len(buf)
        while size - pos >= 9:
            length = (buf[pos] << 16) | (buf[pos + 1] << 8) | buf[pos + 2]
            if length > MAX_FRAME:
                raise ProtocolViolation(FRAME_SIZE_ERROR, f"a {length}-byte frame")
            end = pos + 9 + length
            if end > size:
                break
            sid = _U32.unpack_from(buf, pos + 5)[0] & 0x7FFFFFFF
            frames.append((buf[pos + 3], buf[pos + 4], sid, bytes(buf[pos + 9 : end])))
            pos = end
        if pos:
            del buf[:pos]
        return frames


def frame(ftype: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    n = len(payload)
    return (
        bytes((n >> 16, (n >> 8) & 0xFF, n & 0xFF, ftype, flags)) + _U32.pack(stream_id) + payload
    )


def headers_frames(stream_id: int, block: bytes, flags: int) -> bytes:
    """A header block as HEADERS (+ CONTINUATION frames when it exceeds one frame)."""
    if len(block) <= MAX_FRAME:
        return frame(HEADERS, flags | END_HEADERS, stream_id, block)
    out = [frame(HEADERS, flags, stream_id, block[:MAX_FRAME])]
    for start in range(MAX_FRAME, len(block), MAX_FRAME):
        last = start + MAX_FRAME >= len(block)
        out.append(
            frame(
                CONTINUATION,
                END_HEADERS if last else 0,
                stream_id,
                block[start : start + MAX_FRAME],
            )
        )
    return b"".join(out)


def settings(pairs: Iterable[tuple[int, int]]) -> bytes:
    return frame(SETTINGS, 0, 0, b"".join(_SETTING.pack(k, v) for k, v in pairs))


def parse_settings(payload: bytes) -> list[tuple[int, int]]:
    if len(payload) % 6:
        raise ProtocolViolation(FRAME_SIZE_ERROR, "a SETTINGS payload not a multiple of 6")
    return [_SETTING.unpack_from(payload, i) for i in range(0, len(payload), 6)]


def window_update(stream_id: int, increment: int) -> bytes:
    return frame(WINDOW_UPDATE, 0, stream_id, _U32.pack(increment))


def rst_stream(stream_id: int, code: int) -> bytes:
    return frame(RST_STREAM, 0, stream_id, _U32.pack(code))


def goaway(last_stream_id: int, code: int) -> bytes:
    return frame(GOAWAY, 0, 0, _U32.pack(last_stream_id) + _U32.pack(code))


def u32(payload: bytes, offset: int = 0) -> int:
    return int(_U32.unpack_from(payload, offset)[0])


def unpad(flags: int, payload: bytes) -> bytes:
    """A DATA or HEADERS payload without its padding (and HEADERS' priority fields)."""
    if flags & PADDED:
        if not payload or payload[0] >= len(payload):
            raise ProtocolViolation(PROTOCOL_ERROR, "padding longer than the frame")
        payload = payload[1 : len(payload) - payload[0]]
    return payload


def _integer(value: int, prefix_bits: int, first: int = 0) -> bytes:
    """An HPACK integer (RFC 7541 §5.1) with `first`'s high bits kept in the first octet."""
    top = (1 << prefix_bits) - 1
    if value < top:
        return bytes((first | value,))
    out = bytearray((first | top,))
    value -= top
    while value >= 128:
        out.append((value & 127) | 128)
        value >>= 7
    out.append(value)
    return bytes(out)


def header_block(headers: Iterable[tuple[bytes, bytes]]) -> bytes:
    """Literal header fields without indexing, new names, no Huffman (RFC 7541 §6.2.2)."""
    out = bytearray()
    for name, value in headers:
        out += b"\x00" + _integer(len(name), 7) + name + _integer(len(value), 7) + value
    return bytes(out)


def grpc_status_headers(
    code: int, message: str, response_started: bool
) -> list[tuple[bytes, bytes]]:
    """Trailers for gRPC status `code`; a trailers-only response when nothing was sent."""
    fields = [] if response_started else list(RESPONSE_HEADERS)
    fields.append((b"grpc-status", str(code).encode()))
    if message:  # percent-encoded, as the gRPC HTTP/2 spec asks
        fields.append(
            (b"grpc-message", quote(message, safe=" !\"#$&'()*+,-./:;<=>?@[\\]^_`{|}~").encode())
        )
    return fields
