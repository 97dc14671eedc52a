"""The HTTP/2 attack family against the relay (CVE-2019-9511…9518, CVE-2023-44487 rapid
reset, CVE-2024-27316 CONTINUATION): each flood ends its connection with
GOAWAY(ENHANCE_YOUR_CALM) while a normal client on another connection is served
throughout, its latency measured during the attacks."""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

import grpc
import pytest

from gateway import h2
from tests.gateway.conformance.attacker import ATTACKS
from tests.gateway.conformance.conftest import Relayed
from tests.gateway.conformance.raw import RawClient

# The goal is a p99 of 50 ms during any attack (a benchmark figure: printed here, reported in
# README from a quiet run). The test guards against starvation: before the flood limits a
# rapid-reset flood held the normal client's calls for ~1 s. With 70-600 calls a p99 is one
# or two samples, so one scheduling pause of a shared 2-core machine (seen: 290 ms in a CI
# run while p50 was 9.5 ms) is bounded by the slowest call, and the bulk by the p95.
P95_BOUND = 0.250
MAX_BOUND = 1.0
ROOT = Path(__file__).parents[3]


@pytest.mark.parametrize("attack", ATTACKS.keys())
async def test_a_flood_is_calmed_while_others_are_served(
    relayed_port: Relayed, attack: str
) -> None:
    """Each flood, repeated on fresh connections for a second, ends every one of them with
    GOAWAY(ENHANCE_YOUR_CALM); a normal client meanwhile never fails and keeps its p99
    latency low."""
    latencies: list[float] = []
    async with grpc.aio.insecure_channel(f"127.0.0.1:{relayed_port.port}") as channel:
        echo = channel.unary_unary("/t.T/Echo")
        assert await echo(b"warm", timeout=5) == b"warm"
        attacker = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tests.gateway.conformance.attacker",
            attack, str(relayed_port.port), "1.5", stdout=asyncio.subprocess.PIPE, cwd=ROOT,
        )  # fmt: skip
        await asyncio.sleep(0.3)  # it starts
        stop = time.perf_counter() + 1.0

        async def normal() -> None:
            while time.perf_counter() < stop:
                started = time.perf_counter()
                assert await echo(b"normal", timeout=5) == b"normal"  # never UNAVAILABLE
                latencies.append(time.perf_counter() - started)

        await normal()
        output, _ = await attacker.communicate()
        codes = [int(line) for line in output.split()]
    latencies.sort()
    p99 = latencies[int(len(latencies) * 0.99)]
    p95 = latencies[int(len(latencies) * 0.95)]
    p50 = latencies[len(latencies) // 2]
    calls = f"normal client {len(latencies)} calls"
    print(
        f"\n{attack}: {len(codes)} attacks, {calls}, p50 {p50 * 1e3:.1f} ms, p99 {p99 * 1e3:.1f} ms"
    )
    # Each attacking connection ends in GOAWAY(ENHANCE_YOUR_CALM); the odd one whose unread
    # flood made the kernel reset the socket (-1) lost the GOAWAY on the way.
    assert set(codes) <= {h2.ENHANCE_YOUR_CALM, -1}
    assert codes.count(h2.ENHANCE_YOUR_CALM) >= 0.9 * len(codes) > 0
    assert p95 < P95_BOUND and latencies[-1] < MAX_BOUND
    # The attacks cost the back end nothing but what a normal stream would.
    assert relayed_port.harness.finished.count(grpc.StatusCode.OK) == len(latencies) + 1


async def test_pings_without_data_are_keepalive_strikes(relayed_port: Relayed) -> None:
    """grpc's keepalive enforcement: PINGs closer than the minimum interval with no data
    in between count as strikes; one over the limit is GOAWAY(too_many_pings), while a
    PING after each call is never a strike."""
    client = await RawClient.connect(relayed_port.port)
    for sid in (1, 3, 5, 7):
        client.call(sid, b"p")
        await client.response(sid)
        await client.ping_ack(b"withdata")
    for _ in range(2):  # the limit is two strikes
        await client.ping_ack(b"idle....")
    client.send(h2.frame(h2.PING, 0, 0, b"idle...."))
    _, code = await client.goaway()
    assert code == h2.ENHANCE_YOUR_CALM
