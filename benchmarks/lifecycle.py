"""Lifecycle figures (issue #20), standalone: `python -m benchmarks.lifecycle [--admin-dsn
DSN]` creates a scratch database, fills it with 20,000 finished workflows of 20 owners (half
of them one user's; 3 steps, 3 attempts and 8 events each), then times (a) that user's
ListWorkflows statement per filter (EXPLAIN ANALYZE, median of 20) and (b) the retention
purge in batches of 100 (the repository's statement), and drops the database."""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import uuid

import psycopg
from psycopg.rows import dict_row

from aiwfe.app.embedded import with_dbname
from aiwfe.data.v1 import workflow_store_service_pb2 as store_pb
from aiwfe.runtime.config import Settings
from dataplatform.db import Database, migrate
from dataplatform.workflows.repository import ListFilter, WorkflowRepository
from dataplatform.workflows.watches import Wakeups

BATCH = 100
_FILL = [
    "INSERT INTO workflows (workflow_id, owner_id, owner_username, spec, state, deadline_at,"
    " name, schedule_id, created_at, finished_at)"
    " SELECT gen_random_uuid(), CASE WHEN i %% 2 = 0 THEN 'o0' ELSE 'o' || (1 + i %% 19) END,"
    "   'u', '', 3 + i %% 4, now(), 'name-' || (i %% 10),"
    "   CASE WHEN i %% 10 = 0 THEN %(sid)s::uuid END, now() - i * interval '1 second',"
    "   now() - interval '40 days'"
    " FROM generate_series(1, 20000) AS i",
    "INSERT INTO workflow_steps (workflow_id, name, position, op, remaining_deps, state,"
    " max_attempts, initial_backoff, backoff_multiplier, max_backoff, jitter,"
    " timeout_seconds)"
    " SELECT workflow_id, 's' || k, k, 'noop', 0, 3, 3, 1, 2, 100, 0, 60"
    " FROM workflows, generate_series(1, 3) k",
    "INSERT INTO workflow_step_attempts (workflow_id, step_name, attempt, worker_id,"
    " succeeded) SELECT workflow_id, 's' || k, 1, 'w', true"
    " FROM workflows, generate_series(1, 3) k",
    "INSERT INTO workflow_events (workflow_id, sequence, workflow_state)"
    " SELECT workflow_id, k, 3 FROM workflows, generate_series(1, 8) k",
]


async def _listing(dsn: str) -> None:
    async with await psycopg.AsyncConnection.connect(
        dsn, row_factory=dict_row, autocommit=True
    ) as conn:
        await migrate(conn)
        sid = uuid.uuid4()
        for statement in _FILL:
            await conn.execute(statement, {"sid": sid})
        await conn.execute("VACUUM ANALYZE")
        cur = await conn.execute(
            "SELECT now() - interval '3 hours' AS a, now() - interval '1 hour' AS b"
        )
        window = await cur.fetchone()
        assert window is not None
        cases = {
            "none": ListFilter(),
            "state": ListFilter(state=3),
            "name": ListFilter(name="name-2"),
            "schedule": ListFilter(schedule_id=sid),
            "range": ListFilter(create_after=window["a"], create_before=window["b"]),
            "name+state": ListFilter(state=4, name="name-2"),
        }
        scope = store_pb.WorkflowScope(owner_id="o0")
        for label, filters in cases.items():
            query, args = WorkflowRepository.page_query(scope, filters, None, 50)
            times = []
            for _ in range(20):
                cur = await conn.execute("EXPLAIN (ANALYZE, FORMAT JSON) " + query, args)
                row = await cur.fetchone()
                assert row is not None
                plan = row["QUERY PLAN"][0]
                times.append(plan["Execution Time"])
            node = plan["Plan"]["Plans"][0]
            print(
                f"list {label:10s}: {node['Node Type']} {node.get('Index Name', '')}"
                f" median {statistics.median(times):.3f} ms"
            )


async def _purge(dsn: str) -> None:
    db = Database(dsn, Settings().database.postgres)
    await db.open()
    try:
        repo = WorkflowRepository(db, Wakeups())
        times, total = [], 0
        while True:
            start = time.perf_counter()
            n = await repo.purge_finished(30 * 86400, BATCH)
            times.append((time.perf_counter() - start) * 1000)
            total += n
            if n < BATCH:
                break
        print(
            f"purge: {total} workflows in {len(times)} batches of {BATCH}:"
            f" median {statistics.median(times):.1f} ms, max {max(times):.1f} ms per batch,"
            f" {sum(times) / 1000:.2f} s in all"
        )
    finally:
        await db.close()


async def main(admin: str) -> None:
    name = f"aiwfe_bench_lifecycle_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        await _listing(with_dbname(admin, name))
        await _purge(with_dbname(admin, name))
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--admin-dsn", default="postgresql://postgres@127.0.0.1:5432/postgres")
    asyncio.run(main(parser.parse_args().admin_dsn))
