"""Concurrency keys (`WorkflowSpec.concurrency`) through the real gateway: at most `max`
workflows of one owner's key are active at once, the rest wait queued and start in submit
order as running ones finish in any terminal state; another key or another owner is not
held back; bad keys are field violations; two dataplatform replicas never over-admit."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import grpc
import psycopg
import pytest

from aiwfe.data.v1 import workflow_store_service_pb2 as store_pb
from aiwfe.data.v1 import workflow_store_service_pb2_grpc as store_grpc
from aiwfe.runtime import metrics
from aiwfe.runtime.config import TaskProcSettings
from aiwfe.runtime.identity import IDENTITY_METADATA_KEY, InternalIdentity
from aiwfe.runtime.server import start_service
from aiwfe.taskproc.v1 import schedule_service_pb2 as sched_pb
from aiwfe.taskproc.v1 import schedule_service_pb2_grpc as sched_grpc
from aiwfe.taskproc.v1 import workflow_service_pb2 as wf_pb
from aiwfe.taskproc.v1 import workflow_service_pb2_grpc as wf_grpc
from dataplatform.service import DataPlatformService
from taskproc.spec import validate
from tests.conftest import bearer, field_violations
from tests.taskproc.helpers import finish, get, new_user, spec, step_status, submit, watch

RUNNING = wf_pb.STEP_STATE_RUNNING
# A step no worker polls for: its workflow stays active until stopped.
STUCK = {"name": "a", "op": "task", "inputs": {"queue": "nobody-polls", "type": "t", "input": 1}}


def keyed(customer: str, max_: int, *steps: dict[str, Any], **fields: Any) -> wf_pb.WorkflowSpec:
    """A workflow keyed on its input's customer."""
    return spec(
        *(steps or ({"name": "a", "op": "noop", "inputs": {"sleep_ms": 600}},)),
        concurrency={"key": "${input.customer}", "max": max_},
        input={"customer": customer},
        **fields,
    )


async def run_span(channel: grpc.aio.Channel, token: str, wid: str) -> tuple[float, float, list]:
    """When the workflow's first step started and when the workflow ended (event times, in
    seconds), and its events; waits until it is terminal."""
    events = await watch(channel, token, wid)
    started = min(e.event_time.ToNanoseconds() for e in events if e.step_state == RUNNING)
    ended = events[-1].event_time.ToNanoseconds()
    return started / 1e9, ended / 1e9, events


def most_at_once(spans: list[tuple[float, float]]) -> int:
    """The largest number of [start, end] intervals that overlap at one instant."""
    edges = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans])
    now = peak = 0
    for _, step in edges:
        now += step
        peak = max(peak, now)
    return peak


async def cancel(channel: grpc.aio.Channel, token: str, wid: str) -> wf_pb.Workflow:
    reply = await wf_grpc.WorkflowServiceStub(channel).CancelWorkflow(
        wf_pb.CancelWorkflowRequest(workflow_id=wid), metadata=bearer(token), timeout=10
    )
    return reply.workflow


async def test_at_most_max_run_at_once_in_submit_order(suite, gateway_channel) -> None:
    """Five workflows of one key with max 2: never more than two run at once, two do run
    together, they start in submit order, the waiting ones say they are queued, and a
    workflow of another key submitted last starts at once."""
    token = await new_user(suite, gateway_channel)
    # Steps of 1.5 s: the sixth submission must be in before the first step ends, which
    # 0.6 s did not always leave on a loaded machine (each submit a round trip or more).
    acme = keyed("acme", 2, {"name": "a", "op": "noop", "inputs": {"sleep_ms": 1500}})
    ids = [(await submit(gateway_channel, token, acme)).workflow_id for _ in range(5)]
    other = (await submit(gateway_channel, token, keyed("globex", 2))).workflow_id
    spans = [await run_span(gateway_channel, token, wid) for wid in ids]
    other_start, _, _ = await run_span(gateway_channel, token, other)
    for wid in ids:
        assert (await get(gateway_channel, token, wid)).state == wf_pb.WORKFLOW_STATE_SUCCEEDED
    assert most_at_once([(s, e) for s, e, _ in spans]) == 2, spans
    starts = [s for s, _, _ in spans]
    # Workflows admitted in one transaction start in one claim, in any order among them.
    late = [(i, j) for i in range(5) for j in range(i + 1, 5) if starts[j] < starts[i] - 0.1]
    assert not late, f"started out of submit order: {late} {starts}"
    queued = [any(e.message.startswith("queued:") for e in ev) for _, _, ev in spans]
    assert queued == [False, False, True, True, True], queued
    # globex was submitted after all five, yet ran before the third acme one started.
    assert other_start < starts[2], (other_start, starts)


