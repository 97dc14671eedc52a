"""Fan-out (`for_each`) through the real gateway: items run as steps of their own, at most
`max_concurrency` at once, outputs in input order; fail-fast and collect; the item bound;
lists known at submit and at run time; task items served by an SDK worker; and kill -9 of
taskproc and of dataplatform in the middle of a fan-out."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from typing import Any

import grpc
import psycopg
import pytest
from google.protobuf import json_format, timestamp_pb2

from aiwfe.sdk import task
from aiwfe.taskproc.v1 import schedule_service_pb2 as sched_pb
from aiwfe.taskproc.v1 import schedule_service_pb2_grpc as sched_grpc
from aiwfe.taskproc.v1 import workflow_service_pb2 as wf_pb
from aiwfe.taskproc.v1 import workflow_service_pb2_grpc as wf_grpc
from tests.conftest import bearer, field_violations, login
from tests.resilience.test_crash import external_dataplatform  # noqa: F401
from tests.taskproc.helpers import (
    TERMINAL,
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
from tests.taskproc.test_schedules import delete_all_schedules
from tests.workers.conftest import WorkerSuite, queue_name, sdk_worker, ws  # noqa: F401

ONE_ATTEMPT = {"max_attempts": 1}


def fan(name: str = "each", for_each: str = "${input.items}", **fields: Any) -> dict[str, Any]:
    step = {"name": name, "op": "noop", "for_each": for_each, **fields}
    step.setdefault("inputs", {"echo": "${item}"})
    return step


def output(workflow: wf_pb.Workflow, step: str) -> dict[str, Any]:
    return json_format.MessageToDict(step_status(workflow, step).output)


def details(workflow: wf_pb.Workflow, step: str) -> dict[str, Any]:
    return json_format.MessageToDict(step_status(workflow, step).details)


async def attempts(dsn: str, workflow_id: str) -> dict[str, list[bool]]:
    """Each step's recorded attempts (succeeded or not), items included."""
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute(
            "SELECT step_name, succeeded FROM workflow_step_attempts WHERE workflow_id = %s"
            " ORDER BY step_name, attempt",
            (workflow_id,),
        )
        out: dict[str, list[bool]] = {}
        for name, ok in await cur.fetchall():
            out.setdefault(name, []).append(ok)
        return out


async def test_outputs_come_back_in_input_order(suite, gateway_channel) -> None:
    """Items finishing out of order (later ones sleep less) still give outputs in input
    order, text references format the item, and a dependant reads the list."""
    token = await new_user(suite, gateway_channel)
    items = [{"n": i, "ms": (5 - i) * 40} for i in range(6)]
    workflow = await submit(
        gateway_channel,
        token,
        spec(
            fan(inputs={"echo": "n=${item.n}", "sleep_ms": "${item.ms}"}, max_concurrency=6),
            {
                "name": "after",
                "op": "noop",
                "depends_on": ["each"],
                "inputs": {"echo": "${steps.each.output.items}"},
            },
            input={"items": items},
        ),
    )
    done = await finish(gateway_channel, token, workflow.workflow_id)
    assert done.state == wf_pb.WORKFLOW_STATE_SUCCEEDED, done.error
    out = output(done, "each")
    assert [o["echo"] for o in out["items"]] == [f"n={i}" for i in range(6)]
    assert "failed" not in out  # fail-fast (the default) has nothing to count
    assert [o["echo"] for o in output(done, "after")["echo"]] == [f"n={i}" for i in range(6)]
    # The items are not listed as steps: the fan-out step summarises them.
    assert [s.name for s in done.steps] == ["each", "after"]
    assert details(done, "each")["items"] == 6 and details(done, "each")["succeeded"] == 6


