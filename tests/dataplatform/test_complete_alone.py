"""A step's completion in one call (migration 015, `wf_complete_steps`): a batch that needs
nothing more is completed by one autocommit statement, durable when it returns; a batch
that needs more (a dependant with a condition, a timer, a concurrency key, a fan-out item)
is left untouched by it and completed by the whole transaction instead."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import grpc
import psycopg
import pytest

from aiwfe.data.v1 import workflow_store_service_pb2 as store_pb
from aiwfe.data.v1 import workflow_store_service_pb2_grpc as store_grpc
from aiwfe.runtime.server import RunningService
from aiwfe.taskproc.v1 import workflow_service_pb2 as wf_pb
from dataplatform.workflows.repository import Eager, WorkflowRepository, step_refs
from tests.dataplatform.conftest import attempt_rows
from tests.dataplatform.test_eager_dispatch import _complete, _create, _events, _refs

S = wf_pb


def _repo(dataplatform: RunningService) -> WorkflowRepository:
    return dataplatform.service.workflows.repo  # type: ignore[attr-defined]


async def _alone(repo: WorkflowRepository, step: Any, worker: str = "eager") -> Any:
    """The autocommit path, as CompleteSteps takes it first."""
    refs = step_refs([step.ref])
    eager = Eager(8, 30.0)
    got = await repo.tx(
        lambda conn: repo.complete_alone(conn, worker, refs, [json.dumps({"x": 1})], eager),
        alone=True,
    )
    return got, eager


async def _step_row(dataplatform: RunningService, wid: str, name: str) -> tuple:
    """(state, attempt, lease_owner) of a step, read on a connection of its own."""
    dsn = dataplatform.service.settings.database.postgres.dsn
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute(
            "SELECT state, attempt, lease_owner FROM workflow_steps"
            " WHERE workflow_id = %s AND name = %s",
            (wid, name),
        )
        row = await cur.fetchone()
        assert row is not None
        return tuple(row)


async def test_a_plain_completion_is_one_committed_call(
    dataplatform: RunningService, data_channel: grpc.aio.Channel, internal_md
) -> None:
    """a → b: completing a alone records it, leases b to the worker with its events and
    commits, all in the one call; completing b the same way finishes the workflow."""
    stub = store_grpc.WorkflowStoreServiceStub(data_channel)
    created = await stub.CreateWorkflow(
        _create({"name": "a", "op": "noop"}, {"name": "b", "op": "noop", "depends_on": ["a"]}),
        metadata=internal_md,
        timeout=10,
    )
    wid = created.workflow.workflow_id
    (a,) = created.eager_steps
    repo = _repo(dataplatform)
    got, eager = await _alone(repo, a)
    assert got is not None
    done, _ = got
    assert [(str(r["workflow_id"]), r["name"], r["ord"]) for r in done] == [(wid, "a", 1)]
    assert _refs(eager.steps) == [(wid, "b", 1)]
    assert await _step_row(dataplatform, wid, "a") == (int(S.STEP_STATE_SUCCEEDED), 1, None)
    assert await _step_row(dataplatform, wid, "b") == (int(S.STEP_STATE_RUNNING), 1, "eager")
    got, eager = await _alone(repo, eager.steps[0])
    assert got is not None and not eager.steps
    run, ok = S.WORKFLOW_STATE_RUNNING, S.STEP_STATE_SUCCEEDED
    assert await _events(stub, internal_md, wid) == [
        (S.WORKFLOW_STATE_PENDING, "", 0, "workflow submitted"),
        (run, "a", S.STEP_STATE_RUNNING, "attempt 1"),
        (run, "a", ok, "attempt 1"),
        (run, "b", S.STEP_STATE_RUNNING, "attempt 1"),
        (S.WORKFLOW_STATE_SUCCEEDED, "b", ok, "attempt 1"),  # one append: the new state
        (S.WORKFLOW_STATE_SUCCEEDED, "", 0, "workflow succeeded"),
    ]
    assert await attempt_rows(dataplatform, wid) == [
        ("a", 1, "eager", True, ""),
        ("b", 1, "eager", True, ""),
    ]


@pytest.mark.parametrize(
    ("dependant", "fields"),
    [
        ({"name": "b", "op": "noop", "depends_on": ["a"], "when": "true"}, {}),
        ({"name": "b", "op": "sleep", "depends_on": ["a"], "inputs": {"seconds": 60}}, {}),
        ({"name": "b", "op": "noop", "depends_on": ["a"]}, {"concurrency": {"key": "k", "max": 1}}),
    ],
    ids=["condition", "timer", "concurrency-key"],
)
async def test_a_completion_that_needs_more_is_left_to_the_transaction(
    dataplatform: RunningService,
    data_channel: grpc.aio.Channel,
    internal_md,
    dependant: dict[str, Any],
    fields: dict[str, Any],
) -> None:
    """The one call changes nothing (a stays RUNNING, no attempt row, no event) and says
    so; CompleteSteps then completes a in the transaction that evaluates the condition,
    starts the timer or frees the slot."""
    stub = store_grpc.WorkflowStoreServiceStub(data_channel)
    created = await stub.CreateWorkflow(
        _create({"name": "a", "op": "noop"}, dependant, **fields),
        metadata=internal_md,
        timeout=10,
    )
    wid = created.workflow.workflow_id
    if created.eager_steps:
        (a,) = created.eager_steps
    else:  # a concurrency key's workflow is admitted first, then claimed
        reply = await stub.ClaimSteps(
            store_pb.ClaimStepsRequest(worker_id="eager", max_steps=1000, lease_seconds=30),
            metadata=internal_md,
            timeout=10,
        )
        (a,) = [s for s in reply.steps if s.ref.workflow_id == wid]
    before = await _events(stub, internal_md, wid)
    got, _ = await _alone(_repo(dataplatform), a)
    assert got is None
    assert await _step_row(dataplatform, wid, "a") == (int(S.STEP_STATE_RUNNING), 1, "eager")
    assert await attempt_rows(dataplatform, wid) == []
    assert await _events(stub, internal_md, wid) == before
    assert list((await _complete(stub, internal_md, "eager", a)).accepted) == [True]
    assert await attempt_rows(dataplatform, wid) == [("a", 1, "eager", True, "")]


async def test_sibling_results_completed_at_once_finish_their_workflow_once(
    dataplatform: RunningService, data_channel: grpc.aio.Channel, internal_md
) -> None:
    """Two roots a and b completed by concurrent calls: whichever commits last sees the
    other's result (its finished check follows the workflow row lock, a fresh snapshot in
    the function), so every workflow succeeds, with one "workflow succeeded" event."""
    stub = store_grpc.WorkflowStoreServiceStub(data_channel)
    wids = []
    for _ in range(10):
        created = await stub.CreateWorkflow(
            _create({"name": "a", "op": "noop"}, {"name": "b", "op": "noop"}),
            metadata=internal_md,
            timeout=10,
        )
        a, b = created.eager_steps
        replies = await asyncio.gather(
            _complete(stub, internal_md, "eager", a), _complete(stub, internal_md, "eager", b)
        )
        assert [list(r.accepted) for r in replies] == [[True], [True]]
        wids.append(created.workflow.workflow_id)
    for wid in wids:
        events = await _events(stub, internal_md, wid)
        assert events[-1] == (S.WORKFLOW_STATE_SUCCEEDED, "", 0, "workflow succeeded"), events
        assert sum(1 for e in events if e[3] == "workflow succeeded") == 1
