"""The flood attacks of test_floods.py, run from a process of their own (so the
attacker's CPU is not counted in the latency of the client it competes with):
`python -m tests.gateway.conformance.attacker NAME PORT SECONDS` prints the GOAWAY error
code of each attacking connection, one per line."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable

from gateway import h2
from tests.gateway.conformance.raw import REQUEST, RawClient, literal_block

N = 20_000  # frames per flood: far more than any limit lets through
_UPLOAD = [(n, b"/t.T/Upload" if n == b":path" else v) for n, v in REQUEST]
_HANG = [(n, b"/t.T/Hang" if n == b":path" else v) for n, v in REQUEST]


def _continuation_flood(empty: bool) -> bytes:
    block = literal_block(REQUEST)
    if empty:
        pieces = [h2.frame(h2.CONTINUATION, 0, 1, b"")] * N
    else:
        pieces = [h2.frame(h2.CONTINUATION, 0, 1, block[i : i + 1]) for i in range(len(block))]
    return h2.frame(h2.HEADERS, 0, 1, b"") + b"".join(pieces)


def _streams(count: int, per_stream: Callable[[int], bytes]) -> bytes:
    return b"".join(per_stream(sid) for sid in range(1, 2 * count, 2))


ATTACKS: dict[str, Callable[[], bytes]] = {
    "continuation_empty": lambda: _continuation_flood(empty=True),
    "continuation_count": lambda: _continuation_flood(empty=False),
    "empty_data": lambda: (
        h2.frame(h2.HEADERS, h2.END_HEADERS, 1, literal_block(_UPLOAD))
        + h2.frame(h2.DATA, 0, 1, b"") * N
    ),
    "empty_headers": lambda: _streams(5000, lambda s: h2.frame(h2.HEADERS, h2.END_HEADERS, s, b"")),
    "header_count": lambda: h2.frame(
        h2.HEADERS,
        h2.END_HEADERS,
        1,
        literal_block([*REQUEST, *((b"x-f", b"") for _ in range(300))]),
    ),
    "settings": lambda: h2.settings([(h2.ENABLE_PUSH, 0)]) * N,
    "ping": lambda: h2.frame(h2.PING, 0, 0, b"pingpong") * N,
    "rapid_reset": lambda: _streams(
        5000,
        lambda s: (
            h2.frame(h2.HEADERS, h2.END_HEADERS, s, literal_block(_HANG))
            + h2.rst_stream(s, h2.CANCEL)
        ),
    ),
    "malformed_requests": lambda: _streams(
        5000,
        lambda s: h2.frame(
            h2.HEADERS, h2.END_HEADERS | h2.END_STREAM, s, literal_block([*REQUEST, (b"Bad", b"1")])
        ),
    ),
    "window_update": lambda: h2.window_update(0, 1) * N,
    "priority": lambda: h2.frame(h2.PRIORITY, 0, 1, b"\x00\x00\x00\x00\x10") * N,
    "unknown_frames": lambda: h2.frame(0x20, 0, 0, b"") * N,
}


async def _attack(port: int, payload: bytes) -> int:
    """One attacking connection: the GOAWAY code it ends with."""
    client = await RawClient.connect(port)
    try:
        client.send(payload)
        return (await client.goaway(10))[1]
    finally:
        client.close()


async def _attack(port: int, payload: bytes) -> int:
    """One attacking connection: the GOAWAY code it ends with (-1: closed without one)."""
    client = await RawClient.connect(port)
    try:
        client.send(payload)
        return (await client.goaway(10))[1]
    except Exception:
        return -1
    finally:
        client.close()


async def main(name: str, port: int, seconds: float) -> None:
    payload = ATTACKS[name]()
    stop = time.monotonic() + seconds
    while time.monotonic() < stop:
        print(await _attack(port, payload), flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2]), float(sys.argv[3])))