async def test_whole_item_keeps_its_type_and_an_empty_list_succeeds(suite, gateway_channel) -> None:
    """`${item}` alone is the item itself (an object stays an object); a fan-out over an
    output list runs at run time; an empty list (expanded at submit) gives {"items": []}
    at once; RunWorkflow streams every event in order, from the first."""
    token = await new_user(suite, gateway_channel)
    stream = wf_grpc.WorkflowServiceStub(gateway_channel).RunWorkflow(
        wf_pb.RunWorkflowRequest(
            spec=spec(
                {"name": "make", "op": "noop", "inputs": {"echo": [{"a": 1}, [2, 3], None]}},
                fan(for_each="${steps.make.output.echo}", depends_on=["make"]),
                fan("none", for_each="${input.empty}"),
                input={"empty": []},
            )
        ),
        metadata=bearer(token),
        timeout=30,
    )
    updates = [u async for u in stream]
    sequences = [u.event.sequence for u in updates if u.HasField("event")]
    assert sequences == list(range(1, len(sequences) + 1))
    done = await get(gateway_channel, token, updates[0].workflow.workflow_id)
    assert done.state == wf_pb.WORKFLOW_STATE_SUCCEEDED, done.error
    assert [o["echo"] for o in output(done, "each")["items"]] == [{"a": 1}, [2, 3], None]
    assert output(done, "none") == {"items": []}


async def test_a_scheduled_fan_out_runs(suite, gateway_channel, database_dsn) -> None:
    """A schedule's workflow (created in the ticker's transaction) fans out too."""
    token = await new_user(suite, gateway_channel)
    stub = sched_grpc.ScheduleServiceStub(gateway_channel)
    created = await stub.CreateSchedule(
        sched_pb.CreateScheduleRequest(
            name="fan",
            cron="0 3 1 1 *",
            paused=True,
            spec=spec(fan(max_concurrency=2), input={"items": ["a", "b", "c"]}),
        ),
        metadata=bearer(token),
        timeout=10,
    )
    try:
        reply = await stub.TriggerSchedule(
            sched_pb.TriggerScheduleRequest(schedule_id=created.schedule.schedule_id),
            metadata=bearer(token),
            timeout=10,
        )
        done = await finish(gateway_channel, token, reply.workflow.workflow_id)
        assert done.state == wf_pb.WORKFLOW_STATE_SUCCEEDED, done.error
        assert [o["echo"] for o in output(done, "each")["items"]] == ["a", "b", "c"]
    finally:
        await delete_all_schedules(database_dsn)


async def test_max_concurrency_is_never_exceeded(suite, gateway_channel) -> None:
    """12 items of 150 ms at most 3 at once: the events never show a fourth running, and
    the whole takes at least 4 rounds."""
    token = await new_user(suite, gateway_channel)
    started = time.monotonic()
    workflow = await submit(
        gateway_channel,
        token,
        spec(
            fan(inputs={"sleep_ms": 150, "echo": "${item}"}, max_concurrency=3),
            input={"items": list(range(12))},
        ),
    )
    events = await watch(gateway_channel, token, workflow.workflow_id)
    took = time.monotonic() - started
    running: set[str] = set()
    most = 0
    for e in events:
        if e.step_name.startswith("each["):
            if e.step_state == wf_pb.STEP_STATE_RUNNING:
                running.add(e.step_name)
            else:
                running.discard(e.step_name)
            most = max(most, len(running))
    assert most == 3, most
    assert took >= 0.55, took
    done = await get(gateway_channel, token, workflow.workflow_id)
    assert done.state == wf_pb.WORKFLOW_STATE_SUCCEEDED
    assert [o["echo"] for o in output(done, "each")["items"]] == list(range(12))


async def test_items_wait_for_the_steps_not_before(suite, gateway_channel) -> None:
    """A fan-out step's not_before holds its items, though the list is known at submit."""
    token = await new_user(suite, gateway_channel)
    started = time.monotonic()
    at = timestamp_pb2.Timestamp()
    at.FromNanoseconds(time.time_ns() + 1_500_000_000)
    workflow = await submit(
        gateway_channel,
        token,
        spec(fan(not_before=at.ToJsonString()), input={"items": [1, 2]}),
    )
    done = await finish(gateway_channel, token, workflow.workflow_id)
    assert done.state == wf_pb.WORKFLOW_STATE_SUCCEEDED, done.error
    assert time.monotonic() - started >= 1.4


