"""PostgreSQL access: a psycopg_pool sized from the seed, and migrations applied at start-up.

PgBouncer-safe by construction: every unit of work is one transaction on a pooled
connection, no session state (SET, temp tables, advisory session locks, LISTEN) and no
server-side prepared statements (prepare_threshold None) unless configured.
"""

from __future__ import annotations

import logging
from importlib import resources

import psycopg
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

from aiwfe.config import PostgresSettings

log = logging.getLogger("aiwfe.dataplatform.db")

# Two replicas starting together serialise on this lock; each migration applies once.
_MIGRATION_LOCK = 0x61697766  # "aiwf"


def _migrations() -> list[tuple[int, str, str]]:
    files = resources.files("dataplatform") / "migrations"
    found = []
    for entry in files.iterdir():
        if entry.name.endswith(".sql"):
            version = int(entry.name.split("_", 1)[0])
            found.append((version, entry.name, entry.read_text()))
    return sorted(found)


async def migrate(conn: psycopg.AsyncConnection) -> list[str]:
    """Applies pending migrations in one transaction under an advisory lock; returns their names."""
    applied_now = []
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version integer PRIMARY KEY, name text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        cur = await conn.execute("SELECT version FROM schema_migrations")
        done = {row["version"] for row in await cur.fetchall()}
        for version, name, sql in _migrations():
            if version in done:
                continue
            await conn.execute(sql.encode())
            await conn.execute(
                "INSERT INTO schema_migrations (version, name) VALUES (%s, %s)", (version, name)
            )
            applied_now.append(name)
    if applied_now:
        log.info("applied migrations: %s", ", ".join(applied_now))
    return applied_now


class Database:
    """The pool, opened at start-up; `connection()` yields a connection in a transaction."""

    def __init__(self, dsn: str, settings: PostgresSettings) -> None:
        self.settings = settings
        self.pool = AsyncConnectionPool(
            dsn,
            min_size=settings.pool_size,
            max_size=settings.pool_size + settings.max_overflow,
            timeout=settings.pool_timeout,
            max_lifetime=settings.pool_recycle,
            kwargs={"prepare_threshold": settings.prepare_threshold, "row_factory": dict_row},
            open=False,
            name="aiwfe",
            reconnect_timeout=0,  # keep trying forever: recovery without a restart
        )

    async def open(self) -> None:
        """Opens the pool and migrates; fails fast when the database cannot be reached."""
        await self.pool.open(wait=False)
        async with self.pool.connection(timeout=self.settings.pool_timeout) as conn:
            await migrate(conn)

    async def ping(self, timeout: float = 2.0) -> bool:
        try:
            async with self.pool.connection(timeout=timeout) as conn:
                await conn.execute("SELECT 1")
        except Exception:
            return False
        return True

    def usage(self) -> dict[str, int]:
        """Pool statistics for the database_connection_pool_usage metric."""
        stats = self.pool.get_stats()
        return {
            "size": stats.get("pool_size", 0),
            "available": stats.get("pool_available", 0),
            "waiting": stats.get("requests_waiting", 0),
            "max": self.pool.max_size,
        }

    async def close(self) -> None:
        await self.pool.close()
