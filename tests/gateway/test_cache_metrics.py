"""The API response cache's counters count what happened: one hit per response served from
the cache, through the relay's fast answer and through the gateway's full path alike."""

from __future__ import annotations

import asyncio
import contextlib
from urllib.parse import urlsplit, urlunsplit

import grpc
import pytest
from redis.asyncio import Redis

from aiwfe.app.suite import start_suite
from aiwfe.auth.v1 import auth_service_pb2 as auth_pb
from aiwfe.auth.v1 import auth_service_pb2_grpc as auth_grpc
from aiwfe.cognitive.v1 import cognitive_service_pb2 as cog_pb
from aiwfe.cognitive.v1 import cognitive_service_pb2_grpc as cog_grpc
from aiwfe.runtime import metrics
from tests.conftest import bearer, login
from tests.faultproxy import FaultProxy
from tests.gateway.conftest import PASSWORD, gateway_overrides, unique

LIMIT = 100  # the seed's API limit per user and minute
CALLS = 110


def api_cache(layer: str, result: str) -> float:
    value = metrics.REGISTRY.get_sample_value(
        "redis_cache_hit_rate_total", {"cache": "api", "layer": layer, "result": result}
    )
    return value or 0.0


@pytest.mark.parametrize("relay", [True, False], ids=["relay", "full-path"])
async def test_cache_hits_count_responses_served_from_the_cache(
    base_overrides, redis_url, relay
) -> None:
    """110 identical Embeds by one user: 100 answered (the rest rate limited); the first is
    the one miss, and the hit counter rises by exactly the 99 responses served from the
    cache (refused calls count no hit)."""
    overrides = gateway_overrides({**base_overrides, "gateway": {"relay": relay}}, redis_url)
    suite = await start_suite(overrides)
    try:
        async with grpc.aio.insecure_channel(suite.address("gateway")) as channel:
            name = unique("cached")
            await auth_grpc.UserAdminServiceStub(channel).CreateUser(
                auth_pb.CreateUserRequest(username=name, password=PASSWORD, roles=["user"]),
                metadata=bearer(await login(channel)),
                timeout=10,
            )
            token = await login(channel, name, PASSWORD)
            embed = cog_grpc.CognitiveServiceStub(channel).Embed
            request = cog_pb.EmbedRequest(texts=[f"counted once {name}"])
            before = {
                (layer, result): api_cache(layer, result)
                for layer in ("l1", "redis")
                for result in ("hit", "miss")
            }
            ok = refused = 0
            for _ in range(CALLS):
                try:
                    await embed(request, metadata=bearer(token), timeout=10)
                    ok += 1
                except grpc.aio.AioRpcError as exc:
                    assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                    refused += 1
            delta = {key: api_cache(*key) - value for key, value in before.items()}
    finally:
        await suite.stop()
    assert (ok, refused) == (LIMIT, CALLS - LIMIT)
    hits = delta["l1", "hit"] + delta["redis", "hit"]
    assert hits == ok - 1, delta
    assert delta["l1", "miss"] == 1, delta


async def test_an_expired_entry_is_looked_up_in_redis_once(base_overrides, redis_url) -> None:
    """When the gateway's in-process copy of an answer is gone (expired) while 20 calls for
    it are in flight, they share one Redis GET of the entry, not one each: Redis answers
    slowly here (0.3 s a chunk each way, through a fault proxy), so all 20 miss before it
    answers,
    and Redis's own MONITOR counts the GETs of the entry's key."""
    real = urlsplit(redis_url)
    host, port = real.hostname or "127.0.0.1", real.port or 6379
    async with FaultProxy(host, port) as proxy:
        proxied = urlunsplit(real._replace(netloc=f"127.0.0.1:{proxy.port}"))
        overrides = gateway_overrides(base_overrides, proxied)
        overrides["redis"]["connection_pool"] = {"socket_timeout": 5.0}  # slow, not down
        suite = await start_suite(overrides)
        monitor = Redis.from_url(redis_url)
        try:
            async with grpc.aio.insecure_channel(suite.address("gateway")) as channel:
                token = await login(channel)
                embed = cog_grpc.CognitiveServiceStub(channel).Embed
                request = cog_pb.EmbedRequest(texts=[unique("looked up once")])
                first = await embed(request, metadata=bearer(token), timeout=10)
                for _ in range(2):  # the token, the quota and the answer warm in process
                    assert await embed(request, metadata=bearer(token), timeout=10) == first
                service = suite.running["gateway"].service
                service.response_cache._l1.clear()  # as when its 60 s are up
                key = f"{service.redis.prefix}api:aiwfe.cognitive.v1.CognitiveService.Embed:"
                gets: list[str] = []
                async with monitor.monitor() as commands:

                    async def watch() -> None:
                        while True:
                            command = (await commands.next_command())["command"]
                            if command.startswith(f"GET {key}"):
                                gets.append(command)

                    watching = asyncio.ensure_future(watch())
                    await asyncio.sleep(0.2)  # MONITOR is on before the calls
                    proxy.delay(0.3)
                    answers = await asyncio.gather(
                        *(embed(request, metadata=bearer(token), timeout=20) for _ in range(20))
                    )
                    proxy.pass_through()
                    await asyncio.sleep(0.5)  # MONITOR's lines of the calls have arrived
                    watching.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await watching
        finally:
            await monitor.aclose()
            await suite.stop()
    assert all(answer == first for answer in answers)
    assert len(gets) == 1, gets
