"""End to end through the real gateway: login, Embed proxied as bytes, policy from the
contract, and precise statuses for bad input."""

from __future__ import annotations

import asyncio
import time

import grpc
import psycopg
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from aiwfe.app.suite import start_suite
from aiwfe.auth.v1 import auth_service_pb2 as auth_pb
from aiwfe.auth.v1 import auth_service_pb2_grpc as auth_grpc
from aiwfe.cognitive.v1 import cognitive_service_pb2 as cog_pb
from aiwfe.cognitive.v1 import cognitive_service_pb2_grpc as cog_grpc
from aiwfe.data.v1 import user_store_service_pb2 as user_pb
from aiwfe.data.v1 import user_store_service_pb2_grpc as user_grpc
from aiwfe.runtime.identity import IDENTITY_METADATA_KEY, InternalIdentity
from aiwfe.runtime.passwords import hash_password
from aiwfe.taskproc.v1 import workflow_service_pb2 as wf_pb
from aiwfe.taskproc.v1 import workflow_service_pb2_grpc as wf_grpc
from tests.conftest import bearer, field_violations, login


async def test_login_then_embed_through_gateway(suite, gateway_channel) -> None:
    """An admin logs in, gets an HS256 JWT and receives real 768-d embeddings via the gateway."""
    token = await login(gateway_channel)
    assert token.count(".") == 2
    stub = cog_grpc.CognitiveServiceStub(gateway_channel)
    reply = await stub.Embed(
        cog_pb.EmbedRequest(texts=["the cat sat on the mat", "quarterly revenue grew"]),
        metadata=bearer(token),
        timeout=10,
    )
    assert reply.dimension == 768
    assert reply.model.startswith("aiwfe-hashing")
    assert len(reply.embeddings) == 2
    first = reply.embeddings[0].values
    assert len(first) == 768
    assert abs(sum(v * v for v in first) - 1.0) < 1e-3
    assert list(first) != list(reply.embeddings[1].values)


async def test_embed_is_cached_through_dataplatform(suite, gateway_channel) -> None:
    """A repeated Embed is served from cache, and the vector is persisted in PostgreSQL."""
    token = await login(gateway_channel)
    stub = cog_grpc.CognitiveServiceStub(gateway_channel)
    text = f"persisted cache probe {time.time_ns()}"
    first = await stub.Embed(cog_pb.EmbedRequest(texts=[text]), metadata=bearer(token), timeout=10)
    # Another request (the gateway's response cache would replay identical request bytes).
    second = await stub.Embed(
        cog_pb.EmbedRequest(texts=[text, f"{text} fresh"]), metadata=bearer(token), timeout=10
    )
    assert first.cached_count == 0
    assert second.cached_count == 1
    assert list(second.embeddings[0].values) == pytest.approx(list(first.embeddings[0].values))
    dsn = suite.settings.database.postgres.dsn
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute(
            "SELECT count(*) FROM cache_entries WHERE key LIKE 'cognitive:embed:%%'"
            " AND expires_at > now() + interval '1700 seconds'"
        )
        (count,) = await cur.fetchone()
    assert count >= 1


async def test_whoami_reports_roles_and_permissions(suite, gateway_channel) -> None:
    """WhoAmI returns the principal from the token with the seed's admin permissions."""
    token = await login(gateway_channel)
    me = await auth_grpc.AuthServiceStub(gateway_channel).WhoAmI(
        auth_pb.WhoAmIRequest(), metadata=bearer(token), timeout=5
    )
    assert me.username == "admin"
    assert list(me.roles) == ["admin"]
    assert set(me.permissions) == {"api:*", "cognitive:*", "data:*", "system:*"}


async def test_wrong_password_and_unknown_user_look_the_same(suite, gateway_channel) -> None:
    """Login fails with one UNAUTHENTICATED message whether or not the user exists."""
    stub = auth_grpc.AuthServiceStub(gateway_channel)
    messages = set()
    for username in ("admin", "nobody-here"):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Login(
                auth_pb.LoginRequest(username=username, password="wrong-password-123"), timeout=10
            )
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        messages.add(err.value.details())
    assert messages == {"invalid username or password"}


