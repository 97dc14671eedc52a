"""Lifecycle figures (issue #20), standalone: `python -m benchmarks.lifecycle [--admin-dsn
DSN]` creates a scratch database, fills it with 20,000 finished workflows of 20 owners (half
of them one user's; 3 steps, 3 attempts and 8 events each), then times (a) that user's
ListWorkflows statement per filter (EXPLAIN ANALYZE, median of 20) and (b) the retention
purge in batches of 100 (the repository's statement), then (c) what migration 013's indexes
cost the submit path (create plus three state changes, slices with and without them
alternated), and drops the database."""

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
from aiwfe.taskproc.v1 import workflow_service_pb2 as wf_pb
from dataplatform.db import Database, DictConnection, migrate
from dataplatform.workflows.repository import ListFilter, NewEvent, WorkflowRepository
from dataplatform.workflows.states import WORKFLOW_EVENT, StepState, WorkflowState
from dataplatform.workflows.watches import Wakeups

BATCH = 100
SLICE = 300  # workflows per slice of the index-cost comparison
_NEW_INDEXES = {  # as migration 013 creates them
    "workflows_owner_state_created": "(owner_id, state, created_at DESC, workflow_id DESC)",
    "workflows_owner_name_created": "(owner_id, name, created_at DESC, workflow_id DESC)",
    "workflows_schedule_created": "(schedule_id, created_at DESC, workflow_id DESC)"
    " WHERE schedule_id IS NOT NULL",
    "workflows_finished": "(finished_at) WHERE finished_at IS NOT NULL",
}
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


async def _index_cost(dsn: str) -> None:
    db = Database(dsn, Settings().database.postgres)
    await db.open()
    try:
        repo = WorkflowRepository(db, Wakeups())
        step = wf_pb.StepSpec(name="a", op="noop", timeout_seconds=60)
        step.retry_policy.max_attempts = 3
        request = store_pb.CreateWorkflowRequest(
            owner=store_pb.WorkflowOwner(user_id="bench", username="bench"),
            spec=wf_pb.WorkflowSpec(name="bench", timeout_seconds=60, steps=[step]),
        )

        async def one_slice() -> float:
            start = time.perf_counter()
            for _ in range(SLICE):
                wid = uuid.uuid4()
                await repo.create(request, wid)

                async def moves(conn: DictConnection, wid: uuid.UUID = wid) -> None:
                    running = NewEvent(wid, "", WORKFLOW_EVENT, "running")
                    await repo.append_events(conn, [running], {wid: (WorkflowState.RUNNING, "")})
                    await repo.append_events(conn, [NewEvent(wid, "a", StepState.RUNNING, "a")])
                    done = NewEvent(wid, "", WORKFLOW_EVENT, "done")
                    await repo.append_events(conn, [done], {wid: (WorkflowState.SUCCEEDED, "")})

                await repo.tx(moves)
            return (time.perf_counter() - start) / SLICE * 1000

        await one_slice()  # warm-up
        took: dict[str, list[float]] = {"with": [], "without": []}
        for _ in range(3):
            for variant in took:
                async with db.pool.connection() as conn:
                    for name, definition in _NEW_INDEXES.items():
                        await conn.execute(f"DROP INDEX IF EXISTS {name}")
                        if variant == "with":
                            await conn.execute(f"CREATE INDEX {name} ON workflows {definition}")
                took[variant].append(await one_slice())
        for variant, times in took.items():
            print(
                f"submit path {variant:7s} migration 013's indexes: "
                + ", ".join(f"{t:.2f}" for t in times)
                + f" ms per workflow (median {statistics.median(times):.2f})"
            )
        ratio = statistics.median(took["with"]) / statistics.median(took["without"])
        print(f"with/without: {ratio:.3f}")
    finally:
        await db.close()


async def main(admin: str) -> None:
    name = f"aiwfe_bench_lifecycle_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        await _listing(with_dbname(admin, name))
        await _purge(with_dbname(admin, name))
        await _index_cost(with_dbname(admin, name))
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--admin-dsn", default="postgresql://postgres@127.0.0.1:5432/postgres")
    asyncio.run(main(parser.parse_args().admin_dsn))
