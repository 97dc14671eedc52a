"""Recovery after a crash, through the gateway with the seed's breakers (5 failures, 60 s):
a back end killed -9 and restarted on its port after 4 s gets submissions again within 5 s
of its health going SERVING, because open breakers probe its health by themselves."""

from __future__ import annotations

import asyncio
import copy
import os
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc
import pytest

from aiwfe.app.suite import Suite, start_suite
from aiwfe.runtime.resilience.breaker import BreakerState, breakers_of
from tests.conftest import login
from tests.resilience.test_crash import DataPlatformProcess
from tests.taskproc.helpers import new_user, spec, submit
from tests.taskproc.test_durability import external_taskproc  # noqa: F401

pytestmark = pytest.mark.slow

OUTAGE = 4.0  # seconds between the kill and the restart (the 3-5 s crash)
WORKFLOW = spec({"name": "s0", "op": "noop"})


async def _outage_then_recovery(
    channel: grpc.aio.Channel,
    token: str,
    kill: Callable[[], Awaitable[None]],
    restart: Callable[[], Awaitable[None]],
    opened: Callable[[], bool],
) -> float:
    """Kills the back end, submits during the outage (each refused UNAVAILABLE) until a
    breaker on the path is open, restarts it after OUTAGE s (its health SERVING when
    `restart` returns), then submits every 0.1 s; returns seconds from SERVING to the first
    accepted submission."""
    await kill()
    killed_at = time.monotonic()
    while time.monotonic() - killed_at < OUTAGE:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await submit(channel, token, WORKFLOW)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        await asyncio.sleep(0.1)
    assert opened(), "no breaker opened during the outage"
    await restart()
    serving_at = time.monotonic()
    while True:
        try:
            await submit(channel, token, WORKFLOW)
            return time.monotonic() - serving_at
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc
            assert time.monotonic() - serving_at < 5, f"refused 5 s after SERVING: {exc}"
        await asyncio.sleep(0.1)


def _state(service: str, downstream: str) -> BreakerState:
    return next(b.state for b in breakers_of(service) if b.name == downstream)


async def test_taskproc_crash_recovers_within_5_s_of_serving(external_taskproc) -> None:  # noqa: F811
    """taskproc killed -9 for 4 s: the gateway's breaker for it opens, and once the restarted
    process is SERVING, submissions through the gateway succeed within 5 s."""
    suite, start = external_taskproc
    proc = await start()
    async with grpc.aio.insecure_channel(suite.address("gateway")) as ch:
        token = await new_user(suite, ch)
        await submit(ch, token, WORKFLOW)

        async def kill() -> None:
            os.killpg(proc.pid, signal.SIGKILL)
            await asyncio.to_thread(proc.wait, 10)

        async def restart() -> None:
            await start()  # returns on the readiness line, printed once SERVING

        took = await _outage_then_recovery(
            ch, token, kill, restart, lambda: _state("gateway", "taskproc") is BreakerState.OPEN
        )
        print(f"\ntaskproc: first accepted submit {took:.2f} s after SERVING")
        assert _state("gateway", "taskproc") is BreakerState.CLOSED


@pytest.fixture
async def dataplatform_process(
    base_overrides, tmp_path
) -> AsyncIterator[tuple[Suite, DataPlatformProcess]]:
    """dataplatform as a process, the other services in process, with the seed's breakers."""
    overrides = copy.deepcopy(base_overrides)
    dataplatform = DataPlatformProcess(overrides, tmp_path)
    overrides["services"] = {"dataplatform": {"port": dataplatform.port}}
    overrides["authentication"]["rate_limiting"] = {"api_requests": 100_000}
    await dataplatform.start()
    suite = None
    try:
        suite = await start_suite(overrides, only=("cognitive", "taskproc", "gateway"))
        yield suite, dataplatform
    finally:
        if suite is not None:
            await suite.stop()
        await dataplatform.stop()


async def test_dataplatform_crash_recovers_within_5_s_of_serving(dataplatform_process) -> None:
    """dataplatform killed -9 for 4 s: taskproc's breaker for it opens (the gateway's for
    taskproc does not), and once the restarted process is SERVING, submissions through the
    gateway succeed within 5 s."""
    suite, dataplatform = dataplatform_process
    async with grpc.aio.insecure_channel(suite.address("gateway")) as ch:
        token = await login(ch)
        await submit(ch, token, WORKFLOW)
        took = await _outage_then_recovery(
            ch,
            token,
            dataplatform.kill,
            dataplatform.start,  # returns on the readiness line, printed once SERVING
            lambda: _state("taskproc", "dataplatform") is BreakerState.OPEN,
        )
        print(f"\ndataplatform: first accepted submit {took:.2f} s after SERVING")
        assert _state("taskproc", "dataplatform") is BreakerState.CLOSED
        assert _state("gateway", "taskproc") is BreakerState.CLOSED
