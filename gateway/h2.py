"""HTTP/2 framing for the gateway's relay (RFC 9113): what relaying gRPC needs, no more.

A frame reader, frame writers, and header blocks that never touch an HPACK dynamic table
(every field a literal without indexing), so a block means the same on any connection.
Decoding is the `hpack` library's, behind a memo of the blocks a connection repeats.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Iterable
from typing import cast
from urllib.parse import quote

import hpack
from hpack.table import HeaderTable, table_entry_size

# hpack logs every header it decodes at DEBUG, bearer tokens included: never let it.
logging.getLogger("hpack").setLevel(logging.WARNING)

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
Headers = list[tuple[bytes, bytes]]


class _Table(HeaderTable):
    """hpack's dynamic table, counting its changes (so a memo knows when it went stale)."""

    changes = 0

    def add(self, name: bytes, value: bytes) -> None:
        # An entry larger than the table empties it: no change if it was empty already (a
        # peer told to keep no table still sends "literal with indexing" fields).
        if self.dynamic_entries or table_entry_size(name, value) <= self.maxsize:
            self.changes += 1
        super().add(name, value)

    @HeaderTable.maxsize.setter  # type: ignore[attr-defined, untyped-decorator, misc]
    def maxsize(self, value: int) -> None:
        if value != self.maxsize:
            self.changes += 1
        HeaderTable.maxsize.fset(self, value)  # type: ignore[attr-defined]


class HeaderDecoder:
    """One connection's HPACK decoder (`hpack`), with a memo of the blocks it repeats.

    gRPC clients send the same block for every call of a method once the fields are
    indexed (a token they do not index rides along as a literal without indexing), so a
    block that left the dynamic table as it was decodes the same until the table changes.
    Such blocks are kept and answered from the memo (the caller must not modify them); any
    change to the table empties it. Decoding in pure Python was the relay's largest cost
    per call.
    """

    _MEMO_BLOCK = 2048  # bytes: longer blocks are decoded every time
    _MEMO_ENTRIES = 16

    __slots__ = ("_changes", "_decoder", "_memo", "_table")

    def __init__(self, max_header_list_size: int, table_size: int = 4096) -> None:
        """`table_size`: the SETTINGS_HEADER_TABLE_SIZE this side announced (0: no table)."""
        self._decoder = hpack.Decoder(max_header_list_size)
        self._table = self._decoder.header_table = _Table()
        self._table.maxsize = self._decoder.max_allowed_table_size = table_size
        self._memo: dict[bytes, Headers] = {}
        self._changes = self._table.changes

    def decode(self, block: bytes) -> Headers:
        """The block's fields; ProtocolViolation(COMPRESSION_ERROR) if it is malformed."""
        memo = self._memo
        headers = memo.get(block)
        if headers is not None:
            return headers
        try:
            headers = cast(Headers, self._decoder.decode(block, raw=True))
        except hpack.HPACKError as exc:
            raise ProtocolViolation(COMPRESSION_ERROR, f"a bad header block: {exc}") from None
        changes = self._table.changes
        if changes != self._changes:
            self._changes = changes
            memo.clear()
        elif len(block) <= self._MEMO_BLOCK:
            if len(memo) >= self._MEMO_ENTRIES:
                memo.clear()
            memo[block] = headers
        return headers


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


_FIELDS: dict[tuple[bytes, bytes], bytes] = {}  # encoded fields, most repeat on every call
_FIELD_MEMO_BYTES = 256  # longer fields are encoded every time
_FIELD_MEMO_ENTRIES = 4096


def header_block(headers: Iterable[tuple[bytes, bytes]]) -> bytes:
    """Literal header fields without indexing, new names, no Huffman (RFC 7541 §6.2.2)."""
    out = []
    for field in headers:
        encoded = _FIELDS.get(field)
        if encoded is None:
            name, value = field
            encoded = b"\x00" + _integer(len(name), 7) + name + _integer(len(value), 7) + value
            if len(encoded) <= _FIELD_MEMO_BYTES:
                if len(_FIELDS) >= _FIELD_MEMO_ENTRIES:
                    _FIELDS.clear()
                _FIELDS[field] = encoded
        out.append(encoded)
    return b"".join(out)


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
