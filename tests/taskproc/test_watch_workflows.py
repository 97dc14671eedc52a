"""WatchWorkflows: WatchWorkflow for many workflows on one bidi stream. Each watch gets
what a WatchWorkflow call of its own would (the same events in the same order, then an
end: OK, or the very status that call would have ended with), and its error is its own;
`cancel` ends a watch with no answer and frees its watch slot; the stream's own mistakes (a
watch_id already open, one watch too many) end the whole stream."""

from __future__ import annotations

import asyncio
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import grpc
import pytest
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from aiwfe.app.suite import Suite, start_suite
from aiwfe.runtime.identity import IDENTITY_METADATA_KEY, InternalIdentity, Principal
from aiwfe.taskproc.v1 import workflow_service_pb2 as pb
from aiwfe.taskproc.v1 import workflow_service_pb2_grpc as pb_grpc
from taskproc.streams import WatchSlots
from tests.conftest import error_reason, field_violations, until
from tests.taskproc.helpers import as_user, spec

OWNER = Principal(user_id="watches-owner", username="watches-owner", roles=("user",))
STRANGER = Principal(user_id="watches-stranger", username="watches-stranger", roles=("user",))
ADMIN = Principal(user_id="watches-admin", username="watches-admin", roles=("admin",))
WAITS = {"name": "a", "op": "wait_for_signal", "inputs": {"name": "go"}}
SHORT = {"name": "a", "op": "noop", "inputs": {"sleep_ms": 200}}
CHAIN = (
    {"name": "a", "op": "noop"},
    {"name": "b", "op": "noop", "depends_on": ["a"]},
    {"name": "c", "op": "noop", "depends_on": ["b"]},
)
TIMEOUT = 10  # seconds any one await may take: a bug fails the test, it does not hang it


@asynccontextmanager
async def _back_ends(base_overrides: dict[str, Any], **taskproc: Any) -> AsyncIterator[Suite]:
    """dataplatform and taskproc in process, with `taskproc` settings overridden."""
    overrides = {**base_overrides, "taskproc": taskproc} if taskproc else base_overrides
    suite = await start_suite(overrides, only=("dataplatform", "taskproc"))
    try:
        yield suite
    finally:
        await suite.stop()


@pytest.fixture
async def back_ends(base_overrides: dict[str, Any]) -> AsyncIterator[Suite]:
    async with _back_ends(base_overrides) as suite:
        yield suite


@pytest.fixture
async def channel(back_ends: Suite) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(back_ends.address("taskproc")) as ch:
        yield ch


def _slots(suite: Suite) -> WatchSlots:
    """The taskproc replica's watch slots (its open watches, metric workflow_watch_streams)."""
    slots: WatchSlots = suite.running["taskproc"].service.watch_slots  # type: ignore[attr-defined]
    return slots


def _request(workflow_id: str, after: int = 0) -> pb.WatchWorkflowRequest:
    return pb.WatchWorkflowRequest(workflow_id=workflow_id, after_sequence=after)


async def _submit(channel: grpc.aio.Channel, md: Any, *steps: dict[str, Any]) -> str:
    reply = await pb_grpc.WorkflowServiceStub(channel).SubmitWorkflow(
        pb.SubmitWorkflowRequest(spec=spec(*steps)), metadata=md, timeout=TIMEOUT
    )
    return str(reply.workflow.workflow_id)


async def _signal(channel: grpc.aio.Channel, md: Any, workflow_id: str) -> None:
    await pb_grpc.WorkflowServiceStub(channel).SignalWorkflow(
        pb.SignalWorkflowRequest(workflow_id=workflow_id, name="go"), metadata=md, timeout=TIMEOUT
    )


async def _alone(
    channel: grpc.aio.Channel, md: Any, request: pb.WatchWorkflowRequest
) -> tuple[list[pb.WatchWorkflowResponse], status_pb2.Status]:
    """What a plain WatchWorkflow call of `request` streams, and the status it ends with."""
    call = pb_grpc.WorkflowServiceStub(channel).WatchWorkflow(request, metadata=md, timeout=TIMEOUT)
    events: list[pb.WatchWorkflowResponse] = []
    try:
        async for event in call:
            events.append(event)
    except grpc.aio.AioRpcError as exc:
        status = rpc_status.from_call(exc)
        if status is None:  # no details: the code and message alone
            status = status_pb2.Status(code=exc.code().value[0], message=exc.details() or "")
        return events, status
    return events, status_pb2.Status()