async def test_keys_are_scoped_to_their_owner(suite, gateway_channel) -> None:
    """Two users' workflows with the same key and max 1 run at the same time: one user's
    key never holds back another's workflows."""
    ann, bob = await new_user(suite, gateway_channel), await new_user(suite, gateway_channel)
    slow = {"name": "a", "op": "noop", "inputs": {"sleep_ms": 1500}}
    first = await submit(gateway_channel, ann, keyed("shared", 1, slow))
    second = await submit(gateway_channel, bob, keyed("shared", 1, slow))
    (a_start, a_end, _), (b_start, b_end, b_events) = await asyncio.gather(
        run_span(gateway_channel, ann, first.workflow_id),
        run_span(gateway_channel, bob, second.workflow_id),
    )
    assert b_start < a_end and a_start < b_end, "the same key of two owners ran one by one"
    assert not any(e.message.startswith("queued:") for e in b_events)


async def test_a_cancelled_queued_workflow_leaves_the_queue(suite, gateway_channel) -> None:
    """With max 1, the queue shows in the gauge; cancelling the second (queued) workflow
    ends it without running a step, and the third one starts when the first finishes."""
    token = await new_user(suite, gateway_channel)
    slow = {"name": "a", "op": "noop", "inputs": {"sleep_ms": 1000}}
    first, second, third = [
        (await submit(gateway_channel, token, keyed("acme", 1, slow))).workflow_id for _ in range(3)
    ]
    # The sweep's gauge counts the two waiting workflows.
    until = time.monotonic() + 5
    while (metrics.REGISTRY.get_sample_value("workflow_concurrency_queued") or 0) < 2:
        assert time.monotonic() < until, "workflow_concurrency_queued never counted the queue"
        await asyncio.sleep(0.05)
    stopped = await cancel(gateway_channel, token, second)
    assert stopped.state == wf_pb.WORKFLOW_STATE_CANCELLED
    _, first_end, _ = await run_span(gateway_channel, token, first)
    third_start, _, _ = await run_span(gateway_channel, token, third)
    assert third_start >= first_end
    cancelled = await get(gateway_channel, token, second)
    assert cancelled.state == wf_pb.WORKFLOW_STATE_CANCELLED
    assert step_status(cancelled, "a").attempts == 0, "a queued workflow's step ran"
    done = await get(gateway_channel, token, third)
    assert done.state == wf_pb.WORKFLOW_STATE_SUCCEEDED


@pytest.mark.parametrize("ending", ["failed", "cancelled", "timed_out"])
async def test_a_running_workflow_ending_admits_the_next(suite, gateway_channel, ending) -> None:
    """With max 1, the queued workflow starts once the running one fails, is cancelled or
    times out (every way a workflow finishes frees its slot), and not before."""
    token = await new_user(suite, gateway_channel)
    if ending == "failed":
        head = {"name": "a", "op": "noop", "inputs": {"sleep_ms": 500, "fail": "permanent"}}
        first_spec = keyed("acme", 1, head)
    else:
        first_spec = keyed("acme", 1, STUCK, timeout_seconds=1 if ending == "timed_out" else 60)
    first = (await submit(gateway_channel, token, first_spec)).workflow_id
    nxt = (await submit(gateway_channel, token, keyed("acme", 1))).workflow_id
    if ending == "cancelled":
        await asyncio.sleep(0.5)
        assert (await get(gateway_channel, token, nxt)).state == wf_pb.WORKFLOW_STATE_PENDING
        await cancel(gateway_channel, token, first)
    ended = await finish(gateway_channel, token, first)
    assert (
        ended.state
        == {
            "failed": wf_pb.WORKFLOW_STATE_FAILED,
            "cancelled": wf_pb.WORKFLOW_STATE_CANCELLED,
            "timed_out": wf_pb.WORKFLOW_STATE_TIMED_OUT,
        }[ending]
    )
    first_end = (await watch(gateway_channel, token, first))[-1].event_time.ToNanoseconds()
    next_start, _, _ = await run_span(gateway_channel, token, nxt)
    assert next_start >= first_end / 1e9
    assert (await get(gateway_channel, token, nxt)).state == wf_pb.WORKFLOW_STATE_SUCCEEDED


