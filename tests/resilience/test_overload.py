"""Load shedding: calls over a service's concurrency limit are refused at once with
RESOURCE_EXHAUSTED + RetryInfo (reason OVERLOADED), through the gateway; admitted calls
succeed; health and streams are never refused for unary load. The gateway's relay sheds
the calls it sends straight to a back end itself, from their first frame."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from aiwfe.app.suite import Suite, start_suite
from aiwfe.cognitive.v1 import cognitive_service_pb2 as cog_pb
from aiwfe.cognitive.v1 import cognitive_service_pb2_grpc as cog_grpc
from aiwfe.runtime.resilience.breaker import BreakerState
from aiwfe.taskproc.v1 import workflow_service_pb2 as wf_pb
from aiwfe.taskproc.v1 import workflow_service_pb2_grpc as wf_grpc
from gateway.front import FrontDoor
from gateway.service import GatewayService
from tests.conftest import bearer, login
from tests.taskproc.helpers import get, new_user, spec, submit, watch

T = TypeVar("T")

LIMIT = 2
BURST = 16
TEXTS = 40  # over the built-in backend's thread threshold: the handler awaits its work
# The relay's refusals are due within 100 ms; asserted with room for a loaded machine.
REFUSED_WITHIN_S = 0.25
NO_STORE = ("cache-control", "no-store")  # no response cache: the relay's fast path


@pytest.fixture
async def suite(base_overrides: dict[str, Any]) -> AsyncIterator[Suite]:
    """The four services with a fixed concurrency limit of 2 unary calls each."""
    overrides = {**base_overrides, "load_shedding": {"fixed_limit": LIMIT}}
    running = await start_suite(overrides)
    yield running
    await running.stop()


def _details(error: grpc.aio.AioRpcError) -> tuple[str | None, float | None]:
    """The ErrorInfo reason and the RetryInfo delay (s) of a failed call."""
    status = rpc_status.from_call(error)
    reason = delay = None
    for detail in status.details if status else ():
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason = info.reason
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
            delay = retry.retry_delay.seconds + retry.retry_delay.nanos / 1e9
    return reason, delay


async def _set_up(call: Callable[[], Awaitable[T]]) -> T:
    """A setup call made as a well-behaved client makes it: shed, it is sent again after
    the delay it was given (the suite's own loops may hold both slots for a moment on a
    busy machine)."""
    for _ in range(30):
        try:
            return await call()
        except grpc.aio.AioRpcError as err:
            if err.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                raise
            await asyncio.sleep(_details(err)[1] or 0.1)
    return await call()


async def _serving(channel: grpc.aio.Channel) -> int:
    reply = await health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(), timeout=5
    )
    return reply.status


async def test_a_burst_over_the_limit_is_refused_at_once_with_retry_info(suite: Suite) -> None:
    """16 concurrent Embeds through the gateway against a limit of 2: the excess is refused
    RESOURCE_EXHAUSTED/OVERLOADED with RetryInfo within a second, the rest succeed, health
    answers SERVING throughout, and the gateway's breaker for cognitive stays closed."""
    async with grpc.aio.insecure_channel(suite.address("gateway")) as channel:
        metadata = (*bearer(await _set_up(lambda: login(channel))), ("cache-control", "no-store"))
        embed = cog_grpc.CognitiveServiceStub(channel).Embed

        async def one(i: int) -> tuple[float, grpc.aio.AioRpcError | None]:
            texts = [f"burst {uuid.uuid4().hex} {i} {n}" for n in range(TEXTS)]
            started = time.perf_counter()
            try:
                await embed(
                    cog_pb.EmbedRequest(texts=texts, bypass_cache=True),
                    metadata=metadata,
                    timeout=30,
                )
            except grpc.aio.AioRpcError as exc:
                return time.perf_counter() - started, exc
            return time.perf_counter() - started, None

        calls = [asyncio.create_task(one(i)) for i in range(BURST)]
        health = await asyncio.gather(
            _serving(channel),
            *(_serving(c) for c in [channel] * 2),
        )
        outcomes = await asyncio.gather(*calls)
    assert set(health) == {health_pb2.HealthCheckResponse.SERVING}
    admitted = [t for t, exc in outcomes if exc is None]
    refused = [(t, exc) for t, exc in outcomes if exc is not None]
    assert admitted, "no call was admitted"
    assert len(refused) >= BURST // 2, f"only {len(refused)} of {BURST} refused"
    for elapsed, exc in refused:
        assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, exc
        reason, delay = _details(exc)
        assert reason == "OVERLOADED"
        assert delay is not None and 0 < delay <= 5.0
        # At once: no queueing (a wide margin for a loaded machine; ~10-50 ms here).
        assert elapsed < 1.0, f"refusal took {elapsed:.3f} s"
    # More refusals than the breaker's threshold went through it: shedding is no failure.
    gateway = suite.running["gateway"].service
    assert isinstance(gateway, GatewayService)
    assert gateway.upstreams["aiwfe.cognitive.v1"].breaker.state is BreakerState.CLOSED


