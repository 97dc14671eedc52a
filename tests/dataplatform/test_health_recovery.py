"""dataplatform's health follows PostgreSQL through a fault proxy: NOT_SERVING while it is
unreachable, SERVING again by itself, with the pool reconnecting and its usage exported."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2

from aiwfe.data.v1 import user_store_service_pb2 as user_pb
from aiwfe.data.v1 import user_store_service_pb2_grpc as user_grpc
from aiwfe.runtime.metrics import REGISTRY
from tests.dataplatform.conftest import (
    dsn_address,
    health_status,
    overrides_with_dsn,
    start_dataplatform,
    with_address,
)
from tests.faultproxy import FaultProxy

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def wait_for_status(channel: grpc.aio.Channel, wanted: int, within: float) -> float:
    """Polls health until it reports `wanted`; returns the seconds it took."""
    start = time.monotonic()
    while time.monotonic() - start < within:
        if await health_status(channel) == wanted:
            return time.monotonic() - start
        await asyncio.sleep(0.1)
    raise AssertionError(f"health did not become {wanted} within {within} s")


def pool_usage(state: str) -> float | None:
    return REGISTRY.get_sample_value("database_connection_pool_usage", {"state": state})


async def _fault_cycle(
    base_overrides: dict[str, Any], internal_md: tuple, fault: str
) -> tuple[float, float]:
    """Runs dataplatform through a proxy, injects `fault`, restores; returns both delays."""
    host, port = dsn_address(base_overrides["database"]["postgres"]["dsn"])
    async with FaultProxy(host, port) as proxy:
        dsn = with_address(base_overrides["database"]["postgres"]["dsn"], "127.0.0.1", proxy.port)
        running = await start_dataplatform(overrides_with_dsn(base_overrides, dsn))
        try:
            async with grpc.aio.insecure_channel(running.address) as channel:
                users = user_grpc.UserStoreServiceStub(channel)
                assert await health_status(channel) == SERVING
                assert pool_usage("max") == 10
                getattr(proxy, fault)()
                went_down = await wait_for_status(channel, NOT_SERVING, within=10)
                with pytest.raises(grpc.aio.AioRpcError):
                    await users.GetUser(
                        user_pb.GetUserRequest(username="admin"), metadata=internal_md, timeout=3
                    )
                proxy.pass_through()
                came_back = await wait_for_status(channel, SERVING, within=15)
                # The same server, no restart: the pool reconnected by itself.
                reply = await users.GetUser(
                    user_pb.GetUserRequest(username="admin"), metadata=internal_md, timeout=5
                )
                assert reply.user.username == "admin"
                assert (pool_usage("size") or 0) >= 1
        finally:
            await running.stop(grace=0.5)
    return went_down, came_back


@pytest.mark.slow
async def test_cut_postgres_goes_not_serving_then_recovers(base_overrides, internal_md) -> None:
    """Reset connections to PostgreSQL: NOT_SERVING within seconds, SERVING again on restore."""
    went_down, came_back = await _fault_cycle(base_overrides, internal_md, "cut")
    assert went_down < 6
    assert came_back < 10


@pytest.mark.slow
async def test_blackholed_postgres_goes_not_serving_then_recovers(
    base_overrides, internal_md
) -> None:
    """A silent network (no resets, no answers) is detected by the bounded probe too."""
    went_down, came_back = await _fault_cycle(base_overrides, internal_md, "blackhole")
    assert went_down < 8
    assert came_back < 12
