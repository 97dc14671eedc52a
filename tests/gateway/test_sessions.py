"""Refresh rotation with reuse detection, logout and revocation across replicas, disabled
users and role changes, and no secrets in any log line."""

from __future__ import annotations

import asyncio
import logging
import time

import grpc
import pytest

from aiwfe.auth.v1 import auth_service_pb2 as auth_pb
from aiwfe.auth.v1 import auth_service_pb2_grpc as auth_grpc
from aiwfe.runtime.redis_client import token_hash
from tests.conftest import bearer
from tests.gateway.conftest import PASSWORD
from tests.gateway.test_token_attacks import whoami

OK = grpc.StatusCode.OK
UNAUTH = grpc.StatusCode.UNAUTHENTICATED


async def refresh(gw, token: str) -> auth_pb.RefreshResponse:
    return await gw.auth.Refresh(auth_pb.RefreshRequest(refresh_token=token), timeout=5)


async def eventually(check, want, within: float) -> float:
    """Polls `check()` until it returns `want`; returns the time it took (bounded)."""
    started = time.monotonic()
    for _ in range(int(within / 0.01) + 1):
        if await check() == want:
            return time.monotonic() - started
        await asyncio.sleep(0.01)
    raise AssertionError(f"not {want} within {within} s")


async def test_refresh_rotates_and_reuse_revokes_the_family(gw) -> None:
    """Each refresh token works once; presenting a spent one kills the whole family, access
    tokens issued from it included, and the newest refresh token too."""
    name = await gw.create_user(["user"], "rot")
    first = await gw.login(name)
    second = await refresh(gw, first.refresh_token)
    third = await refresh(gw, second.refresh_token)
    assert len({first.refresh_token, second.refresh_token, third.refresh_token}) == 3
    assert third.token_type == "Bearer" and third.expires_in == 24 * 3600
    for r in (first, second, third):
        assert await whoami(gw.channel, bearer(r.access_token)) == OK
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await refresh(gw, first.refresh_token)  # reuse of a spent token
    assert err.value.code() == UNAUTH
    assert "already used" in err.value.details()
    for r in (first, second, third):
        assert await whoami(gw.channel, bearer(r.access_token)) == UNAUTH
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await refresh(gw, third.refresh_token)
    assert err.value.code() == UNAUTH
    other = await gw.login(name)  # another session of the same user is untouched
    assert await whoami(gw.channel, bearer(other.access_token)) == OK


@pytest.mark.parametrize("token", ["", "rt_unknown", "x" * 100, "rt_" + "y" * 500])
async def test_bad_refresh_tokens_are_rejected(gw, token) -> None:
    """Empty → INVALID_ARGUMENT; unknown or oversized → INVALID_ARGUMENT/UNAUTHENTICATED."""
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await refresh(gw, token)
    want = grpc.StatusCode.INVALID_ARGUMENT if not token or len(token) > 128 else UNAUTH
    assert err.value.code() == want


async def test_logout_is_seen_by_another_replica_within_a_second(gw_any) -> None:
    """Logout on replica A revokes the token on replica B within 1 s: pushed through Redis
    pub/sub, or polled from the record when there is no Redis."""
    gw = gw_any
    replica = await gw.second_gateway()
    try:
        async with grpc.aio.insecure_channel(replica.address) as other:
            name = await gw.create_user(["user"], "logout")
            session = await gw.login(name)
            assert await whoami(other, bearer(session.access_token)) == OK  # cached on B
            await gw.auth.Logout(
                auth_pb.LogoutRequest(), metadata=bearer(session.access_token), timeout=5
            )
            assert await whoami(gw.channel, bearer(session.access_token)) == UNAUTH
            took = await eventually(
                lambda: whoami(other, bearer(session.access_token)), UNAUTH, within=1.0
            )
            assert took < 1.0
            with pytest.raises(grpc.aio.AioRpcError) as err:  # the family went with it
                await auth_grpc.AuthServiceStub(other).Refresh(
                    auth_pb.RefreshRequest(refresh_token=session.refresh_token), timeout=5
                )
            assert err.value.code() == UNAUTH
    finally:
        await replica.stop(grace=0.2)


async def test_disabled_user_sessions_are_dead(gw) -> None:
    """DisableUser kills the user's access and refresh tokens on every replica and login."""
    replica = await gw.second_gateway()
    try:
        async with grpc.aio.insecure_channel(replica.address) as other:
            name = await gw.create_user(["user"], "dis")
            a, b = await gw.login(name), await gw.login(name)
            assert await whoami(other, bearer(a.access_token)) == OK
            await gw.admin.DisableUser(
                auth_pb.DisableUserRequest(username=name),
                metadata=bearer(gw.admin_token),
                timeout=5,
            )
            for s in (a, b):
                assert await whoami(gw.channel, bearer(s.access_token)) == UNAUTH
                await eventually(lambda s=s: whoami(other, bearer(s.access_token)), UNAUTH, 1.0)
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await refresh(gw, s.refresh_token)
                assert err.value.code() == UNAUTH
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await gw.login(name)
            assert err.value.details() == "invalid username or password"
    finally:
        await replica.stop(grace=0.2)


async def test_role_change_invalidates_tokens_and_refresh_carries_new_roles(gw) -> None:
    """SetUserRoles invalidates the user's access tokens; a refresh gets the new roles."""
    name = await gw.create_user(["readonly"], "roles")
    s = await gw.login(name)
    await gw.admin.SetUserRoles(
        auth_pb.SetUserRolesRequest(username=name, roles=["user"]),
        metadata=bearer(gw.admin_token),
        timeout=5,
    )
    assert await whoami(gw.channel, bearer(s.access_token)) == UNAUTH
    fresh = await refresh(gw, s.refresh_token)
    me = await gw.auth.WhoAmI(
        auth_pb.WhoAmIRequest(), metadata=bearer(fresh.access_token), timeout=5
    )
    assert list(me.roles) == ["user"]
    assert "cognitive:inference" in me.permissions


async def test_nothing_sensitive_is_logged(gw, caplog) -> None:
    """Logins, failures, refreshes, reuse and logout log no token, password or hash."""
    caplog.set_level(logging.DEBUG)
    name = await gw.create_user(["user"], "logs")
    secrets_seen: list[str] = [PASSWORD, "wrong-password-for-logs"]
    with pytest.raises(grpc.aio.AioRpcError):
        await gw.login(name, "wrong-password-for-logs")
    s = await gw.login(name)
    r = await refresh(gw, s.refresh_token)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await refresh(gw, s.refresh_token)
    secrets_seen += [s.access_token, s.refresh_token, r.access_token, r.refresh_token]
    s2 = await gw.login(name)
    await gw.auth.Logout(auth_pb.LogoutRequest(), metadata=bearer(s2.access_token), timeout=5)
    secrets_seen += [s2.access_token, s2.refresh_token]
    fragments = set()
    for secret in secrets_seen:
        fragments |= {secret, secret.split(".")[-1], token_hash(secret)}
    fragments.add("$argon2")
    text = "\n".join(rec.getMessage() + str(rec.args) for rec in caplog.records)
    text += err.value.details()
    assert caplog.records, "expected some log lines to check"
    leaked = [f for f in fragments if f and f in text]
    assert leaked == []
