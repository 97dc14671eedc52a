"""UserAdminService: password policy, known roles only, paging, no hashes returned."""

from __future__ import annotations

import base64

import grpc
import pytest

from aiwfe.auth.v1 import auth_service_pb2 as auth_pb
from tests.conftest import bearer, field_violations
from tests.gateway.conftest import PASSWORD, unique


@pytest.mark.parametrize(
    ("username", "password", "roles", "field"),
    [
        ("ok-name", "short", ["user"], "password"),
        ("ok-name", "aaaaaaaaaaaaaaaa", ["user"], "password"),
        ("ok-name", PASSWORD, ["superuser"], "roles[0]"),
        ("ok-name", PASSWORD, [], "roles"),
        ("x", PASSWORD, ["user"], "username"),
        ("bad name!", PASSWORD, ["user"], "username"),
    ],
)
async def test_create_user_validates(gw, username, password, roles, field) -> None:
    """Weak passwords, unknown roles and bad usernames → INVALID_ARGUMENT naming the field."""
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await gw.admin.CreateUser(
            auth_pb.CreateUserRequest(username=username, password=password, roles=roles),
            metadata=bearer(gw.admin_token),
            timeout=10,
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in field_violations(err.value)
    assert password not in err.value.details() or len(password) < 6


async def test_create_duplicate_and_unknown_user_errors(gw) -> None:
    """A taken username → ALREADY_EXISTS; changing a missing user → NOT_FOUND."""
    name = await gw.create_user(["user"], "dup")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await gw.admin.CreateUser(
            auth_pb.CreateUserRequest(username=name, password=PASSWORD, roles=["user"]),
            metadata=bearer(gw.admin_token),
            timeout=10,
        )
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    for call in (
        gw.admin.DisableUser(auth_pb.DisableUserRequest(username=unique("ghost")),
                             metadata=bearer(gw.admin_token), timeout=5),
        gw.admin.SetUserRoles(auth_pb.SetUserRolesRequest(username=unique("ghost"), roles=[]),
                              metadata=bearer(gw.admin_token), timeout=5),
    ):  # fmt: skip
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def test_list_users_pages_without_hashes(gw_private) -> None:
    """ListUsers pages through every account and never exposes a password hash."""
    gw = gw_private
    created = {await gw.create_user(["readonly"], "page") for _ in range(3)}
    seen, token = [], ""
    for _ in range(100):
        page = await gw.admin.ListUsers(
            auth_pb.ListUsersRequest(page_size=2, page_token=token),
            metadata=bearer(gw.admin_token),
            timeout=5,
        )
        assert len(page.users) <= 2
        seen += [u.username for u in page.users]
        token = page.next_page_token
        if not token:
            break
    assert created <= set(seen) and len(seen) == len(set(seen))
    assert "argon2" not in str(page)


async def test_admin_listings_page_tokens_are_sealed_and_bound(gw) -> None:
    """ListUsers, ListServiceAccounts and ListApiKeys tokens show no cursor (a username, a
    key id) and still page; edited, from another listing or another account's keys, or
    replayed by another admin they are INVALID_ARGUMENT naming page_token (AIP-158)."""
    from tests.gateway.test_service_accounts import account, api_key

    admin = bearer(gw.admin_token)
    await gw.create_user(["readonly"], "seal")
    await gw.create_user(["readonly"], "seal")
    users = await gw.admin.ListUsers(
        auth_pb.ListUsersRequest(page_size=1), metadata=admin, timeout=5
    )
    token = users.next_page_token
    assert users.users[0].username.encode() not in base64.urlsafe_b64decode(token)
    more = await gw.admin.ListUsers(
        auth_pb.ListUsersRequest(page_size=1, page_token=token), metadata=admin, timeout=5
    )
    assert more.users and more.users[0].username != users.users[0].username

    one, two = await account(gw, ["readonly"]), await account(gw, ["readonly"])
    for _ in range(2):
        await api_key(gw, one.username)
    keys = await gw.admin.ListApiKeys(
        auth_pb.ListApiKeysRequest(service_account=one.username, page_size=1),
        metadata=admin,
        timeout=5,
    )
    key_token = keys.next_page_token
    assert keys.api_keys[0].key_id.encode() not in base64.urlsafe_b64decode(key_token)
    rest = await gw.admin.ListApiKeys(
        auth_pb.ListApiKeysRequest(service_account=one.username, page_token=key_token),
        metadata=admin,
        timeout=5,
    )
    assert [k.key_id for k in rest.api_keys] != [k.key_id for k in keys.api_keys]

    other_admin = await gw.create_user(["admin"], "admin2")
    other = bearer((await gw.login(other_admin)).access_token)
    raw = bytearray(base64.urlsafe_b64decode(token))
    raw[-3] ^= 1
    refused = [
        gw.admin.ListUsers(
            auth_pb.ListUsersRequest(page_token=base64.urlsafe_b64encode(raw).decode()),
            metadata=admin,
            timeout=5,
        ),
        gw.admin.ListServiceAccounts(
            auth_pb.ListServiceAccountsRequest(page_token=token), metadata=admin, timeout=5
        ),
        gw.admin.ListUsers(auth_pb.ListUsersRequest(page_token=token), metadata=other, timeout=5),
        gw.admin.ListApiKeys(
            auth_pb.ListApiKeysRequest(service_account=two.username, page_token=key_token),
            metadata=admin,
            timeout=5,
        ),
        gw.admin.ListApiKeys(
            auth_pb.ListApiKeysRequest(
                service_account=one.username, page_token=keys.api_keys[0].key_id
            ),
            metadata=admin,
            timeout=5,
        ),
    ]
    for i, call in enumerate(refused):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, i
        assert "page_token" in field_violations(err.value), i