@pytest.mark.parametrize(
    ("metadata", "expected"),
    [
        ((), "missing bearer token"),
        ((("authorization", "Bearer not.a.jwt"),), "invalid token"),
        ((("authorization", "Basic YWRtaW46YWRtaW4="),), "Bearer"),
    ],
)
async def test_embed_without_valid_token_is_unauthenticated(
    suite, gateway_channel, metadata, expected
) -> None:
    """No token, a garbage token or a non-Bearer scheme → UNAUTHENTICATED with a clear message."""
    stub = cog_grpc.CognitiveServiceStub(gateway_channel)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Embed(cog_pb.EmbedRequest(texts=["x"]), metadata=metadata, timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert expected in err.value.details()


async def test_token_signed_with_another_key_is_rejected(suite, gateway_channel) -> None:
    """A well-formed JWT signed with a different secret → UNAUTHENTICATED."""
    import jwt as pyjwt

    now = int(time.time())
    forged = pyjwt.encode(
        {
            "sub": "x",
            "roles": ["admin"],
            "iat": now,
            "exp": now + 60,
            "jti": "j",
            "iss": "aiwfe",
            "aud": "aiwfe-api",
        },
        "a-completely-different-secret-of-32-bytes!",
        algorithm="HS256",
    )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await cog_grpc.CognitiveServiceStub(gateway_channel).Embed(
            cog_pb.EmbedRequest(texts=["x"]), metadata=bearer(forged), timeout=5
        )
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def _create_user(suite, username: str, roles: list[str], password: str) -> None:
    identity = InternalIdentity.from_settings(suite.settings)
    async with grpc.aio.insecure_channel(suite.address("dataplatform")) as ch:
        await user_grpc.UserStoreServiceStub(ch).CreateUser(
            user_pb.CreateUserRequest(
                username=username, password_hash=hash_password(password), roles=roles
            ),
            metadata=((IDENTITY_METADATA_KEY, identity.assertion(None, "test")),),
            timeout=5,
        )


async def test_readonly_role_is_denied_inference(suite, gateway_channel) -> None:
    """A readonly user (api:read only) gets PERMISSION_DENIED on Embed, naming the permission."""
    name = f"reader{time.time_ns()}"
    await _create_user(suite, name, ["readonly"], "readonly-password-1")
    token = await login(gateway_channel, name, "readonly-password-1")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await cog_grpc.CognitiveServiceStub(gateway_channel).Embed(
            cog_pb.EmbedRequest(texts=["x"]), metadata=bearer(token), timeout=5
        )
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "cognitive:inference" in err.value.details()


async def test_internal_data_rpc_is_denied_at_gateway(suite, gateway_channel) -> None:
    """A data-platform RPC that declares no permission is denied even to an admin."""
    token = await login(gateway_channel)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await user_grpc.UserStoreServiceStub(gateway_channel).GetUser(
            user_pb.GetUserRequest(username="admin"), metadata=bearer(token), timeout=5
        )
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_unknown_method_is_unimplemented(suite, gateway_channel) -> None:
    """A method no contract declares → UNIMPLEMENTED."""
    call = gateway_channel.unary_unary("/aiwfe.cognitive.v1.CognitiveService/NoSuchMethod")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call(b"", timeout=5)
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_back_end_rejects_calls_around_the_gateway(suite) -> None:
    """Calling cognitive directly without an internal identity → UNAUTHENTICATED."""
    async with grpc.aio.insecure_channel(suite.address("cognitive")) as ch:
        for metadata in ((), ((IDENTITY_METADATA_KEY, "forged"),)):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await cog_grpc.CognitiveServiceStub(ch).Embed(
                    cog_pb.EmbedRequest(texts=["x"]), metadata=metadata, timeout=5
                )
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_spoofed_internal_identity_header_is_stripped(suite, gateway_channel) -> None:
    """A client-sent x-aiwfe-identity is dropped: without a token the call is UNAUTHENTICATED."""
    identity = InternalIdentity.from_settings(suite.settings)
    spoof = identity.assertion(None, "gateway")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await cog_grpc.CognitiveServiceStub(gateway_channel).Embed(
            cog_pb.EmbedRequest(texts=["x"]),
            metadata=((IDENTITY_METADATA_KEY, "garbage"),),
            timeout=5,
        )
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    token = await login(gateway_channel)
    reply = await cog_grpc.CognitiveServiceStub(gateway_channel).Embed(
        cog_pb.EmbedRequest(texts=["x"]),
        metadata=(*bearer(token), (IDENTITY_METADATA_KEY, spoof)),
        timeout=5,
    )
    assert reply.dimension == 768


@pytest.mark.parametrize(
    ("texts", "field"),
    [([], "texts"), (["ok", ""], "texts[1]"), (["x" * 40000], "texts[0]"), (["a"] * 300, "texts")],
)
async def test_bad_texts_are_invalid_argument_with_field_violations(
    suite, gateway_channel, texts, field
) -> None:
    """Empty, blank or over-long texts → INVALID_ARGUMENT with a BadRequest naming the field."""
    token = await login(gateway_channel)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await cog_grpc.CognitiveServiceStub(gateway_channel).Embed(
            cog_pb.EmbedRequest(texts=texts), metadata=bearer(token), timeout=5
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in field_violations(err.value)


async def test_oversized_message_is_resource_exhausted(suite, gateway_channel) -> None:
    """A request above the 4 MiB limit → RESOURCE_EXHAUSTED, not a hang or INTERNAL."""
    token = await login(gateway_channel)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await cog_grpc.CognitiveServiceStub(gateway_channel).Embed(
            cog_pb.EmbedRequest(texts=["y" * (5 * 1024 * 1024)]), metadata=bearer(token), timeout=5
        )
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_back_end_down_is_unavailable_within_deadline(base_overrides) -> None:
    """With cognitive not running, Embed through the gateway fails UNAVAILABLE quickly."""
    overrides = {**base_overrides, "services": {"cognitive": {"port": 1}}}
    suite = await start_suite(overrides, only=("dataplatform", "gateway"))
    try:
        async with grpc.aio.insecure_channel(suite.address("gateway")) as ch:
            token = await login(ch)
            started = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await cog_grpc.CognitiveServiceStub(ch).Embed(
                    cog_pb.EmbedRequest(texts=["x"]), metadata=bearer(token), timeout=3
                )
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert time.monotonic() - started < 3
    finally:
        await suite.stop()


async def test_health_and_reflection_on_every_service(suite) -> None:
    """Each service reports SERVING and lists its services over reflection."""
    expected = {
        "gateway": {
            "aiwfe.auth.v1.AuthService",
            "aiwfe.cognitive.v1.CognitiveService",
            "aiwfe.taskproc.v1.WorkflowService",
        },
        "cognitive": {"aiwfe.cognitive.v1.CognitiveService"},
        "taskproc": {"aiwfe.taskproc.v1.WorkflowService"},
        "dataplatform": {"aiwfe.data.v1.UserStoreService", "aiwfe.data.v1.CacheStoreService"},
    }
    for name, services in expected.items():
        async with grpc.aio.insecure_channel(suite.address(name)) as ch:
            health = await health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=5
            )
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            stub = reflection_pb2_grpc.ServerReflectionStub(ch)
            responses = stub.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
            )
            listed = set()
            async for resp in responses:
                listed = {s.name for s in resp.list_services_response.service}
            assert services <= listed, name
            if name == "gateway":
                assert "aiwfe.data.v1.UserStoreService" not in listed


