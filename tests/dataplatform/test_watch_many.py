"""WatchWorkflowEventsMany: many watches on one stream, each as WatchWorkflowEvents would
serve it alone (events, end, and the status of its own error), none outliving its cancel or
the stream, and the stream's own mistakes ended with a precise status."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from aiwfe.data.v1 import workflow_store_service_pb2 as pb
from aiwfe.data.v1 import workflow_store_service_pb2_grpc as pb_grpc
from aiwfe.runtime.channels import MANY_RUNS_HEADER
from aiwfe.runtime.config import TaskProcSettings
from aiwfe.runtime.server import RunningService
from taskproc.spec import validate
from tests.dataplatform.conftest import start_dataplatform
from tests.taskproc.helpers import create_stored, spec


def _watch(watch_id: int, workflow_id: str, owner: str, after: int = 0) -> Any:
    return pb.WatchWorkflowEventsManyRequest(
        watch=pb.WorkflowWatch(
            watch_id=watch_id,
            request=pb.WatchWorkflowEventsRequest(
                workflow_id=workflow_id,
                scope=pb.WorkflowScope(owner_id=owner),
                after_sequence=after,
            ),
        )
    )


def _watchers(dataplatform: RunningService) -> list[Any]:
    """The wake-up inboxes of open watches (not those CreateWorkflow leaves for a while)."""
    store = dataplatform.service.workflows
    recent = {id(entry[2]) for entry in store._recent._recent.values()}
    return [w for ws in store.wakeups._watchers.values() for w in ws if id(w) not in recent]


async def _until(check: Any, what: str, seconds: float = 10) -> None:
    end = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


async def _alone(stub: Any, md: Any, request: Any) -> status_pb2.Status:
    """The status WatchWorkflowEvents ends with for `request`, as google.rpc.Status."""
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        async for _ in stub.WatchWorkflowEvents(request, metadata=md, timeout=10):
            pass
    status = rpc_status.from_call(failed.value)
    assert status is not None
    return status


async def test_each_watch_is_served_and_ends_alone(
    dataplatform: RunningService, internal_md: Any
) -> None:
    """Four watches on one stream: another owner's workflow ends that watch alone with
    WatchWorkflowEvents' exact NOT_FOUND status, a negative after_sequence with its exact
    INVALID_ARGUMENT; the others get their events, one ends OK when its workflow is
    cancelled, `cancel` frees the last one's wake-ups, and the stream then ends OK."""
    md = internal_md
    async with grpc.aio.insecure_channel(dataplatform.address) as channel:
        stub = pb_grpc.WorkflowStoreServiceStub(channel)
        a = await create_stored(stub, md, "owner-a", 1)
        b = await create_stored(stub, md, "owner-a", 1)
        call = stub.WatchWorkflowEventsMany(metadata=md, timeout=30)
        requests = [
            _watch(1, a, "owner-a"),
            _watch(2, b, "stranger"),
            _watch(3, a, "owner-a", after=-1),
            _watch(4, b, "owner-a"),
        ]
        for request in requests:
            await call.write(request)
        ends: dict[int, status_pb2.Status] = {}
        events: dict[int, list[int]] = {1: [], 4: []}
        while len(ends) < 2 or not all(events.values()):
            reply = await call.read()
            if reply.HasField("end"):
                ends[reply.watch_id] = reply.end
            else:
                events[reply.watch_id] += [e.sequence for e in reply.events.events]
        assert ends == {
            2: await _alone(stub, md, requests[1].watch.request),
            3: await _alone(stub, md, requests[2].watch.request),
        }
        assert ends[2].code == grpc.StatusCode.NOT_FOUND.value[0]
        assert any(d.Is(error_details_pb2.BadRequest.DESCRIPTOR) for d in ends[3].details)
        assert events == {1: [1], 4: [1]}

        await stub.CancelStoredWorkflow(
            pb.CancelStoredWorkflowRequest(
                workflow_id=a, scope=pb.WorkflowScope(owner_id="owner-a")
            ),
            metadata=md,
            timeout=10,
        )
        while True:
            reply = await call.read()
            assert reply.watch_id == 1, reply
            if reply.HasField("end"):
                assert reply.end == status_pb2.Status()  # OK: finished
                break
            events[1] += [e.sequence for e in reply.events.events]
        assert events[1] == list(range(1, len(events[1]) + 1)) and len(events[1]) > 1

        await call.write(pb.WatchWorkflowEventsManyRequest(cancel=4))
        await _until(lambda: not _watchers(dataplatform), "the cancelled watch to unwatch")
        await call.done_writing()
        assert await call.read() is grpc.aio.EOF
        assert await call.code() == grpc.StatusCode.OK


