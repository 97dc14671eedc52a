"""The adaptive concurrency limit (aiwfe/runtime/resilience/limiter.py) on a simulated clock."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import grpc

from aiwfe.runtime.config import LoadSheddingSettings
from aiwfe.runtime.interceptors import ErrorMappingInterceptor, LoadSheddingInterceptor
from aiwfe.runtime.resilience.limiter import ConcurrencyLimiter


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def run_window(limiter: ConcurrencyLimiter, clock: Clock, in_flight: int, latency: float) -> None:
    """One window: `in_flight` calls admitted at once, each taking `latency`, then a pause
    that ends the window (0.1 s)."""
    started = [limiter.try_acquire() for _ in range(in_flight)]
    clock.now += latency
    for s in started:
        if s is not None:
            limiter.release(s)
    clock.now += 0.1


def settings(**kw: object) -> LoadSheddingSettings:
    base: dict[str, object] = {"initial_limit": 64, "min_limit": 4, "max_limit": 256}
    return LoadSheddingSettings.model_validate({**base, **kw})


def test_the_limit_falls_when_latency_grows_and_recovers_when_it_does_not() -> None:
    """Latency over tolerance x the no-load latency (and over the floor) lowers the limit
    towards min_limit; latency back at its no-load value raises it again."""
    clock = Clock()
    limiter = ConcurrencyLimiter(settings(latency_floor_seconds=0.0), clock)
    run_window(limiter, clock, 20, 0.01)  # no-load latency: 10 ms
    run_window(limiter, clock, 20, 0.01)
    assert limiter.min_rtt is not None and abs(limiter.min_rtt - 0.01) < 1e-9
    for _ in range(40):
        run_window(limiter, clock, limiter.limit, 0.5)  # 50x slower: overloaded
    low = limiter.limit
    assert low < 16, low
    for _ in range(40):
        run_window(limiter, clock, limiter.limit, 0.01)
    assert limiter.limit > low


def test_latency_under_the_floor_never_lowers_the_limit() -> None:
    """A burst whose latency stays under latency_floor_seconds is no overload."""
    clock = Clock()
    limiter = ConcurrencyLimiter(settings(latency_floor_seconds=0.2), clock)
    run_window(limiter, clock, 20, 0.005)  # no-load latency: 5 ms
    for _ in range(30):
        run_window(limiter, clock, 64, 0.15)
    assert limiter.limit >= 64


def test_over_the_limit_is_refused_and_a_fixed_limit_does_not_move() -> None:
    """fixed_limit admits exactly that many at once, whatever the latency."""
    clock = Clock()
    limiter = ConcurrencyLimiter(settings(fixed_limit=3), clock)
    for _ in range(20):
        held = [limiter.try_acquire() for _ in range(5)]
        assert sum(s is not None for s in held) == 3
        clock.now += 1.0
        for s in held:
            if s is not None:
                limiter.release(s)
        clock.now += 0.1
    assert limiter.limit == 3 and limiter.in_flight == 0


def test_a_deadline_shorter_than_current_latency_is_refused_under_load() -> None:
    """With calls in flight taking ~0.5 s, a call with 0.1 s left is refused; when idle
    it is admitted (a stale estimate never locks callers out)."""
    clock = Clock()
    limiter = ConcurrencyLimiter(settings(fixed_limit=100, min_window_samples=1), clock)
    run_window(limiter, clock, 10, 0.5)
    assert limiter.short is not None and limiter.short >= 0.5
    busy = limiter.try_acquire()
    assert busy is not None
    assert limiter.try_acquire(time_remaining=0.1) is None
    assert limiter.try_acquire(time_remaining=5.0) is not None


def test_retry_after_grows_while_a_window_refuses_calls() -> None:
    """RetryInfo's delay grows per window while more than 5% of its calls are refused (up
    to the cap) and falls back to the minimum once none are."""
    clock = Clock()
    limiter = ConcurrencyLimiter(settings(fixed_limit=10, min_retry_after_seconds=0.05), clock)
    for _ in range(30):
        run_window(limiter, clock, 11, 0.1)  # 10 admitted, 1 refused (9%)
    assert limiter.retry_after() == 5.0
    for _ in range(60):
        run_window(limiter, clock, 10, 0.1)
    assert limiter.retry_after() == 0.05


def test_a_fast_service_is_never_probed_into_refusing_its_callers() -> None:
    """32 calls in flight at 10 ms, for longer than the probe interval: latency stays under
    the floor, so the limit never drops to min_limit to measure min_rtt and no call is
    refused (a healthy service under steady load sheds nothing)."""
    clock = Clock()
    limiter = ConcurrencyLimiter(settings(probe_interval_seconds=1.0), clock)
    for _ in range(60):  # 60 windows of 0.11 s: several probe intervals
        run_window(limiter, clock, 32, 0.01)
    assert limiter.refused == 0
    assert limiter.limit >= 32


def test_steady_load_over_the_floor_is_never_probed_into_refusals() -> None:
    """32 calls in flight at a stable 80 ms (over the 50 ms floor, within tolerance of the
    no-load latency measured) across ten probe intervals: nobody is refused, so min_rtt
    holds nobody back and the limit is never pinned to min_limit to re-measure it (it was:
    taskproc refused SubmitWorkflow at "8 calls in flight (limit 8)" on a quiet machine)."""
    clock = Clock()
    limiter = ConcurrencyLimiter(settings(probe_interval_seconds=1.0), clock)
    for _ in range(60):  # 60 windows of 0.18 s
        run_window(limiter, clock, 32, 0.08)
    assert limiter.refused == 0
    assert limiter.limit >= 32


def test_a_limit_held_down_by_a_stale_min_rtt_is_probed_and_recovers() -> None:
    """min_rtt measured at 10 ms, then the service's no-load latency becomes 40 ms: the
    limit falls and refuses callers, so once the probe is due min_rtt is measured again at
    min_limit (40 ms) and the limit climbs back."""
    clock = Clock()
    limiter = ConcurrencyLimiter(
        settings(latency_floor_seconds=0.0, probe_interval_seconds=1.0), clock
    )
    run_window(limiter, clock, 20, 0.01)
    run_window(limiter, clock, 20, 0.01)
    for _ in range(12):  # 2.2 s: the probe falls due while callers are refused
        run_window(limiter, clock, 64, 0.04)
    assert limiter.min_rtt is not None and abs(limiter.min_rtt - 0.04) < 1e-9
    low = limiter.limit
    for _ in range(30):
        run_window(limiter, clock, 64, 0.04)
    assert limiter.limit > low


def test_the_probe_measures_only_calls_admitted_after_it_began() -> None:
    """Calls admitted at the full limit that end during the probe (their latency a loaded
    one) neither end it nor count as the no-load latency: min_rtt comes from the calls
    the probe admitted at min_limit (30 ms here, the service having slowed from 10 ms)."""
    clock = Clock()
    limiter = ConcurrencyLimiter(
        settings(latency_floor_seconds=0.0, probe_interval_seconds=1.0), clock
    )
    run_window(limiter, clock, 20, 0.01)
    run_window(limiter, clock, 20, 0.01)  # min_rtt 10 ms
    held = [limiter.try_acquire() for _ in range(70)]  # 64 admitted, 6 refused
    slow = [s for s in held if s is not None]
    assert len(slow) == 64 and limiter.refused == 6
    clock.now = 1.5  # the probe is due; 20 slow calls end: the window ends over latency
    for s in slow[:20]:
        limiter.release(s)
    assert limiter.limit == 4  # probing at min_limit
    clock.now = 1.7
    for s in slow[20:]:  # admitted before the probe, ended in it
        limiter.release(s)
    assert limiter.limit == 4  # still probing: those calls measured nothing
    for _ in range(3):
        run_window(limiter, clock, 4, 0.03)
    assert limiter.min_rtt is not None and abs(limiter.min_rtt - 0.03) < 1e-9
    assert limiter.limit > 4


async def test_a_server_at_steady_load_over_the_floor_refuses_nothing() -> None:
    """Through a real gRPC server with the shedding interceptor: 32 callers of a handler
    taking 80 ms for 2.5 s, the probe due every 0.5 s: every call succeeds."""
    limiter = ConcurrencyLimiter(LoadSheddingSettings(probe_interval_seconds=0.5))

    async def slow(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        await asyncio.sleep(0.08)
        return request

    handler = grpc.method_handlers_generic_handler(
        "test.Steady", {"Call": grpc.unary_unary_rpc_method_handler(slow)}
    )
    shedding = LoadSheddingInterceptor(limiter, "steady")
    interceptors: list[Any] = [ErrorMappingInterceptor(), shedding]
    server = grpc.aio.server(interceptors=interceptors)
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    codes: dict[str, int] = {}
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.unary_unary("/test.Steady/Call")
            end = time.monotonic() + 2.5

            async def loop() -> None:
                while time.monotonic() < end:
                    try:
                        await call(b"x", timeout=10)
                        name = "OK"
                    except grpc.aio.AioRpcError as exc:
                        name = exc.code().name
                    codes[name] = codes.get(name, 0) + 1

            await asyncio.gather(*(loop() for _ in range(32)))
    finally:
        await server.stop(None)
    assert set(codes) == {"OK"} and limiter.refused == 0, codes
