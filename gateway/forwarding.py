"""What the gateway passes on to a back end, for both data planes: the relay's fast path
(gateway/front.py, HTTP/2 header fields as bytes) and the gRPC byte proxy
(gateway/proxy.py, grpc.aio metadata). One table decides each client header:

- pseudo-headers (`:method` `:scheme` `:path` `:authority`): rebuilt by each path.
- credentials (`authorization` `proxy-authorization` `cookie`): dropped; the gateway
  authenticates, back ends trust only its identity assertion.
- internal (`x-aiwfe-*`, in any letter case): dropped; the gateway adds `x-aiwfe-identity`.
- hop-by-hop and connection-specific (`connection` `keep-alive` `proxy-connection`
  `transfer-encoding` `upgrade` `te` `host` `http2-settings`): dropped (`te: trailers`
  rebuilt).
- deadline (`grpc-timeout`): the client's deadline (a valid value passes as sent), else
  the gateway's default (unary or streaming, `deadline_cap`); a malformed one counts as
  none.
- trace context (the propagator's fields: `traceparent` `tracestate` `baggage`): replaced by
  the call's context, the gateway span's when recording, else the client's own as parsed.
- user agent (`user-agent`): replaced by the gateway's own; the back end's client is the
  gateway (a gRPC library writes its own on the proxy path and cannot forward another).
- message framing (`content-type` `grpc-encoding` `grpc-accept-encoding`): go with the
  message bytes. The relay passes the bytes as sent, so it passes these as sent; the
  proxy's gRPC library decodes and re-encodes the messages and writes its own.
- other `grpc-*` (reserved by the gRPC protocol): dropped.
- custom metadata (anything else, `-bin` binary metadata included): forwarded, in order,
  duplicates kept.

A header gRPC does not allow (a name outside `[0-9a-z_.-]`, a text value with a byte outside
0x20-0x7E such as CR or LF) refuses the call with INVALID_ARGUMENT on both paths: the
relay hands such a call to the full path, whose proxy names the header.
"""

from __future__ import annotations

import functools
import re
import time
from collections.abc import Iterable
from typing import Any

import grpc
from opentelemetry import propagate

from aiwfe.runtime.config import GrpcSettings
from aiwfe.runtime.errors import InvalidArgument
from aiwfe.runtime.identity import INTERNAL_METADATA_PREFIX
from aiwfe.runtime.resilience.breaker import CircuitBreaker
from gateway.policies import MethodInfo

FORWARD, DROP, REPLACE, FRAMING = "forward", "drop", "replace", "framing"
# The user agent the relay's fast path sends (the proxy path's is its gRPC library's).
RELAY_USER_AGENT = b"aiwfe-gateway-relay/1"
_CREDENTIALS = frozenset({"authorization", "proxy-authorization", "cookie"})
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "transfer-encoding",
        "upgrade",
        "te",
        "host",
        "http2-settings",
    }
)
_FRAMING = frozenset({"content-type", "grpc-encoding", "grpc-accept-encoding"})
TRACE_FIELDS = frozenset(propagate.get_global_textmap().fields)
_REPLACED = frozenset({"grpc-timeout", "user-agent"}) | TRACE_FIELDS
_LEGAL_NAME = re.compile(r"[0-9a-z_.\-]+").fullmatch
_LEGAL_VALUE = re.compile(rb"[\x20-\x7e]*").fullmatch
_LEGAL_TEXT = re.compile(r"[\x20-\x7e]*").fullmatch
# Names and values are the client's choice: the memos keep at most this many entries of
# at most this size (a few MiB however a client varies them).
_MEMO_LIMIT = 4096
_MEMO_NAME = 64
_MEMO_PAIR = 1024


def rule(name: str) -> str:
    """What happens to the client header `name` (FORWARD, DROP, REPLACE or FRAMING)."""
    lower = name.lower()
    if lower[:1] == ":" or lower in _CREDENTIALS or lower in _HOP_BY_HOP:
        return DROP
    if lower.startswith(INTERNAL_METADATA_PREFIX):
        return DROP
    if lower in _REPLACED:
        return REPLACE
    if lower in _FRAMING:
        return FRAMING
    if lower.startswith("grpc-"):
        return DROP
    return FORWARD


def illegal(name: str, value: str | bytes) -> bool:
    """Whether gRPC forbids this header (a C-core client would refuse to send it)."""
    if _LEGAL_NAME(name) is None:
        return True
    if name.endswith("-bin"):
        return False
    legal = _LEGAL_TEXT(value) if isinstance(value, str) else _LEGAL_VALUE(value)
    return legal is None


def invalid_header(name: str) -> InvalidArgument:
    """The refusal of a header gRPC forbids, naming it."""
    return InvalidArgument([(f"metadata.{name}", "is not a valid gRPC header name or value")])


def forwarded_metadata(metadata: Iterable[tuple[str, Any]]) -> list[tuple[str, Any]]:
    """The proxy path: the client metadata a back end receives (FORWARD only; the rest is
    rebuilt by the gRPC library or by the caller), or InvalidArgument for an illegal one."""
    kept = []
    for name, value in metadata:
        if illegal(name, value):
            raise invalid_header(name)
        if rule(name) == FORWARD:
            kept.append((name, value))
    return kept


def deadline_cap(info: MethodInfo, settings: GrpcSettings) -> float:
    """The gateway's own deadline for a call of `info` (streams get the longer one)."""
    if info.client_streaming or info.server_streaming:
        return settings.stream_deadline_seconds
    return settings.default_deadline_seconds


