"""The `overload` scenario: Embed through the gateway at 10x the concurrency that saturates
the suite, with load shedding on and off.

Each variant has a server process of its own (`benchmarks.servers`, shedding switched by
`AIWFE_LOAD_SHEDDING__ENABLED`); both are up at once and measured in rounds that alternate
between them (as the harness's latency slices do), each round a slice of three phases:
- anchor: Embed direct to cognitive at 1 in flight (the machine's speed that moment);
- unloaded maximum: closed loops at `concurrency` (32) in flight through the gateway;
- overload: closed loops at `factor` x that (320), each call with a 2 s deadline. A refused
  call (RESOURCE_EXHAUSTED or UNAVAILABLE) waits the RetryInfo delay it was given before
  its loop sends again, as a well-behaved gRPC client does.

Reported: p50/p99 of admitted calls, p99 of refused ones, the share refused, admitted
throughput against the unloaded maximum, and how many calls ended DEADLINE_EXCEEDED.
Refusals are also counted by who made them, as their message names it: the gateway's
relay ("gateway: cognitive overloaded", its limiter for that back end) or a service's
shedding interceptor ("cognitive overloaded", "gateway overloaded" for the gateway's own
gRPC server).
The request is 8 short texts with `bypass_cache`: each call embeds them and writes them to
every cache layer (Redis, and PostgreSQL through dataplatform), so the suite saturates on
work that waits (a thread, Redis, dataplatform) as a real Embed does, not only on CPU.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from aiwfe.cognitive.v1 import cognitive_service_pb2 as cog_pb
from aiwfe.runtime.identity import IDENTITY_METADATA_KEY, InternalIdentity
from benchmarks import load

FACTOR = 10
DEADLINE_S = 2.0
TEXTS = 8
ROUNDS = 3
REFUSED = frozenset({grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE})
SHEDDING_ENV = "AIWFE_LOAD_SHEDDING__ENABLED"


def request(texts: int = TEXTS, bypass: bool = False) -> bytes:
    return cog_pb.EmbedRequest(
        texts=[f"overload probe {i}: the quick brown fox" for i in range(texts)],
        bypass_cache=bypass,
    ).SerializeToString()


def retry_delay(error: grpc.aio.AioRpcError) -> float | None:
    """The RetryInfo delay a refusal carries (None: none given)."""
    status = rpc_status.from_call(error)
    for detail in status.details if status else ():
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            return info.retry_delay.seconds + info.retry_delay.nanos / 1e9
    return None


def refuser(error: grpc.aio.AioRpcError) -> str:
    """Who refused a call: "gateway: cognitive" (the relay), a service's name (its
    interceptor), or the status code."""
    who, overloaded, _ = (error.details() or "").partition(" overloaded")
    return who if overloaded else error.code().name


@dataclass
class Outcome:
    """What one phase of closed loops saw."""

    ok: list[int] = field(default_factory=list)  # ns
    refused: list[int] = field(default_factory=list)  # ns
    codes: Counter[str] = field(default_factory=Counter)
    without_retry_info: int = 0
    seconds: float = 0.0
    refused_by: dict[str, list[int]] = field(default_factory=dict)  # ns, by who refused

    def summary(self) -> dict[str, Any]:
        def pct(values: list[int], q: float) -> float | None:
            return round(float(np.percentile(values, q)) / 1e6, 2) if values else None

        total = sum(self.codes.values())
        return {
            "calls": total,
            "admitted_rps": round(len(self.ok) / self.seconds, 1) if self.seconds else 0.0,
            "admitted_p50_ms": pct(self.ok, 50),
            "admitted_p99_ms": pct(self.ok, 99),
            "refused_p50_ms": pct(self.refused, 50),
            "refused_p99_ms": pct(self.refused, 99),
            "refused_share": round(len(self.refused) / total, 4) if total else 0.0,
            "refused_without_retry_info": self.without_retry_info,
            "refused_by": {
                who: {"calls": len(ns), "p50_ms": pct(ns, 50), "p99_ms": pct(ns, 99)}
                for who, ns in sorted(self.refused_by.items())
            },
            "deadline_exceeded": self.codes.get("DEADLINE_EXCEEDED", 0),
            "codes": dict(self.codes),
        }


async def drive(
    channel: grpc.aio.Channel,
    metadata: tuple[tuple[str, str], ...],
    body: bytes,
    concurrency: int,
    seconds: float,
    timeout: float = DEADLINE_S,
) -> Outcome:
    """`concurrency` closed loops for `seconds`; a refused loop waits its RetryInfo delay."""
    call = channel.unary_unary(load.EMBED_METHOD)
    out = Outcome()
    start = time.perf_counter()
    end = start + seconds

    async def loop() -> None:
        while time.perf_counter() < end:
            t0 = time.perf_counter_ns()
            try:
                await call(body, metadata=metadata, timeout=timeout)
            except grpc.aio.AioRpcError as exc:
                elapsed = time.perf_counter_ns() - t0
                out.codes[exc.code().name] += 1
                if exc.code() in REFUSED:
                    out.refused.append(elapsed)
                    out.refused_by.setdefault(refuser(exc), []).append(elapsed)
                    delay = retry_delay(exc)
                    if delay is None:
                        out.without_retry_info += 1
                    # Jittered, as gRPC clients back off, so retries do not come in waves;
                    # never past the phase's end (its seconds would count the sleep).
                    pause = (delay or 0.05) * random.uniform(0.8, 1.2)
                    await asyncio.sleep(min(pause, max(0.0, end - time.perf_counter())))
                continue
            out.ok.append(time.perf_counter_ns() - t0)
            out.codes["OK"] += 1

    with load._collector_held():
        await asyncio.gather(*(loop() for _ in range(concurrency)))
    out.seconds = time.perf_counter() - start
    return out


@dataclass
class _Variant:
    """One server process (shedding on or off) and what was measured on it."""

    name: str
    server: Any
    gateway: grpc.aio.Channel
    direct: grpc.aio.Channel
    bearer: tuple[tuple[str, str], ...]
    internal: InternalIdentity
    anchor: Outcome = field(default_factory=Outcome)
    unloaded: Outcome = field(default_factory=Outcome)
    overload: Outcome = field(default_factory=Outcome)

    def internal_metadata(self) -> tuple[tuple[str, str], ...]:
        # A fresh assertion per slice: internal assertions live 60 s.
        return ((IDENTITY_METADATA_KEY, self.internal.assertion(None, "bench")),)

    def result(self) -> dict[str, Any]:
        base, over = self.unloaded.summary(), self.overload.summary()
        return {
            "direct_p50_ms": self.anchor.summary()["admitted_p50_ms"],
            "unloaded": base,
            "overload": over,
            "throughput_vs_unloaded": (
                round(over["admitted_rps"] / base["admitted_rps"], 3)
                if base["admitted_rps"]
                else None
            ),
        }


def _merge(into: Outcome, part: Outcome) -> None:
    into.ok += part.ok
    into.refused += part.refused
    into.codes.update(part.codes)
    into.without_retry_info += part.without_retry_info
    for who, ns in part.refused_by.items():
        into.refused_by.setdefault(who, []).extend(ns)
    into.seconds += part.seconds


async def _round(v: _Variant, concurrency: int, seconds: float, warmup: float, body: bytes) -> None:
    """One slice of each phase on `v`, each after a warm-up at its concurrency (the limit
    and the RetryInfo delay adapt to the load in the warm-up)."""
    _merge(v.anchor, await drive(v.direct, v.internal_metadata(), body, 1, seconds / 2))
    await drive(v.gateway, v.bearer, body, concurrency, warmup)
    _merge(v.unloaded, await drive(v.gateway, v.bearer, body, concurrency, seconds))
    await drive(v.gateway, v.bearer, body, concurrency * FACTOR, warmup)
    _merge(v.overload, await drive(v.gateway, v.bearer, body, concurrency * FACTOR, seconds))


async def run(
    start_server: Any,
    login: Any,
    concurrency: int,
    seconds: float,
    warmup: float,
    texts: int = TEXTS,
    rounds: int = ROUNDS,
) -> dict[str, Any]:
    """Both variants up side by side, measured in rounds that alternate between them (the
    first rotates), so the machine's drift hits both alike; `seconds` per phase in all."""
    out: dict[str, Any] = {
        "texts_per_call": texts,
        "concurrency": concurrency,
        "overload_concurrency": concurrency * FACTOR,
        "deadline_s": DEADLINE_S,
        "seconds": seconds,
        "rounds": rounds,
    }
    body = request(texts, bypass=True)
    async with contextlib.AsyncExitStack() as stack:
        variants: list[_Variant] = []
        for name, enabled in (("shedding_on", "true"), ("shedding_off", "false")):
            print(f"starting overload ({name}) ...", file=sys.stderr, flush=True)
            server = await asyncio.to_thread(start_server, {SHEDDING_ENV: enabled})
            stack.push_async_callback(asyncio.to_thread, server.stop)
            token = await login(server.address("gateway"), server.admin_password)
            gateway = grpc.aio.insecure_channel(server.address("gateway"))
            direct = grpc.aio.insecure_channel(server.address("cognitive"))
            stack.push_async_callback(gateway.close)
            stack.push_async_callback(direct.close)
            bearer = (("authorization", f"Bearer {token}"), ("cache-control", "no-store"))
            variant = _Variant(
                name, server, gateway, direct, bearer, InternalIdentity(server.internal_secret)
            )
            await load.preflight(gateway, bearer)
            await drive(direct, variant.internal_metadata(), body, 1, warmup)
            variants.append(variant)
        for r in range(rounds):
            print(f"overload: round {r + 1} of {rounds} ...", file=sys.stderr, flush=True)
            turn = r % len(variants)
            for v in variants[turn:] + variants[:turn]:
                await _round(v, concurrency, seconds / rounds, warmup, body)
        for v in variants:
            out[v.name] = v.result()
    return out


