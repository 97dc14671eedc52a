"""Fixtures for the gateway security tests: the suite with Redis under a key prefix of its
own per test (so rate-limit counters never leak between tests), helpers to create users."""

from __future__ import annotations

import copy
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest

from aiwfe.app.suite import Suite, start_suite
from aiwfe.auth.v1 import auth_service_pb2 as auth_pb
from aiwfe.auth.v1 import auth_service_pb2_grpc as auth_grpc
from aiwfe.runtime.server import RunningService, start_service
from gateway.service import GatewayService
from tests.conftest import bearer, login, redis_for

PASSWORD = "a-long-enough-passphrase-42"


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


@dataclass
class Gateway:
    """A running suite plus an admin channel/token and account helpers."""

    suite: Suite
    channel: grpc.aio.Channel
    admin_token: str

    @property
    def auth(self) -> auth_grpc.AuthServiceStub:
        return auth_grpc.AuthServiceStub(self.channel)

    @property
    def admin(self) -> auth_grpc.UserAdminServiceStub:
        return auth_grpc.UserAdminServiceStub(self.channel)

    async def create_user(self, roles: list[str], prefix: str = "u") -> str:
        name = unique(prefix)
        await self.admin.CreateUser(
            auth_pb.CreateUserRequest(username=name, password=PASSWORD, roles=roles),
            metadata=bearer(self.admin_token),
            timeout=10,
        )
        return name

    async def login(self, username: str, password: str = PASSWORD) -> auth_pb.LoginResponse:
        return await self.auth.Login(
            auth_pb.LoginRequest(username=username, password=password), timeout=10
        )

    async def second_gateway(self) -> RunningService:
        """Another replica against the same back ends, Redis and database."""
        return await start_service(
            GatewayService(self.suite.settings), host="127.0.0.1", port=0, probe_interval=60
        )


def gateway_overrides(base: dict[str, Any], redis_url: str | None) -> dict[str, Any]:
    """`base` with a key prefix of its own and, unless `redis_url` is None, Redis."""
    overrides = copy.deepcopy(base)
    overrides["redis"] = {"key_prefix": f"aiwfe-test:{uuid.uuid4().hex[:12]}:"}
    if redis_url is not None:
        overrides["redis"]["url"] = redis_url
    return overrides


async def _gateway(base: dict[str, Any], redis_url: str | None) -> AsyncIterator[Gateway]:
    suite = await start_suite(gateway_overrides(base, redis_url))
    try:
        async with grpc.aio.insecure_channel(suite.address("gateway")) as channel:
            yield Gateway(suite, channel, await login(channel))
    finally:
        await suite.stop()


@pytest.fixture
async def gw(base_overrides: dict[str, Any], redis_url: str) -> AsyncIterator[Gateway]:
    """The suite with Redis (own key prefix)."""
    async for g in _gateway(base_overrides, redis_url):
        yield g


@pytest.fixture
async def gw_private(private_overrides: dict[str, Any], redis_url: str) -> AsyncIterator[Gateway]:
    """`gw` on a database of this test's own: a listing that pages through every account
    sees its own few, not every account the session's earlier tests made (one page of two
    per call would spend the admin's 100 calls a minute)."""
    async for g in _gateway(private_overrides, redis_url):
        yield g


@pytest.fixture
async def gw_no_redis(base_overrides: dict[str, Any]) -> AsyncIterator[Gateway]:
    """The suite with no Redis at all (in-process fallbacks, revocations by polling)."""
    async for g in _gateway(base_overrides, None):
        yield g


@pytest.fixture(params=["redis", "no_redis"])
async def gw_any(request: pytest.FixtureRequest, base_overrides: dict[str, Any]):
    """The suite with Redis, then without (each test runs against both)."""
    async for g in _gateway(base_overrides, redis_for(request, request.param == "redis")):
        yield g
