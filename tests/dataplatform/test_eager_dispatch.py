"""Eager dispatch: CreateWorkflow and CompleteSteps lease the built-in steps they make
runnable to the calling worker in the same statement/transaction and return them, with
the same leases, fencing and events as ClaimSteps; timers, not_before, conditions,
concurrency keys, fan-outs and higher-priority work are left to the claim."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
from google.protobuf import timestamp_pb2

from aiwfe.data.v1 import workflow_store_service_pb2 as store_pb
from aiwfe.data.v1 import workflow_store_service_pb2_grpc as store_grpc
from aiwfe.runtime.config import TaskProcSettings
from aiwfe.runtime.server import RunningService
from aiwfe.taskproc.v1 import workflow_service_pb2 as wf_pb
from taskproc.spec import validate
from tests.dataplatform.conftest import attempt_rows
from tests.taskproc.helpers import spec

S = wf_pb  # enum names


def _create(
    *steps: dict[str, Any], worker: str = "eager", max_steps: int = 8, lease: float = 30, **fields
) -> store_pb.CreateWorkflowRequest:
    owner = f"eager{time.time_ns()}"
    return store_pb.CreateWorkflowRequest(
        owner=store_pb.WorkflowOwner(user_id=owner, username=owner),
        spec=validate(spec(*steps, **fields), TaskProcSettings()),
        eager_worker_id=worker,
        eager_max_steps=max_steps if worker else 0,
        eager_lease_seconds=lease if worker else 0,
    )


def _refs(steps) -> list[tuple[str, str, int]]:
    return [(s.ref.workflow_id, s.ref.step_name, s.ref.attempt) for s in steps]


async def _claim_mine(stub, md, wid: str, worker: str = "other") -> list:
    """What another worker's ClaimSteps gets of workflow `wid` (others' leftovers aside)."""
    reply = await stub.ClaimSteps(
        store_pb.ClaimStepsRequest(worker_id=worker, max_steps=1000, lease_seconds=30),
        metadata=md,
        timeout=10,
    )
    return [s for s in reply.steps if s.ref.workflow_id == wid]


async def _events(stub, md, wid: str) -> list[tuple[int, str, int, str]]:
    reply = await stub.ListWorkflowEvents(
        store_pb.ListWorkflowEventsRequest(
            workflow_id=wid, scope=store_pb.WorkflowScope(all_owners=True)
        ),
        metadata=md,
        timeout=10,
    )
    return [(e.workflow_state, e.step_name, e.step_state, e.message) for e in reply.events]


async def _complete(stub, md, worker: str, step, eager: int = 8):
    result = store_pb.StepResult(ref=step.ref)
    result.output.update({"echo": step.ref.step_name})
    return await stub.CompleteSteps(
        store_pb.CompleteStepsRequest(
            worker_id=worker,
            results=[result],
            eager_max_steps=eager,
            eager_lease_seconds=30 if eager else 0,
        ),
        metadata=md,
        timeout=10,
    )


async def test_create_and_complete_lease_runnable_steps_to_the_caller(
    dataplatform: RunningService, data_channel: grpc.aio.Channel, internal_md
) -> None:
    """A chain a → b and a second root c: CreateWorkflow returns a and c leased (attempt 1,
    RUNNING events after the submitted one, the reply itself as submitted); no other worker
    can claim them; completing a returns b leased with a's output; each attempt is recorded
    exactly once and a second completion of a is refused."""
    stub = store_grpc.WorkflowStoreServiceStub(data_channel)
    created = await stub.CreateWorkflow(
        _create(
            {"name": "a", "op": "noop"},
            {
                "name": "b",
                "op": "noop",
                "depends_on": ["a"],
                "inputs": {"echo": "${steps.a.output.echo}"},
            },
            {"name": "c", "op": "noop"},
        ),
        metadata=internal_md,
        timeout=10,
    )
    wid = created.workflow.workflow_id
    assert created.workflow.state == S.WORKFLOW_STATE_PENDING
    assert _refs(created.eager_steps) == [(wid, "a", 1), (wid, "c", 1)]
    assert all(s.lease_expire_time.seconds > time.time() + 20 for s in created.eager_steps)
    assert await _claim_mine(stub, internal_md, wid) == []
    running = S.STEP_STATE_RUNNING
    run_wf = S.WORKFLOW_STATE_RUNNING
    assert await _events(stub, internal_md, wid) == [
        (S.WORKFLOW_STATE_PENDING, "", 0, "workflow submitted"),
        (run_wf, "a", running, "attempt 1"),
        (run_wf, "c", running, "attempt 1"),
    ]
    a, c = created.eager_steps
    done = await _complete(stub, internal_md, "eager", a)
    assert list(done.accepted) == [True]
    assert _refs(done.eager_steps) == [(wid, "b", 1)]
    assert dict(done.eager_steps[0].dependency_outputs)["a"]["echo"] == "a"
    assert await _claim_mine(stub, internal_md, wid) == []
    again = await _complete(stub, internal_md, "eager", a)
    assert list(again.accepted) == [False] and not again.eager_steps
    for step in (c, done.eager_steps[0]):
        assert list((await _complete(stub, internal_md, "eager", step)).accepted) == [True]
    got = await stub.GetStoredWorkflow(
        store_pb.GetStoredWorkflowRequest(
            workflow_id=wid, scope=store_pb.WorkflowScope(all_owners=True)
        ),
        metadata=internal_md,
        timeout=10,
    )
    assert got.workflow.state == S.WORKFLOW_STATE_SUCCEEDED
    assert await attempt_rows(dataplatform, wid) == [
        ("a", 1, "eager", True, ""),
        ("b", 1, "eager", True, ""),
        ("c", 1, "eager", True, ""),
    ]


async def test_without_eager_fields_nothing_is_leased(
    dataplatform: RunningService, data_channel: grpc.aio.Channel, internal_md
) -> None:
    """A caller that asks for no eager dispatch gets none: the steps wait for ClaimSteps."""
    stub = store_grpc.WorkflowStoreServiceStub(data_channel)
    created = await stub.CreateWorkflow(
        _create(
            {"name": "a", "op": "noop"}, {"name": "b", "op": "noop", "depends_on": ["a"]}, worker=""
        ),
        metadata=internal_md,
        timeout=10,
    )
    wid = created.workflow.workflow_id
    assert not created.eager_steps
    (a,) = await _claim_mine(stub, internal_md, wid, "w1")
    done = await _complete(stub, internal_md, "w1", a, eager=0)
    assert list(done.accepted) == [True] and not done.eager_steps
    assert _refs(await _claim_mine(stub, internal_md, wid, "w2")) == [(wid, "b", 1)]


async def test_a_lapsed_eager_lease_is_claimed_again(
    dataplatform: RunningService, data_channel: grpc.aio.Channel, internal_md
) -> None:
    """A worker that got a step eagerly and died (never ran it) loses it when the lease
    lapses: the attempt is recorded as lost and another worker claims attempt 2, and the
    dead worker's late completion is refused."""
    stub = store_grpc.WorkflowStoreServiceStub(data_channel)
    created = await stub.CreateWorkflow(
        _create({"name": "only", "op": "noop"}, worker="killed", lease=0.2),
        metadata=internal_md,
        timeout=10,
    )
    wid = created.workflow.workflow_id
    assert _refs(created.eager_steps) == [(wid, "only", 1)]
    retried: list = []
    until = time.monotonic() + 10
    while not retried:  # claiming also sweeps expired leases
        assert time.monotonic() < until, "the lapsed step was never handed out again"
        await asyncio.sleep(0.1)
        retried = await _claim_mine(stub, internal_md, wid, "survivor")
    assert _refs(retried) == [(wid, "only", 2)]
    late = await _complete(stub, internal_md, "killed", created.eager_steps[0])
    assert list(late.accepted) == [False]
    assert list((await _complete(stub, internal_md, "survivor", retried[0])).accepted) == [True]
    assert await attempt_rows(dataplatform, wid) == [
        ("only", 1, "killed", False, "lease expired (worker lost)"),
        ("only", 2, "survivor", True, ""),
    ]