def render(result: dict[str, Any]) -> list[str]:
    """Lines for the printed report."""
    lines = [
        "",
        f"overload: Embed of {result['texts_per_call']} texts (cache bypassed) via the gateway, "
        f"{result['overload_concurrency']} in flight (unloaded max measured at "
        f"{result['concurrency']}), {result['deadline_s']} s deadlines, refused calls retried "
        "after their RetryInfo delay",
    ]
    for name in ("shedding_on", "shedding_off"):
        v = result.get(name)
        if not v:
            continue
        o, u = v["overload"], v["unloaded"]
        lines.append(
            f"  {name}: admitted p50 {o['admitted_p50_ms']} ms p99 {o['admitted_p99_ms']} ms; "
            f"refused {o['refused_share']:.1%} (p99 {o['refused_p99_ms']} ms, "
            f"{o['refused_without_retry_info']} without RetryInfo); admitted "
            f"{o['admitted_rps']:,.0f} rps = {v['throughput_vs_unloaded']:.2f}x the unloaded "
            f"{u['admitted_rps']:,.0f} rps (p50 {u['admitted_p50_ms']} ms); "
            f"DEADLINE_EXCEEDED {o['deadline_exceeded']}; direct p50 {v['direct_p50_ms']} ms"
        )
        if o.get("refused_by"):
            by = ", ".join(
                f"{who} {r['calls']} (p50 {r['p50_ms']} ms, p99 {r['p99_ms']} ms)"
                for who, r in o["refused_by"].items()
            )
            lines.append(f"    refused by: {by}")
    return lines
