"""The gateway's front door through the real suite: which calls its relay sends straight
to a back end, and that the policies hold on that path (revocation, roles, the client's
address for login limits)."""

from __future__ import annotations

import grpc
import pytest

from aiwfe.app.suite import start_suite
from aiwfe.auth.v1 import auth_service_pb2 as auth_pb
from aiwfe.cognitive.v1 import cognitive_service_pb2 as cog_pb
from aiwfe.cognitive.v1 import cognitive_service_pb2_grpc as cog_grpc
from gateway.ratelimit import RELAYED_PEER_KEY
from tests.conftest import bearer, login
from tests.gateway.conftest import Gateway


async def test_admitted_calls_go_straight_to_the_back_end_and_revocation_holds(gw) -> None:
    """Once its token is cached, a user's uncached Embed goes straight to cognitive and
    answers as the full path does; a readonly user is still refused (by the full path),
    and a logged-out token stops working at once."""
    front = gw.suite.running["gateway"].front
    stub = cog_grpc.CognitiveServiceStub(gw.channel)
    token = (await gw.login(await gw.create_user(["user"], "fast"))).access_token
    metadata = (*bearer(token), ("cache-control", "no-store"))
    request = cog_pb.EmbedRequest(texts=["through the front door"])
    full = await stub.Embed(request, metadata=bearer(token), timeout=10)  # the cache: full
    fast_before = front.fast_calls
    fast = await stub.Embed(request, metadata=metadata, timeout=10)
    assert front.fast_calls == fast_before + 1
    assert list(fast.embeddings[0].values) == list(full.embeddings[0].values)

    readonly = (await gw.login(await gw.create_user(["readonly"], "ro"))).access_token
    with pytest.raises(grpc.aio.AioRpcError) as denied:
        await stub.Embed(request, metadata=(*bearer(readonly), ("cache-control", "no-store")))
    assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED

    await gw.auth.Logout(auth_pb.LogoutRequest(), metadata=bearer(token), timeout=10)
    fast_before = front.fast_calls
    with pytest.raises(grpc.aio.AioRpcError) as revoked:
        await stub.Embed(request, metadata=metadata, timeout=10)
    assert revoked.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert front.fast_calls == fast_before


async def test_a_client_cannot_choose_the_address_login_limits_count(gw: Gateway) -> None:
    """The relay tells the gateway's gRPC server the client's address in a header it sets
    itself; a client sending that header from elsewhere changes nothing: twenty failures
    under twenty made-up addresses still exhaust its real one."""
    for i in range(20):
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await gw.auth.Login(
                auth_pb.LoginRequest(username=f"spoof-{i}", password="wrong-password"),
                metadata=((RELAYED_PEER_KEY, f"ipv4:10.0.0.{i}:1"),),
                timeout=10,
            )
        assert failed.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.aio.AioRpcError) as limited:
        await gw.login("spoof-new-name", "whatever-password")
    assert limited.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_the_relay_answers_from_the_response_cache_per_user(gw) -> None:
    """A cacheable call the gateway answered before is answered by the relay itself from
    the in-process cache, byte for byte; "no-cache" still goes to the back end, and another
    user asking the same is never answered from the first user's entry."""
    front = gw.suite.running["gateway"].front
    stub = cog_grpc.CognitiveServiceStub(gw.channel)
    first, second = [
        (await gw.login(await gw.create_user(["user"], "cache"))).access_token for _ in range(2)
    ]
    request = cog_pb.EmbedRequest(texts=["answered by the relay"])
    stored = await stub.Embed(request, metadata=bearer(first), timeout=10)  # full path stores
    answered = front.answered_calls
    again = await stub.Embed(request, metadata=bearer(first), timeout=10)
    assert front.answered_calls == answered + 1
    assert again.SerializeToString() == stored.SerializeToString()

    fresh = await stub.Embed(
        request, metadata=(*bearer(first), ("cache-control", "no-cache")), timeout=10
    )
    assert front.answered_calls == answered + 1
    assert list(fresh.embeddings[0].values) == list(stored.embeddings[0].values)
    await gw.auth.WhoAmI(auth_pb.WhoAmIRequest(), metadata=bearer(second), timeout=10)
    other = await stub.Embed(request, metadata=bearer(second), timeout=10)  # token cached
    assert front.answered_calls == answered + 1  # entries are per user: a miss
    assert list(other.embeddings[0].values) == list(stored.embeddings[0].values)


async def test_with_the_relay_off_the_grpc_server_takes_the_port(base_overrides) -> None:
    """`gateway.relay: false`: no front, the gateway's gRPC server listens on the port and
    proxies every call itself, with the same answers."""
    suite = await start_suite(
        {**base_overrides, "gateway": {"relay": False}},
        only=("dataplatform", "cognitive", "gateway"),
    )
    try:
        assert suite.running["gateway"].front is None
        async with grpc.aio.insecure_channel(suite.address("gateway")) as channel:
            token = await login(channel)
            reply = await cog_grpc.CognitiveServiceStub(channel).Embed(
                cog_pb.EmbedRequest(texts=["no relay"]),
                metadata=(*bearer(token), ("cache-control", "no-store")),
                timeout=10,
            )
            assert reply.dimension == 768
    finally:
        await suite.stop()