def _details(status: status_pb2.Status, kind: Any) -> list[Any]:
    """The details of `status` of the message type `kind`, decoded."""
    out = []
    for detail in status.details:
        if detail.Is(kind.DESCRIPTOR):
            message = kind()
            detail.Unpack(message)
            out.append(message)
    return out


def _violated(status: status_pb2.Status) -> set[str]:
    """The fields a BadRequest detail of `status` names."""
    bad = _details(status, error_details_pb2.BadRequest)
    return {v.field for each in bad for v in each.field_violations}


class _Stream:
    """The client side of one WatchWorkflows stream: each watch's events (flattened from
    its batches, in the order received) and its end, by watch_id."""

    def __init__(self, channel: grpc.aio.Channel, md: Any) -> None:
        self.call = pb_grpc.WorkflowServiceStub(channel).WatchWorkflows(metadata=md, timeout=60)
        self.events: dict[int, list[pb.WatchWorkflowResponse]] = defaultdict(list)
        self.ends: dict[int, status_pb2.Status] = {}
        self.replies = 0

    async def watch(self, watch_id: int, request: pb.WatchWorkflowRequest) -> None:
        watch = pb.WorkflowWatch(watch_id=watch_id, request=request)
        await asyncio.wait_for(self.call.write(pb.WatchWorkflowsRequest(watch=watch)), TIMEOUT)

    async def cancel(self, watch_id: int) -> None:
        await asyncio.wait_for(self.call.write(pb.WatchWorkflowsRequest(cancel=watch_id)), TIMEOUT)

    def forget(self, watch_id: int) -> None:
        """Drops what an ended (or cancelled) watch got, before its id is used again."""
        self.events.pop(watch_id, None)
        self.ends.pop(watch_id, None)

    async def read(self) -> pb.WatchWorkflowsResponse:
        """The next message; nothing may come for a watch after its end."""
        reply = await asyncio.wait_for(self.call.read(), TIMEOUT)
        assert reply is not grpc.aio.EOF, "the stream ended"
        self.replies += 1
        assert reply.watch_id not in self.ends, f"a message after watch {reply.watch_id}'s end"
        kind = reply.WhichOneof("update")
        if kind == "events":
            assert reply.events.events, "an empty batch of events"
            self.events[reply.watch_id].extend(reply.events.events)
        else:
            assert kind == "end", reply
            self.ends[reply.watch_id] = reply.end
        return reply

    async def until(self, check: Callable[[], bool]) -> None:
        while not check():
            await self.read()

    async def ended(self, *watch_ids: int) -> list[status_pb2.Status]:
        """Reads until each of `watch_ids` has ended; their ends."""
        await self.until(lambda: all(w in self.ends for w in watch_ids))
        return [self.ends[w] for w in watch_ids]

    async def started(self, *watch_ids: int) -> None:
        """Reads until each of `watch_ids` has its first event (so holds its slot)."""
        await self.until(lambda: all(self.events[w] for w in watch_ids))

    async def close(self) -> None:
        """Half-closes; the stream must then end with OK (after whatever is still due)."""
        await asyncio.wait_for(self.call.done_writing(), TIMEOUT)
        await self.finished()

    async def finished(self) -> None:
        """Reads the rest: the stream ends with OK."""
        while (reply := await asyncio.wait_for(self.call.read(), TIMEOUT)) is not grpc.aio.EOF:
            assert reply.watch_id not in self.ends, f"a message after watch {reply.watch_id}'s end"
            self.replies += 1
            if reply.HasField("end"):
                self.ends[reply.watch_id] = reply.end
            else:
                self.events[reply.watch_id].extend(reply.events.events)
        assert await asyncio.wait_for(self.call.code(), TIMEOUT) == grpc.StatusCode.OK

    async def failure(self) -> grpc.aio.AioRpcError:
        """Reads on until the stream fails; its error."""
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            while True:
                await self.read()
        return failed.value


def _assert_in_order(events: list[pb.WatchWorkflowResponse]) -> None:
    assert [e.sequence for e in events] == list(
        range(events[0].sequence, events[0].sequence + len(events))
    ), events


