"""Service accounts and API keys through the real gateway: a key authenticates like a token
(its roles apply, the relay's fast path admits it), is shown once and stored as a hash,
expires, is revoked on every replica within a second, records its last use in batches,
and a service account can never log in."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time

import grpc
import psycopg
import pytest
from google.protobuf import struct_pb2
from google.protobuf.duration_pb2 import Duration

from aiwfe.app.suite import start_suite
from aiwfe.auth.v1 import auth_service_pb2 as auth_pb
from aiwfe.auth.v1 import auth_service_pb2_grpc as auth_grpc
from aiwfe.cognitive.v1 import cognitive_service_pb2 as cog_pb
from aiwfe.cognitive.v1 import cognitive_service_pb2_grpc as cog_grpc
from aiwfe.runtime.metrics import REGISTRY
from aiwfe.taskproc.v1 import worker_service_pb2 as worker_pb
from aiwfe.taskproc.v1 import worker_service_pb2_grpc as worker_grpc
from aiwfe.taskproc.v1 import workflow_service_pb2 as wf_pb
from tests.conftest import bearer, field_violations, login
from tests.gateway.conftest import Gateway, gateway_overrides, unique
from tests.gateway.test_error_reasons_e2e import error_info, failure
from tests.taskproc.helpers import finish, spec, submit

UNAUTH = grpc.StatusCode.UNAUTHENTICATED
DENIED = grpc.StatusCode.PERMISSION_DENIED


async def account(gw: Gateway, roles: list[str]) -> auth_pb.User:
    made = await gw.admin.CreateServiceAccount(
        auth_pb.CreateServiceAccountRequest(name=unique("svc"), roles=roles),
        metadata=bearer(gw.admin_token),
        timeout=10,
    )
    return made.service_account


async def api_key(gw: Gateway, account_name: str, **fields) -> auth_pb.CreateApiKeyResponse:
    return await gw.admin.CreateApiKey(
        auth_pb.CreateApiKeyRequest(service_account=account_name, **fields),
        metadata=bearer(gw.admin_token),
        timeout=10,
    )


async def whoami(channel: grpc.aio.Channel, key: str) -> auth_pb.WhoAmIResponse:
    return await auth_grpc.AuthServiceStub(channel).WhoAmI(
        auth_pb.WhoAmIRequest(), metadata=bearer(key), timeout=10
    )


async def refusal(channel: grpc.aio.Channel, key: str) -> str:
    """The ErrorInfo reason WhoAmI answers with `key`; "" when it succeeds."""
    try:
        await whoami(channel, key)
    except grpc.aio.AioRpcError as exc:
        code, reason, _ = error_info(exc)
        assert code == UNAUTH
        return reason
    return ""


def counted(outcome: str) -> float:
    """authentication_success_rate{kind="api_key"} (the suite runs in process: one registry)."""
    value = REGISTRY.get_sample_value(
        "authentication_success_rate_total", {"kind": "api_key", "outcome": outcome}
    )
    return value or 0.0


async def until(check, within: float) -> float:
    """Polls `check()` until true; returns how long it took (AssertionError past `within`)."""
    started = time.monotonic()
    while not await check():
        if time.monotonic() - started > within:
            raise AssertionError(f"not within {within} s")
        await asyncio.sleep(0.005)
    return time.monotonic() - started


async def test_api_key_authenticates_as_its_service_account_with_its_roles(gw) -> None:
    """A key is a bearer credential for its service account: WhoAmI names the account and
    its roles, a permission the roles lack is PERMISSION_DENIED (PERMISSION_MISSING), and
    once cached the key's calls take the relay's fast path to the back end."""
    svc = await account(gw, ["readonly"])
    made = await api_key(gw, svc.username, name="ci")
    assert made.key.startswith(f"aiwfe_sk_{made.api_key.key_id}_")
    me = await whoami(gw.channel, made.key)
    assert (me.user_id, me.username, list(me.roles)) == (svc.user_id, svc.username, ["readonly"])
    assert svc.service_account and not svc.disabled
    embed = cog_grpc.CognitiveServiceStub(gw.channel).Embed
    request = cog_pb.EmbedRequest(texts=["x"])
    code, reason, meta = await failure(embed, request, metadata=bearer(made.key))
    assert (code, reason, meta["permission"]) == (
        DENIED,
        "PERMISSION_MISSING",
        "cognitive:inference",
    )
    code, _, meta = await failure(
        gw.admin.ListUsers, auth_pb.ListUsersRequest(), metadata=bearer(made.key)
    )
    assert (code, meta["permission"]) == (DENIED, "system:users")

    worker = await api_key(gw, (await account(gw, ["user"])).username)
    metadata = (*bearer(worker.key), ("cache-control", "no-store"))
    await embed(request, metadata=metadata, timeout=10)  # verified and cached (full path)
    front = gw.suite.running["gateway"].front
    fast_before = front.fast_calls
    reply = await embed(request, metadata=metadata, timeout=10)
    assert front.fast_calls == fast_before + 1 and len(reply.embeddings) == 1


async def test_key_is_shown_once_and_only_its_hash_is_stored(gw) -> None:
    """CreateApiKey returns the key once; listings never carry it, and PostgreSQL holds its
    SHA-256 and nothing of the secret."""
    svc = await account(gw, ["worker"])
    made = await api_key(gw, svc.username, name="once")
    prefix = f"aiwfe_sk_{made.api_key.key_id}_"
    secret = made.key.removeprefix(prefix)  # 32 random bytes, URL-safe base64 (may hold "_")
    assert made.key.startswith(prefix) and len(secret) == 43
    listed = await gw.admin.ListApiKeys(
        auth_pb.ListApiKeysRequest(service_account=svc.username),
        metadata=bearer(gw.admin_token),
        timeout=10,
    )
    assert [k.key_id for k in listed.api_keys] == [made.api_key.key_id]
    assert listed.api_keys[0].name == "once" and not listed.api_keys[0].revoked
    assert secret not in str(listed) and secret not in str(made.api_key)
    dsn = gw.suite.settings.database.postgres.dsn
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        cur = await conn.execute(
            "SELECT secret_hash, row_to_json(k)::text FROM api_keys k WHERE key_id = %s",
            (made.api_key.key_id,),
        )
        rows = await cur.fetchall()
        cur = await conn.execute(
            "SELECT password_hash, kind FROM users WHERE username = %s", (svc.username,)
        )
        user_row = await cur.fetchone()
    assert len(rows) == 1
    assert bytes(rows[0][0]) == hashlib.sha256(made.key.encode()).digest()
    assert secret not in rows[0][1] and made.key not in rows[0][1]
    assert user_row == ("", "service")


@pytest.mark.parametrize("bad", ["wrong-secret", "unknown-id", "malformed", "truncated"])
async def test_bad_keys_are_refused_with_api_key_invalid(gw, bad: str) -> None:
    """A wrong secret, an unknown key id or a malformed key is UNAUTHENTICATED with
    API_KEY_INVALID (the same answer for each, so nothing tells which part was wrong), and
    counted in authentication_success_rate{kind="api_key"}."""
    svc = await account(gw, ["worker"])
    made = await api_key(gw, svc.username)
    key_id = made.api_key.key_id
    key = {
        "wrong-secret": f"aiwfe_sk_{key_id}_{'A' * 43}",
        "unknown-id": f"aiwfe_sk_{'0' * 16}_{made.key[-43:]}",
        "malformed": "aiwfe_sk_not-a-key",
        "truncated": made.key[:-1],
    }[bad]
    failed_before = counted("failure")
    for _ in range(2):  # the second answer comes from the gateway's memory of the refusal
        assert await refusal(gw.channel, key) == "API_KEY_INVALID"
    assert counted("failure") - failed_before == 2
    ok_before = counted("success")
    assert await refusal(gw.channel, made.key) == ""  # the real key is unaffected
    assert counted("success") - ok_before == 1


async def test_expired_key_is_refused(gw) -> None:
    """A key past its ttl is UNAUTHENTICATED with API_KEY_EXPIRED, even when it was cached
    while valid; an expire_time in the past is refused at creation."""
    svc = await account(gw, ["worker"])
    made = await api_key(gw, svc.username, ttl=Duration(seconds=1))
    assert made.api_key.HasField("expire_time")
    assert await refusal(gw.channel, made.key) == ""
    await asyncio.sleep(max(0.0, made.api_key.expire_time.ToMicroseconds() / 1e6 - time.time()))
    await until(lambda: _is(refusal(gw.channel, made.key), "API_KEY_EXPIRED"), within=1.0)
    past = auth_pb.CreateApiKeyRequest(service_account=svc.username)
    past.expire_time.FromSeconds(int(time.time()) - 60)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await gw.admin.CreateApiKey(past, metadata=bearer(gw.admin_token), timeout=10)
    assert "expire_time" in field_violations(err.value)


async def _is(answer, want: str) -> bool:
    return await answer == want


async def test_revoked_key_is_refused_on_another_replica_within_a_second(gw_any) -> None:
    """RevokeApiKey on replica A: A refuses the key at once and replica B, which had it
    cached, within 1 s (pushed through Redis pub/sub, or polled from the record without
    Redis), both with API_KEY_REVOKED; revoking again is a no-op."""
    gw = gw_any
    replica = await gw.second_gateway()
    try:
        async with grpc.aio.insecure_channel(replica.address) as other:
            svc = await account(gw, ["worker"])
            made = await api_key(gw, svc.username)
            assert await refusal(other, made.key) == ""  # cached on B
            assert await refusal(other, made.key) == ""
            started = time.monotonic()
            revoked = await gw.admin.RevokeApiKey(
                auth_pb.RevokeApiKeyRequest(key_id=made.api_key.key_id),
                metadata=bearer(gw.admin_token),
                timeout=10,
            )
            assert revoked.api_key.revoked and revoked.api_key.HasField("revoke_time")
            assert await refusal(gw.channel, made.key) == "API_KEY_REVOKED"
            await until(lambda: _is(refusal(other, made.key), "API_KEY_REVOKED"), within=1.0)
            took = time.monotonic() - started
            print(f"revoked key refused on the second replica after {took * 1000:.1f} ms")
            assert took < 1.0
            again = await gw.admin.RevokeApiKey(
                auth_pb.RevokeApiKeyRequest(key_id=made.api_key.key_id),
                metadata=bearer(gw.admin_token),
                timeout=10,
            )
            assert again.api_key.revoke_time == revoked.api_key.revoke_time
    finally:
        await replica.stop(grace=0.2)


async def test_role_change_and_disabling_reach_every_replica_within_a_second(gw) -> None:
    """SetUserRoles on a service account gives its cached key the new roles on replica B
    within 1 s (the key keeps working); DisableUser refuses it there within 1 s
    (API_KEY_REVOKED) and no new key can be created for it."""
    replica = await gw.second_gateway()
    try:
        async with grpc.aio.insecure_channel(replica.address) as other:
            svc = await account(gw, ["readonly"])
            made = await api_key(gw, svc.username)
            assert list((await whoami(other, made.key)).roles) == ["readonly"]
            await gw.admin.SetUserRoles(
                auth_pb.SetUserRolesRequest(username=svc.username, roles=["worker"]),
                metadata=bearer(gw.admin_token),
                timeout=10,
            )

            async def new_roles() -> bool:
                return list((await whoami(other, made.key)).roles) == ["worker"]

            assert await until(new_roles, within=1.0) < 1.0
            await gw.admin.DisableUser(
                auth_pb.DisableUserRequest(username=svc.username),
                metadata=bearer(gw.admin_token),
                timeout=10,
            )
            took = await until(lambda: _is(refusal(other, made.key), "API_KEY_REVOKED"), 1.0)
            assert took < 1.0
            code, reason, _ = await failure(
                gw.admin.CreateApiKey,
                auth_pb.CreateApiKeyRequest(service_account=svc.username),
                metadata=bearer(gw.admin_token),
            )
            assert (code, reason) == (
                grpc.StatusCode.FAILED_PRECONDITION,
                "SERVICE_ACCOUNT_DISABLED",
            )
    finally:
        await replica.stop(grace=0.2)


async def test_only_admins_manage_service_accounts_and_keys(gw) -> None:
    """A user, and a service account's own key, get PERMISSION_DENIED for every service
    account and key RPC; keys exist only for service accounts."""
    user = (await gw.login(await gw.create_user(["user"], "nokeys"))).access_token
    svc = await account(gw, ["worker"])
    key = (await api_key(gw, svc.username)).key
    calls = [
        (gw.admin.CreateServiceAccount, auth_pb.CreateServiceAccountRequest(name="x-svc")),
        (gw.admin.ListServiceAccounts, auth_pb.ListServiceAccountsRequest()),
        (gw.admin.CreateApiKey, auth_pb.CreateApiKeyRequest(service_account=svc.username)),
        (gw.admin.ListApiKeys, auth_pb.ListApiKeysRequest(service_account=svc.username)),
        (gw.admin.RevokeApiKey, auth_pb.RevokeApiKeyRequest(key_id="0" * 16)),
    ]
    for credential in (user, key):
        for rpc, request in calls:
            code, reason, _ = await failure(rpc, request, metadata=bearer(credential))
            assert (code, reason) == (DENIED, "PERMISSION_MISSING")
    person = await gw.create_user(["user"], "person")
    code, reason, _ = await failure(
        gw.admin.CreateApiKey,
        auth_pb.CreateApiKeyRequest(service_account=person),
        metadata=bearer(gw.admin_token),
    )
    assert (code, reason) == (grpc.StatusCode.NOT_FOUND, "SERVICE_ACCOUNT_NOT_FOUND")
    code, reason, _ = await failure(
        gw.admin.RevokeApiKey,
        auth_pb.RevokeApiKeyRequest(key_id="0" * 16),
        metadata=bearer(gw.admin_token),
    )
    assert (code, reason) == (grpc.StatusCode.NOT_FOUND, "API_KEY_NOT_FOUND")


async def test_listing_shows_last_use_recorded_in_batches(gw) -> None:
    """ListApiKeys shows no last use before the key is used and the time of its last use
    after; fifty calls leave one pending entry per key (no write per call)."""
    svc = await account(gw, ["worker"])
    made = await api_key(gw, svc.username)

    async def listed() -> auth_pb.ApiKey:
        reply = await gw.admin.ListApiKeys(
            auth_pb.ListApiKeysRequest(service_account=svc.username),
            metadata=bearer(gw.admin_token),
            timeout=10,
        )
        return reply.api_keys[0]

    assert not (await listed()).HasField("last_used_time")
    service = gw.suite.running["gateway"].service
    for _ in range(50):
        await whoami(gw.channel, made.key)
    assert service.key_uses.uses.keys() == {made.api_key.key_id}
    used = time.time()
    last = (await listed()).last_used_time.ToMicroseconds() / 1e6
    assert used - 5 < last <= used + 1
    assert made.api_key.key_id not in service.key_uses.uses  # flushed by the listing


async def test_service_account_cannot_log_in(gw) -> None:
    """Login as a service account fails like a wrong password (CREDENTIALS_INVALID), even
    with the password the gateway verifies for unknown users; ListUsers does not list it."""
    svc = await account(gw, ["admin"])
    for password in ("aiwfe-dummy-password-for-timing", "any-password-at-all"):
        code, reason, _ = await failure(
            gw.auth.Login, auth_pb.LoginRequest(username=svc.username, password=password)
        )
        assert (code, reason) == (UNAUTH, "CREDENTIALS_INVALID")
    users = await gw.admin.ListUsers(
        auth_pb.ListUsersRequest(page_size=1000), metadata=bearer(gw.admin_token), timeout=10
    )
    accounts = await gw.admin.ListServiceAccounts(
        auth_pb.ListServiceAccountsRequest(page_size=1000),
        metadata=bearer(gw.admin_token),
        timeout=10,
    )
    assert svc.username not in {u.username for u in users.users}
    assert svc.username in {a.username for a in accounts.service_accounts}
    assert all(a.service_account for a in accounts.service_accounts)


async def test_logout_with_a_key_is_refused_and_the_key_lives_on(gw) -> None:
    """Logout with an API key is FAILED_PRECONDITION (API_KEY_NOT_A_SESSION): a key ends
    only by RevokeApiKey, so a client's logout cannot kill a worker's key by accident."""
    made = await api_key(gw, (await account(gw, ["worker"])).username)
    code, reason, _ = await failure(
        gw.auth.Logout, auth_pb.LogoutRequest(), metadata=bearer(made.key)
    )
    assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "API_KEY_NOT_A_SESSION")
    assert await refusal(gw.channel, made.key) == ""


async def test_no_key_is_ever_logged(gw, caplog) -> None:
    """Creating, using, refusing, listing and revoking keys log no key or secret."""
    caplog.set_level(logging.DEBUG)
    svc = await account(gw, ["worker"])
    made = await api_key(gw, svc.username)
    await whoami(gw.channel, made.key)
    wrong = made.key[:-4] + "AAAA"
    assert await refusal(gw.channel, wrong) == "API_KEY_INVALID"
    await gw.admin.RevokeApiKey(
        auth_pb.RevokeApiKeyRequest(key_id=made.api_key.key_id),
        metadata=bearer(gw.admin_token),
        timeout=10,
    )
    assert await refusal(gw.channel, made.key) == "API_KEY_REVOKED"
    text = "\n".join(rec.getMessage() + str(rec.args) for rec in caplog.records)
    assert made.api_key.key_id in text  # keys are named by id
    for secret in (made.key, made.key[-43:], wrong, wrong[-43:]):
        assert secret not in text


async def test_api_key_calls_count_against_the_rate_limit(base_overrides, redis_url) -> None:
    """A key's calls spend its service account's API quota like a user's: with a limit of
    12 per minute the 13th call is RESOURCE_EXHAUSTED (RATE_LIMITED)."""
    overrides = gateway_overrides(base_overrides, redis_url)
    overrides["authentication"]["rate_limiting"] = {
        "api_requests": 12,
        "api_requests_per_role": {"admin": 1000},
    }
    suite = await start_suite(overrides, only=("dataplatform", "gateway"))
    try:
        async with grpc.aio.insecure_channel(suite.address("gateway")) as channel:
            gw = Gateway(suite, channel, await login(channel))
            made = await api_key(gw, (await account(gw, ["worker"])).username)
            for _ in range(12):
                await whoami(channel, made.key)
            code, reason, _ = await failure(
                auth_grpc.AuthServiceStub(channel).WhoAmI,
                auth_pb.WhoAmIRequest(),
                metadata=bearer(made.key),
            )
            assert (code, reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "RATE_LIMITED")
    finally:
        await suite.stop()


async def test_a_worker_key_with_the_seed_worker_role_serves_a_task_queue(gw) -> None:
    """A service account with the seed role `worker` polls a queue and completes a task
    with its API key alone (the issue's unattended worker); a key whose roles lack
    worker:queue:* is refused at the gateway (PERMISSION_MISSING)."""
    queue = unique("q")
    worker = await api_key(gw, (await account(gw, ["worker"])).username)
    reader = await api_key(gw, (await account(gw, ["readonly"])).username)
    stub = worker_grpc.WorkerServiceStub(gw.channel)
    code, reason, meta = await failure(
        stub.PollTask,
        worker_pb.PollTaskRequest(queues=[queue], wait_seconds=0.2),
        metadata=bearer(reader.key),
    )
    assert (code, reason, meta["permission"]) == (
        DENIED,
        "PERMISSION_MISSING",
        f"worker:queue:{queue}",
    )
    workflow = await submit(
        gw.channel,
        gw.admin_token,
        spec({"name": "work", "op": "task", "inputs": {"queue": queue, "type": "t", "input": {}}}),
    )
    task = await stub.PollTask(
        worker_pb.PollTaskRequest(queues=[queue], wait_seconds=10),
        metadata=bearer(worker.key),
        timeout=15,
    )
    assert task.task_token and task.workflow_id == workflow.workflow_id
    output = struct_pb2.Struct()
    output.update({"done": True})
    await stub.CompleteTask(
        worker_pb.CompleteTaskRequest(task_token=task.task_token, queue=queue, output=output),
        metadata=bearer(worker.key),
        timeout=10,
    )
    done = await finish(gw.channel, gw.admin_token, workflow.workflow_id)
    assert done.state == wf_pb.WORKFLOW_STATE_SUCCEEDED
