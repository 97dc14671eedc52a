"""Eager dispatch through the real suite: taskproc's worker gets a submitted workflow's
root step from CreateWorkflow and each next step of a chain from its own CompleteSteps,
and runs every step exactly once; a fan-out's max_concurrency still holds."""

from __future__ import annotations

import psycopg

from aiwfe.taskproc.v1 import workflow_service_pb2 as wf_pb
from aiwfe.taskproc.v1 import workflow_service_pb2_grpc as wf_grpc
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
