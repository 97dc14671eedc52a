"""kill -9 of dataplatform or taskproc while a durable timer is pending or a signal is
awaited: each workflow resumes and finishes exactly once (one SUCCEEDED event per step,
one attempt row per attempt, nothing fired twice)."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import grpc
import psycopg
import pytest
import yaml
from google.protobuf import json_format

from aiwfe.app.suite import start_suite
from aiwfe.data.v1 import workflow_store_service_pb2 as store_pb
from aiwfe.data.v1 import workflow_store_service_pb2_grpc as store_grpc
from aiwfe.runtime.config import TaskProcSettings
from aiwfe.runtime.identity import IDENTITY_METADATA_KEY, InternalIdentity
from aiwfe.runtime.server import start_service
from aiwfe.taskproc.v1 import workflow_service_pb2 as wf_pb
from dataplatform.service import DataPlatformService
from dataplatform.workflows import timers
from dataplatform.workflows.repository import SIGNAL_WORKER, TIMER_WORKER
from taskproc.spec import validate
from tests.conftest import login
from tests.resilience.test_crash import RETRYABLE, external_dataplatform  # noqa: F401
from tests.taskproc.helpers import (
    deadline,
    finish,
    get,
    new_user,
    spec,
    step_status,
    submit,
    watch,
)
from tests.taskproc.test_durability import _exit_code, external_taskproc  # noqa: F401
from tests.taskproc.test_timers_signals import payload
from tests.taskproc.test_timers_signals import signal as send_signal

pytestmark = pytest.mark.slow

T = TypeVar("T")


async def retrying(call: Callable[[], Awaitable[T]], within: float = 30) -> T:
    """`call()` until it stops failing with UNAVAILABLE or DEADLINE_EXCEEDED (a service
    restarting); any other error fails the test."""
    until = deadline(within)
    while True:
        try:
            return await call()
        except grpc.aio.AioRpcError as exc:
            assert exc.code() in RETRYABLE, exc  # never INTERNAL
            assert time.monotonic() < until, f"still failing: {exc.code()}"
            await asyncio.sleep(0.2)


async def wait_step(channel: grpc.aio.Channel, token: str, wid: str, step: str, state: int) -> None:
    until = deadline(15)
    while step_status(await get(channel, token, wid), step).state != state:
        assert time.monotonic() < until, f"{step} never reached {state}"
        await asyncio.sleep(0.05)


async def ran_once(dsn: str, wid: str) -> dict[str, list[tuple[int, str, bool]]]:
    """Asserts the stored history of a finished workflow shows everything exactly once:
    the workflow SUCCEEDED once, each step SUCCEEDED once (one event), and each step's
    attempt rows are 1..n for its n attempts with exactly one succeeded. Returns each
    step's attempt rows as (attempt, worker, succeeded)."""
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute(
            "SELECT step_name, count(*) FROM workflow_events"
            " WHERE workflow_id = %s AND step_state = %s GROUP BY step_name",
            (wid, wf_pb.STEP_STATE_SUCCEEDED),
        )
        succeeded_events = dict(await cur.fetchall())
        cur = await conn.execute(
            "SELECT count(*) FROM workflow_events"
            " WHERE workflow_id = %s AND step_name = '' AND workflow_state = %s",
            (wid, wf_pb.WORKFLOW_STATE_SUCCEEDED),
        )
        workflow_succeeded = (await cur.fetchone() or (0,))[0]
        cur = await conn.execute(
            "SELECT s.name, s.attempt, a.attempt, a.worker_id, a.succeeded"
            " FROM workflow_steps s LEFT JOIN workflow_step_attempts a"
            "   ON a.workflow_id = s.workflow_id AND a.step_name = s.name"
            " WHERE s.workflow_id = %s ORDER BY s.name, a.attempt",
            (wid,),
        )
        rows = await cur.fetchall()
    steps = {r[0] for r in rows}
    assert workflow_succeeded == 1, workflow_succeeded
    assert succeeded_events == {name: 1 for name in steps}, succeeded_events
    attempts: dict[str, list[tuple[int, str, bool]]] = {}
    counted = {}
    for name, step_attempt, attempt, worker, ok in rows:
        assert attempt is not None, f"{name} has no attempt row"
        attempts.setdefault(name, []).append((attempt, worker, ok))
        counted[name] = step_attempt
    for name, rows_of in attempts.items():
        assert [a for a, _, _ in rows_of] == list(range(1, counted[name] + 1)), (name, rows_of)
        assert [ok for _, _, ok in rows_of].count(True) == 1, (name, rows_of)
    return attempts