async def test_watches_of_many_workflows_each_get_their_own_events_then_ok(
    back_ends: Suite, channel: grpc.aio.Channel
) -> None:
    """Four watches on one stream (three workflows, one of them also resumed after
    sequence 2; arbitrary uint64 watch ids) each get exactly the events a WatchWorkflow call
    of the same request streams, in the same order, then an OK end; an admin's stream sees
    the owner's workflow too; each stream ends with OK once the client half-closes."""
    md = as_user(back_ends, OWNER)
    wids = [
        await _submit(channel, md, SHORT),
        await _submit(channel, md, *CHAIN),
        await _submit(channel, md, {**SHORT, "inputs": {"sleep_ms": 500}}),
    ]
    watches = {
        7: _request(wids[0]),
        2**63 + 5: _request(wids[1]),
        0: _request(wids[2]),
        42: _request(wids[1], after=2),
    }
    stream = _Stream(channel, md)
    for watch_id, request in watches.items():
        await stream.watch(watch_id, request)
    ends = await stream.ended(*watches)
    assert ends == [status_pb2.Status()] * len(watches)
    await stream.close()
    assert set(stream.events) == set(watches)
    for watch_id, request in watches.items():
        expected, status = await _alone(channel, md, request)
        assert status == status_pb2.Status(), status
        assert stream.events[watch_id] == expected, watch_id
        _assert_in_order(expected)
        assert expected[-1].workflow_state == pb.WORKFLOW_STATE_SUCCEEDED
        assert expected[0].sequence == request.after_sequence + 1
    # the workflows' histories differ: each watch got its own workflow's, not another's
    assert {e.step_name for e in stream.events[2**63 + 5]} >= {"a", "b", "c"}
    assert {e.step_name for e in stream.events[7] + stream.events[0]} <= {"", "a"}
    assert stream.events[7] != stream.events[0]
    assert stream.events[42] == stream.events[2**63 + 5][2:]

    admin = _Stream(channel, as_user(back_ends, ADMIN))
    await admin.watch(1, _request(wids[1]))
    assert await admin.ended(1) == [status_pb2.Status()]
    await admin.close()
    assert admin.events[1] == stream.events[2**63 + 5]
    assert _slots(back_ends).in_flight == 0


async def test_half_closing_with_watches_open_ends_the_stream_after_the_last(
    back_ends: Suite, channel: grpc.aio.Channel
) -> None:
    """The client half-closes while a watch of a waiting workflow is open: the stream
    stays open and still delivers it, then ends with OK right after its end."""
    md = as_user(back_ends, OWNER)
    wid = await _submit(channel, md, WAITS)
    stream = _Stream(channel, md)
    await stream.watch(3, _request(wid))
    await stream.started(3)
    await asyncio.wait_for(stream.call.done_writing(), TIMEOUT)
    await _signal(channel, md, wid)
    assert await stream.ended(3) == [status_pb2.Status()]
    await stream.finished()
    expected, _ = await _alone(channel, md, _request(wid))
    assert stream.events[3] == expected
    assert expected[-1].workflow_state == pb.WORKFLOW_STATE_SUCCEEDED


async def test_a_watch_s_error_is_its_own_and_the_one_watchworkflow_ends_with(
    back_ends: Suite, channel: grpc.aio.Channel
) -> None:
    """On one stream: an unknown workflow and another user's end NOT_FOUND, an empty or a
    too-long workflow_id INVALID_ARGUMENT on `workflow_id`, a negative after_sequence
    INVALID_ARGUMENT on `after_sequence`, each with the code, message and details
    WatchWorkflow ends with for the same request; the valid watch opened first, and one
    opened after the errors, get all their events and an OK end."""
    md = as_user(back_ends, OWNER)
    mine = await _submit(channel, md, {**SHORT, "inputs": {"sleep_ms": 500}})
    later = await _submit(channel, md, SHORT)
    theirs = await _submit(channel, as_user(back_ends, STRANGER), SHORT)
    failing = {
        2: (_request(str(uuid.uuid4())), code_pb2.NOT_FOUND, set()),
        3: (_request(""), code_pb2.INVALID_ARGUMENT, {"workflow_id"}),
        4: (_request("x" * 65), code_pb2.INVALID_ARGUMENT, {"workflow_id"}),
        5: (_request(mine, after=-1), code_pb2.INVALID_ARGUMENT, {"after_sequence"}),
        6: (_request(theirs), code_pb2.NOT_FOUND, set()),
    }
    stream = _Stream(channel, md)
    await stream.watch(1, _request(mine))
    for watch_id, (request, _, _) in failing.items():
        await stream.watch(watch_id, request)
    await stream.ended(*failing)
    await stream.watch(9, _request(later))
    assert await stream.ended(1, 9) == [status_pb2.Status()] * 2
    await stream.close()
    for watch_id, (request, code, fields) in failing.items():
        end = stream.ends[watch_id]
        assert end.code == code, (watch_id, end)
        assert _violated(end) == fields, (watch_id, end)
        assert end.message, end
        assert stream.events[watch_id] == []
        events, alone = await _alone(channel, md, request)
        assert events == []
        assert end == alone, (watch_id, end, alone)
    # another user's workflow reads exactly as one that does not exist
    assert stream.ends[6].message.replace(theirs, "?") == stream.ends[2].message.replace(
        failing[2][0].workflow_id, "?"
    )
    for watch_id, wid in ((1, mine), (9, later)):
        expected, _ = await _alone(channel, md, _request(wid))
        assert stream.events[watch_id] == expected
        assert expected[-1].workflow_state == pb.WORKFLOW_STATE_SUCCEEDED


