"""The stall probe tells a slow database from a lost one: calls over a link with 0.6 s of
round trip (longer than the probe's 0.5 s timeout) keep succeeding while they keep getting
answers, instead of being ended as if PostgreSQL had gone away."""

from __future__ import annotations

import asyncio
import time

import grpc

from aiwfe.data.v1 import user_store_service_pb2 as user_pb
from aiwfe.data.v1 import user_store_service_pb2_grpc as user_grpc
from tests.dataplatform.conftest import (
    dsn_address,
    overrides_with_dsn,
    start_dataplatform,
    with_address,
)
from tests.faultproxy import FaultProxy


async def test_slow_but_answering_database_is_not_lost(base_overrides, internal_md) -> None:
    """Six callers reading users over a link that holds every chunk 0.3 s all succeed for
    3 s and the database stays reachable, though each probe times out meanwhile (a probe
    that times out while another call succeeded is an answer: six callers 0.1 s apart keep
    a success inside every probe's 0.5 s even on a loaded machine, where three 0.2 s apart
    once left a whole probe without one)."""
    real_dsn = base_overrides["database"]["postgres"]["dsn"]
    async with FaultProxy(*dsn_address(real_dsn)) as proxy:
        dsn = with_address(real_dsn, "127.0.0.1", proxy.port)
        overrides = overrides_with_dsn(base_overrides, dsn)
        # Connections opened before the link slows down: over it, opening one takes several
        # 0.3 s round trips, and the service's own loops (timers, schedules, retention) use
        # the pool too; this test is about the stall probe, not about growing a pool.
        overrides["database"]["postgres"]["pool_size"] = 12
        running = await start_dataplatform(overrides)
        db = running.service.db
        try:
            async with grpc.aio.insecure_channel(running.address) as channel:
                users = user_grpc.UserStoreServiceStub(channel)
                proxy.delay(0.3)
                until = time.monotonic() + 3

                async def reader(offset: float) -> int:
                    await asyncio.sleep(offset)
                    done = 0
                    while time.monotonic() < until:
                        reply = await users.GetUser(
                            user_pb.GetUserRequest(username="admin"),
                            metadata=internal_md,
                            timeout=10,
                        )
                        assert reply.user.username == "admin"
                        done += 1
                    return done

                counts = await asyncio.gather(*(reader(i * 0.1) for i in range(6)))
                assert db.reachable
                assert sum(counts) >= 12, counts
        finally:
            proxy.pass_through()
            await running.stop(grace=0.5)