async def test_the_timeout_runs_while_queued(suite, gateway_channel) -> None:
    """A queued workflow whose timeout passes while it waits ends TIMED_OUT without running
    a step, and leaves the queue."""
    token = await new_user(suite, gateway_channel)
    first = (await submit(gateway_channel, token, keyed("acme", 1, STUCK))).workflow_id
    waiting = (
        await submit(gateway_channel, token, keyed("acme", 1, timeout_seconds=1))
    ).workflow_id
    done = await finish(gateway_channel, token, waiting, timeout=15)
    assert done.state == wf_pb.WORKFLOW_STATE_TIMED_OUT
    assert step_status(done, "a").attempts == 0
    await cancel(gateway_channel, token, first)


@pytest.mark.parametrize(
    ("concurrency", "workflow_input", "field", "fragment"),
    [
        ({"key": "${input.nope}", "max": 1}, {}, "spec.concurrency.key", "no 'nope'"),
        ({"key": "", "max": 1}, {}, "spec.concurrency.key", "must not be empty"),
        ({"key": "${input.c}", "max": 1}, {"c": ""}, "spec.concurrency.key", "must not be empty"),
        ({"key": "${input}", "max": 1}, {"c": 1}, "spec.concurrency.key", "string or a number"),
        ({"key": "k" * 257, "max": 1}, {}, "spec.concurrency.key", "at most 256"),
        ({"key": "${input.c}", "max": 1}, {"c": "x" * 300}, "spec.concurrency.key", "at most 256"),
        ({"key": "k", "max": 0}, {}, "spec.concurrency.max", "between 1 and 1000"),
        ({"key": "k", "max": 1001}, {}, "spec.concurrency.max", "between 1 and 1000"),
    ],
)
async def test_bad_concurrency_is_a_field_violation(
    suite, gateway_channel, concurrency, workflow_input, field, fragment
) -> None:
    token = await new_user(suite, gateway_channel)
    extra = {"input": workflow_input} if workflow_input else {}
    workflow = spec({"name": "a", "op": "noop"}, concurrency=concurrency, **extra)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await submit(gateway_channel, token, workflow)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    violations = field_violations(err.value)
    assert fragment in violations.get(field, ""), violations


async def test_a_numeric_key_is_formatted_as_text(suite, gateway_channel) -> None:
    """`${input.tenant}` holding 42 becomes the key "42" (no ".0"), stored with the spec."""
    token = await new_user(suite, gateway_channel)
    workflow = spec(
        {"name": "a", "op": "noop"},
        concurrency={"key": "tenant-${input.tenant}", "max": 1},
        input={"tenant": 42},
    )
    accepted = await submit(gateway_channel, token, workflow)
    assert accepted.spec.concurrency.key == "tenant-42"
    whole = spec(
        {"name": "a", "op": "noop"}, concurrency={"key": "${input.t}", "max": 1}, input={"t": 7}
    )
    assert (await submit(gateway_channel, token, whole)).spec.concurrency.key == "7"


async def test_two_replicas_never_admit_more_than_max(suite, gateway_channel) -> None:
    """Twelve workflows of one key (max 2) submitted at once through two dataplatform
    replicas, their task steps claimed and completed through both: never more than two
    are admitted or leased at any moment, and all twelve finish."""
    other = await start_service(DataPlatformService(suite.settings), "127.0.0.1", 0)
    identity = InternalIdentity.from_settings(suite.settings)
    md = ((IDENTITY_METADATA_KEY, identity.assertion(None, "tests")),)
    queue = f"q{uuid.uuid4().hex[:8]}"
    owner = f"owner{uuid.uuid4().hex[:8]}"
    workflow = validate(
        spec(
            {"name": "a", "op": "task", "inputs": {"queue": queue, "type": "t", "input": 1}},
            concurrency={"key": "k", "max": 2},
        ),
        TaskProcSettings(),
    )
    dsn = suite.settings.database.postgres.dsn
    try:
        async with (
            grpc.aio.insecure_channel(suite.address("dataplatform")) as one,
            grpc.aio.insecure_channel(f"127.0.0.1:{other.port}") as two,
        ):
            stubs = [store_grpc.WorkflowStoreServiceStub(ch) for ch in (one, two)]
            request = store_pb.CreateWorkflowRequest(
                owner=store_pb.WorkflowOwner(user_id=owner, username=owner), spec=workflow
            )
            created = await asyncio.gather(
                *(stubs[i % 2].CreateWorkflow(request, metadata=md, timeout=10) for i in range(12))
            )
            ids = {c.workflow.workflow_id for c in created}
            leased: set[str] = set()
            peak_leased = peak_admitted = 0
            done: set[str] = set()

            async def work(stub: Any, worker: str) -> None:
                nonlocal peak_leased
                while len(done) < 12:
                    claimed = await stub.ClaimSteps(
                        store_pb.ClaimStepsRequest(
                            worker_id=worker, max_steps=10, lease_seconds=30, queues=[queue]
                        ),
                        metadata=md,
                        timeout=10,
                    )
                    if not claimed.steps:
                        await asyncio.sleep(0.01)
                        continue
                    refs = [s.ref for s in claimed.steps]
                    leased.update(r.workflow_id for r in refs)
                    peak_leased = max(peak_leased, len(leased))
                    await asyncio.sleep(0.05)
                    leased.difference_update(r.workflow_id for r in refs)
                    await stub.CompleteSteps(
                        store_pb.CompleteStepsRequest(
                            worker_id=worker,
                            results=[store_pb.StepResult(ref=r) for r in refs],
                        ),
                        metadata=md,
                        timeout=10,
                    )
                    done.update(r.workflow_id for r in refs)

            async def sample() -> None:
                nonlocal peak_admitted
                async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
                    while len(done) < 12:
                        cur = await conn.execute(
                            "SELECT count(*) FROM workflows WHERE owner_id = %s"
                            " AND admitted AND state IN (1, 2)",
                            (owner,),
                        )
                        row = await cur.fetchone()
                        peak_admitted = max(peak_admitted, row[0] if row else 0)
                        await asyncio.sleep(0.005)

            end = time.monotonic() + 30
            await asyncio.wait_for(
                asyncio.gather(
                    work(stubs[0], "w-one"),
                    work(stubs[1], "w-two"),
                    work(stubs[1], "w-three"),
                    sample(),
                ),
                timeout=end - time.monotonic(),
            )
    finally:
        await other.stop(grace=0.5)
    assert done == ids
    assert peak_leased == 2, peak_leased
    assert peak_admitted == 2, peak_admitted


