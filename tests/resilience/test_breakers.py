"""Circuit breakers: only sick-downstream codes open them, open means UNAVAILABLE at once,
half-open admits one probe, and admins read every breaker through SystemService."""

from __future__ import annotations

import time

import grpc
import pytest

from aiwfe.cognitive.v1 import cognitive_service_pb2 as cog_pb
from aiwfe.cognitive.v1 import cognitive_service_pb2_grpc as cog_grpc
from aiwfe.errors import Unavailable
from aiwfe.resilience.breaker import BreakerState, CircuitBreaker
from aiwfe.suite import start_suite
from aiwfe.system.v1 import system_service_pb2 as sys_pb
from aiwfe.system.v1 import system_service_pb2_grpc as sys_grpc
from tests.conftest import bearer, login


def test_caller_mistakes_never_open_the_breaker() -> None:
    """INVALID_ARGUMENT and NOT_FOUND reset the count; five UNAVAILABLE in a row open it."""
    breaker = CircuitBreaker("x", failure_threshold=5, timeout=60, service="test")
    for _ in range(10):
        breaker.before_call()
        breaker.record_failure(grpc.StatusCode.INVALID_ARGUMENT)
        breaker.before_call()
        breaker.record_failure(grpc.StatusCode.NOT_FOUND)
    assert breaker.state is BreakerState.CLOSED
    for _ in range(4):
        breaker.before_call()
        breaker.record_failure(grpc.StatusCode.UNAVAILABLE)
    assert breaker.state is BreakerState.CLOSED
    breaker.before_call()
    breaker.record_failure(grpc.StatusCode.DEADLINE_EXCEEDED)
    assert breaker.state is BreakerState.OPEN
    with pytest.raises(Unavailable) as err:
        breaker.before_call()
    assert "circuit open" in err.value.message
    assert 59 < breaker.open_remaining() <= 60


def test_half_open_admits_one_probe_and_closes_on_success() -> None:
    """After the timeout one probe passes, a second concurrent call is refused, success closes."""
    breaker = CircuitBreaker("y", failure_threshold=1, timeout=0.05, service="test")
    breaker.before_call()
    breaker.record_failure(grpc.StatusCode.UNAVAILABLE)
    assert breaker.state is BreakerState.OPEN
    time.sleep(0.06)
    breaker.before_call()
    assert breaker.state is BreakerState.HALF_OPEN
    with pytest.raises(Unavailable):
        breaker.before_call()
    breaker.record_success()
    assert breaker.state is BreakerState.CLOSED
    breaker.before_call()


def test_failed_probe_reopens() -> None:
    """A probe that fails with a sick code opens the breaker again for a full timeout."""
    breaker = CircuitBreaker("z", failure_threshold=1, timeout=0.05, service="test")
    breaker.record_failure(grpc.StatusCode.UNAVAILABLE)
    time.sleep(0.06)
    breaker.before_call()
    breaker.record_failure(grpc.StatusCode.UNAVAILABLE)
    assert breaker.state is BreakerState.OPEN
    assert breaker.open_remaining() > 0.03


async def test_admin_reads_breakers_of_every_service(base_overrides) -> None:
    """ListCircuitBreakers shows the gateway's and back ends' breakers; when cognitive is down
    the gateway's cognitive breaker opens and cognitive is reported unreachable."""
    suite = await start_suite(base_overrides)
    try:
        async with grpc.aio.insecure_channel(suite.address("gateway")) as ch:
            token = await login(ch)
            system = sys_grpc.SystemServiceStub(ch)
            reply = await system.ListCircuitBreakers(
                sys_pb.ListCircuitBreakersRequest(), metadata=bearer(token), timeout=5
            )
            pairs = {(b.service, b.downstream) for b in reply.breakers}
            expected = {("gateway", "cognitive"), ("gateway", "taskproc"),
                        ("gateway", "dataplatform"), ("cognitive", "dataplatform")}  # fmt: skip
            assert expected <= pairs
            assert all(b.state == sys_pb.BREAKER_STATE_CLOSED for b in reply.breakers)
            assert list(reply.unreachable_services) == []

            await suite.running.pop("cognitive").stop(grace=0)
            stub = cog_grpc.CognitiveServiceStub(ch)
            for _ in range(6):
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await stub.Embed(cog_pb.EmbedRequest(texts=["x"]), metadata=bearer(token),
                                     timeout=5)  # fmt: skip
                assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            reply = await system.ListCircuitBreakers(
                sys_pb.ListCircuitBreakersRequest(), metadata=bearer(token), timeout=5
            )
            by_pair = {(b.service, b.downstream): b for b in reply.breakers}
            opened = by_pair[("gateway", "cognitive")]
            assert opened.state == sys_pb.BREAKER_STATE_OPEN
            assert opened.open_remaining_seconds > 50
            assert "cognitive" in reply.unreachable_services
    finally:
        await suite.stop()


class _DependencyDown(cog_grpc.CognitiveServiceServicer):
    """A live cognitive whose own backend is down: it answers UNAVAILABLE with details."""

    calls = 0

    async def Embed(self, request, context):
        type(self).calls += 1
        raise Unavailable("ollama at http://llm:11434 is unavailable")


async def test_live_server_unavailable_is_neither_retried_nor_counted() -> None:
    """An UNAVAILABLE answered by a live server (its dependency is down) reaches the caller
    once — no automatic retry — and does not open the caller's breaker for that server."""
    from aiwfe.channels import Downstream
    from aiwfe.cognitive.v1 import cognitive_service_pb2
    from aiwfe.config import load_settings
    from aiwfe.identity import InternalIdentity
    from aiwfe.interceptors import ErrorMappingInterceptor

    server = grpc.aio.server(interceptors=[ErrorMappingInterceptor()])
    cog_grpc.add_CognitiveServiceServicer_to_server(_DependencyDown(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    settings = load_settings(env={})
    identity = InternalIdentity("s" * 40)
    downstream = Downstream(
        "cognitive", f"127.0.0.1:{port}", settings, identity, caller="test-live",
        files=[cognitive_service_pb2.DESCRIPTOR],
    )  # fmt: skip
    try:
        stub = cog_grpc.CognitiveServiceStub(downstream.channel)
        for _ in range(7):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await downstream.call(stub.Embed, cog_pb.EmbedRequest(texts=["x"]), timeout=5)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "ollama" in err.value.details()
        assert _DependencyDown.calls == 7  # Embed is idempotent, yet never retried
        assert downstream.breaker.state is BreakerState.CLOSED
    finally:
        await downstream.close()
        await server.stop(0)
