"""ListWorkflows page tokens are opaque and tamper-evident (AIP-158): sealed (AES-GCM) with
a key derived from the internal secret and bound to the caller and the filter."""

from __future__ import annotations

import base64

import grpc
import pytest

from aiwfe.taskproc.v1 import workflow_service_pb2 as wf_pb
from aiwfe.taskproc.v1 import workflow_service_pb2_grpc as wf_grpc
from tests.conftest import bearer, field_violations
from tests.taskproc.helpers import new_user, spec, submit

FILTERED = wf_pb.WorkflowState.values()[1]  # any state filter other than "all"


async def _list(channel, token: str, **fields) -> wf_pb.ListWorkflowsResponse:
    return await wf_grpc.WorkflowServiceStub(channel).ListWorkflows(
        wf_pb.ListWorkflowsRequest(page_size=1, **fields), metadata=bearer(token), timeout=10
    )


async def _refused(channel, token: str, **fields) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _list(channel, token, **fields)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "page_token" in field_violations(err.value)


async def test_page_tokens_are_opaque_and_bound_to_caller_and_filter(
    suite, gateway_channel
) -> None:
    """A page token shows nothing of the store's cursor (the last row's id and time); the
    next page follows with it (page size may change); edited, replayed by another user, or
    with a different filter it is INVALID_ARGUMENT naming page_token; a token in the old
    plain format too."""
    alice = await new_user(suite, gateway_channel)
    bob = await new_user(suite, gateway_channel)
    ids = [
        (await submit(gateway_channel, alice, spec({"name": "a", "op": "noop"}))).workflow_id
        for _ in range(3)
    ]
    first = await _list(gateway_channel, alice)
    token = first.next_page_token
    assert ids[-1].encode() not in base64.urlsafe_b64decode(token)
    second = await wf_grpc.WorkflowServiceStub(gateway_channel).ListWorkflows(
        wf_pb.ListWorkflowsRequest(page_size=5, page_token=token),
        metadata=bearer(alice),
        timeout=10,
    )
    assert [w.workflow_id for w in [*first.workflows, *second.workflows]] == ids[::-1]

    raw = bytearray(base64.urlsafe_b64decode(token))
    raw[-3] ^= 1  # the cursor's last characters: an edited position
    await _refused(gateway_channel, alice, page_token=base64.urlsafe_b64encode(raw).decode())
    await _refused(gateway_channel, bob, page_token=token)
    await _refused(gateway_channel, alice, page_token=token, state=FILTERED)
    old = base64.urlsafe_b64encode(f"2026-01-01T00:00:00+00:00|{ids[0]}".encode()).decode()
    await _refused(gateway_channel, alice, page_token=old)
    await _refused(gateway_channel, alice, page_token="not base64 at all!")