async def test_a_queued_workflow_starts_its_timers_and_takes_signals_when_admitted(
    suite, gateway_channel
) -> None:
    """Behind a running workflow (max 1), a queued one's root `sleep` counts from its
    admission, not its submit; a signal sent to a queued one is kept and delivered then."""
    token = await new_user(suite, gateway_channel)
    slow = {"name": "a", "op": "noop", "inputs": {"sleep_ms": 1500}}
    first = (await submit(gateway_channel, token, keyed("acme", 1, slow))).workflow_id
    nap = (
        await submit(
            gateway_channel,
            token,
            keyed("acme", 1, {"name": "a", "op": "sleep", "inputs": {"seconds": 1}}),
        )
    ).workflow_id
    waits = (
        await submit(
            gateway_channel,
            token,
            keyed("acme", 1, {"name": "a", "op": "wait_for_signal", "inputs": {"name": "go"}}),
        )
    ).workflow_id
    sent = await wf_grpc.WorkflowServiceStub(gateway_channel).SignalWorkflow(
        wf_pb.SignalWorkflowRequest(workflow_id=waits, name="go"),
        metadata=bearer(token),
        timeout=10,
    )
    assert not sent.delivered, "a queued workflow's step took a signal"
    first_end = (await watch(gateway_channel, token, first))[-1].event_time.ToNanoseconds()
    nap_end = (await watch(gateway_channel, token, nap))[-1].event_time.ToNanoseconds()
    # From submit it would end ~0.5 s *before* `first`; event times are taken within
    # their transactions, so admission and `first`'s end differ by a few ms (0.998 s once).
    assert nap_end - first_end >= 0.95e9, "the queued sleep counted from submit"
    done = await finish(gateway_channel, token, waits)
    assert done.state == wf_pb.WORKFLOW_STATE_SUCCEEDED
    assert (await get(gateway_channel, token, nap)).state == wf_pb.WORKFLOW_STATE_SUCCEEDED


async def test_run_workflow_streams_every_event_of_a_queued_workflow(
    suite, gateway_channel
) -> None:
    """RunWorkflow of a workflow that waits behind another streams a gap-free history:
    submitted, queued, admitted, its step, succeeded."""
    token = await new_user(suite, gateway_channel)
    slow = {"name": "a", "op": "noop", "inputs": {"sleep_ms": 500}}
    await submit(gateway_channel, token, keyed("acme", 1, slow))
    stream = wf_grpc.WorkflowServiceStub(gateway_channel).RunWorkflow(
        wf_pb.RunWorkflowRequest(spec=keyed("acme", 1)), metadata=bearer(token), timeout=30
    )
    events = [r.event async for r in stream if r.HasField("event")]
    assert [e.sequence for e in events] == list(range(1, len(events) + 1))
    messages = [e.message for e in events if not e.step_name]
    assert messages[0] == "workflow submitted"
    assert messages[1].startswith("queued: concurrency key 'acme'"), messages
    assert messages[2] == "admitted: concurrency key 'acme'", messages
    assert events[-1].workflow_state == wf_pb.WORKFLOW_STATE_SUCCEEDED


