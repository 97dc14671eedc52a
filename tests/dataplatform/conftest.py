"""Fixtures for the data-platform suite: dataplatform alone on a free port, and the internal
identity a caller needs. Runs unchanged directly or through PgBouncer (AIWFE_TEST_PG_DSN)."""

from __future__ import annotations

import copy
from collections.abc import AsyncIterator
from typing import Any

import grpc
import psycopg
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from aiwfe.runtime.config import load_settings
from aiwfe.runtime.identity import IDENTITY_METADATA_KEY, InternalIdentity
from aiwfe.runtime.server import RunningService, start_service
from dataplatform.service import DataPlatformService


def with_address(dsn: str, host: str, port: int) -> str:
    """`dsn` with its host and port replaced (e.g. to go through a FaultProxy)."""
    return make_conninfo(dsn, host=host, port=str(port))


def dsn_address(dsn: str) -> tuple[str, int]:
    """Host and port a DSN points at."""
    params = conninfo_to_dict(dsn)
    return str(params.get("host", "127.0.0.1")), int(params.get("port", 5432))


def overrides_with_dsn(base: dict[str, Any], dsn: str) -> dict[str, Any]:
    out = copy.deepcopy(base)
    out["database"]["postgres"]["dsn"] = dsn
    return out


@pytest.fixture
def internal_md(base_overrides: dict[str, Any]) -> tuple[tuple[str, str], ...]:
    """Metadata carrying a valid service assertion (what cognitive/taskproc send)."""
    identity = InternalIdentity(base_overrides["authentication"]["internal"]["secret_key"])
    return ((IDENTITY_METADATA_KEY, identity.assertion(None, "tests")),)


async def start_dataplatform(overrides: dict[str, Any]) -> RunningService:
    """dataplatform alone (no other service imported), on a free port."""
    settings = load_settings(env={}, overrides=overrides)
    return await start_service(DataPlatformService(settings), host="127.0.0.1", port=0)


@pytest.fixture
async def dataplatform(base_overrides: dict[str, Any]) -> AsyncIterator[RunningService]:
    """dataplatform alone, started on a free port and stopped after the test."""
    running = await start_dataplatform(base_overrides)
    yield running
    await running.stop(grace=0.5)


@pytest.fixture
async def data_channel(dataplatform: RunningService) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(dataplatform.address) as channel:
        yield channel


async def health_status(channel: grpc.aio.Channel) -> int:
    """The overall health status the server reports ("" service)."""
    reply = await health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service=""), timeout=5
    )
    return reply.status


async def attempt_rows(dataplatform: RunningService, workflow_id: str) -> list[tuple]:
    """A workflow's recorded step attempts, in step then attempt order:
    (step_name, attempt, worker_id, succeeded, error)."""
    dsn = dataplatform.service.settings.database.postgres.dsn
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute(
            "SELECT step_name, attempt, worker_id, succeeded, error FROM workflow_step_attempts"
            " WHERE workflow_id = %s ORDER BY step_name, attempt",
            (workflow_id,),
        )
        return await cur.fetchall()
