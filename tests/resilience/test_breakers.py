"""Circuit breakers: only sick-downstream codes open them, open means UNAVAILABLE at once,
half-open admits one probe, and admins read every breaker through SystemService."""

from __future__ import annotations

import asyncio
import logging
import time

import grpc
import pytest

from aiwfe.app.embedded import free_port
from aiwfe.app.suite import start_suite
from aiwfe.cognitive.v1 import cognitive_service_pb2 as cog_pb
from aiwfe.cognitive.v1 import cognitive_service_pb2_grpc as cog_grpc
from aiwfe.runtime.errors import Unavailable
from aiwfe.runtime.resilience.breaker import BreakerState, CircuitBreaker
from aiwfe.system.v1 import system_service_pb2 as sys_pb
from aiwfe.system.v1 import system_service_pb2_grpc as sys_grpc
from tests.conftest import bearer, login

NEVER_COUNTED = [
    (grpc.StatusCode.INVALID_ARGUMENT, False, False),
    (grpc.StatusCode.NOT_FOUND, False, False),
    (grpc.StatusCode.PERMISSION_DENIED, False, False),
    (grpc.StatusCode.UNIMPLEMENTED, False, False),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, False, False),
    (grpc.StatusCode.INTERNAL, False, False),
    (grpc.StatusCode.UNKNOWN, False, False),
    (grpc.StatusCode.CANCELLED, False, False),
    (grpc.StatusCode.DEADLINE_EXCEEDED, False, True),  # the caller's own short deadline
    (grpc.StatusCode.UNAVAILABLE, True, False),  # passed on from the back end's dependency
    (grpc.StatusCode.DEADLINE_EXCEEDED, True, False),  # answered by a live back end
]


@pytest.mark.parametrize(("code", "details", "caller_deadline"), NEVER_COUNTED)
def test_statuses_that_are_not_the_back_ends_failure_never_count(
    code: grpc.StatusCode, details: bool, caller_deadline: bool
) -> None:
    """Fifty calls ending with a status that is not the back end's own failure leave a
    one-failure breaker closed with nothing counted."""
    breaker = CircuitBreaker("x", failure_threshold=1, timeout=60, service="test")
    for _ in range(50):
        breaker.before_call()
        breaker.record_status(code, details, caller_deadline=caller_deadline)
    assert breaker.state is BreakerState.CLOSED
    assert breaker.failure_count == 0


def test_back_end_failures_open_after_the_threshold() -> None:
    """Bare UNAVAILABLE (transport) and our own DEADLINE_EXCEEDED count: the fifth in a row
    opens the breaker, which then fails calls at once naming the downstream."""
    breaker = CircuitBreaker("x", failure_threshold=5, timeout=60, service="test")
    for _ in range(4):
        breaker.before_call()
        breaker.record_status(grpc.StatusCode.UNAVAILABLE, False)
    assert breaker.state is BreakerState.CLOSED
    breaker.before_call()
    breaker.record_status(grpc.StatusCode.DEADLINE_EXCEEDED, False, caller_deadline=False)
    assert breaker.state is BreakerState.OPEN
    with pytest.raises(Unavailable) as err:
        breaker.before_call()
    assert "circuit open" in err.value.message
    assert err.value.reason == "DEPENDENCY_UNAVAILABLE"
    assert err.value.error_metadata == {"dependency": "x", "circuit": "open"}
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


def test_a_silent_probe_call_frees_the_half_open_slot(monkeypatch) -> None:
    """A probe call that has not finished within the hold (a long stream, say) no longer
    blocks the half-open breaker: the next call becomes the probe."""
    from aiwfe.runtime.resilience import breaker as breaker_module

    monkeypatch.setattr(breaker_module, "PROBE_CALL_HOLD", 0.05)
    breaker = CircuitBreaker("w", failure_threshold=1, timeout=0.01, service="test")
    breaker.record_status(grpc.StatusCode.UNAVAILABLE, False)
    time.sleep(0.02)
    breaker.before_call()  # the probe, which never reports back
    with pytest.raises(Unavailable):
        breaker.before_call()
    time.sleep(0.06)
    breaker.before_call()
    breaker.record_success()
    assert breaker.state is BreakerState.CLOSED


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
        raise Unavailable(
            "ollama at http://llm:11434 is unavailable",
            reason="BACKEND_UNREACHABLE",
            metadata={"backend": "ollama"},
        )


