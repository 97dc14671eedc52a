"""UserAdminService: password policy, known roles only, paging, no hashes returned."""

from __future__ import annotations

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


async def test_list_users_pages_without_hashes(gw) -> None:
    """ListUsers pages through every account and never exposes a password hash."""
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