async def test_timers_not_before_tasks_and_conditions_are_not_eager(
    dataplatform: RunningService, data_channel: grpc.aio.Channel, internal_md
) -> None:
    """Roots that are a sleep, a step with a not_before ahead or a task are not leased at
    create (only the plain noop is), nor are such dependants on completion; a workflow with
    a condition on a root, a concurrency key or a fan-out gets no eager step at all."""
    stub = store_grpc.WorkflowStoreServiceStub(data_channel)
    later = timestamp_pb2.Timestamp()
    later.FromDatetime(datetime.now(UTC) + timedelta(minutes=5))
    req = _create(
        {"name": "plain", "op": "noop"},
        {"name": "nap", "op": "sleep", "inputs": {"seconds": 60}},
        {"name": "held", "op": "noop"},
        {"name": "ext", "op": "task", "inputs": {"queue": "q", "type": "t", "input": {}}},
        {"name": "after_nap", "op": "sleep", "depends_on": ["plain"], "inputs": {"seconds": 60}},
        {"name": "after_held", "op": "noop", "depends_on": ["plain"]},
    )
    req.spec.steps[2].not_before.CopyFrom(later)
    req.spec.steps[5].not_before.CopyFrom(later)
    created = await stub.CreateWorkflow(req, metadata=internal_md, timeout=10)
    wid = created.workflow.workflow_id
    assert _refs(created.eager_steps) == [(wid, "plain", 1)]
    done = await _complete(stub, internal_md, "eager", created.eager_steps[0])
    assert list(done.accepted) == [True] and not done.eager_steps
    assert await _claim_mine(stub, internal_md, wid) == []  # still ahead
    await stub.CancelStoredWorkflow(
        store_pb.CancelStoredWorkflowRequest(
            workflow_id=wid, scope=store_pb.WorkflowScope(all_owners=True)
        ),
        metadata=internal_md,
        timeout=10,
    )
    for excluded in (
        _create({"name": "a", "op": "noop", "when": "true"}),
        _create({"name": "a", "op": "noop"}, concurrency={"key": "k", "max": 1}),
        _create(
            {"name": "a", "op": "noop", "for_each": "${input.items}"},
            input={"items": [1, 2]},
        ),
    ):
        created = await stub.CreateWorkflow(excluded, metadata=internal_md, timeout=10)
        assert not created.eager_steps, excluded.spec
        await stub.CancelStoredWorkflow(
            store_pb.CancelStoredWorkflowRequest(
                workflow_id=created.workflow.workflow_id,
                scope=store_pb.WorkflowScope(all_owners=True),
            ),
            metadata=internal_md,
            timeout=10,
        )


