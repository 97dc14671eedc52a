"""The submitter's W3C trace context is stored with a workflow (migration 009) and handed
back with every claimed step, with the submit time; an oversized one is refused."""

from __future__ import annotations

import time

import grpc
import pytest

from aiwfe.data.v1 import workflow_store_service_pb2 as store_pb
from aiwfe.data.v1 import workflow_store_service_pb2_grpc as store_grpc
from aiwfe.runtime.config import TaskProcSettings
from taskproc.spec import validate
from tests.conftest import field_violations
from tests.taskproc.helpers import spec

TRACEPARENT = f"00-{'4b' * 16}-{'a1' * 8}-01"


def _create(
    owner: str, trace_context: store_pb.TraceContext | None
) -> store_pb.CreateWorkflowRequest:
    return store_pb.CreateWorkflowRequest(
        owner=store_pb.WorkflowOwner(user_id=owner, username=owner),
        # Claimed before any other test's leftovers: the highest priority goes first.
        spec=validate(spec({"name": "only", "op": "noop"}, priority=9), TaskProcSettings()),
        trace_context=trace_context,
    )


async def _claim_own(
    stub: store_grpc.WorkflowStoreServiceStub, md, wid: str
) -> store_pb.ClaimedStep:
    reply = await stub.ClaimSteps(
        store_pb.ClaimStepsRequest(worker_id=f"trace-{wid}", max_steps=1, lease_seconds=30),
        metadata=md,
        timeout=10,
    )
    assert [s.ref.workflow_id for s in reply.steps] == [wid]
    return reply.steps[0]


async def test_a_claimed_step_carries_its_workflows_trace_context(
    data_channel, internal_md
) -> None:
    """traceparent and tracestate come back with the claimed step, with a submit time of
    the creation; a workflow submitted without one claims with none."""
    stub = store_grpc.WorkflowStoreServiceStub(data_channel)
    traced = await stub.CreateWorkflow(
        _create(
            f"tc{time.time_ns()}",
            store_pb.TraceContext(traceparent=TRACEPARENT, tracestate="vendor=1,other=2"),
        ),
        metadata=internal_md,
        timeout=10,
    )
    before = time.time()
    step = await _claim_own(stub, internal_md, traced.workflow.workflow_id)
    assert (step.trace_context.traceparent, step.trace_context.tracestate) == (
        TRACEPARENT,
        "vendor=1,other=2",
    )
    submitted = step.submit_time.ToMicroseconds() / 1e6
    assert abs(submitted - traced.workflow.create_time.ToMicroseconds() / 1e6) < 0.001
    assert submitted <= before + 1
    untraced = await stub.CreateWorkflow(
        _create(f"tc{time.time_ns()}", None), metadata=internal_md, timeout=10
    )
    step = await _claim_own(stub, internal_md, untraced.workflow.workflow_id)
    assert not step.HasField("trace_context") and step.HasField("submit_time")


@pytest.mark.parametrize(
    ("context", "field"),
    [
        (store_pb.TraceContext(traceparent="0" * 65), "trace_context.traceparent"),
        (
            store_pb.TraceContext(traceparent=TRACEPARENT, tracestate="a" * 513),
            "trace_context.tracestate",
        ),
    ],
)
async def test_an_oversized_trace_context_is_refused(
    data_channel, internal_md, context, field
) -> None:
    """A traceparent over 64 or a tracestate over 512 characters is INVALID_ARGUMENT with
    its field violation."""
    stub = store_grpc.WorkflowStoreServiceStub(data_channel)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.CreateWorkflow(
            _create(f"tc{time.time_ns()}", context), metadata=internal_md, timeout=10
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in field_violations(err.value)