async def test_cancel_ends_a_watch_with_no_answer_and_frees_its_slot(
    back_ends: Suite, channel: grpc.aio.Channel
) -> None:
    """Two watches of waiting workflows hold two watch slots; `cancel` of one gives its
    slot back and no end, even once its workflow ends; the other goes on to its OK end;
    the cancelled id can be used again (an id not open is ignored by `cancel`)."""
    slots = _slots(back_ends)
    md = as_user(back_ends, OWNER)
    first, second = await _submit(channel, md, WAITS), await _submit(channel, md, WAITS)
    stream = _Stream(channel, md)
    await stream.watch(1, _request(first))
    await stream.watch(2, _request(second))
    await stream.started(1, 2)
    assert slots.in_flight == 2
    await stream.cancel(1)
    await until(lambda: slots.in_flight == 1, TIMEOUT)
    await stream.cancel(1)  # no longer open: ignored
    await stream.cancel(12345)  # never open: ignored
    # its workflow ends: a watch still open would now get the last events and its end
    await pb_grpc.WorkflowServiceStub(channel).CancelWorkflow(
        pb.CancelWorkflowRequest(workflow_id=first), metadata=md, timeout=TIMEOUT
    )
    await _signal(channel, md, second)
    assert await stream.ended(2) == [status_pb2.Status()]
    expected, _ = await _alone(channel, md, _request(second))
    assert stream.events[2] == expected
    await until(lambda: slots.in_flight == 0, TIMEOUT)
    assert 1 not in stream.ends
    cancelled, _ = await _alone(channel, md, _request(first))
    assert cancelled[-1].workflow_state == pb.WORKFLOW_STATE_CANCELLED
    assert stream.events[1] == cancelled[: len(stream.events[1])]
    assert pb.WORKFLOW_STATE_CANCELLED not in {e.workflow_state for e in stream.events[1]}
    stream.forget(1)
    await stream.watch(1, _request(first))  # the cancelled watch's id is free
    assert await stream.ended(1) == [status_pb2.Status()]
    assert stream.events[1] == cancelled
    await stream.close()
    assert 1 in stream.ends and slots.in_flight == 0


async def test_a_watch_id_already_open_ends_the_stream(
    back_ends: Suite, channel: grpc.aio.Channel
) -> None:
    """A second watch under an open watch's id ends the whole stream INVALID_ARGUMENT on
    `watch.watch_id`, and frees every slot its watches held; an id whose end was read may
    be used again."""
    slots = _slots(back_ends)
    md = as_user(back_ends, OWNER)
    waiting = await _submit(channel, md, WAITS)
    stream = _Stream(channel, md)
    await stream.watch(4, _request(str(uuid.uuid4())))
    assert [end.code for end in await stream.ended(4)] == [code_pb2.NOT_FOUND]
    stream.forget(4)
    await stream.watch(4, _request(waiting))  # ended: its id is free
    await stream.watch(5, _request(waiting))
    await stream.started(4, 5)
    assert slots.in_flight == 2
    await stream.watch(5, _request(waiting))
    error = await stream.failure()
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error
    assert set(field_violations(error)) == {"watch.watch_id"}, error
    assert 4 not in stream.ends and 5 not in stream.ends
    await until(lambda: slots.in_flight == 0, TIMEOUT)


