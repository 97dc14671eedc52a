"""Crashes: kill -9 of dataplatform while workflows are being submitted and run, and of a
taskproc worker with several workflows in flight. Every accepted workflow reaches a terminal
state, none is duplicated, no step's result is recorded twice."""

from __future__ import annotations

import asyncio
import copy
import os
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import psycopg
import pytest

from aiwfe.app.embedded import free_port
from aiwfe.app.suite import Suite, start_suite
from aiwfe.taskproc.v1 import workflow_service_pb2 as wf_pb
from tests.conftest import ADMIN_PASSWORD, login
from tests.taskproc.helpers import deadline, finish, get, new_user, spec, step_status, submit
from tests.taskproc.test_durability import _exit_code, external_taskproc  # noqa: F401

pytestmark = pytest.mark.slow

RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}


async def step_attempts(dsn: str, workflow_ids: list[str]) -> list[tuple[str, str, int, int]]:
    """(workflow, step, succeeded attempts, all attempts) straight from PostgreSQL."""
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute(
            "SELECT workflow_id::text, step_name, count(*) FILTER (WHERE succeeded), count(*)"
            " FROM workflow_step_attempts WHERE workflow_id::text = ANY(%s)"
            " GROUP BY workflow_id, step_name",
            (workflow_ids,),
        )
        return await cur.fetchall()


class DataPlatformProcess:
    """`python -m dataplatform` on one fixed port, configured only through the environment;
    kill -9 and start again at will."""

    def __init__(self, overrides: dict[str, Any], home: Path) -> None:
        self.port = free_port()
        self._home = home
        self._starts = 0
        auth = overrides["authentication"]
        self._env = {
            **os.environ,
            "AIWFE_INTERNAL_SECRET_KEY": auth["internal"]["secret_key"],
            "JWT_SECRET_KEY": auth["jwt"]["secret_key"],
            "AIWFE_ADMIN_PASSWORD": ADMIN_PASSWORD,
            "AIWFE_DATABASE__POSTGRES__DSN": overrides["database"]["postgres"]["dsn"],
            "AIWFE_DATABASE__POSTGRES__POOL_SIZE": "2",
            "AIWFE_REDIS__KEY_PREFIX": overrides["redis"]["key_prefix"],
            "AIWFE_SERVICES__DATAPLATFORM__PORT": str(self.port),
            "AIWFE_SERVICES__DATAPLATFORM__METRICS_PORT": "null",
            "AIWFE_LOGGING__JSON_FORMAT": "false",
        }
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        self._starts += 1
        # A home of its own per start: the embedded vector engine's directory lock of a
        # killed process is not what this test is about.
        env = {**self._env, "AIWFE_HOME": str(self._home / f"start{self._starts}")}
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "dataplatform", env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), 60)
        assert line.decode().startswith("dataplatform: "), line

    async def kill(self) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        await asyncio.wait_for(self.proc.wait(), 10)

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            await self.kill()


@pytest.fixture
async def external_dataplatform(
    base_overrides, tmp_path
) -> AsyncIterator[tuple[Suite, DataPlatformProcess]]:
    """dataplatform as a process; cognitive, taskproc and gateway in process pointed at it,
    with 2 s breakers (a restart should not leave callers refused for the seed's 60 s)."""
    overrides = copy.deepcopy(base_overrides)
    dataplatform = DataPlatformProcess(overrides, tmp_path)
    overrides["services"] = {"dataplatform": {"port": dataplatform.port}}
    overrides["circuit_breaker"] = {"timeout": 2}
    overrides["authentication"]["rate_limiting"] = {"api_requests": 100_000}
    overrides["taskproc"] = {"poll_interval": 0.2, "lease_seconds": 3}
    await dataplatform.start()
    suite = None
    try:
        suite = await start_suite(overrides, only=("cognitive", "taskproc", "gateway"))
        yield suite, dataplatform
    finally:
        if suite is not None:
            await suite.stop()
        await dataplatform.stop()