async def test_fail_fast_fails_the_step_and_cancels_the_other_items(
    suite, gateway_channel, database_dsn
) -> None:
    """An item that fails for good fails its fan-out step and the workflow, naming the
    item; the items not yet run are cancelled, never run."""
    token = await new_user(suite, gateway_channel)
    items = ["ok", "permanent", "ok", "ok", "ok"]
    workflow = await submit(
        gateway_channel,
        token,
        spec(
            fan(inputs={"fail": "${item}"}, max_concurrency=1, retry_policy=ONE_ATTEMPT),
            input={"items": items},
        ),
    )
    done = await finish(gateway_channel, token, workflow.workflow_id)
    assert done.state == wf_pb.WORKFLOW_STATE_FAILED
    assert "step 'each' failed: item each[1] failed after 1 attempt(s)" in done.error
    step = step_status(done, "each")
    assert step.state == wf_pb.STEP_STATE_FAILED and "noop asked to fail" in step.error
    assert details(done, "each") == {
        "items": 5, "pending": 0, "running": 0, "retrying": 0, "succeeded": 1, "failed": 1,
        "cancelled": 3,
    }  # fmt: skip
    recorded = await attempts(database_dsn, workflow.workflow_id)
    assert recorded == {"each[0]": [True], "each[1]": [False]}


async def test_collect_records_errors_and_succeeds(suite, gateway_channel) -> None:
    """Under COLLECT a failed item (after its retries) is {"error": ...} in place, the rest
    run, the output counts the failures, and the workflow succeeds."""
    token = await new_user(suite, gateway_channel)
    retry = {"max_attempts": 2, "initial_backoff_seconds": 0.01}
    workflow = await submit(
        gateway_channel,
        token,
        spec(
            fan(
                inputs={"fail_times": "${item}", "echo": "${item}"},
                item_failure="ITEM_FAILURE_POLICY_COLLECT",
                max_concurrency=2,
                retry_policy=retry,
            ),
            input={"items": [0, 5, 1, 0, 9]},
        ),
    )
    done = await finish(gateway_channel, token, workflow.workflow_id)
    assert done.state == wf_pb.WORKFLOW_STATE_SUCCEEDED, done.error
    out = output(done, "each")
    assert out["failed"] == 2
    assert [o.get("echo") for o in out["items"]] == [0, None, 1, 0, None]
    assert out["items"][1] == {"error": "attempt 2 failed: noop failing attempt 2 as asked"}
    assert out["items"][2]["attempt"] == 2  # retried once, then succeeded


async def test_cancel_mid_fan_out_stops_its_items(suite, gateway_channel, database_dsn) -> None:
    """Cancelling a workflow while its items run cancels the running and the held items;
    none starts afterwards."""
    token = await new_user(suite, gateway_channel)
    workflow = await submit(
        gateway_channel,
        token,
        spec(
            fan(inputs={"sleep_ms": 2000}, max_concurrency=2),
            input={"items": list(range(6))},
        ),
    )
    until = deadline(15)
    while (
        details(await get(gateway_channel, token, workflow.workflow_id), "each").get("running", 0)
        < 2
    ):
        assert time.monotonic() < until, "items never ran"
        await asyncio.sleep(0.02)
    await wf_grpc.WorkflowServiceStub(gateway_channel).CancelWorkflow(
        wf_pb.CancelWorkflowRequest(workflow_id=workflow.workflow_id),
        metadata=bearer(token),
        timeout=10,
    )
    done = await finish(gateway_channel, token, workflow.workflow_id)
    assert done.state == wf_pb.WORKFLOW_STATE_CANCELLED
    assert step_status(done, "each").state == wf_pb.STEP_STATE_CANCELLED
    assert details(done, "each")["cancelled"] == 6
    await asyncio.sleep(0.5)
    events = await watch(gateway_channel, token, workflow.workflow_id)
    started = {e.step_name for e in events if e.step_state == wf_pb.STEP_STATE_RUNNING}
    assert started == {"each", "each[0]", "each[1]"}
    assert await attempts(database_dsn, workflow.workflow_id) == {}


async def test_the_item_bound_and_non_lists_fail_the_step_at_run_time(
    suite, gateway_channel, database_dsn
) -> None:
    """A list longer than taskproc.max_fan_out_items, or a value that is no list, found at
    run time fails the fan-out step for good with a clear message (one attempt)."""
    token = await new_user(suite, gateway_channel)
    bound = suite.settings.taskproc.max_fan_out_items
    for value, expected in (
        (list(range(bound + 1)), f"names {bound + 1} items; at most taskproc.max_fan_out_items"),
        ("a string", "is not a list (got string)"),
    ):
        workflow = await submit(
            gateway_channel,
            token,
            spec(
                {"name": "make", "op": "noop", "inputs": {"echo": value}},
                fan(for_each="${steps.make.output.echo}", depends_on=["make"]),
            ),
        )
        done = await finish(gateway_channel, token, workflow.workflow_id)
        assert done.state == wf_pb.WORKFLOW_STATE_FAILED
        assert expected in step_status(done, "each").error, step_status(done, "each").error
        assert expected in done.error
        recorded = await attempts(database_dsn, workflow.workflow_id)
        assert recorded == {"make": [True], "each": [False]}


