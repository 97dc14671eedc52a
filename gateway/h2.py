"""HTTP/2 framing for the gateway's relay (RFC 9113): what relaying gRPC needs, no more.

A frame reader, frame writers, request header validation, and header blocks that never
touch an HPACK dynamic table (every field a literal without indexing), so a block means the
same on any connection. Decoding is the `hpack` library's (public API), behind a memo of
the blocks a connection repeats.
"""

from __future__ import annotations

import base64
import logging
import re
import struct
from collections.abc import Callable, Iterable
from typing import NamedTuple, cast
from urllib.parse import quote

import hpack

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
FRAME_HEAD = struct.Struct(">BHBBI")  # length (24 bits: 8 + 16), type, flags, stream id
_U32_FRAME = struct.Struct(">BHBBII")  # a frame whose payload is one 32-bit value
_SETTING = struct.Struct(">HI")


class ProtocolViolation(Exception):
    """The peer broke the protocol: the connection ends with GOAWAY(code)."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code


Frame = tuple[int, int, int, bytes]  # (type, flags, stream id, payload)
Headers = list[tuple[bytes, bytes]]


class DecodedHeaders(list[tuple[bytes, bytes]]):
    """A header list as `HeaderDecoder` gives it. `derived` holds what a consumer worked
    out from these fields alone (the front door's reading of a request), so a block the
    memo answers again is not read again; it lives as long as the list does (one
    connection's memo, never a process-wide one: the fields may carry credentials)."""

    __slots__ = ("derived",)
    derived: object


def _integer_at(block: bytes, pos: int, prefix_bits: int) -> tuple[int, int]:
    """An HPACK integer (RFC 7541 §5.1) at `pos`, and the position after it."""
    top = (1 << prefix_bits) - 1
    value = block[pos] & top
    pos += 1
    if value == top:
        shift = 0
        while True:
            octet = block[pos]
            pos += 1
            value += (octet & 127) << shift
            shift += 7
            if not octet & 128:
                break
    return value, pos


def changes_table(block: bytes, sized: bool) -> bool:
    """Whether a (well-formed) HPACK block changes the decoder's dynamic table: a size
    update, or a literal with incremental indexing when the table can hold anything."""
    pos, end = 0, len(block)
    while pos < end:
        octet = block[pos]
        if octet & 0x80:  # indexed field
            pos = _integer_at(block, pos, 7)[1]
            continue
        if octet & 0xC0 == 0x40:  # literal with incremental indexing
            if sized:
                return True
            new_name = not octet & 0x3F
            pos = _integer_at(block, pos, 6)[1]
        elif octet & 0xE0 == 0x20:  # dynamic table size update
            return True
        else:  # literal without indexing / never indexed
            new_name = not octet & 0x0F
            pos = _integer_at(block, pos, 4)[1]
        for _ in range(2 if new_name else 1):
            length, pos = _integer_at(block, pos, 7)
            pos += length
    return False


class HeaderDecoder:
    """One connection's HPACK decoder (`hpack`, public API), with a memo of the blocks it
    repeats, and each block's verdict from `check` (None: well-formed).

    gRPC clients send the same block for every call of a method once the fields are
    indexed (a token they do not index rides along as a literal without indexing), so a
    block that left the dynamic table as it was decodes the same until the table changes.
    Such blocks are kept and answered from the memo (the caller must not modify them); a
    block that changes the table (`changes_table`, our own scan of its instructions)
    empties it. Decoding in pure Python was the relay's largest cost per call.
    """

    _MEMO_BLOCK = 2048  # bytes: longer blocks are decoded every time
    _MEMO_ENTRIES = 16

    __slots__ = ("_check", "_decoder", "_last", "_last_block", "_max_fields", "_memo")

    def __init__(
        self,
        max_header_list_size: int,
        table_size: int = 4096,
        check: Callable[[Headers], Malformed | None] | None = None,
        max_fields: int = 1 << 30,
    ) -> None:
        """`table_size`: the SETTINGS_HEADER_TABLE_SIZE this side announced (0: no table)."""
        self._decoder = hpack.Decoder(max_header_list_size)
        self._decoder.max_allowed_table_size = table_size
        self._decoder.header_table_size = table_size
        self._memo: dict[bytes, tuple[Headers, Malformed | None]] = {}
        # The block answered last, compared before the memo is asked: a client that
        # repeats one call's block (most do) costs a memcmp instead of hashing it anew.
        self._last_block = b""
        self._last: tuple[Headers, Malformed | None] | None = None
        self._check = check
        self._max_fields = max_fields

    def decode(self, block: bytes) -> Headers:
        """The block's fields; ProtocolViolation(COMPRESSION_ERROR) if it is malformed."""
        return self.checked(block)[0]

    def checked(self, block: bytes) -> tuple[Headers, Malformed | None]:
        """The block's fields and `check`'s verdict on them (memoised with them)."""
        if block == self._last_block and self._last is not None:
            return self._last
        memo = self._memo
        found = memo.get(block)
        if found is not None:
            self._last_block, self._last = block, found
            return found
        try:
            headers = DecodedHeaders(cast(Headers, self._decoder.decode(block, raw=True)))
        except hpack.HPACKError as exc:
            raise ProtocolViolation(COMPRESSION_ERROR, f"a bad header block: {exc}") from None
        if len(headers) > self._max_fields:
            raise ProtocolViolation(ENHANCE_YOUR_CALM, f"{len(headers)} header fields")
        found = (headers, self._check(headers) if self._check is not None else None)
        if changes_table(block, self._decoder.header_table_size > 0):
            memo.clear()
            self._last = None
        elif len(block) <= self._MEMO_BLOCK:
            if len(memo) >= self._MEMO_ENTRIES:
                memo.clear()
            memo[block] = found
        return found


class Malformed(NamedTuple):
    """Why a request's header list is malformed (RFC 9113 §8.2-8.3) or its gRPC headers
    unusable; `grpc`: answered with INVALID_ARGUMENT instead of RST_STREAM."""

    reason: str
    grpc: bool = False


# A field name: lower-case token characters (RFC 9110 §5.6.2, RFC 9113 §8.2.1).
_BAD_NAME = re.compile(rb"[^!#$%&'*+\-.^_`|~0-9a-z]")
# A field value: no NUL, CR or LF, and no whitespace at either end (RFC 9113 §8.2.1).
_BAD_VALUE = re.compile(rb"[\x00\r\n]|\A[ \t]|[ \t]\Z")
_GRPC_TIMEOUT = re.compile(rb"[0-9]{1,8}[HMSmun]\Z")
_REQUEST_PSEUDO = frozenset((b":method", b":scheme", b":path", b":authority"))
CONNECTION_SPECIFIC = frozenset(
    (b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade")
)


def _show(raw: bytes) -> str:
    return repr(raw.decode("latin-1"))


def request_error(headers: Headers) -> Malformed | None:
    """What makes a request's header list malformed, or None (RFC 9113 §8.2-8.3: names,
    values, pseudo-headers, connection-specific fields, `te`; plus gRPC's grpc-timeout)."""
    seen: set[bytes] = set()
    regular = False
    for name, value in headers:
        if name[:1] == b":":
            if regular:
                return Malformed(f"pseudo-header {_show(name)} after a regular field")
            if name not in _REQUEST_PSEUDO:
                return Malformed(f"pseudo-header {_show(name)} in a request")
            if name in seen:
                return Malformed(f"a second {_show(name)}")
            seen.add(name)
            if not value and name != b":authority":
                return Malformed(f"an empty {_show(name)}")
        else:
            regular = True
            if not name or _BAD_NAME.search(name):
                return Malformed(f"a malformed field name {_show(name[:64])}")
            if name in CONNECTION_SPECIFIC:
                return Malformed(f"connection-specific field {_show(name)}")
            if name == b"te" and value != b"trailers":
                return Malformed("te other than trailers")
            if name == b"grpc-timeout" and not _GRPC_TIMEOUT.match(value):
                return Malformed(f"a malformed grpc-timeout {_show(value[:32])}", grpc=True)
        if value and _BAD_VALUE.search(value):
            return Malformed(f"a malformed value in {_show(name[:64])}")
    if len(seen) < 4 and not _REQUEST_PSEUDO.difference(seen) <= {b":authority"}:
        return Malformed("a required pseudo-header is missing")
    return None


def trailer_error(headers: Headers) -> Malformed | None:
    """What makes a request's trailer section malformed (no pseudo-headers there)."""
    for name, value in headers:
        if not name or _BAD_NAME.search(name) or name in CONNECTION_SPECIFIC:
            return Malformed(f"a malformed trailer field {_show(name[:64])}")
        if value and _BAD_VALUE.search(value):
            return Malformed(f"a malformed trailer value in {_show(name[:64])}")
    return None


class FrameReader:
    """Splits a byte stream into frames (payloads up to MAX_FRAME bytes), handing each to
    its consumer as it is found: a consumer that raises at a bad frame (a flood) never pays
    for parsing the rest. A read that holds whole frames (the usual case) is sliced as it
    came, not copied first. (A callback rather than a generator: resuming a generator
    re-enters the interpreter once per frame, a call from Python does not.)"""

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = bytearray()  # the start of a frame the last read cut off

    def parse(self, data: bytes, on_frame: Callable[[int, int, int, bytes], None]) -> None:
        """Calls `on_frame(type, flags, stream id, payload)` for each whole frame in `data`,
        in order; what follows a frame that raised is kept, unparsed, as is a frame cut off."""
        buf = self._buf
        if buf:
            buf += data
            data = bytes(buf)
            buf.clear()
        elif type(data) is not bytes:
            data = bytes(data)
        size = len(data)
        pos = 0
        unpack = FRAME_HEAD.unpack_from
        try:
            while size - pos >= 9:
                high, low, ftype, flags, sid = unpack(data, pos)
                length = (high << 16) | low
                if length > MAX_FRAME:
                    raise ProtocolViolation(FRAME_SIZE_ERROR, f"a {length}-byte frame")
                end = pos + 9 + length
                if end > size:
                    break
                start, pos = pos + 9, end
                on_frame(ftype, flags, sid & 0x7FFFFFFF, data[start:end])
        finally:
            if pos < size:
                buf += data[pos:]

    def feed(self, data: bytes) -> list[Frame]:
        """The whole frames in `data` (for raw clients and tests)."""
        frames: list[Frame] = []
        self.parse(data, lambda *frame: frames.append(frame))
        return frames


def frame(ftype: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    n = len(payload)
    return FRAME_HEAD.pack(n >> 16, n & 0xFFFF, ftype, flags, stream_id) + payload


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
    return _U32_FRAME.pack(0, 4, WINDOW_UPDATE, 0, stream_id, increment)


def rst_stream(stream_id: int, code: int) -> bytes:
    return _U32_FRAME.pack(0, 4, RST_STREAM, 0, stream_id, code)


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
    code: int,
    message: str,
    response_started: bool,
    metadata: Iterable[tuple[str, str | bytes]] = (),
) -> list[tuple[bytes, bytes]]:
    """Trailers for gRPC status `code` and trailing `metadata` (a grpc.Status's: `-bin`
    values as bytes, sent base64 without padding as gRPC does); a trailers-only response
    when nothing was sent."""
    fields = [] if response_started else list(RESPONSE_HEADERS)
    fields.append((b"grpc-status", str(code).encode()))
    if message:  # percent-encoded, as the gRPC HTTP/2 spec asks
        fields.append(
            (b"grpc-message", quote(message, safe=" !\"#$&'()*+,-./:;<=>?@[\\]^_`{|}~").encode())
        )
    for name, value in metadata:
        if isinstance(value, bytes):
            value = base64.b64encode(value).rstrip(b"=").decode("ascii")
        fields.append((name.encode("ascii"), value.encode("ascii")))
    return fields