async def test_kill_9_dataplatform_mid_write_loses_and_duplicates_nothing(
    external_dataplatform, base_overrides
) -> None:
    """30 workflows submitted with idempotency keys while dataplatform is killed -9 twice and
    restarted on its port: a key resubmitted after a failure gets the id it was given (one
    workflow per key), every workflow succeeds, every step succeeds exactly once."""
    suite, dataplatform = external_dataplatform
    n_workflows, kills = 30, 2
    accepted: dict[str, set[str]] = {}
    failures: list[grpc.StatusCode] = []
    workflow = spec(
        {"name": "s0", "op": "noop", "inputs": {"sleep_ms": 50}},
        {"name": "s1", "op": "noop", "depends_on": ["s0"], "inputs": {"sleep_ms": 50}},
        {"name": "s2", "op": "noop", "depends_on": ["s1"]},
    )
    async with grpc.aio.insecure_channel(suite.address("gateway")) as ch:
        token = await login(ch)
        keys = [f"crash-{uuid.uuid4()}" for _ in range(n_workflows)]
        gate = asyncio.Semaphore(4)

        async def submit_until_accepted(key: str) -> None:
            until = deadline(90)
            async with gate:
                while True:
                    try:
                        wf = await submit(ch, token, workflow, key=key)
                        accepted.setdefault(key, set()).add(wf.workflow_id)
                        return
                    except grpc.aio.AioRpcError as exc:
                        assert exc.code() in RETRYABLE, exc  # never INTERNAL
                        failures.append(exc.code())
                    assert time.monotonic() < until, f"{key} never accepted"
                    await asyncio.sleep(0.2)

        async def killer() -> None:
            for k in range(kills):
                until = deadline(60)
                while len(accepted) < (k + 1) * n_workflows // (kills + 1):
                    assert time.monotonic() < until, "submissions stalled"
                    await asyncio.sleep(0.02)
                await dataplatform.kill()
                await asyncio.sleep(0.5)  # callers meet the dead port meanwhile
                await dataplatform.start()

        await asyncio.gather(killer(), *(submit_until_accepted(k) for k in keys))
        assert set(accepted) == set(keys)
        assert all(len(ids) == 1 for ids in accepted.values()), accepted
        ids = {key: next(iter(v)) for key, v in accepted.items()}
        # The same keys again (as a client retrying after a lost answer would): same ids.
        for key in keys[:5]:
            assert (await submit(ch, token, workflow, key=key)).workflow_id == ids[key]
        until = deadline(90)
        reruns = 0
        for wid in ids.values():
            while True:
                try:
                    done = await finish(ch, token, wid, timeout=30)
                    break
                except grpc.aio.AioRpcError as exc:
                    assert exc.code() in RETRYABLE, exc
                    assert time.monotonic() < until, f"workflow {wid} not finished"
                    await asyncio.sleep(0.2)
            assert done.state == wf_pb.WORKFLOW_STATE_SUCCEEDED, done.error
            reruns += sum(s.attempts - 1 for s in done.steps)
    dsn = base_overrides["database"]["postgres"]["dsn"]
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute(
            "SELECT idempotency_key, count(*) FROM workflows"
            " WHERE idempotency_key = ANY(%s) GROUP BY idempotency_key",
            (keys,),
        )
        per_key = dict(await cur.fetchall())
    assert per_key == {key: 1 for key in keys}
    rows = await step_attempts(dsn, list(ids.values()))
    assert len(rows) == 3 * n_workflows
    assert all(ok == 1 for _, _, ok, _ in rows), [r for r in rows if r[2] != 1]
    print(
        f"\ndataplatform kill -9 x{kills}: {n_workflows} workflows accepted, "
        f"{len(failures)} submits refused meanwhile ({sorted({c.name for c in failures})}), "
        f"{reruns} steps re-run after a lost lease, 0 duplicated"
    )


async def test_kill_9_worker_with_several_workflows_in_flight(external_taskproc) -> None:  # noqa: F811
    """kill -9 of the only worker while 6 workflows have a step running: a new worker picks
    every one up after the leases expire, all succeed, no step's result is recorded twice."""
    running, start = external_taskproc
    worker = await start()
    async with grpc.aio.insecure_channel(running.address("gateway")) as ch:
        token = await new_user(running, ch)
        workflow = spec(
            {"name": "first", "op": "noop"},
            {"name": "slow", "op": "noop", "depends_on": ["first"], "inputs": {"sleep_ms": 2000}},
            {"name": "last", "op": "noop", "depends_on": ["slow"]},
        )
        wids = [(await submit(ch, token, workflow)).workflow_id for _ in range(6)]
        until = deadline(20)
        while True:
            states = [step_status(await get(ch, token, w), "slow").state for w in wids]
            if all(s == wf_pb.STEP_STATE_RUNNING for s in states):
                break
            assert time.monotonic() < until, states
            await asyncio.sleep(0.05)
        os.killpg(worker.pid, signal.SIGKILL)
        await _exit_code(worker, 10)
        await start()
        for wid in wids:
            done = await finish(ch, token, wid, timeout=40)
            assert done.state == wf_pb.WORKFLOW_STATE_SUCCEEDED, done.error
            assert step_status(done, "slow").attempts == 2
    rows = await step_attempts(running.settings.database.postgres.dsn, wids)
    assert len(rows) == 3 * len(wids)
    assert all(ok == 1 for _, _, ok, _ in rows), rows
