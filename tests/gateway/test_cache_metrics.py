"""The API response cache's counters count what happened: one hit per response served from
the cache, through the relay's fast answer and through the gateway's full path alike."""

from __future__ import annotations

import grpc
import pytest

from aiwfe.app.suite import start_suite
from aiwfe.auth.v1 import auth_service_pb2 as auth_pb
from aiwfe.auth.v1 import auth_service_pb2_grpc as auth_grpc
from aiwfe.cognitive.v1 import cognitive_service_pb2 as cog_pb
from aiwfe.cognitive.v1 import cognitive_service_pb2_grpc as cog_grpc
from aiwfe.runtime import metrics
from tests.conftest import bearer, login
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
