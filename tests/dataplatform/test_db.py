"""The PostgreSQL pool: autocommit point reads never leak autocommit into transactions,
pool usage is exported as database_connection_pool_usage, and a failed start closes it."""

from __future__ import annotations

import psycopg
import psycopg_pool
import pytest

from aiwfe.app.embedded import free_port
from aiwfe.runtime.config import PostgresSettings, load_settings
from aiwfe.runtime.metrics import REGISTRY
from aiwfe.runtime.server import start_service
from dataplatform.db import Database
from dataplatform.service import DataPlatformService


@pytest.fixture
async def db(database_dsn: str):
    database = Database(database_dsn, PostgresSettings(pool_size=1, max_overflow=1))
    await database.open()
    yield database
    await database.close()


async def test_autocommit_restores_transactions_even_after_errors(db: Database) -> None:
    """After autocommit() — clean or failed — the same pooled connection is transactional again."""
    async with db.autocommit() as conn:
        assert conn.autocommit
        await conn.execute("SELECT 1")
    with pytest.raises(psycopg.errors.UndefinedTable):
        async with db.autocommit() as conn:
            await conn.execute("SELECT * FROM no_such_table")
    for _ in range(2):  # whichever connection the pool hands out
        async with db.pool.connection() as conn:
            assert not conn.autocommit
            await conn.execute("SELECT 1")
            assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS


async def test_pool_usage_is_exported(db: Database) -> None:
    """export_usage() publishes size, in-use, available, waiting and max per state label."""
    async with db.pool.connection():
        usage = db.export_usage()
        assert usage["in_use"] >= 1
    assert usage["max"] == 2
    for state, value in usage.items():
        sample = REGISTRY.get_sample_value("database_connection_pool_usage", {"state": state})
        assert sample == value
    assert await db.ping()


async def test_a_failed_start_closes_what_it_opened(base_overrides) -> None:
    """When dataplatform cannot start (no database answers), start_service stops it: its
    pool is closed, so nothing keeps reconnecting and the process can exit."""
    settings = load_settings(
        env={},
        overrides={
            **base_overrides,
            "database": {
                "postgres": {
                    "dsn": f"postgresql://postgres@127.0.0.1:{free_port()}/none",
                    "pool_timeout": 1,
                }
            },
        },
    )
    service = DataPlatformService(settings)
    with pytest.raises(psycopg_pool.PoolTimeout):
        await start_service(service, "127.0.0.1", 0)
    assert service.db.pool.closed
