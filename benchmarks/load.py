"""Closed-loop load generation with grpc.aio: N calls in flight, bounded by time and count.

Requests are sent pre-serialized and responses kept as bytes (no protobuf work per call on
the client), so the load generator spends its CPU on the transport, not on messages; the
first reply is parsed once to check it is a real, cached embedding. The generator's own
garbage collector is held off while it measures: a full collection of the harness process
stalled it for ~40 ms and showed up as a server's p99 (coordinated omission).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np

from aiwfe.cognitive.v1 import cognitive_service_pb2 as cog_pb
from benchmarks import procstat

EMBED_METHOD = "/aiwfe.cognitive.v1.CognitiveService/Embed"
# One short text: cached after the warm-up, so the figures measure the hops, not embedding.
EMBED_TEXT = "benchmark probe: the quick brown fox jumps over the lazy dog"
CALL_TIMEOUT_S = 10.0


def embed_request() -> bytes:
    return cog_pb.EmbedRequest(texts=[EMBED_TEXT]).SerializeToString()


@dataclass
class PhaseResult:
    """One timed phase at a fixed concurrency."""

    concurrency: int
    requests: int = 0
    errors: int = 0
    error_codes: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    rps: float = 0.0
    p50_ms: float | None = None
    p95_ms: float | None = None
    p99_ms: float | None = None
    mean_ms: float | None = None
    max_ms: float | None = None
    server_cpu_us_per_request: float | None = None
    proxy_cpu_us_per_request: float | None = None
    client_cpu_us_per_request: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {k: _round(v) for k, v in self.__dict__.items()}


def _round(value: Any) -> Any:
    return round(value, 4) if isinstance(value, float) else value


@contextlib.contextmanager
def _collector_held() -> Iterator[None]:
    """No collection pauses in this process while it measures; one collection after."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
        gc.collect()


class PreflightError(RuntimeError):
    """The target does not answer Embed correctly; the scenario cannot be measured."""


async def preflight(
    channel: grpc.aio.Channel, metadata: tuple[tuple[str, str], ...], attempts: int = 50
) -> cog_pb.EmbedResponse:
    """Calls Embed until it succeeds (a proxy may still be binding), then checks the reply."""
    call = channel.unary_unary(EMBED_METHOD)
    request = embed_request()
    last: grpc.aio.AioRpcError | None = None
    for _ in range(attempts):
        try:
            raw = await call(request, metadata=metadata, timeout=CALL_TIMEOUT_S)
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.UNAVAILABLE:
                raise PreflightError(f"{exc.code().name}: {exc.details()}") from None
            last = exc
            await asyncio.sleep(0.1)
            continue
        reply = cog_pb.EmbedResponse.FromString(raw)
        if len(reply.embeddings) != 1 or len(reply.embeddings[0].values) != reply.dimension:
            raise PreflightError(f"unexpected Embed reply: {len(reply.embeddings)} embeddings")
        return reply
    assert last is not None
    raise PreflightError(f"{last.code().name}: {last.details()}")


@dataclass
class Samples:
    """What measured slices of one phase add up to (see `measure`)."""

    latencies: list[int] = field(default_factory=list)  # ns
    errors: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0
    server_cpu: float | None = None  # None: not measured
    proxy_cpu: float | None = None
    client_cpu: float | None = None
    slice_p50_ms: list[float] = field(default_factory=list)

    def result(self, concurrency: int) -> PhaseResult:
        result = PhaseResult(concurrency=concurrency, seconds=self.seconds)
        result.requests = len(self.latencies)
        result.errors = sum(self.errors.values())
        result.error_codes = dict(self.errors)
        if self.latencies:
            ms = np.asarray(self.latencies, dtype=np.float64) / 1e6
            p50, p95, p99 = np.percentile(ms, [50, 95, 99])
            result.p50_ms, result.p95_ms, result.p99_ms = float(p50), float(p95), float(p99)
            result.mean_ms, result.max_ms = float(ms.mean()), float(ms.max())
            result.rps = result.requests / self.seconds
            # Per completed request; /proc resolution is one clock tick (usually 10 ms).
            if self.server_cpu is not None:
                result.server_cpu_us_per_request = self.server_cpu / result.requests * 1e6
            if self.client_cpu is not None:
                result.client_cpu_us_per_request = self.client_cpu / result.requests * 1e6
            if self.proxy_cpu is not None:
                result.proxy_cpu_us_per_request = self.proxy_cpu / result.requests * 1e6
        return result


