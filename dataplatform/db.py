"""PostgreSQL access: a psycopg_pool sized from the seed, and migrations applied at start-up.

PgBouncer-safe by construction: every unit of work is one transaction on a pooled
connection, no session state (SET, temp tables, advisory session locks, LISTEN) and no
server-side prepared statements (prepare_threshold None) unless configured. The socket
settings below (keepalives, tcp_user_timeout) are the client's own, never sent to the
server or PgBouncer.

Fail fast mid-call: the database-backed RPCs run through `Database.run`. A call in flight
longer than `stall_probe_after` makes a probe ask PostgreSQL for SELECT 1 on a connection of
its own; when it gets no answer within `stall_probe_timeout` (or the health probe finds the
database down) every call in flight ends at once with DatabaseLost (UNAVAILABLE), its work
abandoned rather than awaited.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable
from importlib import resources
from typing import Any, TypeVar

import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import DictRow, dict_row
from psycopg_pool import AsyncConnectionPool

from aiwfe.runtime.config import PostgresSettings
from aiwfe.runtime.metrics import database_connection_pool_usage

log = logging.getLogger("aiwfe.dataplatform.db")

# Every connection the pool hands out returns rows as dicts (row_factory=dict_row below).
DictConnection = psycopg.AsyncConnection[DictRow]

# Two replicas starting together serialise on this lock; each migration applies once.
_MIGRATION_LOCK = 0x61697766  # "aiwf"
# Without it a connect to a black-holed address waits for the kernel's TCP timeout (minutes).
_CONNECT_TIMEOUT_SECONDS = 5
# Client-side socket options (libpq parameters, not startup parameters: PgBouncer never
# sees them): a link that died silently fails its connection within seconds instead of the
# kernel's ~15 minutes of retransmissions, so work abandoned on it ends and frees it.
_SOCKET_OPTIONS = {
    "keepalives": 1,
    "keepalives_idle": 5,
    "keepalives_interval": 2,
    "keepalives_count": 3,
    "tcp_user_timeout": 10_000,  # ms of unacknowledged data
}
# How often the stall watch looks at the oldest call in flight.
_STALL_TICK = 0.05
# Probes stuck on a dead link are abandoned; past this many, the link counts as down.
_MAX_STUCK_PROBES = 3
# A probe waits in slices of this length (see `_answers`).
_PROBE_SLICE = 0.05
_LOST = "the database stopped answering"
T = TypeVar("T")


class DatabaseLost(psycopg.OperationalError):
    """PostgreSQL stopped answering while this call was in flight (its work abandoned)."""


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
        given = conninfo_to_dict(dsn)
        if "connect_timeout" not in given:
            kwargs["connect_timeout"] = _CONNECT_TIMEOUT_SECONDS
        kwargs.update({k: v for k, v in _SOCKET_OPTIONS.items() if k not in given})
        self._dsn = dsn
        self._probe_kwargs = {**kwargs, "autocommit": True, "prepare_threshold": None}
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
        # Calls in flight (their work → when it started, oldest first) and the signal that
        # ends them all: resolved when a probe finds the database down.
        self._inflight: dict[asyncio.Future[Any], float] = {}
        self._lost: asyncio.Future[None] | None = None
        self._watching: asyncio.Task[None] | None = None
        self._probe_conn: psycopg.AsyncConnection[Any] | None = None
        self._probing: asyncio.Task[None] | None = None
        self._stuck: set[asyncio.Task[None]] = set()
        # When a call last succeeded: life that a slow probe cannot deny.
        self._answered_at = 0.0

    async def open(self) -> None:
        """Opens the pool and migrates; fails fast when the database cannot be reached."""
        await self.pool.open(wait=False)
        async with self.pool.connection(timeout=self.settings.pool_timeout) as conn:
            await migrate(conn)
        self._watching = asyncio.create_task(self._watch_stalls())

    async def run(self, work: Awaitable[T]) -> T:
        """Runs `work` (one database-backed call); raises DatabaseLost as soon as a probe
        finds the database down while it is in flight.

        The work runs in a task of its own that is cancelled but not awaited when the
        database is lost: psycopg's clean-up of a query on a dead link (a cancel request,
        then the reply) can itself wait many seconds. Its connection is discarded by the
        pool once that ends.
        """
        if self._lost is None or (self._lost.done() and self.reachable):
            self._lost = asyncio.get_running_loop().create_future()
        lost = self._lost
        task = asyncio.ensure_future(work)
        self._inflight[task] = time.monotonic()
        try:
            await asyncio.wait((task, lost), return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            task.cancel()  # the caller went away: so does its query
            raise
        finally:
            del self._inflight[task]
        if not task.done():
            task.cancel()
            task.add_done_callback(_ignore_result)
            raise DatabaseLost(_LOST)
        result = task.result()
        self._answered_at = time.monotonic()
        return result

    def _set_reachable(self, ok: bool) -> None:
        """Records a probe's verdict; a database found down ends every call in flight."""
        self.reachable = ok
        if not ok and self._lost is not None and not self._lost.done():
            self._lost.set_result(None)
            if self._inflight:
                log.warning("database lost: ending %d calls in flight", len(self._inflight))

    async def _watch_stalls(self) -> None:
        """Runs forever: probes the database whenever a call has been in flight longer than
        `stall_probe_after`, at most once per that interval."""
        after = self.settings.stall_probe_after
        while True:
            await asyncio.sleep(_STALL_TICK)
            if not self.reachable or not self._inflight:
                continue
            oldest = next(iter(self._inflight.values()))  # dicts keep insertion order
            if time.monotonic() - oldest < after:
                continue
            if await self._answers(self.settings.stall_probe_timeout):
                await asyncio.sleep(after)  # just slow: look again later, not every tick
            else:
                self._set_reachable(False)
                self.check_soon()

    async def _answers(self, timeout: float) -> bool:
        """SELECT 1 within `timeout` on the probe's own connection: a pool busy with slow
        queries is not an outage. Time the event loop spent busy elsewhere does not count
        against `timeout`. A probe that times out is abandoned with its connection, and
        counts as an answer when another call succeeded meanwhile (a loaded database, not a
        dead link)."""
        started = time.monotonic()
        if len(self._stuck) >= _MAX_STUCK_PROBES:  # no more connections: judge by the calls
            await asyncio.sleep(timeout)
            return self._answered_at > started
        self._probing = task = asyncio.create_task(self._select_one_direct())
        waited = 0.0
        while not task.done() and waited < timeout:
            sliced = time.monotonic()
            await asyncio.wait({task}, timeout=_PROBE_SLICE)
            # A slice the event loop overran (busy elsewhere, not waiting for the database)
            # counts as two at most: a stalled loop is not a database that stopped answering.
            waited += min(time.monotonic() - sliced, 2 * _PROBE_SLICE)
        if task.done() and not task.cancelled() and task.exception() is None:
            return True
        if not task.done():
            self._probe_conn = None  # left to the stuck task; the next probe connects anew
            self._stuck.add(task)
            task.add_done_callback(self._stuck.discard)
            task.add_done_callback(_ignore_result)
        else:
            _ignore_result(task)
        if self._answered_at > started:
            log.info("database probe got no answer in %.1f s, but calls did", timeout)
            return True
        return False

    async def _select_one_direct(self) -> None:
        conn = self._probe_conn
        if conn is None or conn.closed:
            conn = self._probe_conn = await psycopg.AsyncConnection.connect(
                self._dsn, **self._probe_kwargs
            )
        try:
            await conn.execute("SELECT 1")
        except BaseException:
            if self._probe_conn is conn:
                self._probe_conn = None
            with contextlib.suppress(Exception):
                await conn.close()
            raise
        if self._probe_conn is not conn:  # abandoned while stuck: a newer probe took over
            await conn.close()

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
            self._set_reachable(True)
            return True
        task.cancel()
        self.check_soon()
        self._set_reachable(False)
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
        for task in (self._checking, self._pinging, self._watching, self._probing, *self._stuck):
            if task is not None:
                task.cancel()
        if self._probe_conn is not None:
            with contextlib.suppress(Exception):
                await self._probe_conn.close()
        await self.pool.close()


def _ignore_result(task: asyncio.Future[Any]) -> None:
    """A failed background probe or check is not an error: the next probe reports the state."""
    if not task.cancelled() and task.exception() is not None:
        log.debug("database probe failed: %s", task.exception())