_UNITS = {b"H": 3600.0, b"M": 60.0, b"S": 1.0, b"m": 1e-3, b"u": 1e-6, b"n": 1e-9}


def parse_grpc_timeout(value: bytes) -> float | None:
    """Seconds in a grpc-timeout value (1-8 digits and a unit), None when malformed."""
    digits, unit = value[:-1], value[-1:]
    if not 0 < len(digits) <= 8 or not digits.isdigit() or unit not in _UNITS:
        return None
    return int(digits) * _UNITS[unit]


@functools.lru_cache(maxsize=16)  # asked for the gateway's own few deadlines
def grpc_timeout(seconds: float) -> bytes:
    """A grpc-timeout value (at most 8 digits, as the spec allows)."""
    millis = max(1, round(seconds * 1000))
    if millis < 10**8:
        return f"{millis}m".encode()
    return f"{min(10**8 - 1, round(seconds))}S".encode()


_DEADLINE_EXCEEDED = grpc.StatusCode.DEADLINE_EXCEEDED  # read once (an Enum class attribute)
# A call that ends DEADLINE_EXCEEDED this close to the client's own deadline ran out of it:
# each hop behind the gateway ends its calls a few milliseconds early.
_CALLER_MARGIN = 0.05


class Deadline:
    """One proxied call's deadline and its breaker's verdict, for both paths: the client's
    deadline if it sent one, else the gateway's own (`deadline_cap`). A DEADLINE_EXCEEDED
    is the caller's doing (not counted against the back end) when the client's deadline
    was the shorter one and the call ran until it."""

    __slots__ = ("_breaker", "_callers", "_started", "seconds")

    def __init__(self, breaker: CircuitBreaker, client: float | None, cap: float) -> None:
        self._breaker = breaker
        self.seconds = cap if client is None else client
        self._callers = client is not None and client < cap
        self._started = time.monotonic()

    def record(self, code: grpc.StatusCode, details: bool, message: str = "") -> None:
        """How the call ended, told to the back end's breaker (`message`: for its log)."""
        caller_deadline = (
            code is _DEADLINE_EXCEEDED
            and self._callers
            and time.monotonic() - self._started >= self.seconds - _CALLER_MARGIN
        )
        self._breaker.record_status(code, details, caller_deadline=caller_deadline, message=message)


_TRACE_NAMES = frozenset(name.encode() for name in TRACE_FIELDS)
_ILLEGAL_BYTE = re.compile(rb"[^\x20-\x7e]").search
# What the relay does with a header name: pass it (text, or binary), take it as trace
# context, skip it (its text value still checked), skip it unchecked (pseudo-headers,
# checked by the relay), or refuse the call.
_KEEP, _KEEP_BINARY, _TRACE, _SKIP, _SKIP_UNCHECKED, _REFUSE = range(6)
_memo: dict[bytes, int] = {}


def _judged(name: bytes) -> int:
    """What the relay does with header `name` (memoized: clients repeat their names)."""
    text = name.decode("latin-1")
    if text[:1] == ":":
        action = _SKIP_UNCHECKED
    elif _LEGAL_NAME(text) is None:
        action = _REFUSE
    else:
        found, binary = rule(text), text.endswith("-bin")
        if found == FORWARD or found == FRAMING:
            action = _KEEP_BINARY if binary else _KEEP
        elif name in _TRACE_NAMES:
            action = _TRACE
        else:
            action = _SKIP_UNCHECKED if binary else _SKIP
    if len(name) <= _MEMO_NAME and len(_memo) < _MEMO_LIMIT:
        _memo[name] = action
    return action


# Each (name, value) a client sent before, judged: clients repeat most of their headers
# call after call (all but the deadline and the trace context, which are not kept here).
# Bounded: emptied when full, so headers unique per call cannot crowd out repeated ones.
_pairs: dict[tuple[bytes, bytes], int] = {}


def _judged_pair(header: tuple[bytes, bytes]) -> int:
    """What the relay does with one header, its value checked (memoized when small)."""
    name, value = header
    found = _memo.get(name)
    by_name = action = _judged(name) if found is None else found
    if action in (_KEEP, _SKIP, _TRACE) and _ILLEGAL_BYTE(value) is not None:
        action = _REFUSE
    # Dropped headers (credentials among them) are judged anew each time: the memo is
    # process-wide and must never hold a token after its connection is gone.
    if (
        by_name not in (_TRACE, _SKIP)
        and name != b"grpc-timeout"
        and len(name) + len(value) <= _MEMO_PAIR
    ):
        if len(_pairs) >= _MEMO_LIMIT:  # headers unique per call filled it: start again
            _pairs.clear()
        _pairs[header] = action
    return action


def relayed_headers(
    headers: Iterable[tuple[bytes, bytes]],
) -> tuple[list[tuple[bytes, bytes]], list[tuple[str, str]]] | None:
    """The relay's fast path: the client headers a back end receives as sent (FORWARD and
    FRAMING), and the client's trace fields; None when a header is one gRPC forbids (the
    call then takes the full path, which refuses it)."""
    kept: list[tuple[bytes, bytes]] = []
    trace: list[tuple[str, str]] = []
    for header in headers:
        action = _pairs.get(header)
        if action is None:
            action = _judged_pair(header)
        if action == _KEEP or action == _KEEP_BINARY:
            kept.append(header)
        elif action == _TRACE:
            trace.append((header[0].decode(), header[1].decode("latin-1")))
        elif action == _REFUSE:
            return None
    return kept, trace