@pytest.fixture
async def bounded(base_overrides: dict[str, Any]) -> AsyncIterator[RunningService]:
    """dataplatform with room for two watches per stream."""
    running = await start_dataplatform({**base_overrides, "taskproc": {"watches_per_stream": 2}})
    yield running
    await running.stop(grace=0.5)


async def test_stream_mistakes_end_the_stream_with_a_precise_status(
    bounded: RunningService, internal_md: Any
) -> None:
    """A watch_id already open ends the stream INVALID_ARGUMENT naming the field; a watch
    past the bound RESOURCE_EXHAUSTED (STREAM_WATCHES_EXHAUSTED, QuotaFailure); either way,
    and when the client cancels, every watch of the stream is unwatched."""
    md = internal_md
    async with grpc.aio.insecure_channel(bounded.address) as channel:
        stub = pb_grpc.WorkflowStoreServiceStub(channel)
        a = await create_stored(stub, md, "owner-a", 1)
        b = await create_stored(stub, md, "owner-a", 1)
        c = await create_stored(stub, md, "owner-a", 1)

        async def refused(*requests: Any) -> status_pb2.Status:
            call = stub.WatchWorkflowEventsMany(iter(requests), metadata=md, timeout=10)
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                async for _ in call:
                    pass
            status = rpc_status.from_call(failed.value)
            assert status is not None
            return status

        duplicate = await refused(_watch(7, a, "owner-a"), _watch(7, b, "owner-a"))
        assert duplicate.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        bad = error_details_pb2.BadRequest()
        assert next(d for d in duplicate.details if d.Unpack(bad))
        assert [v.field for v in bad.field_violations] == ["watch.watch_id"]
        await _until(lambda: not _watchers(bounded), "the stream's watches to unwatch")

        # Cancelled, then reused: the id is free again once its watch is cancelled.
        reused = [_watch(1, a, "owner-a"), pb.WatchWorkflowEventsManyRequest(cancel=1)]
        too_many = await refused(
            *reused, _watch(1, a, "owner-a"), _watch(2, b, "owner-a"), _watch(3, c, "owner-a")
        )
        assert too_many.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
        info = error_details_pb2.ErrorInfo()
        assert next(d for d in too_many.details if d.Unpack(info))
        assert info.reason == "STREAM_WATCHES_EXHAUSTED" and info.metadata["limit"] == "2"
        assert any(d.Is(error_details_pb2.QuotaFailure.DESCRIPTOR) for d in too_many.details)
        await _until(lambda: not _watchers(bounded), "the stream's watches to unwatch")

        call = stub.WatchWorkflowEventsMany(metadata=md, timeout=30)
        await call.write(_watch(1, a, "owner-a"))
        await call.write(_watch(2, b, "owner-a"))
        seen = set()
        while seen != {1, 2}:
            seen.add((await call.read()).watch_id)
        assert len(_watchers(bounded)) == 2
        call.cancel()
        await _until(lambda: not _watchers(bounded), "the cancelled stream's watches to unwatch")


def _run(watch_id: int, create: Any) -> Any:
    return pb.WatchWorkflowEventsManyRequest(
        run=pb.WorkflowRun(watch_id=watch_id, request=pb.RunStoredWorkflowRequest(create=create))
    )