async def test_slots_come_back_when_calls_end_even_abandoned(suite: Suite) -> None:
    """Calls abandoned by their caller (a 20 ms deadline on a slower Embed) give their
    slots back, so the limit is not eaten away: afterwards every limiter (the relay's
    included) is idle and a call succeeds."""
    limiter = suite.running["cognitive"].limiter
    assert limiter is not None
    async with grpc.aio.insecure_channel(suite.address("gateway")) as channel:
        metadata = (*bearer(await _set_up(lambda: login(channel))), ("cache-control", "no-store"))
        embed = cog_grpc.CognitiveServiceStub(channel).Embed

        async def abandoned(i: int) -> grpc.StatusCode:
            texts = [f"abandoned {uuid.uuid4().hex} {i} {n}" for n in range(TEXTS * 4)]
            request = cog_pb.EmbedRequest(texts=texts, bypass_cache=True)
            try:
                await embed(request, metadata=metadata, timeout=0.02)
            except grpc.aio.AioRpcError as exc:
                return exc.code()
            return grpc.StatusCode.OK

        codes = await asyncio.gather(*(abandoned(i) for i in range(6)))
        assert grpc.StatusCode.DEADLINE_EXCEEDED in codes
        for _ in range(100):
            if all(r.limiter is None or r.limiter.in_flight == 0 for r in suite.running.values()):
                break
            await asyncio.sleep(0.05)
        assert {name: r.limiter.in_flight for name, r in suite.running.items() if r.limiter} == {
            name: 0 for name in suite.running
        }
        front = _front(suite)
        assert front.limiter(COGNITIVE) is not None
        assert front.limiter(COGNITIVE).in_flight == 0  # the relay's slots came back too
        await embed(cog_pb.EmbedRequest(texts=["after"]), metadata=metadata, timeout=10)


async def test_streams_and_health_pass_while_unary_slots_are_full(suite: Suite) -> None:
    """With taskproc's unary slots all held, a unary call is refused at once, yet a
    WatchWorkflow stream runs to its end and health says SERVING; freed, calls pass."""
    limiter = suite.running["taskproc"].limiter
    assert limiter is not None
    async with grpc.aio.insecure_channel(suite.address("gateway")) as channel:
        token = await _set_up(lambda: new_user(suite, channel))
        wf = await submit(channel, token, spec({"name": "a", "op": "noop"}))
        held = []
        while (slot := limiter.try_acquire()) is not None:
            held.append(slot)  # stands for unary calls in flight
        assert len(held) == LIMIT
        try:
            started = time.perf_counter()
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await get(channel, token, wf.workflow_id)
            elapsed = time.perf_counter() - started
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert _details(refused.value)[0] == "OVERLOADED"
            assert elapsed < 1.0
            events = await watch(channel, token, wf.workflow_id, timeout=20)
            assert events and events[-1].workflow_state != 0
            async with grpc.aio.insecure_channel(suite.address("taskproc")) as direct:
                assert await _serving(direct) == health_pb2.HealthCheckResponse.SERVING
        finally:
            for slot in held:
                limiter.release(slot)
        assert (await get(channel, token, wf.workflow_id)).workflow_id == wf.workflow_id


COGNITIVE = "aiwfe.cognitive.v1"
TASKPROC = "aiwfe.taskproc.v1"


def _front(suite: Suite) -> FrontDoor:
    front = suite.running["gateway"].front
    assert isinstance(front, FrontDoor)
    return front