async def test_higher_priority_work_waiting_keeps_its_turn(
    dataplatform: RunningService, data_channel: grpc.aio.Channel, internal_md
) -> None:
    """While a runnable built-in step of a higher priority waits for a claim, a new
    workflow's root is not leased eagerly: the next ClaimSteps takes the urgent one first;
    once it is claimed, the next submission's root is leased eagerly again."""
    stub = store_grpc.WorkflowStoreServiceStub(data_channel)
    urgent = await stub.CreateWorkflow(
        _create({"name": "u", "op": "noop"}, worker="", priority=1000),
        metadata=internal_md,
        timeout=10,
    )
    try:
        created = await stub.CreateWorkflow(
            _create({"name": "low", "op": "noop"}), metadata=internal_md, timeout=10
        )
        assert not created.eager_steps
        reply = await stub.ClaimSteps(
            store_pb.ClaimStepsRequest(worker_id="w", max_steps=1, lease_seconds=30),
            metadata=internal_md,
            timeout=10,
        )
        assert _refs(reply.steps) == [(urgent.workflow.workflow_id, "u", 1)]
        after = await stub.CreateWorkflow(
            _create({"name": "next", "op": "noop"}), metadata=internal_md, timeout=10
        )  # nothing more urgent waits now
        assert _refs(after.eager_steps) == [(after.workflow.workflow_id, "next", 1)]
    finally:
        for wf in (urgent, created, after):
            await stub.CancelStoredWorkflow(
                store_pb.CancelStoredWorkflowRequest(
                    workflow_id=wf.workflow.workflow_id,
                    scope=store_pb.WorkflowScope(all_owners=True),
                ),
                metadata=internal_md,
                timeout=10,
            )
