"""Eager dispatch through the real suite: taskproc's worker gets a submitted workflow's
root step from CreateWorkflow and each next step of a chain from its own CompleteSteps,
and runs every step exactly once; a fan-out's max_concurrency still holds."""

from __future__ import annotations

import asyncio
import time

import grpc
import psycopg

from aiwfe.data.v1 import workflow_store_service_pb2 as store_pb
from aiwfe.data.v1 import workflow_store_service_pb2_grpc as store_grpc
from aiwfe.runtime.config import TaskProcSettings
from aiwfe.runtime.identity import IDENTITY_METADATA_KEY, InternalIdentity
from aiwfe.taskproc.v1 import workflow_service_pb2 as wf_pb
from aiwfe.taskproc.v1 import workflow_service_pb2_grpc as wf_grpc
from taskproc.spec import validate
from tests.conftest import bearer
from tests.taskproc.helpers import new_user, spec, step_status


async def test_a_chain_runs_on_eager_dispatch_once_per_step(suite, gateway_channel) -> None:
    """RunWorkflow of a → b → c on an idle worker: all three steps reach the worker by eager
    dispatch (none by a claim), each runs once (attempt 1, one attempt row, this worker's),
    outputs flow along the chain and no slot stays reserved."""
    worker = suite.running["taskproc"].service.worker
    token = await new_user(suite, gateway_channel)
    chain = spec(
        {"name": "a", "op": "noop", "inputs": {"echo": "x"}},
        {
            "name": "b",
            "op": "noop",
            "depends_on": ["a"],
            "inputs": {"echo": "${steps.a.output.echo}"},
        },
        {
            "name": "c",
            "op": "noop",
            "depends_on": ["b"],
            "inputs": {"echo": "${steps.b.output.echo}"},
        },
    )
    before = worker.eager_steps
    stream = wf_grpc.WorkflowServiceStub(gateway_channel).RunWorkflow(
        wf_pb.RunWorkflowRequest(spec=chain), metadata=bearer(token), timeout=30
    )
    updates = [u async for u in stream]
    wid = updates[0].workflow.workflow_id
    assert updates[-1].event.workflow_state == wf_pb.WORKFLOW_STATE_SUCCEEDED
    assert worker.eager_steps - before == 3
    assert worker._reserved == 0
    running = [
        (u.event.step_name, u.event.message)
        for u in updates[1:]
        if u.event.step_state == wf_pb.STEP_STATE_RUNNING
    ]
    assert running == [("a", "attempt 1"), ("b", "attempt 1"), ("c", "attempt 1")]
    got = await wf_grpc.WorkflowServiceStub(gateway_channel).GetWorkflow(
        wf_pb.GetWorkflowRequest(workflow_id=wid), metadata=bearer(token), timeout=10
    )
    assert step_status(got.workflow, "c").output["echo"] == "x"
    dsn = suite.settings.database.postgres.dsn
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute(
            "SELECT step_name, attempt, worker_id FROM workflow_step_attempts"
            " WHERE workflow_id = %s ORDER BY step_name",
            (wid,),
        )
        assert await cur.fetchall() == [(n, 1, worker.id) for n in ("a", "b", "c")]


async def test_a_completion_in_flight_leaves_slots_for_submissions(suite) -> None:
    """A CompleteSteps of one result offers its own slot and half the free ones for the
    dependants it may make runnable; the other half stays free, so a submission arriving
    meanwhile still gets its root by eager dispatch instead of waiting for a claim."""
    worker = suite.running["taskproc"].service.worker
    assert worker.running_count == 0 and worker._reserved == 0
    free = worker.cfg.worker_concurrency
    offered = worker.reserve_for_results(1)
    try:
        assert offered == min(1 + free // 2, worker.cfg.claim_batch)
        root = worker.reserve(1)
        assert root == 1
        worker.unreserve(root)
    finally:
        worker.unreserve(offered)
    assert worker._reserved == 0


async def test_eager_dispatch_off_claims_every_step(suite, gateway_channel) -> None:
    """With `taskproc.eager_dispatch` off the same chain runs on claims alone."""
    worker = suite.running["taskproc"].service.worker
    worker.cfg = worker.cfg.model_copy(update={"eager_dispatch": False})
    token = await new_user(suite, gateway_channel)
    before = worker.eager_steps
    stream = wf_grpc.WorkflowServiceStub(gateway_channel).RunWorkflow(
        wf_pb.RunWorkflowRequest(
            spec=spec({"name": "a", "op": "noop"}, {"name": "b", "op": "noop", "depends_on": ["a"]})
        ),
        metadata=bearer(token),
        timeout=30,
    )
    updates = [u async for u in stream]
    assert updates[-1].event.workflow_state == wf_pb.WORKFLOW_STATE_SUCCEEDED
    assert worker.eager_steps == before


async def test_steps_leased_to_a_stopping_worker_are_released_at_once(suite) -> None:
    """A step a store call leased to the worker after it began stopping is not started but
    released: another worker claims it at once (attempt 2), not after the lease lapses."""
    worker = suite.running["taskproc"].service.worker
    worker._stopping = True  # as stop() does first; its claim loop ends too
    identity = InternalIdentity.from_settings(suite.settings)
    md = ((IDENTITY_METADATA_KEY, identity.assertion(None, "taskproc")),)
    async with grpc.aio.insecure_channel(suite.address("dataplatform")) as channel:
        stub = store_grpc.WorkflowStoreServiceStub(channel)
        owner = f"stopping{time.time_ns()}"
        created = await stub.CreateWorkflow(
            store_pb.CreateWorkflowRequest(
                owner=store_pb.WorkflowOwner(user_id=owner, username=owner),
                spec=validate(spec({"name": "only", "op": "noop"}), TaskProcSettings()),
                eager_worker_id=worker.id,
                eager_max_steps=1,
                eager_lease_seconds=30,
            ),
            metadata=md,
            timeout=10,
        )
        wid = created.workflow.workflow_id
        assert len(created.eager_steps) == 1
        worker.adopt(created.eager_steps, 0, time.monotonic())
        assert worker.running_count == 0
        until = time.monotonic() + 5
        got: list = []
        while not got:
            assert time.monotonic() < until, "the step was not released"
            await asyncio.sleep(0.05)
            reply = await stub.ClaimSteps(
                store_pb.ClaimStepsRequest(worker_id="other", max_steps=100, lease_seconds=30),
                metadata=md,
                timeout=10,
            )
            got = [s for s in reply.steps if s.ref.workflow_id == wid]
        assert got[0].ref.attempt == 2