async def test_the_relay_refuses_a_burst_over_a_back_ends_limit_from_its_headers(
    suite: Suite,
) -> None:
    """16 concurrent Embeds on the relay's fast path against a limit of 2 per back end: the
    relay itself refuses the excess (cognitive's own limiter never sees it) with
    RESOURCE_EXHAUSTED/OVERLOADED and RetryInfo within 100 ms each (asserted with a
    margin), the admitted calls succeed, and the breaker for cognitive stays closed."""
    front = _front(suite)
    limiter = front.limiter(COGNITIVE)
    back_end = suite.running["cognitive"].limiter
    assert limiter is not None and back_end is not None
    async with grpc.aio.insecure_channel(suite.address("gateway")) as channel:
        metadata = (*bearer(await _set_up(lambda: login(channel))), NO_STORE)
        embed = cog_grpc.CognitiveServiceStub(channel).Embed
        await embed(cog_pb.EmbedRequest(texts=["warm"]), metadata=metadata, timeout=10)
        fast_before, shed_before = front.fast_calls, front.shed_calls
        back_end_refused = back_end.refused

        async def one(i: int) -> tuple[float, grpc.aio.AioRpcError | None]:
            texts = [f"front {uuid.uuid4().hex} {i} {n}" for n in range(TEXTS)]
            request = cog_pb.EmbedRequest(texts=texts, bypass_cache=True)
            started = time.perf_counter()
            try:
                await embed(request, metadata=metadata, timeout=30)
            except grpc.aio.AioRpcError as exc:
                return time.perf_counter() - started, exc
            return time.perf_counter() - started, None

        outcomes = await asyncio.gather(*(one(i) for i in range(BURST)))
    admitted = [t for t, exc in outcomes if exc is None]
    refused = [(t, exc) for t, exc in outcomes if exc is not None]
    assert len(refused) >= BURST // 2, f"only {len(refused)} of {BURST} refused"
    assert back_end.refused == back_end_refused, "cognitive's own limiter had to refuse"
    assert front.shed_calls - shed_before == len(refused)
    assert front.fast_calls - fast_before == len(admitted) > 0
    for elapsed, exc in refused:
        assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, exc
        reason, delay = _details(exc)
        assert reason == "OVERLOADED"
        assert delay is not None and 0 < delay <= 5.0
        assert (exc.details() or "").startswith("gateway: cognitive overloaded")
        assert elapsed < REFUSED_WITHIN_S, f"refusal took {elapsed:.3f} s"
    gateway = suite.running["gateway"].service
    assert isinstance(gateway, GatewayService)
    assert gateway.upstreams[COGNITIVE].breaker.state is BreakerState.CLOSED
    for _ in range(100):  # each slot is given back once its response is out
        if limiter.in_flight == 0:
            break
        await asyncio.sleep(0.02)
    assert limiter.in_flight == 0


async def test_the_relay_never_refuses_a_stream_for_unary_load(suite: Suite) -> None:
    """With the relay's slots for taskproc all held, a unary GetWorkflow on the fast path
    is refused by the relay at once (taskproc never sees it), yet a WatchWorkflow stream
    goes straight to taskproc and runs to its end; freed, unary calls pass again."""
    front = _front(suite)
    limiter = front.limiter(TASKPROC)
    back_end = suite.running["taskproc"].limiter
    assert limiter is not None and back_end is not None
    async with grpc.aio.insecure_channel(suite.address("gateway")) as channel:
        token = await _set_up(lambda: new_user(suite, channel))
        wf = await submit(channel, token, spec({"name": "a", "op": "noop"}))
        stub = wf_grpc.WorkflowServiceStub(channel)
        request = wf_pb.GetWorkflowRequest(workflow_id=wf.workflow_id)
        metadata = (*bearer(token), NO_STORE)
        await stub.GetWorkflow(request, metadata=metadata, timeout=10)  # the token is known
        held = []
        while (slot := limiter.try_acquire()) is not None:
            held.append(slot)  # stands for unary calls in flight through the relay
        assert len(held) == LIMIT
        back_end_refused = back_end.refused
        try:
            started = time.perf_counter()
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.GetWorkflow(request, metadata=metadata, timeout=10)
            elapsed = time.perf_counter() - started
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert _details(refused.value)[0] == "OVERLOADED"
            assert elapsed < REFUSED_WITHIN_S, f"refusal took {elapsed:.3f} s"
            assert back_end.refused == back_end_refused
            fast_before = front.fast_calls
            events = await watch(channel, token, wf.workflow_id, timeout=20)
            assert events and events[-1].workflow_state != 0
            assert front.fast_calls == fast_before + 1  # the stream took the fast path
        finally:
            for slot in held:
                limiter.release(slot)
        reply = await stub.GetWorkflow(request, metadata=metadata, timeout=10)
        assert reply.workflow.workflow_id == wf.workflow_id