class _StreamingTaskProc(wf_grpc.WorkflowServiceServicer):
    """A real back end that streams three events, to prove the proxy streams bytes."""

    async def WatchWorkflow(self, request, context):
        for seq in range(1, 4):
            yield wf_pb.WatchWorkflowResponse(
                sequence=seq, step_name=f"{request.workflow_id}-{seq}"
            )
            await asyncio.sleep(0)


async def test_server_streaming_rpc_is_proxied(base_overrides) -> None:
    """WatchWorkflow streams every message through the gateway to the client, in order."""
    backend = grpc.aio.server()
    wf_grpc.add_WorkflowServiceServicer_to_server(_StreamingTaskProc(), backend)
    port = backend.add_insecure_port("127.0.0.1:0")
    await backend.start()
    overrides = {**base_overrides, "services": {"taskproc": {"port": port}}}
    suite = await start_suite(overrides, only=("dataplatform", "gateway"))
    try:
        async with grpc.aio.insecure_channel(suite.address("gateway")) as ch:
            token = await login(ch)
            stream = wf_grpc.WorkflowServiceStub(ch).WatchWorkflow(
                wf_pb.WatchWorkflowRequest(workflow_id="wf"), metadata=bearer(token), timeout=5
            )
            events = [e async for e in stream]
        assert [(e.sequence, e.step_name) for e in events] == [
            (1, "wf-1"),
            (2, "wf-2"),
            (3, "wf-3"),
        ]
    finally:
        await suite.stop()
        await backend.stop(0)


async def test_streaming_upstream_error_keeps_its_status(suite, gateway_channel) -> None:
    """A back end's error on a server stream reaches the client with its code and message."""
    token = await login(gateway_channel)
    stream = wf_grpc.WorkflowServiceStub(gateway_channel).WatchWorkflow(
        wf_pb.WatchWorkflowRequest(workflow_id="00000000-0000-0000-0000-000000000000"),
        metadata=bearer(token),
        timeout=5,
    )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for _ in stream:
            pass
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
