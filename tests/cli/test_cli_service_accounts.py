"""`aiwfe service-account` and `aiwfe api-key` as an admin runs them: the key is printed
once (alone on stdout, so `KEY=$(aiwfe api-key create ...)` works), listings never show
it and show its last use, and a revoked key stops working."""

from __future__ import annotations

import json
import uuid

import grpc
import pytest

from aiwfe.app.cli import parse_ttl
from aiwfe.app.suite import Suite
from aiwfe.auth.v1 import auth_service_pb2 as auth_pb
from aiwfe.auth.v1 import auth_service_pb2_grpc as auth_grpc
from tests.cli.test_cli import aiwfe, assert_one_error_line, cli_env, login_as
from tests.conftest import ADMIN_PASSWORD, bearer

__all__ = ["cli_env"]  # the fixture, shared with test_cli.py


async def whoami_code(gateway: str, key: str) -> grpc.StatusCode:
    async with grpc.aio.insecure_channel(gateway) as channel:
        try:
            await auth_grpc.AuthServiceStub(channel).WhoAmI(
                auth_pb.WhoAmIRequest(), metadata=bearer(key), timeout=10
            )
        except grpc.aio.AioRpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


async def test_service_account_and_api_key_commands_end_to_end(suite: Suite, cli_env) -> None:
    """service-account create/ls and api-key create/ls/revoke: the key is printed once and
    works, listings carry no secret and show its last use, revoking it refuses it."""
    gw = suite.address("gateway")
    await login_as(cli_env, gw, "admin", ADMIN_PASSWORD)
    name = f"ci-bot-{uuid.uuid4().hex[:8]}"
    made = await aiwfe(
        cli_env, "service-account", "create", name, "--role", "worker", "--json", "--gateway", gw
    )
    assert made.code == 0, made
    account = json.loads(made.out)["service_account"]
    assert account["roles"] == ["worker"] and account["service_account"] is True
    listed = await aiwfe(cli_env, "service-account", "ls", "--gateway", gw)
    assert name in listed.out and "worker" in listed.out

    created = await aiwfe(
        cli_env, "api-key", "create", name, "--name", "nightly", "--ttl", "30d", "--gateway", gw
    )
    assert created.code == 0, created
    key = created.out.strip()
    assert key.startswith("aiwfe_sk_") and "\n" not in key
    assert "shown only now" in created.err and key not in created.err
    key_id = key.split("_")[2]
    assert await whoami_code(gw, key) == grpc.StatusCode.OK

    keys = await aiwfe(cli_env, "api-key", "ls", name, "--json", "--gateway", gw)
    assert keys.code == 0, keys
    assert key[-43:] not in keys.out
    (entry,) = json.loads(keys.out)["api_keys"]
    assert entry["key_id"] == key_id and entry["name"] == "nightly"
    assert "last_used_time" in entry and "expire_time" in entry
    human = await aiwfe(cli_env, "api-key", "ls", name, "--gateway", gw)
    assert key_id in human.out and "active" in human.out and "last used -" not in human.out

    revoked = await aiwfe(cli_env, "api-key", "revoke", key_id, "--gateway", gw)
    assert revoked.code == 0 and "revoked" in revoked.out, revoked
    assert await whoami_code(gw, key) == grpc.StatusCode.UNAUTHENTICATED
    missing = await aiwfe(cli_env, "api-key", "revoke", "0" * 16, "--gateway", gw)
    assert_one_error_line(missing, "NOT_FOUND")


@pytest.mark.parametrize(
    ("text", "seconds"), [("30d", 30 * 86400), ("12h", 43200), ("90m", 5400), ("3600", 3600)]
)
def test_ttl_takes_days_hours_minutes_or_seconds(text: str, seconds: float) -> None:
    """--ttl reads 30d, 12h, 90m and bare seconds."""
    assert parse_ttl(text) == seconds


async def test_bad_ttl_is_a_usage_error(cli_env) -> None:
    """A --ttl that is no lifetime exits 2 before anything is sent."""
    result = await aiwfe(cli_env, "api-key", "create", "x", "--ttl", "soon", "--gateway", "h:1")
    assert result.code == 2 and "--ttl" in result.err


@pytest.mark.parametrize(
    ("group", "commands"),
    [
        ("service-account", ["create", "ls", "set-roles", "disable"]),
        ("api-key", ["create", "ls", "revoke"]),
    ],
)
async def test_the_groups_print_their_commands(cli_env, group: str, commands: list[str]) -> None:
    """`aiwfe service-account` and `aiwfe api-key` alone list their commands (exit 0)."""
    result = await aiwfe(cli_env, group)
    assert result.code == 0 and result.out.startswith(f"usage: aiwfe {group}"), result
    for name in commands:
        assert name in result.out