async def test_submit_refuses_what_fan_out_does_not_support(suite, gateway_channel) -> None:
    """Every fan-out mistake is a field violation naming its path, nothing stored."""
    token = await new_user(suite, gateway_channel)
    bound = suite.settings.taskproc.max_fan_out_items
    bad = spec(
        {"name": "a", "op": "noop", "inputs": {"echo": "${item}"}, "max_concurrency": 2},
        fan("b", for_each="${input.text}"),
        fan("c", for_each="${input.big}"),
        fan("d", for_each="items: ${input.list}"),
        fan("e", for_each="${steps.a.output.echo}"),
        {"name": "f", "op": "sleep", "for_each": "${input.list}", "inputs": {"seconds": 1}},
        fan("g", for_each="${input.list}", max_concurrency=100_000,
            inputs={"echo": "${item.}"}),
        fan("h", for_each="${input.missing}"),
        {"name": "i", "op": "noop", "item_failure": "ITEM_FAILURE_POLICY_COLLECT"},
        input={"text": "no list", "big": list(range(bound + 1)), "list": [1]},
    )  # fmt: skip
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await submit(gateway_channel, token, bad)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    got = field_violations(err.value)
    assert got["spec.steps[0].inputs.echo"] == "${item} is defined only in a step with for_each"
    assert got["spec.steps[0].max_concurrency"] == "needs for_each"
    assert got["spec.steps[1].for_each"] == "must name a list (got str)"
    assert "at most taskproc.max_fan_out_items" in got["spec.steps[2].for_each"]
    assert got["spec.steps[3].for_each"].startswith("must be one whole reference")
    assert "which is not in depends_on" in got["spec.steps[4].for_each"]
    assert got["spec.steps[5].for_each"] == "op 'sleep' cannot fan out"
    assert got["spec.steps[6].max_concurrency"].startswith("must be between 0")
    assert got["spec.steps[6].inputs.echo"].startswith("malformed reference")
    assert "spec.steps[7].for_each" in got
    assert got["spec.steps[8].item_failure"] == "needs for_each"


@task("double_item")
async def double_item(n: int) -> dict[str, Any]:
    """Twice its input (a fan-out item)."""
    return {"twice": n * 2}


async def test_task_items_are_served_by_an_sdk_worker(ws: WorkerSuite, sdk_worker) -> None:  # noqa: F811
    """A fan-out of `task` items goes to external workers on the step's queue, each with
    its own item as input; the outputs come back in order, and an item lacking the field
    its input names fails at dispatch (collected here), never reaching a worker."""
    q = queue_name()
    sdk_worker(q, [double_item])
    items: list[dict[str, Any]] = [{"n": i} for i in range(10)]
    items[3] = {"m": 3}
    workflow = spec(
        fan(
            "each",
            op="task",
            inputs={"queue": q, "type": "double_item", "input": {"n": "${item.n}"}},
            max_concurrency=4,
            item_failure="ITEM_FAILURE_POLICY_COLLECT",
        ),
        input={"items": items},
    )
    wf = await submit(ws.channel, ws.admin, workflow)
    done = await finish(ws.channel, ws.admin, wf.workflow_id)
    assert done.state == wf_pb.WORKFLOW_STATE_SUCCEEDED, done.error
    expected: list[dict[str, Any]] = [{"twice": 2 * i} for i in range(10)]
    expected[3] = {"error": "attempt 1 failed: ${item.n}: the item has no 'n'"}
    assert output(done, "each") == {"items": expected, "failed": 1}


# --- kill -9 in the middle of a fan-out ---------------------------------------------------


def slow_fan_out(n: int) -> wf_pb.WorkflowSpec:
    return spec(
        fan(inputs={"sleep_ms": 300, "echo": "${item}"}, max_concurrency=4),
        {"name": "after", "op": "noop", "depends_on": ["each"]},
        input={"items": list(range(n))},
    )


