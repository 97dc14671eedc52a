"""PostgreSQL access: a psycopg_pool sized from the seed, and migrations applied at start-up.

PgBouncer-safe by construction: every unit of work is one transaction on a pooled
connection, no session state (SET, temp tables, advisory session locks, LISTEN) and no
server-side prepared statements (prepare_threshold None) unless configured.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from importlib import resources

import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import DictRow, dict_row
from psycopg_pool import AsyncConnectionPool

from aiwfe.config import PostgresSettings
from aiwfe.metrics import database_connection_pool_usage

log = logging.getLogger("aiwfe.dataplatform.db")

# Every connection the pool hands out returns rows as dicts (row_factory=dict_row below).
DictConnection = psycopg.AsyncConnection[DictRow]

# Two replicas starting together serialise on this lock; each migration applies once.
_MIGRATION_LOCK = 0x61697766  # "aiwf"
# Without it a connect to a black-holed address waits for the kernel's TCP timeout (minutes).
_CONNECT_TIMEOUT_SECONDS = 5


def _migrations() -> list[tuple[int, str, str]]:
    files = resources.files("dataplatform") / "migrations"
    found = []
    for entry in files.iterdir():
        if entry.name.endswith(".sql"):
            version = int(entry.name.split("_", 1)[0])
            found.append((version, entry.name, entry.read_text()))
    return sorted(found)


async def migrate(conn: DictConnection) -> list[str]:
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
            # Never prepared: a migration is many statements, and runs once.
            await conn.execute(sql.encode(), prepare=False)
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
        kwargs: dict = {"prepare_threshold": settings.prepare_threshold, "row_factory": dict_row}
        if "connect_timeout" not in conninfo_to_dict(dsn):
            kwargs["connect_timeout"] = _CONNECT_TIMEOUT_SECONDS
        # The row type comes from kwargs' row_factory, which mypy cannot see: say it here.
        self.pool: AsyncConnectionPool[DictConnection] = AsyncConnectionPool(
            dsn,
            min_size=settings.pool_size,
            max_size=settings.pool_size + settings.max_overflow,
            timeout=settings.pool_timeout,
            max_lifetime=settings.pool_recycle,
            kwargs=kwargs,
            open=False,
            name="aiwfe",
            # While the database is down, give up background reconnects quickly: the next
            # request (or health probe) grows the pool again, so it recovers without a restart
            # as soon as the database answers instead of after a long back-off.
            reconnect_timeout=0,
        )
        self._checking: asyncio.Task[None] | None = None
        self._pinging: asyncio.Task[None] | None = None
        # The last probe's verdict; while False, DatabaseGuard answers UNAVAILABLE at once.
        self.reachable = True

    async def open(self) -> None:
        """Opens the pool and migrates; fails fast when the database cannot be reached."""
        await self.pool.open(wait=False)
        async with self.pool.connection(timeout=self.settings.pool_timeout) as conn:
            await migrate(conn)

    @contextlib.asynccontextmanager
    async def autocommit(self) -> AsyncIterator[DictConnection]:
        """A pooled connection in autocommit, for one statement: a read, or a write whose
        CTEs do all its work (a statement is atomic by itself).

        One round trip instead of three (BEGIN, query, COMMIT): a point read's latency is
        mostly round trips. Use `pool.connection()` (a transaction) for anything else.
        """
        async with self.pool.connection() as conn:
            await conn.set_autocommit(True)
            try:
                yield conn
            finally:
                try:
                    await conn.set_autocommit(False)
                except Exception:
                    # Never hand an autocommit connection back to code expecting a transaction.
                    await conn.close()

    async def ping(self, timeout: float = 2.0) -> bool:
        """True when a pooled connection answers within `timeout` (a hung socket counts as down).

        The query runs in its own task that is abandoned, not awaited, on timeout: psycopg's
        clean-up after a cancellation sends a cancel request to the server, which on a dead
        network can itself take many seconds. At most one probe query is in flight. On
        failure the idle connections are checked too, so the dead ones a network cut left
        behind go at once rather than one per probe after the database returns.
        """
        if self._pinging is not None and not self._pinging.done():
            return False  # the previous probe is still stuck
        self._pinging = task = asyncio.create_task(self._select_one(timeout))
        task.add_done_callback(_ignore_result)
        done, _ = await asyncio.wait({task}, timeout=timeout)
        if done and not task.cancelled() and task.exception() is None:
            self.reachable = True
            return True
        task.cancel()
        self.check_soon()
        self.reachable = False
        return False

    async def _select_one(self, timeout: float) -> None:
        async with self.pool.connection(timeout=timeout) as conn:
            await conn.execute("SELECT 1")

    def check_soon(self) -> None:
        """Starts one background check of the idle connections unless one is running.

        Never cancelled: psycopg_pool's check() takes every idle connection out of the pool
        first, so cancelling it half-way would leak them.
        """
        if self._checking is None or self._checking.done():
            self._checking = asyncio.create_task(self.pool.check())
            self._checking.add_done_callback(_ignore_result)

    async def maintain(self, interval: float) -> None:
        """Runs forever: every `interval` s checks idle connections and exports pool usage."""
        while True:
            await asyncio.sleep(interval)
            self.check_soon()
            self.export_usage()

    def usage(self) -> dict[str, int]:
        """Pool statistics for the database_connection_pool_usage metric."""
        stats = self.pool.get_stats()
        size = stats.get("pool_size", 0)
        available = stats.get("pool_available", 0)
        return {
            "size": size,
            "in_use": max(0, size - available),
            "available": available,
            "waiting": stats.get("requests_waiting", 0),
            "max": self.pool.max_size,
        }

    def export_usage(self) -> dict[str, int]:
        """Sets database_connection_pool_usage{state} from the pool's statistics."""
        usage = self.usage()
        for state, value in usage.items():
            database_connection_pool_usage.labels(state=state).set(value)
        return usage

    async def close(self) -> None:
        for task in (self._checking, self._pinging):
            if task is not None:
                task.cancel()
        await self.pool.close()


def _ignore_result(task: asyncio.Task[None]) -> None:
    """A failed background probe or check is not an error: the next probe reports the state."""
    if not task.cancelled() and task.exception() is not None:
        log.debug("database probe failed: %s", task.exception())
