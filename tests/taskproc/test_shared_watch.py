"""A replica's watchers of one workflow share one dataplatform stream without losing
anything a watch of their own would give: resumption, visibility, early leaving."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from aiwfe.app.suite import Suite, start_suite
from aiwfe.runtime.identity import Principal
from aiwfe.taskproc.v1 import workflow_service_pb2 as pb
from aiwfe.taskproc.v1 import workflow_service_pb2_grpc as pb_grpc
from taskproc.shared_watch import SharedWatches
from tests.taskproc.helpers import as_user, spec

OWNER = Principal(user_id="owner-1", username="owner", roles=("user",))
STRANGER = Principal(user_id="stranger-1", username="stranger", roles=("user",))
ADMIN = Principal(user_id="admin-1", username="boss", roles=("admin",))


@pytest.fixture
async def back_ends(base_overrides: dict[str, Any]) -> AsyncIterator[Suite]:
    running = await start_suite(base_overrides, only=("dataplatform", "taskproc"))
    yield running
    await running.stop()


async def test_watchers_of_one_workflow_share_one_upstream(back_ends: Suite) -> None:
    """Two watchers (one resuming after sequence 2) share one upstream and get exactly
    their events; a watcher leaving early ends nothing else; another user still gets
    NOT_FOUND and the admin sees it all; the upstream closes with its last watcher."""
    suite = back_ends
    watches: SharedWatches = suite.running["taskproc"].service.watches
    async with grpc.aio.insecure_channel(suite.address("taskproc")) as channel:
        stub = pb_grpc.WorkflowServiceStub(channel)
        reply = await stub.SubmitWorkflow(
            pb.SubmitWorkflowRequest(
                spec=spec({"name": "a", "op": "noop", "inputs": {"sleep_ms": 1500}})
            ),
            metadata=as_user(suite, OWNER),
            timeout=10,
        )
        wid = reply.workflow.workflow_id

        async def watch(user: Principal, after: int = 0) -> list[pb.WatchWorkflowResponse]:
            call = stub.WatchWorkflow(
                pb.WatchWorkflowRequest(workflow_id=wid, after_sequence=after),
                metadata=as_user(suite, user),
                timeout=30,
            )
            return [event async for event in call]

        first = asyncio.create_task(watch(OWNER))
        leaver = asyncio.create_task(watch(OWNER))
        end = time.monotonic() + 10
        while watches.upstreams != 1:
            assert time.monotonic() < end
            await asyncio.sleep(0.02)
        resumed = asyncio.create_task(watch(OWNER, after=2))
        await asyncio.sleep(0.2)
        assert watches.upstreams == 1
        leaver.cancel()
        with pytest.raises(grpc.aio.AioRpcError) as stranger:
            await watch(STRANGER)
        assert stranger.value.code() == grpc.StatusCode.NOT_FOUND
        admin = await watch(ADMIN)
        events, later = await asyncio.gather(first, resumed)
        assert [e.sequence for e in events] == list(range(1, len(events) + 1))
        assert events[-1].workflow_state == pb.WORKFLOW_STATE_SUCCEEDED
        assert later == events[2:]
        assert admin == events
        assert watches.upstreams == 0


async def test_a_watch_is_checked_first_and_holds_its_slot_until_it_ends(
    base_overrides: dict[str, Any],
) -> None:
    """With room for one watch: a malformed request is INVALID_ARGUMENT even while the
    slot is taken (the checks come first), a second watch is refused with
    RESOURCE_EXHAUSTED, and the slot comes back when the watcher leaves."""
    overrides = {**base_overrides, "taskproc": {"max_watch_streams": 1}}
    suite = await start_suite(overrides, only=("dataplatform", "taskproc"))
    service = suite.running["taskproc"].service
    try:
        async with grpc.aio.insecure_channel(suite.address("taskproc")) as channel:
            stub = pb_grpc.WorkflowServiceStub(channel)
            md = as_user(suite, OWNER)
            waits = {"name": "a", "op": "wait_for_signal", "inputs": {"name": "go"}}
            reply = await stub.SubmitWorkflow(
                pb.SubmitWorkflowRequest(spec=spec(waits)), metadata=md, timeout=10
            )
            wid = reply.workflow.workflow_id
            holder = stub.WatchWorkflow(pb.WatchWorkflowRequest(workflow_id=wid), metadata=md)
            await holder.read()
            assert service.watch_slots.in_flight == 1
            for request, code in (
                (pb.WatchWorkflowRequest(workflow_id=wid, after_sequence=-1), "INVALID_ARGUMENT"),
                (pb.WatchWorkflowRequest(workflow_id="x" * 65), "INVALID_ARGUMENT"),
                (pb.WatchWorkflowRequest(workflow_id=wid), "RESOURCE_EXHAUSTED"),
            ):
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    async for _ in stub.WatchWorkflow(request, metadata=md, timeout=10):
                        pass
                assert refused.value.code().name == code, refused.value.details()
            holder.cancel()
            end = time.monotonic() + 10
            while service.watch_slots.in_flight or service.watches.upstreams:
                assert time.monotonic() < end
                await asyncio.sleep(0.02)
            again = stub.WatchWorkflow(pb.WatchWorkflowRequest(workflow_id=wid), metadata=md)
            assert (await again.read()).sequence == 1
            again.cancel()
    finally:
        await suite.stop()