async def until_items_running(channel, token, wid: str, succeeded: int) -> None:
    """Until `succeeded` items did and some are running."""
    until = deadline(30)
    while True:
        found = details(await get(channel, token, wid), "each")
        if found.get("succeeded", 0) >= succeeded and found.get("running", 0) > 0:
            return
        assert time.monotonic() < until, "items never ran"
        await asyncio.sleep(0.02)


async def until_terminal(channel, token, wid: str) -> wf_pb.Workflow:
    """GetWorkflow until the workflow is terminal, through the restart's UNAVAILABLE."""
    until = deadline(60)
    while True:
        try:
            workflow = await get(channel, token, wid)
        except grpc.aio.AioRpcError as exc:  # the gateway reconnecting
            assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc
        else:
            if workflow.state in TERMINAL:
                return workflow
        assert time.monotonic() < until, "the fan-out never finished"
        await asyncio.sleep(0.1)


async def assert_finished_exactly_once(dsn: str, workflow_id: str, n: int) -> None:
    """Every item and step succeeded once (one succeeded attempt each), the outputs are
    complete and in order, and the workflow succeeded once."""
    recorded = await attempts(dsn, workflow_id)
    succeeded = {name: oks.count(True) for name, oks in recorded.items()}
    assert succeeded == {"each": 1, "after": 1, **{f"each[{i}]": 1 for i in range(n)}}
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute(
            "SELECT count(*) FROM workflow_events WHERE workflow_id = %s"
            " AND message = 'workflow succeeded'",
            (workflow_id,),
        )
        assert await cur.fetchone() == (1,)
        cur = await conn.execute(
            "SELECT output FROM workflow_steps WHERE workflow_id = %s AND name = 'each'",
            (workflow_id,),
        )
        row = await cur.fetchone()
        assert row is not None
        assert [o["echo"] for o in row[0]["items"]] == list(range(n))


@pytest.mark.slow
async def test_kill_9_taskproc_mid_fan_out_finishes_exactly_once(
    external_taskproc,  # noqa: F811
) -> None:
    """kill -9 of the taskproc running the items: a new one takes over (lost items once
    their leases expire) and the fan-out finishes once, every item succeeded once."""
    running, start = external_taskproc
    worker = await start()
    n = 30
    async with grpc.aio.insecure_channel(running.address("gateway")) as ch:
        token = await new_user(running, ch)
        wf = await submit(ch, token, slow_fan_out(n))
        await until_items_running(ch, token, wf.workflow_id, 4)
        os.killpg(worker.pid, signal.SIGKILL)
        await _exit_code(worker, 10)
        await start()
        done = await until_terminal(ch, token, wf.workflow_id)
        assert done.state == wf_pb.WORKFLOW_STATE_SUCCEEDED, done.error
        events = await watch(ch, token, wf.workflow_id)
        assert any(e.step_name.startswith("each[") and "lease expired" in e.message
                   for e in events), [(e.step_name, e.message) for e in events]  # fmt: skip
    await assert_finished_exactly_once(running.settings.database.postgres.dsn, wf.workflow_id, n)


@pytest.mark.slow
async def test_kill_9_dataplatform_mid_fan_out_finishes_exactly_once(
    external_dataplatform,  # noqa: F811
) -> None:
    """kill -9 of dataplatform while items run: once it is back, the workers' pending
    results and the rest of the items go through, and the fan-out finishes once."""
    suite, dataplatform = external_dataplatform
    n = 30
    async with grpc.aio.insecure_channel(suite.address("gateway")) as ch:
        token = await login(ch)  # the admin (users are made in dataplatform's process)
        wf = await submit(ch, token, slow_fan_out(n))
        await until_items_running(ch, token, wf.workflow_id, 4)
        await dataplatform.kill()
        await asyncio.sleep(0.5)  # items finish meanwhile: their results wait for the store
        await dataplatform.start()
        done = await until_terminal(ch, token, wf.workflow_id)
        assert done.state == wf_pb.WORKFLOW_STATE_SUCCEEDED, done.error
    await assert_finished_exactly_once(suite.settings.database.postgres.dsn, wf.workflow_id, n)
