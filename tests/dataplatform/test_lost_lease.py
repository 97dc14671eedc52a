"""An attempt lost to an expired lease is recorded like any finished attempt: a row in
workflow_step_attempts, then the step is retried under a new attempt number."""

from __future__ import annotations

import asyncio
import time

import grpc

from aiwfe.data.v1 import workflow_store_service_pb2 as store_pb
from aiwfe.data.v1 import workflow_store_service_pb2_grpc as store_grpc
from aiwfe.runtime.config import TaskProcSettings
from aiwfe.runtime.server import RunningService
from taskproc.spec import validate
from tests.dataplatform.conftest import attempt_rows
from tests.taskproc.helpers import spec


async def test_expired_lease_gets_an_attempt_row_and_is_retried(
    dataplatform: RunningService, data_channel: grpc.aio.Channel, internal_md
) -> None:
    """A worker that claims a step and vanishes leaves a failed attempt row with error
    "lease expired (worker lost)" naming it, and the step is claimed again as attempt 2."""
    stub = store_grpc.WorkflowStoreServiceStub(data_channel)
    owner = f"lost{time.time_ns()}"
    created = await stub.CreateWorkflow(
        store_pb.CreateWorkflowRequest(
            owner=store_pb.WorkflowOwner(user_id=owner, username=owner),
            spec=validate(spec({"name": "only", "op": "noop"}), TaskProcSettings()),
        ),
        metadata=internal_md,
        timeout=10,
    )
    wid = created.workflow.workflow_id
    lost = await stub.ClaimSteps(
        store_pb.ClaimStepsRequest(worker_id="vanished", max_steps=1, lease_seconds=0.2),
        metadata=internal_md,
        timeout=10,
    )
    assert [(s.ref.workflow_id, s.ref.attempt) for s in lost.steps] == [(wid, 1)]
    retried = store_pb.ClaimStepsResponse()
    until = time.monotonic() + 10
    while not retried.steps:  # claiming also sweeps expired leases
        assert time.monotonic() < until, "the lost step was never handed out again"
        await asyncio.sleep(0.1)
        retried = await stub.ClaimSteps(
            store_pb.ClaimStepsRequest(worker_id="survivor", max_steps=1, lease_seconds=30),
            metadata=internal_md,
            timeout=10,
        )
    assert [(s.ref.workflow_id, s.ref.attempt) for s in retried.steps] == [(wid, 2)]
    (step,) = {s.ref.step_name for s in lost.steps}
    assert await attempt_rows(dataplatform, wid) == [
        (step, 1, "vanished", False, "lease expired (worker lost)")
    ]
