"""Fixtures: a database of its own per test run on the real PostgreSQL, a Redis key prefix
of its own, and the real services started in-process on free ports."""

from __future__ import annotations

import asyncio
import os
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import psycopg
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from aiwfe.app.suite import Suite, start_suite
from aiwfe.auth.v1 import auth_service_pb2 as auth_pb
from aiwfe.auth.v1 import auth_service_pb2_grpc as auth_grpc

# The server the tests create their database on; CI points the data-platform suite at
# PgBouncer by setting AIWFE_TEST_PG_DSN to it (with AIWFE_TEST_PG_ADMIN_DSN direct).
ADMIN_DSN = os.environ.get(
    "AIWFE_TEST_PG_ADMIN_DSN", "postgresql://postgres@127.0.0.1:5432/postgres"
)
ADMIN_PASSWORD = "correct-horse-battery-staple"


@pytest.fixture(scope="session")
def database_dsn() -> Iterator[str]:
    """A fresh database for this test run, dropped at the end."""
    name = f"aiwfe_test_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(ADMIN_DSN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = os.environ.get("AIWFE_TEST_PG_DSN", ADMIN_DSN)
    yield base.rsplit("/", 1)[0] + f"/{name}"
    with psycopg.connect(ADMIN_DSN, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


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