async def test_the_store_refuses_an_unbounded_concurrency_spec(suite) -> None:
    """dataplatform checks the bounds itself (a caller other than taskproc's validation):
    an oversized key or a max of 0 is INVALID_ARGUMENT naming both fields."""
    identity = InternalIdentity.from_settings(suite.settings)
    md = ((IDENTITY_METADATA_KEY, identity.assertion(None, "tests")),)
    workflow = validate(spec({"name": "a", "op": "noop"}), TaskProcSettings())
    workflow.concurrency.key, workflow.concurrency.max = "k" * 257, 0
    async with grpc.aio.insecure_channel(suite.address("dataplatform")) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await store_grpc.WorkflowStoreServiceStub(ch).CreateWorkflow(
                store_pb.CreateWorkflowRequest(
                    owner=store_pb.WorkflowOwner(user_id="u", username="u"), spec=workflow
                ),
                metadata=md,
                timeout=10,
            )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    violations = field_violations(err.value)
    assert {"spec.concurrency.key", "spec.concurrency.max"} <= violations.keys(), violations


async def test_scheduled_workflows_share_their_owners_key(suite, gateway_channel) -> None:
    """A schedule's workflows are queued by their key like submitted ones (created in the
    ticker's transaction): with max 1 the second trigger waits until the first is
    cancelled, then is admitted."""
    token = await new_user(suite, gateway_channel)
    schedules = sched_grpc.ScheduleServiceStub(gateway_channel)
    created = await schedules.CreateSchedule(
        sched_pb.CreateScheduleRequest(
            name="keyed",
            cron="0 3 1 1 *",
            spec=keyed("acme", 1, STUCK),
            paused=True,
            overlap_policy=sched_pb.OVERLAP_POLICY_ALLOW_ALL,
        ),
        metadata=bearer(token),
        timeout=10,
    )
    sid = created.schedule.schedule_id
    try:
        first, second = [
            (
                await schedules.TriggerSchedule(
                    sched_pb.TriggerScheduleRequest(schedule_id=sid),
                    metadata=bearer(token),
                    timeout=10,
                )
            ).workflow.workflow_id
            for _ in range(2)
        ]
        await cancel(gateway_channel, token, first)
        await cancel(gateway_channel, token, second)
        history = [
            e.message for e in await watch(gateway_channel, token, second) if not e.step_name
        ]
        assert history[1].startswith("queued:"), history
        assert history[2] == "admitted: concurrency key 'acme'", history
    finally:
        await schedules.DeleteSchedule(
            sched_pb.DeleteScheduleRequest(schedule_id=sid), metadata=bearer(token), timeout=10
        )


async def test_a_retried_keyed_workflow_waits_for_a_slot(suite, gateway_channel) -> None:
    """RetryWorkflow of a keyed workflow queues it again: while another workflow of its key
    holds the only slot, its failed step does not run; once that one ends, it does."""
    token = await new_user(suite, gateway_channel)
    failing = {"name": "a", "op": "noop", "inputs": {"fail": "permanent"}}
    first = (await submit(gateway_channel, token, keyed("acme", 1, failing))).workflow_id
    assert (await finish(gateway_channel, token, first)).state == wf_pb.WORKFLOW_STATE_FAILED
    holder = (await submit(gateway_channel, token, keyed("acme", 1, STUCK))).workflow_id
    stub = wf_grpc.WorkflowServiceStub(gateway_channel)
    await stub.RetryWorkflow(
        wf_pb.RetryWorkflowRequest(workflow_id=first), metadata=bearer(token), timeout=10
    )
    await asyncio.sleep(1.0)
    waiting = await get(gateway_channel, token, first)
    assert step_status(waiting, "a").attempts == 1, waiting  # not run again yet
    assert step_status(waiting, "a").state == wf_pb.STEP_STATE_PENDING
    await cancel(gateway_channel, token, holder)
    again = await finish(gateway_channel, token, first)
    assert again.state == wf_pb.WORKFLOW_STATE_FAILED
    assert step_status(again, "a").attempts == 2  # ran once the slot was free
    messages = [e.message for e in await watch(gateway_channel, token, first)]
    retried = messages.index(next(m for m in messages if m.startswith("workflow retried")))
    assert any(m.startswith("queued: concurrency key 'acme'") for m in messages[retried:])