def timer_workflow(seconds: float) -> wf_pb.WorkflowSpec:
    return spec(
        {"name": "first", "op": "noop"},
        {"name": "nap", "op": "sleep", "depends_on": ["first"], "inputs": {"seconds": seconds}},
        {
            "name": "after",
            "op": "noop",
            "depends_on": ["nap"],
            "inputs": {"echo": "${steps.nap.output.slept_seconds}"},
        },
    )


def approval_workflow(first_ms: int = 0) -> wf_pb.WorkflowSpec:
    return spec(
        {"name": "first", "op": "noop", "inputs": {"sleep_ms": first_ms}},
        {
            "name": "approve",
            "op": "wait_for_signal",
            "depends_on": ["first"],
            "inputs": {"name": "approval"},
        },
        {
            "name": "publish",
            "op": "noop",
            "depends_on": ["approve"],
            "inputs": {"echo": "${steps.approve.output.by}"},
        },
    )


def output(workflow: wf_pb.Workflow, step: str) -> dict[str, Any]:
    return json_format.MessageToDict(step_status(workflow, step).output)


async def test_kill_9_dataplatform_while_a_timer_is_pending_fires_it_once(
    external_dataplatform,  # noqa: F811
) -> None:
    """dataplatform is killed -9 with a 1.5 s sleep pending and stays down past its due
    time; once restarted the timer fires once and the workflow finishes exactly once."""
    suite, dataplatform = external_dataplatform
    async with grpc.aio.insecure_channel(suite.address("gateway")) as ch:
        token = await login(ch)  # (new_user needs dataplatform in this process)
        wf = await submit(ch, token, timer_workflow(1.5))
        await wait_step(ch, token, wf.workflow_id, "first", wf_pb.STEP_STATE_SUCCEEDED)
        pending = step_status(await get(ch, token, wf.workflow_id), "nap")
        assert pending.state == wf_pb.STEP_STATE_PENDING
        await dataplatform.kill()
        await asyncio.sleep(2.0)  # the timer falls due while dataplatform is down
        await dataplatform.start()
        done = await retrying(lambda: finish(ch, token, wf.workflow_id, timeout=20))
    assert done.state == wf_pb.WORKFLOW_STATE_SUCCEEDED, done.error
    assert output(done, "after")["echo"] == 1.5
    attempts = await ran_once(suite.settings.database.postgres.dsn, wf.workflow_id)
    assert attempts["nap"] == [(1, TIMER_WORKER, True)]


async def test_kill_9_taskproc_while_a_timer_is_pending_fires_it_once(
    external_taskproc,  # noqa: F811
) -> None:
    """taskproc (the only worker) is killed -9 with a 1 s sleep pending: dataplatform's
    timer loop fires it on time with no worker polling, and once a worker is back the
    workflow finishes exactly once."""
    running, start = external_taskproc
    worker = await start()
    async with grpc.aio.insecure_channel(running.address("gateway")) as ch:
        token = await new_user(running, ch)
        wf = await submit(ch, token, timer_workflow(1.0))
        await wait_step(ch, token, wf.workflow_id, "first", wf_pb.STEP_STATE_SUCCEEDED)
        os.killpg(worker.pid, signal.SIGKILL)
        await _exit_code(worker, 10)
        killed_at = time.time()
        await asyncio.sleep(2.0)
        restarted_at = time.time()
        await start()
        done = await finish(ch, token, wf.workflow_id, timeout=20)
        events = await watch(ch, token, wf.workflow_id)
    assert done.state == wf_pb.WORKFLOW_STATE_SUCCEEDED, done.error
    fired = next(
        e.event_time.ToNanoseconds() / 1e9
        for e in events
        if e.step_name == "nap" and e.step_state == wf_pb.STEP_STATE_SUCCEEDED
    )
    assert killed_at < fired < restarted_at, "the timer waited for a worker to poll"
    attempts = await ran_once(running.settings.database.postgres.dsn, wf.workflow_id)
    assert attempts["nap"] == [(1, TIMER_WORKER, True)]
    assert [ok for _, _, ok in attempts["after"]] == [True]


