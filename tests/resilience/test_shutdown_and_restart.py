"""Graceful shutdown under load and a back end killed then restarted, on real servers."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from aiwfe.app.embedded import free_port
from aiwfe.app.suite import start_suite
from aiwfe.cognitive.v1 import cognitive_service_pb2 as cog_pb
from aiwfe.cognitive.v1 import cognitive_service_pb2_grpc as cog_grpc
from aiwfe.runtime.server import start_service
from cognitive.service import CognitiveService
from tests.conftest import bearer, login

pytestmark = pytest.mark.slow


def _env_for(overrides: dict, suite, gateway_port: int) -> dict[str, str]:
    auth = overrides["authentication"]
    return {
        **os.environ,
        "JWT_SECRET_KEY": auth["jwt"]["secret_key"],
        "AIWFE_INTERNAL_SECRET_KEY": auth["internal"]["secret_key"],
        "AIWFE_SERVICES__GATEWAY__PORT": str(gateway_port),
        "AIWFE_SERVICES__GATEWAY__METRICS_PORT": "null",
        "AIWFE_SERVICES__COGNITIVE__PORT": str(suite.running["cognitive"].port),
        "AIWFE_SERVICES__TASKPROC__PORT": str(suite.running["taskproc"].port),
        "AIWFE_SERVICES__DATAPLATFORM__PORT": str(suite.running["dataplatform"].port),
        "AIWFE_GRPC__SHUTDOWN_GRACE_SECONDS": "60",
        "AIWFE_REDIS__KEY_PREFIX": overrides["redis"]["key_prefix"],
    }


async def test_sigterm_drains_in_flight_calls(base_overrides) -> None:
    """SIGTERM to a gateway under load: health goes NOT_SERVING, every in-flight call
    completes OK, new calls get UNAVAILABLE, and the process exits 0."""
    suite = await start_suite(base_overrides, only=("dataplatform", "cognitive", "taskproc"))
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", env=_env_for(base_overrides, suite, port),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), 30)
        assert line.decode().startswith("gateway: ")
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            token = await login(ch)
            stub = cog_grpc.CognitiveServiceStub(ch)
            watch = health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest(service=""))
            assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
            # Uncached 256-text batches keep each call busy for a while on the back end.
            texts = [f"in flight {i} " + "lorem ipsum dolor " * 60 for i in range(256)]

            async def one(n: int) -> cog_pb.EmbedResponse:
                request = cog_pb.EmbedRequest(texts=texts, bypass_cache=True)
                return await stub.Embed(request, metadata=bearer(token), timeout=60)

            in_flight = [asyncio.create_task(one(n)) for n in range(4)]
            await asyncio.sleep(0.1)
            assert not all(t.done() for t in in_flight)
            proc.send_signal(signal.SIGTERM)
            status = await asyncio.wait_for(watch.read(), 10)
            assert status.status == health_pb2.HealthCheckResponse.NOT_SERVING
            results = await asyncio.gather(*in_flight, return_exceptions=True)
            assert all(isinstance(r, cog_pb.EmbedResponse) for r in results), results
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Embed(cog_pb.EmbedRequest(texts=["late"]), metadata=bearer(token),
                                 timeout=5)  # fmt: skip
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert await asyncio.wait_for(proc.wait(), 30) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await suite.stop()


async def test_back_end_restart_is_unavailable_then_recovers(base_overrides) -> None:
    """With cognitive stopped the gateway answers UNAVAILABLE fast; after cognitive restarts
    on the same port, calls succeed again without restarting the gateway."""
    overrides = {**base_overrides, "circuit_breaker": {"failure_threshold": 5, "timeout": 1}}
    suite = await start_suite(overrides)
    cognitive = suite.running.pop("cognitive")
    port = cognitive.port
    try:
        async with grpc.aio.insecure_channel(suite.address("gateway")) as ch:
            token = await login(ch)
            stub = cog_grpc.CognitiveServiceStub(ch)
            request = cog_pb.EmbedRequest(texts=["restart probe"])
            # A different request first: the gateway's response cache would replay this one.
            warmup = cog_pb.EmbedRequest(texts=["restart warm-up"])
            assert (await stub.Embed(warmup, metadata=bearer(token), timeout=5)).dimension == 768
            await cognitive.stop(grace=0)
            for _ in range(8):
                started = time.monotonic()
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await stub.Embed(request, metadata=bearer(token), timeout=5)
                assert err.value.code() == grpc.StatusCode.UNAVAILABLE
                assert time.monotonic() - started < 5
            restarted = await start_service(
                CognitiveService(suite.settings), host="127.0.0.1", port=port
            )
            suite.running["cognitive"] = restarted
            deadline = time.monotonic() + 15
            while True:
                try:
                    reply = await stub.Embed(request, metadata=bearer(token), timeout=5)
                    break
                except grpc.aio.AioRpcError as exc:
                    assert exc.code() == grpc.StatusCode.UNAVAILABLE
                    assert time.monotonic() < deadline, "gateway did not reconnect"
                    await asyncio.sleep(0.2)
            assert reply.dimension == 768
    finally:
        await suite.stop()