async def test_a_stream_carries_at_most_watches_per_stream_open_watches(
    base_overrides: dict[str, Any],
) -> None:
    """With taskproc.watches_per_stream = 3: watches that ended do not count, three open
    ones are served, and a fourth open one ends the stream RESOURCE_EXHAUSTED
    (STREAM_WATCHES_EXHAUSTED, a QuotaFailure on the setting), freeing their slots."""
    async with (
        _back_ends(base_overrides, watches_per_stream=3) as suite,
        grpc.aio.insecure_channel(suite.address("taskproc")) as channel,
    ):
        slots = _slots(suite)
        md = as_user(suite, OWNER)
        waiting = [await _submit(channel, md, WAITS) for _ in range(4)]
        stream = _Stream(channel, md)
        for watch_id in (10, 11, 12):
            await stream.watch(watch_id, _request(str(uuid.uuid4())))
        await stream.ended(10, 11, 12)
        for watch_id, wid in zip((1, 2, 3), waiting, strict=False):
            await stream.watch(watch_id, _request(wid))
        await stream.started(1, 2, 3)
        assert slots.in_flight == 3
        await stream.watch(4, _request(waiting[3]))
        error = await stream.failure()
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error
        assert error_reason(error) == "STREAM_WATCHES_EXHAUSTED", error
        status = rpc_status.from_call(error)
        assert status is not None
        quota = _details(status, error_details_pb2.QuotaFailure)
        assert [v.subject for q in quota for v in q.violations] == ["taskproc.watches_per_stream"]
        assert not {1, 2, 3, 4} & set(stream.ends)
        await until(lambda: slots.in_flight == 0, TIMEOUT)


async def test_a_watch_beyond_the_replica_s_slots_ends_resource_exhausted_alone(
    base_overrides: dict[str, Any],
) -> None:
    """With taskproc.max_watch_streams = 1: a second open watch ends RESOURCE_EXHAUSTED
    (WatchWorkflow's very status) while the first goes on; once the first is cancelled its
    slot serves the next watch on the same stream."""
    async with (
        _back_ends(base_overrides, max_watch_streams=1) as suite,
        grpc.aio.insecure_channel(suite.address("taskproc")) as channel,
    ):
        slots = _slots(suite)
        md = as_user(suite, OWNER)
        wid = await _submit(channel, md, WAITS)
        stream = _Stream(channel, md)
        await stream.watch(1, _request(wid))
        await stream.started(1)
        assert slots.in_flight == 1
        await stream.watch(2, _request(wid))
        [end] = await stream.ended(2)
        assert end.code == code_pb2.RESOURCE_EXHAUSTED, end
        infos = _details(end, error_details_pb2.ErrorInfo)
        assert [i.reason for i in infos] == ["WATCH_STREAMS_EXHAUSTED"], end
        events, alone = await _alone(channel, md, _request(wid))  # the slot is still taken
        assert events == [] and end == alone, (end, alone)
        assert 1 not in stream.ends
        await stream.cancel(1)
        await until(lambda: slots.in_flight == 0, TIMEOUT)
        await stream.watch(3, _request(wid))
        await stream.started(3)
        assert stream.events[3][0].sequence == 1
        await _signal(channel, md, wid)
        assert await stream.ended(3) == [status_pb2.Status()]
        await stream.close()
        assert 1 not in stream.ends


async def test_an_unauthenticated_stream_is_refused(
    back_ends: Suite, channel: grpc.aio.Channel
) -> None:
    """Called around the gateway, with no identity assertion or a forged one, the stream
    is UNAUTHENTICATED; a bare service acting for no user is refused as WatchWorkflow
    refuses it."""
    for md in ((), ((IDENTITY_METADATA_KEY, "forged"),)):
        stream = _Stream(channel, md)  # refused before any request is read
        error = await stream.failure()
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED, error
        assert not stream.replies
    identity = InternalIdentity.from_settings(back_ends.settings)
    service = ((IDENTITY_METADATA_KEY, identity.assertion(None, "gateway")),)
    stream = _Stream(channel, service)
    error = await stream.failure()
    _, alone = await _alone(channel, service, _request(str(uuid.uuid4())))
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED, error
    assert error.code().value[0] == alone.code and error.details() == alone.message