async def test_kill_9_dataplatform_while_a_signal_is_awaited_then_signalled(
    external_dataplatform,  # noqa: F811
) -> None:
    """dataplatform is killed -9 while `approve` waits for its signal; the signal sent after
    the restart is delivered once, the workflow finishes exactly once, and resending the
    same signal_id is a duplicate that changes nothing."""
    suite, dataplatform = external_dataplatform
    async with grpc.aio.insecure_channel(suite.address("gateway")) as ch:
        token = await login(ch)  # (new_user needs dataplatform in this process)
        wf = await submit(ch, token, approval_workflow())
        await wait_step(ch, token, wf.workflow_id, "first", wf_pb.STEP_STATE_SUCCEEDED)
        await dataplatform.kill()
        await asyncio.sleep(0.5)
        await dataplatform.start()
        sent = await retrying(
            lambda: send_signal(
                ch, token, wf.workflow_id, "approval", payload=payload(by="ann"), signal_id="a-1"
            )
        )
        assert sent.delivered and not sent.duplicate
        done = await retrying(lambda: finish(ch, token, wf.workflow_id, timeout=20))
        again = await send_signal(
            ch, token, wf.workflow_id, "approval", payload=payload(by="bob"), signal_id="a-1"
        )
    assert again.duplicate and not again.delivered
    assert done.state == wf_pb.WORKFLOW_STATE_SUCCEEDED, done.error
    assert output(done, "approve") == {"by": "ann"}
    assert output(done, "publish")["echo"] == "ann"
    attempts = await ran_once(suite.settings.database.postgres.dsn, wf.workflow_id)
    assert attempts["approve"] == [(1, SIGNAL_WORKER, True)]


@pytest.mark.parametrize("reached", [False, True], ids=["kept", "delivered"])
async def test_a_signal_sent_just_before_a_kill_9_of_dataplatform_is_delivered_once(
    external_dataplatform,  # noqa: F811
    reached: bool,
) -> None:
    """A signal answered just before dataplatform is killed -9 survives the crash and is
    taken once: sent before its step is reached (kept; the step takes it after the
    restart), or to the waiting step (delivered in the call); the workflow finishes
    exactly once."""
    suite, dataplatform = external_dataplatform
    async with grpc.aio.insecure_channel(suite.address("gateway")) as ch:
        token = await login(ch)  # (new_user needs dataplatform in this process)
        wf = await submit(ch, token, approval_workflow(first_ms=0 if reached else 1500))
        first = wf_pb.STEP_STATE_SUCCEEDED if reached else wf_pb.STEP_STATE_RUNNING
        await wait_step(ch, token, wf.workflow_id, "first", first)
        sent = await send_signal(
            ch, token, wf.workflow_id, "approval", payload=payload(by="cy"), signal_id="c-1"
        )
        assert (sent.delivered, sent.duplicate) == (reached, False)
        await dataplatform.kill()
        await asyncio.sleep(0.5)
        await dataplatform.start()
        done = await retrying(lambda: finish(ch, token, wf.workflow_id, timeout=30))
    assert done.state == wf_pb.WORKFLOW_STATE_SUCCEEDED, done.error
    assert output(done, "approve") == {"by": "cy"}
    attempts = await ran_once(suite.settings.database.postgres.dsn, wf.workflow_id)
    assert attempts["approve"] == [(1, SIGNAL_WORKER, True)]
    # `first` was running on the in-process worker: it may have run again after the crash
    # (its lease), but only one of its attempts succeeded (checked by ran_once).
    async with await psycopg.AsyncConnection.connect(suite.settings.database.postgres.dsn) as conn:
        cur = await conn.execute(
            "SELECT consumed_by FROM workflow_signals WHERE workflow_id = %s",
            (wf.workflow_id,),
        )
        assert await cur.fetchall() == [("approve",)]


