"""Shared helpers for the workflow tests: users, specs and waiting for a workflow."""

from __future__ import annotations

import time
import uuid
from typing import Any

import grpc
from google.protobuf import json_format

from aiwfe.app.suite import Suite
from aiwfe.data.v1 import user_store_service_pb2 as user_pb
from aiwfe.data.v1 import user_store_service_pb2_grpc as user_grpc
from aiwfe.data.v1 import workflow_store_service_pb2 as store_pb
from aiwfe.runtime.config import TaskProcSettings
from aiwfe.runtime.identity import IDENTITY_METADATA_KEY, InternalIdentity, Principal
from aiwfe.runtime.passwords import hash_password
from aiwfe.taskproc.v1 import workflow_service_pb2 as wf_pb
from aiwfe.taskproc.v1 import workflow_service_pb2_grpc as wf_grpc
from taskproc.spec import validate
from tests.conftest import bearer, login

TERMINAL = {
    wf_pb.WORKFLOW_STATE_SUCCEEDED,
    wf_pb.WORKFLOW_STATE_FAILED,
    wf_pb.WORKFLOW_STATE_CANCELLED,
    wf_pb.WORKFLOW_STATE_TIMED_OUT,
}
PASSWORD = "workflow-test-password-1"


async def new_user(
    suite: Suite, channel: grpc.aio.Channel, roles: tuple[str, ...] = ("user",)
) -> str:
    """Creates a user through dataplatform and returns their access token (via the gateway)."""
    name = f"wf{uuid.uuid4().hex[:12]}"
    identity = InternalIdentity.from_settings(suite.settings)
    async with grpc.aio.insecure_channel(suite.address("dataplatform")) as ch:
        await user_grpc.UserStoreServiceStub(ch).CreateUser(
            user_pb.CreateUserRequest(
                username=name, password_hash=hash_password(PASSWORD), roles=list(roles)
            ),
            metadata=((IDENTITY_METADATA_KEY, identity.assertion(None, "test")),),
            timeout=5,
        )
    return await login(channel, name, PASSWORD)


def spec(*steps: dict[str, Any], **fields: Any) -> wf_pb.WorkflowSpec:
    """A WorkflowSpec from its JSON form."""
    return json_format.ParseDict(
        {"name": "test", "steps": list(steps), **fields}, wf_pb.WorkflowSpec()
    )


async def submit(
    channel: grpc.aio.Channel, token: str, workflow: wf_pb.WorkflowSpec, key: str = ""
) -> wf_pb.Workflow:
    reply = await wf_grpc.WorkflowServiceStub(channel).SubmitWorkflow(
        wf_pb.SubmitWorkflowRequest(spec=workflow, idempotency_key=key),
        metadata=bearer(token),
        timeout=10,
    )
    return reply.workflow


async def watch(
    channel: grpc.aio.Channel, token: str, workflow_id: str, after: int = 0, timeout: float = 30
) -> list[wf_pb.WatchWorkflowResponse]:
    """Every event after `after` until the workflow is terminal (the stream ends)."""
    stream = wf_grpc.WorkflowServiceStub(channel).WatchWorkflow(
        wf_pb.WatchWorkflowRequest(workflow_id=workflow_id, after_sequence=after),
        metadata=bearer(token),
        timeout=timeout,
    )
    return [event async for event in stream]


async def get(channel: grpc.aio.Channel, token: str, workflow_id: str) -> wf_pb.Workflow:
    reply = await wf_grpc.WorkflowServiceStub(channel).GetWorkflow(
        wf_pb.GetWorkflowRequest(workflow_id=workflow_id), metadata=bearer(token), timeout=10
    )
    return reply.workflow


async def finish(
    channel: grpc.aio.Channel, token: str, workflow_id: str, timeout: float = 30
) -> wf_pb.Workflow:
    """Waits (via Watch) until the workflow is terminal and returns it."""
    await watch(channel, token, workflow_id, timeout=timeout)
    workflow = await get(channel, token, workflow_id)
    assert workflow.state in TERMINAL, workflow
    return workflow


def step_status(workflow: wf_pb.Workflow, name: str) -> wf_pb.StepStatus:
    return next(s for s in workflow.steps if s.name == name)


def deadline(seconds: float) -> float:
    return time.monotonic() + seconds


def as_user(suite: Suite, user: Principal) -> tuple[tuple[str, str], ...]:
    """The metadata the gateway sends a back end for `user` (to call taskproc directly)."""
    identity = InternalIdentity.from_settings(suite.settings)
    return ((IDENTITY_METADATA_KEY, identity.assertion(user, "gateway")),)


async def create_stored(
    stub, metadata, owner: str, n_steps: int, lease_prio: int = 0, chain: bool = False
) -> str:
    """A workflow of `n_steps` `noop` steps (s0, s1, ...; `chain`: each depending on the one
    before) stored straight through dataplatform."""
    steps = [
        {"name": f"s{i}", "op": "noop", **({"depends_on": [f"s{i - 1}"]} if chain and i else {})}
        for i in range(n_steps)
    ]
    workflow = validate(spec(*steps, priority=lease_prio), TaskProcSettings())
    reply = await stub.CreateWorkflow(
        store_pb.CreateWorkflowRequest(
            owner=store_pb.WorkflowOwner(user_id=owner, username=owner), spec=workflow
        ),
        metadata=metadata,
        timeout=10,
    )
    return reply.workflow.workflow_id
