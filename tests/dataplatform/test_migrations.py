"""Schema migrations: an empty database migrates, a re-run is a no-op, and two migrators
starting together apply each migration exactly once (advisory transaction lock)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator

import psycopg
import pytest
from psycopg.rows import dict_row

from aiwfe.app.embedded import with_dbname
from dataplatform.db import _migrations, migrate


@pytest.fixture
def empty_dsn(database_dsn: str, admin_dsn: str) -> Iterator[str]:
    """A new empty database on the same server (reached like the suite's, e.g. via PgBouncer)."""
    name = f"aiwfe_test_mig_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    yield with_dbname(database_dsn, name)
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def _connect(dsn: str) -> psycopg.AsyncConnection:
    # The same connection settings as the pool: no server-side prepared statements.
    return await psycopg.AsyncConnection.connect(dsn, prepare_threshold=None, row_factory=dict_row)


async def test_empty_database_migrates_then_rerun_is_noop(empty_dsn: str) -> None:
    """Every migration file applies in order once; running again applies nothing."""
    expected = [name for _, name, _ in _migrations()]
    assert expected == sorted(expected)
    async with await _connect(empty_dsn) as conn:
        assert await migrate(conn) == expected
        assert await migrate(conn) == []
        cur = await conn.execute("SELECT version, name FROM schema_migrations ORDER BY version")
        rows = await cur.fetchall()
        cur = await conn.execute(
            "SELECT to_regclass('users')::text AS t, to_regclass('cache_entries')::text AS c"
        )
        tables = await cur.fetchone()
    assert [r["name"] for r in rows] == expected
    assert tables == {"t": "users", "c": "cache_entries"}


async def test_concurrent_migrators_apply_each_migration_once(empty_dsn: str) -> None:
    """Two replicas starting together: one applies everything, the other waits and applies none."""
    conns = [await _connect(empty_dsn) for _ in range(2)]
    try:
        results = await asyncio.gather(*(migrate(c) for c in conns))
        cur = await conns[0].execute(
            "SELECT version, count(*) AS n FROM schema_migrations GROUP BY version"
        )
        counts = await cur.fetchall()
    finally:
        for c in conns:
            await c.close()
    expected = [name for _, name, _ in _migrations()]
    assert sorted(results, key=len) == [[], expected]
    assert len(counts) == len(expected)
    assert all(r["n"] == 1 for r in counts)


async def test_lifecycle_migration_backfills_names_and_schedules(empty_dsn: str) -> None:
    """Migration 013 copies each stored workflow's spec name out of its protobuf bytes
    (empty, short, and longer than a one-byte length, multibyte), the schedule id out of a
    tick's idempotency key only where that schedule is the workflow owner's, and a finished
    workflow's last update as its finish time."""
    from aiwfe.taskproc.v1 import workflow_service_pb2 as wf_pb

    names = ["", "nightly", "é" * 100 + "x" * 56]  # 256 bytes: a two-byte length
    sid, other_sid = uuid.uuid4(), uuid.uuid4()
    async with await _connect(empty_dsn) as conn:
        async with conn.transaction():
            await conn.execute(
                "CREATE TABLE schema_migrations (version integer PRIMARY KEY,"
                " name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"
            )
            for version, name, sql in _migrations():
                if version < 13:
                    await conn.execute(sql.encode(), prepare=False)
                    await conn.execute(
                        "INSERT INTO schema_migrations (version, name) VALUES (%s, %s)",
                        (version, name),
                    )
        for s, owner in ((sid, "ann"), (other_sid, "bob")):
            await conn.execute(
                "INSERT INTO schedules (schedule_id, owner_id, owner_username, name, cron,"
                " time_zone, spec, overlap_policy, catch_up_policy)"
                " VALUES (%s, %s, %s, 'n', '* * * * *', 'UTC', '', 1, 1)",
                (s, owner, owner),
            )
        rows = [(name, "ann", f"k{i}") for i, name in enumerate(names)] + [
            ("tick", "ann", f"schedule:{sid}:2026-01-01T00:00:00+00:00"),
            ("forged", "ann", f"schedule:{other_sid}:2026-01-01T00:00:00+00:00"),
        ]
        ids = []
        for name, owner, key in rows:
            spec = wf_pb.WorkflowSpec(name=name, steps=[wf_pb.StepSpec(name="a", op="noop")])
            wid = uuid.uuid4()
            ids.append(wid)
            await conn.execute(
                "INSERT INTO workflows (workflow_id, owner_id, owner_username, idempotency_key,"
                " spec, state, deadline_at) VALUES (%s, %s, %s, %s, %s, 3, now())",
                (wid, owner, owner, key, spec.SerializeToString()),
            )
        await conn.commit()
        assert "013_lifecycle.sql" in await migrate(conn)
        cur = await conn.execute(
            "SELECT workflow_id, name, schedule_id, finished_at = updated_at AS finished"
            " FROM workflows WHERE workflow_id = ANY(%s)",
            (ids,),
        )
        rows = await cur.fetchall()
        got = {r["workflow_id"]: (r["name"], r["schedule_id"]) for r in rows}
    assert all(r["finished"] for r in rows)  # SUCCEEDED: finished at its last update
    assert [got[w] for w in ids] == [
        ("", None),
        ("nightly", None),
        (names[2], None),
        ("tick", sid),
        ("forged", None),  # bob's schedule: ann's key only looks like its tick
    ]


async def test_engine_functions_keep_generic_plans(empty_dsn: str) -> None:
    """Every PL/pgSQL function of the engine runs with cached generic plans and no
    sequential scans (migration 016): under the default its statements were planned afresh
    on every call, and a later migration replacing a function (CREATE OR REPLACE drops its
    SET clauses) must set them again."""
    async with await _connect(empty_dsn) as conn:
        await migrate(conn)
        cur = await conn.execute(
            "SELECT p.proname, p.proconfig FROM pg_proc p JOIN pg_language l"
            " ON l.oid = p.prolang WHERE l.lanname = 'plpgsql'"
            " AND p.pronamespace = 'public'::regnamespace ORDER BY p.proname"
        )
        rows = await cur.fetchall()
    assert [r["proname"] for r in rows] == [
        "wf_append_events",
        "wf_complete_steps",
        "wf_create_workflow",
    ]
    settings = ["plan_cache_mode=force_generic_plan", "enable_seqscan=off"]
    assert all(sorted(r["proconfig"]) == sorted(settings) for r in rows)
