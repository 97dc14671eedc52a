"""The gateway's per-service health: Check/Watch for each service it routes, following the
back end (its breaker and its own health), as per-service health-checking clients use it."""

from __future__ import annotations

import asyncio
import json
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from aiwfe.app.suite import start_suite
from aiwfe.cognitive.v1 import cognitive_service_pb2 as cog_pb
from aiwfe.cognitive.v1 import cognitive_service_pb2_grpc as cog_grpc
from aiwfe.runtime.server import start_service
from cognitive.service import CognitiveService
from gateway.policies import public_services
from tests.conftest import bearer, health_status, login, until_health

COGNITIVE = "aiwfe.cognitive.v1.CognitiveService"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def test_gateway_answers_health_for_every_routed_service(gw) -> None:
    """Check answers SERVING for every service the gateway lists over reflection (routed
    ones included), and List reports each of them."""
    for service in public_services():
        assert await health_status(gw.channel, service) == SERVING, service
    listed = await health_pb2_grpc.HealthStub(gw.channel).List(
        health_pb2.HealthListRequest(), timeout=5
    )
    assert set(public_services()) <= set(listed.statuses)


async def test_routed_service_health_follows_its_back_end(base_overrides) -> None:
    """Cognitive stopped: the gateway's Check for CognitiveService turns NOT_SERVING (and a
    Watch hears it) while WorkflowService stays SERVING; restarted: SERVING again. A client
    using per-service health checking (gRPC's healthCheckConfig) calls through the gateway
    while cognitive is up, fails fast while it is down and recovers by itself."""
    suite = await start_suite(base_overrides)
    cognitive = suite.running.pop("cognitive")
    port = cognitive.port
    config = {
        "loadBalancingConfig": [{"round_robin": {}}],
        "healthCheckConfig": {"serviceName": COGNITIVE},
    }
    address = suite.address("gateway")
    try:
        async with (
            grpc.aio.insecure_channel(address) as plain,
            grpc.aio.insecure_channel(
                address, options=[("grpc.service_config", json.dumps(config))]
            ) as checked,
        ):
            token = await login(plain)
            embed = cog_grpc.CognitiveServiceStub(checked).Embed
            request = cog_pb.EmbedRequest(texts=["health-checked"], bypass_cache=True)
            assert (await embed(request, metadata=bearer(token), timeout=10)).dimension == 768
            watch = health_pb2_grpc.HealthStub(plain).Watch(
                health_pb2.HealthCheckRequest(service=COGNITIVE), timeout=60
            )
            assert (await watch.read()).status == SERVING

            await cognitive.stop(grace=0)
            took = await until_health(plain, COGNITIVE, NOT_SERVING, within=15)
            print(f"NOT_SERVING {took:.1f} s after cognitive stopped")
            assert (await watch.read()).status == NOT_SERVING
            assert await health_status(plain, "aiwfe.taskproc.v1.WorkflowService") == SERVING
            assert await health_status(plain, "") == SERVING  # the gateway itself is fine
            started = time.monotonic()
            try:
                await embed(request, metadata=bearer(token), timeout=3)
                raise AssertionError("a health-checked channel called a NOT_SERVING service")
            except grpc.aio.AioRpcError as exc:
                assert exc.code() in (
                    grpc.StatusCode.UNAVAILABLE,
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                )
            assert time.monotonic() - started < 5

            suite.running["cognitive"] = await start_service(
                CognitiveService(suite.settings), host="127.0.0.1", port=port
            )
            took = await until_health(plain, COGNITIVE, SERVING, within=15)
            print(f"SERVING {took:.1f} s after cognitive restarted")
            assert (await watch.read()).status == SERVING
            watch.cancel()
            deadline = time.monotonic() + 10
            while True:
                try:
                    reply = await embed(request, metadata=bearer(token), timeout=5)
                    break
                except grpc.aio.AioRpcError:
                    assert time.monotonic() < deadline, "health-checked channel never recovered"
                    await asyncio.sleep(0.2)
            assert reply.dimension == 768
    finally:
        await suite.stop()