async def test_runs_are_served_on_the_stream_and_end_alone(
    dataplatform: RunningService, internal_md: Any
) -> None:
    """The stream says it takes runs (its headers). A run is answered with its stored
    workflow, then its events to the end; a run with a bad spec ends alone with
    RunStoredWorkflow's exact INVALID_ARGUMENT and stores nothing; a reused idempotency key
    follows the existing workflow from its first event; a watch of the run's workflow on
    the same stream is served beside it, and nothing stays watched. A run's first events
    come in its `stored` message and its last ones in its end; a watch's never do."""
    md = internal_md
    me = f"owner-r-{uuid.uuid4().hex[:8]}"  # the idempotency key is new on any database
    owner = pb.WorkflowOwner(user_id=me, username=me)
    good = validate(
        spec({"name": "s", "op": "wait_for_signal", "inputs": {"name": "go"}}), TaskProcSettings()
    )
    create = pb.CreateWorkflowRequest(owner=owner, spec=good, idempotency_key="run-key")
    empty = pb.CreateWorkflowRequest(owner=owner)  # no steps, no timeout
    async with grpc.aio.insecure_channel(dataplatform.address) as channel:
        stub = pb_grpc.WorkflowStoreServiceStub(channel)
        call = stub.WatchWorkflowEventsMany(metadata=md, timeout=30)
        assert dict(await call.initial_metadata())[MANY_RUNS_HEADER] == "1"
        await call.write(_run(1, create))
        first = await call.read()
        assert first.watch_id == 1 and first.stored.created, first
        assert [e.sequence for e in first.run_events.events] == [1]  # "submitted"
        wid = first.stored.workflow.workflow_id
        await call.write(_run(2, empty))
        await call.write(_run(3, create))
        await call.write(_watch(4, wid, me))
        stored: dict[int, Any] = {1: first.stored}
        ends: dict[int, status_pb2.Status] = {}
        events: dict[int, list[int]] = {1: [1], 3: [], 4: []}

        def take(reply: Any) -> None:
            if reply.HasField("stored"):
                assert not events[reply.watch_id], "stored comes first"
                stored[reply.watch_id] = reply.stored
            elif reply.HasField("end"):
                ends[reply.watch_id] = reply.end
            assert reply.watch_id in (1, 3) or not reply.HasField("run_events")
            if reply.watch_id in events:  # not the refused run's
                events[reply.watch_id] += [e.sequence for e in reply.events.events]
                events[reply.watch_id] += [e.sequence for e in reply.run_events.events]

        while 2 not in ends or not all(events.values()):
            take(await call.read())
        with pytest.raises(grpc.aio.AioRpcError) as alone:
            async for _ in stub.RunStoredWorkflow(
                pb.RunStoredWorkflowRequest(create=empty), metadata=md, timeout=10
            ):
                pass
        assert ends == {2: rpc_status.from_call(alone.value)}
        assert ends[2].code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        assert 2 not in stored
        assert not stored[3].created and stored[3].workflow.workflow_id == wid
        assert events == {1: [1], 3: [1], 4: [1]}

        await stub.CancelStoredWorkflow(
            pb.CancelStoredWorkflowRequest(workflow_id=wid, scope=pb.WorkflowScope(owner_id=me)),
            metadata=md,
            timeout=10,
        )
        ending: dict[int, int] = {}  # events in each end message
        while len(ends) < 4:
            reply = await call.read()
            ending[reply.watch_id] = len(reply.run_events.events)
            take(reply)
        assert ends[1] == ends[3] == ends[4] == status_pb2.Status()  # OK: finished
        assert events[1] == events[3] == events[4] == list(range(1, len(events[1]) + 1))
        assert len(events[1]) > 1
        assert ending[1] >= 1 and ending[3] >= 1 and ending[4] == 0  # the runs' last events
        assert await _listed(dataplatform, md, me) == [wid]  # the bad run stored none
        await _until(lambda: not _watchers(dataplatform), "the runs' watches to unwatch")
        await call.done_writing()
        assert await call.read() is grpc.aio.EOF


async def test_a_run_or_watch_while_the_database_is_down_ends_unavailable_at_once(
    dataplatform: RunningService, internal_md: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once the health probe finds PostgreSQL down, a run or a watch on a stream opened
    before ends at once with DatabaseGuard's UNAVAILABLE (DATABASE_UNAVAILABLE), as a call
    of its own is refused, instead of waiting out the pool's timeout."""
    db = dataplatform.service.workflows._db
    monkeypatch.setattr(db, "_set_reachable", lambda ok: None)  # no probe flips it back
    me = f"owner-d-{uuid.uuid4().hex[:8]}"
    owner = pb.WorkflowOwner(user_id=me, username=me)
    good = validate(spec({"name": "s", "op": "noop"}), TaskProcSettings())
    async with grpc.aio.insecure_channel(dataplatform.address) as channel:
        stub = pb_grpc.WorkflowStoreServiceStub(channel)
        call = stub.WatchWorkflowEventsMany(metadata=internal_md, timeout=10)
        await call.initial_metadata()  # opened while the database was up
        monkeypatch.setattr(db, "reachable", False)
        await call.write(_run(1, pb.CreateWorkflowRequest(owner=owner, spec=good)))
        await call.write(_watch(2, str(uuid.uuid4()), me))
        ends = {}
        while len(ends) < 2:
            reply = await call.read()
            assert reply.HasField("end"), reply
            ends[reply.watch_id] = reply.end
        for end in ends.values():
            assert end.code == grpc.StatusCode.UNAVAILABLE.value[0]
            info = error_details_pb2.ErrorInfo()
            assert next(d for d in end.details if d.Unpack(info))
            assert info.reason == "DATABASE_UNAVAILABLE"
        call.cancel()
    monkeypatch.setattr(db, "reachable", True)
    listed = await _listed(dataplatform, internal_md, me)
    assert not listed  # the run stored nothing


async def _listed(dataplatform: RunningService, md: Any, owner: str) -> list[str]:
    async with grpc.aio.insecure_channel(dataplatform.address) as channel:
        listed = await pb_grpc.WorkflowStoreServiceStub(channel).ListStoredWorkflows(
            pb.ListStoredWorkflowsRequest(scope=pb.WorkflowScope(owner_id=owner)),
            metadata=md,
            timeout=10,
        )
    return [w.workflow_id for w in listed.workflows]