async def test_kill_9_taskproc_while_a_signal_is_awaited_then_signalled(
    external_taskproc,  # noqa: F811
) -> None:
    """taskproc is killed -9 while `approve` waits; the signal sent through the restarted
    taskproc is delivered once and the workflow finishes exactly once."""
    running, start = external_taskproc
    worker = await start()
    async with grpc.aio.insecure_channel(running.address("gateway")) as ch:
        token = await new_user(running, ch)
        wf = await submit(ch, token, approval_workflow())
        await wait_step(ch, token, wf.workflow_id, "first", wf_pb.STEP_STATE_SUCCEEDED)
        os.killpg(worker.pid, signal.SIGKILL)
        await _exit_code(worker, 10)
        await start()
        sent = await retrying(
            lambda: send_signal(ch, token, wf.workflow_id, "approval", payload=payload(by="di"))
        )
        assert sent.delivered
        done = await finish(ch, token, wf.workflow_id, timeout=20)
    assert done.state == wf_pb.WORKFLOW_STATE_SUCCEEDED, done.error
    assert output(done, "publish")["echo"] == "di"
    attempts = await ran_once(running.settings.database.postgres.dsn, wf.workflow_id)
    assert attempts["approve"] == [(1, SIGNAL_WORKER, True)]


async def test_two_replicas_fire_each_timer_once_with_no_worker(
    base_overrides, monkeypatch
) -> None:
    """Two dataplatform replicas and no taskproc at all: 40 sleeps stored on both, all due
    at about one instant, each fire once (one attempt row, one SUCCEEDED event) and within
    a second of their time, though each replica's loop naps 30 s here: storing a timer
    wakes its replica's loop."""
    monkeypatch.setattr(timers, "MAX_NAP_SECONDS", 30.0)
    a = await start_suite(base_overrides, only=("dataplatform",))
    b = await start_service(DataPlatformService(a.settings), "127.0.0.1", 0)
    dsn = a.settings.database.postgres.dsn
    identity = InternalIdentity.from_settings(a.settings)
    md = ((IDENTITY_METADATA_KEY, identity.assertion(None, "taskproc")),)
    owner = store_pb.WorkflowOwner(user_id=f"timers{time.time_ns()}", username="timers")
    try:
        async with (
            grpc.aio.insecure_channel(a.address("dataplatform")) as ch_a,
            grpc.aio.insecure_channel(f"127.0.0.1:{b.port}") as ch_b,
        ):
            stubs = [store_grpc.WorkflowStoreServiceStub(c) for c in (ch_a, ch_b)]
            await asyncio.sleep(0.3)  # both loops found nothing and nap
            due_at = time.time() + 1.0
            replies = await asyncio.gather(
                *(
                    stubs[i % 2].CreateWorkflow(
                        store_pb.CreateWorkflowRequest(
                            owner=owner,
                            spec=validate(
                                spec(
                                    {
                                        "name": "nap",
                                        "op": "sleep",
                                        "inputs": {"seconds": round(due_at - time.time(), 3)},
                                    }
                                ),
                                TaskProcSettings(),
                            ),
                        ),
                        metadata=md,
                        timeout=10,
                    )
                    for i in range(40)
                )
            )
        wids = [r.workflow.workflow_id for r in replies]
        async with await psycopg.AsyncConnection.connect(dsn) as conn:
            until = deadline(10)
            while True:
                cur = await conn.execute(
                    "SELECT count(*) FROM workflows WHERE workflow_id = ANY(%s) AND state = %s",
                    (wids, wf_pb.WORKFLOW_STATE_SUCCEEDED),
                )
                if (await cur.fetchone() or (0,))[0] == len(wids):
                    break
                assert time.monotonic() < until, "the timers did not all fire"
                await asyncio.sleep(0.1)
            cur = await conn.execute(
                "SELECT max(extract(epoch FROM e.created_at - s.next_run_at))::float8"
                " FROM workflow_events e JOIN workflow_steps s"
                "   ON s.workflow_id = e.workflow_id AND s.name = e.step_name"
                " WHERE e.workflow_id = ANY(%s) AND e.step_state = %s",
                (wids, wf_pb.STEP_STATE_SUCCEEDED),
            )
            latest = (await cur.fetchone() or (None,))[0]
        assert latest is not None and latest < 1.0, latest
        for wid in wids:
            assert (await ran_once(dsn, wid))["nap"] == [(1, TIMER_WORKER, True)]
    finally:
        await b.stop(grace=0.5)
        await a.stop()


def test_the_readme_durability_example_is_a_valid_spec() -> None:
    """README's "Workflow language: durability" example passes submit-time validation."""
    text = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    start = text.index("name: cool-down-then-approve")
    example = yaml.safe_load(text[start : text.index("```", start)])
    checked = validate(json_format.ParseDict(example, wf_pb.WorkflowSpec()), TaskProcSettings())
    assert [s.op for s in checked.steps] == ["noop", "sleep", "wait_for_signal"]
