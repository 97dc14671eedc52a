"""Workflow lifecycle through the real gateway: ListWorkflows filters (state, name, schedule,
create time) with page tokens bound to them and an index per filter, RetryWorkflow (failed
and cancelled steps run again, succeeded ones keep their outputs, one re-run under
concurrent calls), and retention (finished workflows purged in bounded batches, active
ones never)."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any

import grpc
import psycopg
import pytest
from google.protobuf import json_format, timestamp_pb2
from grpc_status import rpc_status

from aiwfe.app.suite import start_suite
from aiwfe.data.v1 import workflow_store_service_pb2 as store_pb
from aiwfe.runtime import metrics
from aiwfe.taskproc.v1 import schedule_service_pb2 as sched_pb
from aiwfe.taskproc.v1 import schedule_service_pb2_grpc as sched_grpc
from aiwfe.taskproc.v1 import workflow_service_pb2 as wf_pb
from aiwfe.taskproc.v1 import workflow_service_pb2_grpc as wf_grpc
from dataplatform.workflows.repository import ListFilter, WorkflowRepository
from dataplatform.workflows.retention import Retention
from tests.conftest import bearer, field_violations
from tests.taskproc.helpers import finish, get, new_user, spec, step_status, submit, watch
from tests.taskproc.test_schedules import delete_all_schedules

# A step no worker ever polls for: its workflow stays active.
STUCK = {"name": "wait", "op": "task", "inputs": {"queue": "nobody-polls", "type": "t"}}


def _stub(channel: grpc.aio.Channel) -> wf_grpc.WorkflowServiceStub:
    return wf_grpc.WorkflowServiceStub(channel)


async def _list(channel: grpc.aio.Channel, token: str, **fields: Any) -> list[str]:
    """Every workflow id the filter lists, newest first, following page tokens."""
    ids: list[str] = []
    page_token = ""
    while True:
        reply = await _stub(channel).ListWorkflows(
            wf_pb.ListWorkflowsRequest(page_size=2, page_token=page_token, **fields),
            metadata=bearer(token),
            timeout=10,
        )
        ids += [w.workflow_id for w in reply.workflows]
        page_token = reply.next_page_token
        if not page_token:
            return ids


async def _retry(channel: grpc.aio.Channel, token: str, workflow_id: str) -> wf_pb.Workflow:
    reply = await _stub(channel).RetryWorkflow(
        wf_pb.RetryWorkflowRequest(workflow_id=workflow_id), metadata=bearer(token), timeout=10
    )
    return reply.workflow


def _reason(error: grpc.aio.AioRpcError) -> tuple[str, dict[str, str]]:
    from google.rpc import error_details_pb2

    status = rpc_status.from_call(error)
    assert status is not None
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info.reason, dict(info.metadata)
    raise AssertionError("no ErrorInfo")


def _stamp(ts: timestamp_pb2.Timestamp, plus_ns: int = 0) -> timestamp_pb2.Timestamp:
    out = timestamp_pb2.Timestamp()
    out.FromNanoseconds(ts.ToNanoseconds() + plus_ns)
    return out


# --- ListWorkflows filters -----------------------------------------------------------------


@pytest.fixture
async def _no_schedule_left(base_overrides: dict[str, Any]) -> Any:
    yield
    await delete_all_schedules(base_overrides["database"]["postgres"]["dsn"])


@pytest.mark.usefixtures("_no_schedule_left")
async def test_list_filters_by_state_name_schedule_and_create_time(suite, gateway_channel) -> None:
    """Each filter keeps exactly its workflows (name: exact match; schedule: the workflows
    its ticks and triggers started, for its owner only; time: [after, before)), across
    pages; a token reused with another filter is INVALID_ARGUMENT naming page_token."""
    token = await new_user(suite, gateway_channel)
    other = await new_user(suite, gateway_channel)
    a1 = await submit(gateway_channel, token, spec({"name": "s", "op": "noop"}, name="alpha"))
    b1 = await submit(gateway_channel, token, spec({"name": "s", "op": "noop"}, name="beta"))
    a2 = await submit(gateway_channel, token, spec({"name": "s", "op": "noop"}, name="alpha"))
    a3 = await submit(gateway_channel, token, spec(STUCK, name="alpha"))
    # The same name under another user is not listed.
    await submit(gateway_channel, other, spec({"name": "s", "op": "noop"}, name="alpha"))
    schedules = sched_grpc.ScheduleServiceStub(gateway_channel)
    made = await schedules.CreateSchedule(
        sched_pb.CreateScheduleRequest(
            name="nightly",
            cron="0 3 1 1 *",
            paused=True,
            spec=spec({"name": "s", "op": "noop"}, name="nightly"),
        ),
        metadata=bearer(token),
        timeout=10,
    )
    sid = made.schedule.schedule_id
    ticked = await schedules.TriggerSchedule(
        sched_pb.TriggerScheduleRequest(schedule_id=sid), metadata=bearer(token), timeout=10
    )
    tick_id = ticked.workflow.workflow_id
    for wf in (a1, b1, a2):
        await finish(gateway_channel, token, wf.workflow_id)
    await finish(gateway_channel, token, tick_id)

    alphas = [a3.workflow_id, a2.workflow_id, a1.workflow_id]
    assert await _list(gateway_channel, token, name="alpha") == alphas
    assert await _list(gateway_channel, token, name="beta") == [b1.workflow_id]
    assert await _list(gateway_channel, token, name="alp") == []  # exact, not a prefix
    assert await _list(gateway_channel, token, schedule_id=sid) == [tick_id]
    assert await _list(gateway_channel, token, schedule_id=sid.upper()) == [tick_id]
    assert await _list(gateway_channel, other, schedule_id=sid) == []
    assert await _list(gateway_channel, token, schedule_id=str(uuid.uuid4())) == []
    running = wf_pb.WORKFLOW_STATE_PENDING
    assert await _list(gateway_channel, token, name="alpha", state=running) == [a3.workflow_id]
    succeeded = wf_pb.WORKFLOW_STATE_SUCCEEDED
    assert await _list(gateway_channel, token, name="alpha", state=succeeded) == alphas[1:]
    # [after, before): b1's create time is in, a2's (the bound) is out.
    window = {"create_after": b1.create_time, "create_before": a2.create_time}
    assert await _list(gateway_channel, token, **window) == [b1.workflow_id]
    since = await _list(gateway_channel, token, create_after=a2.create_time)
    assert since == [tick_id, a3.workflow_id, a2.workflow_id]
    assert await _list(gateway_channel, token, create_before=b1.create_time) == [a1.workflow_id]

    first = await _stub(gateway_channel).ListWorkflows(
        wf_pb.ListWorkflowsRequest(page_size=1, name="alpha"), metadata=bearer(token), timeout=10
    )
    page_token = first.next_page_token
    assert page_token
    for changed in (
        {"name": "beta"},
        {"name": "alpha", "schedule_id": sid},
        {"name": "alpha", "create_after": b1.create_time},
        {"name": "alpha", "create_before": a2.create_time},
    ):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await _stub(gateway_channel).ListWorkflows(
                wf_pb.ListWorkflowsRequest(page_size=1, page_token=page_token, **changed),
                metadata=bearer(token),
                timeout=10,
            )
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, changed
        assert "page_token" in field_violations(err.value), changed
    await _stub(gateway_channel).CancelWorkflow(
        wf_pb.CancelWorkflowRequest(workflow_id=a3.workflow_id), metadata=bearer(token), timeout=10
    )


async def test_list_filter_mistakes_are_field_violations(suite, gateway_channel) -> None:
    """A too-long name, a schedule id that is no id, a range whose end precedes its start
    and a timestamp out of range are each INVALID_ARGUMENT naming the field."""
    token = await new_user(suite, gateway_channel)
    now = timestamp_pb2.Timestamp()
    now.GetCurrentTime()
    cases = [
        ({"name": "n" * 65}, "name"),
        ({"schedule_id": "nightly"}, "schedule_id"),
        ({"create_after": now, "create_before": _stamp(now, -1)}, "create_before"),
        ({"create_after": timestamp_pb2.Timestamp(seconds=10**12)}, "create_after"),
        ({"create_before": timestamp_pb2.Timestamp(seconds=0, nanos=-1)}, "create_before"),
    ]
    for fields, field in cases:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await _list(gateway_channel, token, **fields)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, fields
        assert field in field_violations(err.value), (fields, field_violations(err.value))
    # The same instant for both bounds is a valid (empty) range.
    assert await _list(gateway_channel, token, create_after=now, create_before=now) == []


async def test_each_filter_of_a_users_listing_is_an_index_scan(suite, database_dsn) -> None:
    """With 40,000 workflows of 20 owners, a quarter of them one user's, that user's listing
    by state, name, schedule or time range is an index scan of its own index, newest first
    with no sort. (With half the rows one user's, scanning the state index and filtering by
    owner read only twice the rows, and the planner chose it in one CI run.)"""
    owners = [f"bulk-{uuid.uuid4().hex[:8]}" for _ in range(20)]
    schedule_id = uuid.uuid4()
    async with await psycopg.AsyncConnection.connect(database_dsn, autocommit=True) as conn:
        try:
            await conn.execute(
                "INSERT INTO workflows (workflow_id, owner_id, owner_username, spec, state,"
                " deadline_at, name, schedule_id, created_at)"
                # A quarter are owners[0]'s (the user with many), the rest the others'; state,
                # name and schedule vary with i / 4, so each is independent of the owner.
                " SELECT gen_random_uuid(), CASE WHEN i %% 4 = 0 THEN (%(owners)s::text[])[1]"
                "   ELSE (%(owners)s::text[])[2 + i %% 19] END, 'bulk', '',"
                # Finished states only: the suite's sweep would time out active ones.
                "   3 + (i / 4) %% 4, now() + interval '1 day', 'name-' || ((i / 4) %% 10),"
                # A schedule belongs to one owner: owners[0]'s.
                "   CASE WHEN i %% 4 = 0 AND (i / 4) %% 10 = 0 THEN %(sid)s::uuid END,"
                "   now() - i * interval '1 second'"
                " FROM generate_series(1, 40000) AS i",
                {"owners": owners, "sid": schedule_id},
            )
            await conn.execute("ANALYZE workflows")
            scope = store_pb.WorkflowScope(owner_id=owners[0])
            day_ago = (await (await conn.execute("SELECT now() - interval '1 day'")).fetchone())[0]
            hour_ago = (await (await conn.execute("SELECT now() - interval '1 hour'")).fetchone())[
                0
            ]
            cases = {
                "workflows_owner_state_created": ListFilter(state=3),
                "workflows_owner_name_created": ListFilter(name="name-2"),
                "workflows_schedule_created": ListFilter(schedule_id=schedule_id),
                "workflows_owner_created": ListFilter(create_after=day_ago, create_before=hour_ago),
            }
            for index, filters in cases.items():
                query, args = WorkflowRepository.page_query(scope, filters, None, 50)
                cur = await conn.execute("EXPLAIN (FORMAT JSON) " + query, args)
                plan = json.dumps((await cur.fetchone())[0])
                assert f'"Index Name": "{index}"' in plan, (index, plan)
                assert '"Seq Scan"' not in plan and '"Node Type": "Sort"' not in plan, plan
        finally:
            await conn.execute("DELETE FROM workflows WHERE owner_id = ANY(%s)", (owners,))


# --- RetryWorkflow -------------------------------------------------------------------------


def _failing_twice(**extra: Any) -> wf_pb.WorkflowSpec:
    """first succeeds; second fails its two attempts (max_attempts 2), so the workflow
    FAILS, but its third attempt (the retry's first) passes; third reads first's output."""
    return spec(
        {"name": "first", "op": "noop", "inputs": {"echo": "kept"}},
        {
            "name": "second",
            "op": "noop",
            "depends_on": ["first"],
            "inputs": {"fail_times": 2},
            "retry_policy": {"max_attempts": 2, "initial_backoff_seconds": 0.05},
        },
        {
            "name": "third",
            "op": "noop",
            "depends_on": ["second"],
            "inputs": {"echo": "${steps.first.output.echo}"},
        },
        **extra,
    )


async def test_retry_reruns_failed_steps_and_keeps_succeeded_outputs(
    suite, gateway_channel, database_dsn
) -> None:
    """A workflow whose second step failed for good is retried: the failed and cancelled
    steps run again with a fresh attempts budget, the first step is not re-run (its
    attempts and output unchanged, its output still read by the third), the workflow ends
    SUCCEEDED, and the events say it was retried."""
    token = await new_user(suite, gateway_channel)
    wf = await submit(gateway_channel, token, _failing_twice())
    failed = await finish(gateway_channel, token, wf.workflow_id)
    assert failed.state == wf_pb.WORKFLOW_STATE_FAILED
    first = step_status(failed, "first")
    assert (first.state, first.attempts) == (wf_pb.STEP_STATE_SUCCEEDED, 1)
    assert step_status(failed, "second").state == wf_pb.STEP_STATE_FAILED
    assert step_status(failed, "third").state == wf_pb.STEP_STATE_CANCELLED
    last_sequence = (await watch(gateway_channel, token, wf.workflow_id))[-1].sequence

    retried = await _retry(gateway_channel, token, wf.workflow_id)
    assert retried.state == wf_pb.WORKFLOW_STATE_RUNNING and not retried.error
    assert step_status(retried, "second").state in (
        wf_pb.STEP_STATE_PENDING,
        wf_pb.STEP_STATE_RUNNING,
        wf_pb.STEP_STATE_SUCCEEDED,
    )
    events = await watch(gateway_channel, token, wf.workflow_id, after=last_sequence)
    done = await get(gateway_channel, token, wf.workflow_id)
    assert done.state == wf_pb.WORKFLOW_STATE_SUCCEEDED, done
    assert step_status(done, "first") == first  # not re-run: attempts and output unchanged
    assert step_status(done, "second").attempts == 3  # the fencing token keeps counting
    assert json_format.MessageToDict(step_status(done, "third").output)["echo"] == "kept"
    assert events[0].message.startswith("workflow retried: 2 step(s)")
    assert events[0].workflow_state == wf_pb.WORKFLOW_STATE_RUNNING
    pending = {(e.step_name, e.message) for e in events if e.step_state == wf_pb.STEP_STATE_PENDING}
    assert pending == {("second", "retried"), ("third", "retried")}
    async with await psycopg.AsyncConnection.connect(database_dsn) as conn:
        cur = await conn.execute(
            "SELECT step_name, count(*) FROM workflow_step_attempts WHERE workflow_id = %s"
            " GROUP BY step_name ORDER BY step_name",
            (wf.workflow_id,),
        )
        assert await cur.fetchall() == [("first", 1), ("second", 3), ("third", 1)]


async def test_a_workflow_that_is_not_retryable_is_failed_precondition(
    suite, gateway_channel
) -> None:
    """Retrying a SUCCEEDED or an active workflow is FAILED_PRECONDITION with reason
    WORKFLOW_NOT_RETRYABLE naming its state; another user's is NOT_FOUND; an empty id is
    INVALID_ARGUMENT."""
    token = await new_user(suite, gateway_channel)
    other = await new_user(suite, gateway_channel)
    ok = await submit(gateway_channel, token, spec({"name": "s", "op": "noop"}))
    await finish(gateway_channel, token, ok.workflow_id)
    active = await submit(gateway_channel, token, spec(STUCK))
    for wf, state in ((ok, "WORKFLOW_STATE_SUCCEEDED"), (active, "WORKFLOW_STATE_PENDING")):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await _retry(gateway_channel, token, wf.workflow_id)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert _reason(err.value) == (
            "WORKFLOW_NOT_RETRYABLE",
            {"workflowId": wf.workflow_id, "state": state},
        )
    failed = await submit(
        gateway_channel, token, spec({"name": "s", "op": "noop", "inputs": {"fail": "permanent"}})
    )
    await finish(gateway_channel, token, failed.workflow_id)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _retry(gateway_channel, other, failed.workflow_id)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _retry(gateway_channel, token, "")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "workflow_id" in field_violations(err.value)
    await _stub(gateway_channel).CancelWorkflow(
        wf_pb.CancelWorkflowRequest(workflow_id=active.workflow_id),
        metadata=bearer(token),
        timeout=10,
    )


async def test_concurrent_retries_rerun_the_workflow_once(suite, gateway_channel) -> None:
    """Of four concurrent retries of one failed workflow one re-runs it, the others are
    WORKFLOW_NOT_RETRYABLE (it is running again): one "retried" event, one more attempt."""
    token = await new_user(suite, gateway_channel)
    wf = await submit(
        gateway_channel,
        token,
        spec({"name": "s", "op": "noop", "inputs": {"fail": "permanent", "sleep_ms": 300}}),
    )
    await finish(gateway_channel, token, wf.workflow_id)
    results = await asyncio.gather(
        *(_retry(gateway_channel, token, wf.workflow_id) for _ in range(4)),
        return_exceptions=True,
    )
    ok = [r for r in results if isinstance(r, wf_pb.Workflow)]
    refused = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(ok) == 1 and len(refused) == 3, results
    assert all(_reason(r)[0] == "WORKFLOW_NOT_RETRYABLE" for r in refused)
    done = await finish(gateway_channel, token, wf.workflow_id)
    assert done.state == wf_pb.WORKFLOW_STATE_FAILED  # permanent: it fails again
    assert done.steps[0].attempts == 2
    events = await watch(gateway_channel, token, wf.workflow_id)
    assert sum(e.message.startswith("workflow retried") for e in events) == 1


async def test_a_cancelled_workflow_resumes_with_a_new_deadline(
    suite, gateway_channel, database_dsn
) -> None:
    """A cancelled workflow's cancelled steps run again (the succeeded first one does not)
    and its deadline is counted again from the retry."""
    token = await new_user(suite, gateway_channel)
    wf = await submit(
        gateway_channel,
        token,
        spec(
            {"name": "first", "op": "noop"},
            {**STUCK, "depends_on": ["first"]},
            timeout_seconds=600,
        ),
    )

    async def deadline() -> Any:
        async with await psycopg.AsyncConnection.connect(database_dsn) as conn:
            cur = await conn.execute(
                "SELECT deadline_at FROM workflows WHERE workflow_id = %s", (wf.workflow_id,)
            )
            return (await cur.fetchone())[0]

    for _ in range(100):
        if step_status(await get(gateway_channel, token, wf.workflow_id), "first").attempts:
            break
        await asyncio.sleep(0.05)
    before = await deadline()
    await _stub(gateway_channel).CancelWorkflow(
        wf_pb.CancelWorkflowRequest(workflow_id=wf.workflow_id), metadata=bearer(token), timeout=10
    )
    await asyncio.sleep(0.2)
    retried = await _retry(gateway_channel, token, wf.workflow_id)
    assert retried.state == wf_pb.WORKFLOW_STATE_RUNNING
    assert step_status(retried, "first").attempts == 1
    assert step_status(retried, "wait").state == wf_pb.STEP_STATE_PENDING
    assert await deadline() > before
    await _stub(gateway_channel).CancelWorkflow(
        wf_pb.CancelWorkflowRequest(workflow_id=wf.workflow_id), metadata=bearer(token), timeout=10
    )


async def test_a_timed_out_workflow_retried_gets_a_whole_new_deadline(
    suite, gateway_channel
) -> None:
    """A TIMED_OUT workflow is retryable: its cancelled step waits again (the succeeded one
    is not re-run) and it times out again only its full timeout after the retry, not at
    once on the old deadline."""
    token = await new_user(suite, gateway_channel)
    wf = await submit(
        gateway_channel,
        token,
        spec(
            {"name": "first", "op": "noop"}, {**STUCK, "depends_on": ["first"]}, timeout_seconds=1
        ),
    )
    timed_out = await finish(gateway_channel, token, wf.workflow_id)
    assert timed_out.state == wf_pb.WORKFLOW_STATE_TIMED_OUT
    started = time.monotonic()
    retried = await _retry(gateway_channel, token, wf.workflow_id)
    assert retried.state == wf_pb.WORKFLOW_STATE_RUNNING
    assert step_status(retried, "wait").state == wf_pb.STEP_STATE_PENDING
    again = await finish(gateway_channel, token, wf.workflow_id)
    assert again.state == wf_pb.WORKFLOW_STATE_TIMED_OUT
    assert time.monotonic() - started >= 0.9
    assert step_status(again, "first").attempts == 1


# --- retention -----------------------------------------------------------------------------


@pytest.fixture
async def short_retention(base_overrides: dict[str, Any]) -> Any:
    """A suite keeping finished workflows 1 s, purging 2 at a time every 0.1 s."""
    overrides = {
        **base_overrides,
        "taskproc": {"retention_seconds": 1, "retention_batch": 2, "retention_interval": 0.1},
    }
    running = await start_suite(overrides)
    async with grpc.aio.insecure_channel(running.address("gateway")) as channel:
        yield running, channel
    await running.stop()


async def test_finished_workflows_are_purged_after_retention_active_ones_never(
    short_retention, database_dsn
) -> None:
    """With a 1 s retention, finished workflows (succeeded, failed, cancelled) become
    NOT_FOUND and leave no step, attempt, event or signal row; an active workflow older
    than the retention stays; workflow_purged counts them."""
    suite, channel = short_retention
    token = await new_user(suite, channel)
    purged_before = metrics.workflow_purged._value.get()
    active = await submit(channel, token, spec(STUCK))
    done = [
        await submit(channel, token, spec({"name": "s", "op": "noop"})),
        await submit(
            channel, token, spec({"name": "s", "op": "noop", "inputs": {"fail": "permanent"}})
        ),
        await submit(channel, token, spec(STUCK)),
    ]
    await _stub(channel).CancelWorkflow(
        wf_pb.CancelWorkflowRequest(workflow_id=done[2].workflow_id),
        metadata=bearer(token),
        timeout=10,
    )
    for wf in done[:2]:
        await finish(channel, token, wf.workflow_id)
    deadline = time.monotonic() + 15
    remaining = set()
    while time.monotonic() < deadline:
        remaining = set()
        for wf in done:
            try:
                await get(channel, token, wf.workflow_id)
                remaining.add(wf.workflow_id)
            except grpc.aio.AioRpcError as err:
                assert err.code() == grpc.StatusCode.NOT_FOUND
        if not remaining:
            break
        await asyncio.sleep(0.2)
    assert not remaining, "finished workflows outlived their retention"
    still = await get(channel, token, active.workflow_id)
    assert still.state == wf_pb.WORKFLOW_STATE_PENDING
    assert time.time() - still.create_time.ToSeconds() > 1  # older than the retention
    assert metrics.workflow_purged._value.get() - purged_before >= len(done)
    ids = [wf.workflow_id for wf in done]
    async with await psycopg.AsyncConnection.connect(database_dsn) as conn:
        for table in (
            "workflow_steps",
            "workflow_step_attempts",
            "workflow_events",
            "workflow_signals",
        ):
            cur = await conn.execute(
                f"SELECT count(*) FROM {table} WHERE workflow_id = ANY(%s::uuid[])",  # noqa: S608
                (ids,),
            )
            assert (await cur.fetchone())[0] == 0, table
    await _stub(channel).CancelWorkflow(
        wf_pb.CancelWorkflowRequest(workflow_id=active.workflow_id),
        metadata=bearer(token),
        timeout=10,
    )


async def test_a_purge_batch_deletes_at_most_the_batch(suite, gateway_channel) -> None:
    """Five expired workflows with a batch of two: one DELETE removes exactly two, and a
    purge round deletes the rest batch after batch, each no larger than two."""
    token = await new_user(suite, gateway_channel)
    wfs = [
        await submit(gateway_channel, token, spec({"name": "s", "op": "noop"})) for _ in range(5)
    ]
    for wf in wfs:
        await finish(gateway_channel, token, wf.workflow_id)
    await asyncio.sleep(1.1)
    service = suite.running["dataplatform"].service  # type: ignore[attr-defined]
    repo: WorkflowRepository = service.workflows.repo
    assert await repo.purge_finished(1.0, 2) == 2
    batches: list[int] = []
    purge = repo.purge_finished

    async def counted(retention: float, batch: int) -> int:
        n = await purge(retention, batch)
        batches.append(n)
        return n

    repo.purge_finished = counted  # type: ignore[method-assign]
    try:
        limits = suite.settings.taskproc.model_copy(
            update={"retention_seconds": 1.0, "retention_batch": 2}
        )
        total = await Retention(repo, limits).purge_once()
    finally:
        del repo.purge_finished
    assert total >= 3 and batches and max(batches) <= 2 and batches[-1] < 2, batches
    for wf in wfs:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await get(gateway_channel, token, wf.workflow_id)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_the_readme_lifecycle_example_is_a_valid_spec() -> None:
    """README's "Workflow language: lifecycle" example passes submit-time validation."""
    from pathlib import Path

    import yaml

    from aiwfe.runtime.config import Settings
    from taskproc.spec import validate

    text = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    start = text.index("name: nightly-report")
    example = yaml.safe_load(text[start : text.index("```", start)])
    checked = validate(json_format.ParseDict(example, wf_pb.WorkflowSpec()), Settings().taskproc)
    assert [s.name for s in checked.steps] == ["fetch", "summarise", "publish"]


async def test_two_replicas_purge_side_by_side(
    suite, gateway_channel, database_dsn, monkeypatch
) -> None:
    """A purge never waits for a row another transaction holds (SKIP LOCKED: it deletes the
    others and leaves that one for a later round), and two replicas' purge rounds at once
    (a second dataplatform on the same database) both delete, without error, until every
    expired workflow is gone."""
    from aiwfe.runtime.server import start_service
    from dataplatform.service import DataPlatformService

    token = await new_user(suite, gateway_channel)
    wfs = [
        await submit(gateway_channel, token, spec({"name": "s", "op": "noop"})) for _ in range(8)
    ]
    for wf in wfs:
        await finish(gateway_channel, token, wf.workflow_id)
    await asyncio.sleep(1.1)
    limits = suite.settings.taskproc.model_copy(
        update={"retention_seconds": 1.0, "retention_batch": 1}
    )
    first = suite.running["dataplatform"].service  # type: ignore[attr-defined]
    held = wfs[0].workflow_id
    async with await psycopg.AsyncConnection.connect(database_dsn) as holder:
        await holder.execute("SELECT 1 FROM workflows WHERE workflow_id = %s FOR UPDATE", (held,))
        await asyncio.wait_for(Retention(first.workflows.repo, limits).purge_once(), 10)
        assert (await get(gateway_channel, token, held)).workflow_id == held
        await holder.rollback()
    for wf in wfs[1:]:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await get(gateway_channel, token, wf.workflow_id)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND

    more = [
        await submit(gateway_channel, token, spec({"name": "s", "op": "noop"})) for _ in range(8)
    ]
    for wf in more:
        await finish(gateway_channel, token, wf.workflow_id)
    await asyncio.sleep(1.1)
    second = await start_service(DataPlatformService(suite.settings), host="127.0.0.1", port=0)
    replicas = (first, second.service)  # type: ignore[attr-defined]
    # Both replicas' first batches start together: otherwise a warm replica can purge all
    # nine while the new one's first statement still loads its backend's catalog.
    together = asyncio.Barrier(len(replicas))
    for replica in replicas:
        repo = replica.workflows.repo

        async def first_batch_together(*args, _repo=repo, _purge=repo.purge_finished):
            monkeypatch.setattr(_repo, "purge_finished", _purge)
            await together.wait()
            return await _purge(*args)

        monkeypatch.setattr(repo, "purge_finished", first_batch_together)
    try:
        totals = await asyncio.gather(
            *(Retention(r.workflows.repo, limits).purge_once() for r in replicas)
        )
    finally:
        await second.stop(grace=0.5)
    assert sum(totals) >= len(more) + 1 and all(totals), totals
    for wf in [wfs[0], *more]:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await get(gateway_channel, token, wf.workflow_id)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def test_every_table_referencing_workflows_is_purged_with_them(suite, database_dsn) -> None:
    """Every foreign key to `workflows` deletes with it (ON DELETE CASCADE), so a purge
    leaves no orphan and no table added later can make the purge's DELETE fail; and every
    table with a workflow_id column (other than schedules' last_workflow_id) has one."""
    async with await psycopg.AsyncConnection.connect(database_dsn) as conn:
        cur = await conn.execute(
            "SELECT conrelid::regclass::text, confdeltype FROM pg_constraint"
            " WHERE contype = 'f' AND confrelid = 'workflows'::regclass"
        )
        keys = dict(await cur.fetchall())
        cur = await conn.execute(
            "SELECT table_name FROM information_schema.columns WHERE column_name = 'workflow_id'"
            " AND table_schema = current_schema() AND table_name <> 'workflows'"
        )
        tables = {r[0] for r in await cur.fetchall()}
    assert {"workflow_steps", "workflow_step_attempts", "workflow_events"} <= set(keys)
    assert "workflow_signals" in keys
    assert all(kind == "c" for kind in keys.values()), keys
    assert tables <= set(keys), tables - set(keys)


async def test_a_retried_fan_out_runs_its_items_again(suite, gateway_channel, database_dsn) -> None:
    """A fail-fast fan-out whose item failed for good is retried: its items are made
    again (their attempt numbers continue after the recorded ones: no attempt is recorded
    twice), and the step's output lists every item in order."""
    token = await new_user(suite, gateway_channel)
    wf = await submit(
        gateway_channel,
        token,
        spec(
            {
                "name": "each",
                "op": "noop",
                "for_each": "${input.items}",
                "inputs": {"echo": "${item.k}", "fail_times": "${item.f}"},
                "retry_policy": {"max_attempts": 2, "initial_backoff_seconds": 0.05},
            },
            input={"items": [{"k": "a", "f": 0}, {"k": "b", "f": 2}, {"k": "c", "f": 0}]},
        ),
    )
    failed = await finish(gateway_channel, token, wf.workflow_id)
    assert failed.state == wf_pb.WORKFLOW_STATE_FAILED, failed
    await _retry(gateway_channel, token, wf.workflow_id)
    await watch(gateway_channel, token, wf.workflow_id)
    done = await get(gateway_channel, token, wf.workflow_id)
    assert done.state == wf_pb.WORKFLOW_STATE_SUCCEEDED, done
    items = json_format.MessageToDict(step_status(done, "each").output)["items"]
    assert [i["echo"] for i in items] == ["a", "b", "c"]
    assert items[1]["attempt"] == 3  # after the two recorded failures
    async with await psycopg.AsyncConnection.connect(database_dsn) as conn:
        cur = await conn.execute(
            "SELECT step_name, array_agg(attempt ORDER BY attempt) FROM workflow_step_attempts"
            " WHERE workflow_id = %s AND step_name LIKE 'each[%%' GROUP BY 1 ORDER BY 1",
            (wf.workflow_id,),
        )
        attempts = dict(await cur.fetchall())
    assert attempts["each[1]"] == [1, 2, 3], attempts


async def test_a_retried_conditional_step_has_its_condition_evaluated_again(
    suite, gateway_channel
) -> None:
    """A step whose condition errored is retried: the condition is evaluated again (and
    fails the same way), the step is not run unconditionally."""
    token = await new_user(suite, gateway_channel)
    wf = await submit(
        gateway_channel,
        token,
        spec({"name": "gated", "op": "noop", "when": "input.missing > 1.0"}, input={"x": 1}),
    )
    failed = await finish(gateway_channel, token, wf.workflow_id)
    assert failed.state == wf_pb.WORKFLOW_STATE_FAILED, failed
    await _retry(gateway_channel, token, wf.workflow_id)
    again = await finish(gateway_channel, token, wf.workflow_id)
    assert again.state == wf_pb.WORKFLOW_STATE_FAILED, again
    gated = step_status(again, "gated")
    assert gated.state == wf_pb.STEP_STATE_FAILED and gated.attempts == 0, gated
    assert "input.missing > 1.0" in gated.error