async def test_live_server_unavailable_is_neither_retried_nor_counted() -> None:
    """An UNAVAILABLE answered by a live server (its dependency is down) reaches the caller
    once — no automatic retry — and does not open the caller's breaker for that server."""
    from aiwfe.cognitive.v1 import cognitive_service_pb2
    from aiwfe.runtime.channels import Upstream
    from aiwfe.runtime.config import load_settings
    from aiwfe.runtime.identity import InternalIdentity
    from aiwfe.runtime.interceptors import ErrorMappingInterceptor

    server = grpc.aio.server(interceptors=[ErrorMappingInterceptor()])
    cog_grpc.add_CognitiveServiceServicer_to_server(_DependencyDown(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    settings = load_settings(env={})
    identity = InternalIdentity("s" * 40)
    downstream = Upstream(
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


class _Slow(cog_grpc.CognitiveServiceServicer):
    """A live cognitive that answers Embed after a second (slower than any deadline here)."""

    async def Embed(self, request, context):
        await asyncio.sleep(1)
        return cog_pb.EmbedResponse(dimension=1)


class _Quick(cog_grpc.CognitiveServiceServicer):
    """A live cognitive that answers Embed at once."""

    async def Embed(self, request, context):
        return cog_pb.EmbedResponse(dimension=1)


async def _serve(servicer: cog_grpc.CognitiveServiceServicer, port: int = 0):
    """A real cognitive-shaped server with grpc.health.v1 SERVING, on `port` (0: any)."""
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    from aiwfe.runtime.interceptors import ErrorMappingInterceptor

    server = grpc.aio.server(interceptors=[ErrorMappingInterceptor()])
    cog_grpc.add_CognitiveServiceServicer_to_server(servicer, server)
    checks = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(checks, server)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await checks.set("", health_pb2.HealthCheckResponse.SERVING)
    return server, bound


def _downstream(port: int, caller: str, **grpc_settings: float):
    from aiwfe.cognitive.v1 import cognitive_service_pb2
    from aiwfe.runtime.channels import Upstream
    from aiwfe.runtime.config import load_settings
    from aiwfe.runtime.identity import InternalIdentity

    settings = load_settings(env={}, overrides={"grpc": grpc_settings} if grpc_settings else {})
    return Upstream(
        "cognitive", f"127.0.0.1:{port}", settings, InternalIdentity("s" * 40), caller=caller,
        files=[cognitive_service_pb2.DESCRIPTOR],
    )  # fmt: skip


async def test_downstream_counts_its_own_deadline_not_the_callers() -> None:
    """Calls cut short by the incoming call's shorter deadline never count; the same slow
    back end timing out on the Upstream's own 0.3 s cap opens the breaker at the fifth."""
    from aiwfe.runtime.identity import request_deadline

    server, port = await _serve(_Slow())
    downstream = _downstream(port, "test-deadline", default_deadline_seconds=0.3)
    stub = cog_grpc.CognitiveServiceStub(downstream.channel)
    try:
        for _ in range(8):
            token = request_deadline.set(time.monotonic() + 0.1)  # the caller's own deadline
            try:
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await downstream.call(stub.Embed, cog_pb.EmbedRequest(texts=["x"]))
            finally:
                request_deadline.reset(token)
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert downstream.breaker.state is BreakerState.CLOSED
        assert downstream.breaker.failure_count == 0
        for _ in range(5):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await downstream.call(stub.Embed, cog_pb.EmbedRequest(texts=["x"]))
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert downstream.breaker.state is BreakerState.OPEN
    finally:
        await downstream.close()
        await server.stop(0)


async def test_open_breaker_probes_health_and_recovers_without_calls(caplog) -> None:
    """A back end down for 3 s opens the breaker (WARNING with the failure count and last
    error); once it is back and SERVING, the breaker's own health probes half-open it within
    5 s with no call made (INFO), and the next call succeeds and closes it (INFO)."""
    caplog.set_level(logging.INFO, logger="aiwfe.breaker")
    port = free_port()
    server, _ = await _serve(_Quick(), port)
    downstream = _downstream(port, "test-recovery")
    breaker = downstream.breaker
    stub = cog_grpc.CognitiveServiceStub(downstream.channel)
    request = cog_pb.EmbedRequest(texts=["x"])
    try:
        assert (await downstream.call(stub.Embed, request)).dimension == 1
        await server.stop(0)
        for _ in range(5):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await downstream.call(stub.Embed, request, timeout=2)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert breaker.state is BreakerState.OPEN
        opened = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(opened) == 1
        text = opened[0].getMessage()
        assert "test-recovery -> cognitive OPEN after 5 consecutive failures" in text
        assert "last error UNAVAILABLE" in text
        await asyncio.sleep(3)  # the outage; health probes fail meanwhile
        assert breaker.state is BreakerState.OPEN
        server, _ = await _serve(_Quick(), port)
        serving_at = time.monotonic()
        while breaker.state is BreakerState.OPEN:  # no call: the probe alone must see it
            assert time.monotonic() - serving_at < 5, "no half-open within 5 s of SERVING"
            await asyncio.sleep(0.05)
        assert breaker.state is BreakerState.HALF_OPEN
        assert (await downstream.call(stub.Embed, request)).dimension == 1
        assert breaker.state is BreakerState.CLOSED
        assert time.monotonic() - serving_at < 5
        infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
        assert any("HALF_OPEN (health check answered SERVING" in m for m in infos), infos
        assert any("test-recovery -> cognitive CLOSED" in m for m in infos), infos
    finally:
        await downstream.close()
        await server.stop(0)


def _attribution(error: grpc.aio.AioRpcError) -> tuple[list, list]:
    """The ErrorInfo and RetryInfo details of a failed call."""
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    status = rpc_status.from_call(error)
    assert status is not None, error
    infos: list = []
    retries: list = []
    for detail in status.details:
        for kind, out in ((error_details_pb2.ErrorInfo, infos),
                          (error_details_pb2.RetryInfo, retries)):  # fmt: skip
            if detail.Is(kind.DESCRIPTOR):
                out.append(kind())
                detail.Unpack(out[-1])
    return infos, retries


async def test_dependency_outage_is_attributed_and_spares_the_healthy_service(
    base_overrides,
) -> None:
    """With dataplatform stopped, submits through the gateway (and the gateway's own Login)
    are UNAVAILABLE with an ErrorInfo naming dataplatform and a RetryInfo, and the gateway's
    breaker for the healthy taskproc stays closed (only taskproc's for dataplatform opens)."""
    from aiwfe.runtime.resilience.breaker import breakers_of
    from tests.taskproc.helpers import spec, submit

    suite = await start_suite(base_overrides)
    try:
        async with grpc.aio.insecure_channel(suite.address("gateway")) as ch:
            token = await login(ch)
            workflow = spec({"name": "s0", "op": "noop"})
            await submit(ch, token, workflow)
            await suite.running.pop("dataplatform").stop(grace=0)
            for _ in range(10):
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await submit(ch, token, workflow)
                assert err.value.code() == grpc.StatusCode.UNAVAILABLE
                infos, retries = _attribution(err.value)
                assert [i.reason for i in infos] == ["DEPENDENCY_UNAVAILABLE"]
                assert infos[0].domain == "aiwfe.dev"
                assert infos[0].metadata["dependency"] == "dataplatform"
                assert len(retries) == 1
                assert retries[0].retry_delay.ToTimedelta().total_seconds() > 0
            gateway = {b.name: b for b in breakers_of("gateway")}
            assert gateway["taskproc"].state is BreakerState.CLOSED
            assert gateway["taskproc"].failure_count == 0
            taskproc = {b.name: b for b in breakers_of("taskproc")}
            assert taskproc["dataplatform"].state is BreakerState.OPEN
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await login(ch)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            infos, _ = _attribution(err.value)
            assert [(i.reason, i.metadata["dependency"]) for i in infos] == [
                ("DEPENDENCY_UNAVAILABLE", "dataplatform")
            ]
    finally:
        await suite.stop()