async def _drive(
    channel: grpc.aio.Channel,
    metadata: tuple[tuple[str, str], ...],
    concurrency: int,
    seconds: float,
    max_requests: int,
) -> tuple[list[int], Counter[str], float]:
    """Runs `concurrency` closed loops; returns latencies (ns), error codes, elapsed s."""
    call = channel.unary_unary(EMBED_METHOD)
    request = embed_request()
    latencies: list[int] = []
    errors: Counter[str] = Counter()
    started = 0
    start = time.perf_counter()
    deadline = start + seconds

    async def loop() -> None:
        nonlocal started
        while started < max_requests and time.perf_counter() < deadline:
            started += 1
            t0 = time.perf_counter_ns()
            try:
                await call(request, metadata=metadata, timeout=CALL_TIMEOUT_S)
            except grpc.aio.AioRpcError as exc:
                errors[exc.code().name] += 1
                continue
            latencies.append(time.perf_counter_ns() - t0)

    await asyncio.gather(*(loop() for _ in range(concurrency)))
    return latencies, errors, time.perf_counter() - start


async def run_rate(
    channel: grpc.aio.Channel,
    metadata: tuple[tuple[str, str], ...],
    rate: float,
    seconds: float,
) -> PhaseResult:
    """Open loop at a fixed request rate (e.g. half the measured maximum): latency under a
    realistic load, not at saturation. Calls still in flight at the end are awaited."""
    call = channel.unary_unary(EMBED_METHOD)
    request = embed_request()
    latencies: list[int] = []
    errors: Counter[str] = Counter()

    async def one() -> None:
        t0 = time.perf_counter_ns()
        try:
            await call(request, metadata=metadata, timeout=CALL_TIMEOUT_S)
        except grpc.aio.AioRpcError as exc:
            errors[exc.code().name] += 1
            return
        latencies.append(time.perf_counter_ns() - t0)

    tasks = []
    interval = 1.0 / rate
    n = int(rate * seconds)
    with _collector_held():
        start = time.perf_counter()
        for i in range(n):
            delay = start + i * interval - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one()))
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - start
    return Samples(latencies, errors, elapsed).result(0)


async def measure(
    channel: grpc.aio.Channel,
    metadata: tuple[tuple[str, str], ...],
    concurrency: int,
    seconds: float,
    max_requests: int,
    server_pids: list[int],
    proxy_pids: list[int] | None,
    into: Samples,
) -> None:
    """One measured slice of closed loops, added to `into` with the CPU it cost."""
    with _collector_held():
        server_cpu0 = procstat.total_cpu_seconds(server_pids)
        proxy_cpu0 = procstat.total_cpu_seconds(proxy_pids) if proxy_pids else 0.0
        client_cpu0 = time.process_time()
        latencies, errors, elapsed = await _drive(
            channel, metadata, concurrency, seconds, max_requests
        )
        into.client_cpu = (into.client_cpu or 0.0) + time.process_time() - client_cpu0
        server_cpu = procstat.total_cpu_seconds(server_pids) - server_cpu0
        into.server_cpu = (into.server_cpu or 0.0) + server_cpu
        if proxy_pids:
            proxy_cpu = procstat.total_cpu_seconds(proxy_pids) - proxy_cpu0
            into.proxy_cpu = (into.proxy_cpu or 0.0) + proxy_cpu
    into.latencies += latencies
    into.errors.update(errors)
    into.seconds += elapsed
    if latencies:
        into.slice_p50_ms.append(float(np.median(latencies)) / 1e6)


async def warm_up(
    channel: grpc.aio.Channel,
    metadata: tuple[tuple[str, str], ...],
    concurrency: int,
    seconds: float,
    max_requests: int,
) -> None:
    await _drive(channel, metadata, concurrency, seconds, max_requests)


async def run_phase(
    channel: grpc.aio.Channel,
    metadata: tuple[tuple[str, str], ...],
    concurrency: int,
    seconds: float,
    warmup_seconds: float,
    max_requests: int,
    server_pids: list[int],
    proxy_pids: list[int] | None = None,
) -> PhaseResult:
    """Warms up, then measures latency, throughput and CPU per request for one phase."""
    await warm_up(channel, metadata, concurrency, warmup_seconds, max_requests)
    samples = Samples()
    await measure(
        channel, metadata, concurrency, seconds, max_requests, server_pids, proxy_pids, samples
    )
    return samples.result(concurrency)
