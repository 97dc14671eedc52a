"""A taskproc replica's watches of different workflows share one WatchWorkflowEventsMany
call to dataplatform (taskproc/shared_watch.py), and each watcher still gets what a stream
of its own would give: its events, its own error with the same status, its watch freed
when it leaves; the call's failure is every watch's, and an older dataplatform without the
method is watched with one WatchWorkflowEvents stream per workflow."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from aiwfe.app.suite import Suite, start_suite
from aiwfe.data.v1 import workflow_store_service_pb2 as store_pb
from aiwfe.data.v1 import workflow_store_service_pb2_grpc as store_grpc
from aiwfe.runtime.identity import IDENTITY_METADATA_KEY, InternalIdentity, Principal
from aiwfe.runtime.server import start_service
from aiwfe.taskproc.v1 import workflow_service_pb2 as pb
from aiwfe.taskproc.v1 import workflow_service_pb2_grpc as pb_grpc
from dataplatform.service import DataPlatformService
from dataplatform.workflows.servicer import WorkflowStore
from taskproc.streams import RENEW_SECONDS
from tests.dataplatform.test_watch_many import _until, _watchers
from tests.taskproc.helpers import as_user, spec

OWNER = Principal(user_id="mux-owner", username="mux-owner", roles=("user",))
STRANGER = Principal(user_id="mux-stranger", username="mux-stranger", roles=("user",))
WAITS = {"name": "a", "op": "wait_for_signal", "inputs": {"name": "go"}}
SHORT = {"name": "a", "op": "noop", "inputs": {"sleep_ms": 300}}
MANY = "WatchWorkflowEventsMany"
ONE = "WatchWorkflowEvents"
RUN = "RunStoredWorkflow"


@pytest.fixture
def served(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """Calls of the watch and run methods dataplatform served (counted at its servicer)."""
    calls = Counter[str]()

    def counting(name: str) -> Callable[..., AsyncIterator[Any]]:
        original = getattr(WorkflowStore, name)

        async def handler(self: WorkflowStore, request: Any, context: Any) -> AsyncIterator[Any]:
            calls[name] += 1
            async for reply in original(self, request, context):
                yield reply

        return handler

    for name in (MANY, ONE, RUN):
        monkeypatch.setattr(WorkflowStore, name, counting(name))
    return calls


@pytest.fixture
async def back_ends(base_overrides: dict[str, Any], served: Counter[str]) -> AsyncIterator[Suite]:
    running = await start_suite(base_overrides, only=("dataplatform", "taskproc"))
    yield running
    await running.stop()


def _open_watches(suite: Suite) -> int:
    """dataplatform's open watches (not those CreateWorkflow leaves for a few seconds)."""
    return len(_watchers(suite.running["dataplatform"]))


async def _submit(stub: Any, md: Any, *steps: dict[str, Any]) -> str:
    reply = await stub.SubmitWorkflow(
        pb.SubmitWorkflowRequest(spec=spec(*steps)), metadata=md, timeout=10
    )
    return str(reply.workflow.workflow_id)


async def _events(stub: Any, md: Any, wid: str) -> list[pb.WatchWorkflowResponse]:
    call = stub.WatchWorkflow(pb.WatchWorkflowRequest(workflow_id=wid), metadata=md, timeout=30)
    return [event async for event in call]


async def _alone(suite: Suite, wid: str, owner: str) -> status_pb2.Status:
    """The status dataplatform's own WatchWorkflowEvents stream ends with."""
    identity = InternalIdentity.from_settings(suite.settings)
    md = ((IDENTITY_METADATA_KEY, identity.assertion(None, "taskproc")),)
    async with grpc.aio.insecure_channel(suite.address("dataplatform")) as channel:
        call = store_grpc.WorkflowStoreServiceStub(channel).WatchWorkflowEvents(
            store_pb.WatchWorkflowEventsRequest(
                workflow_id=wid, scope=store_pb.WorkflowScope(owner_id=owner)
            ),
            metadata=md,
            timeout=10,
        )
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            async for _ in call:
                pass
    status = rpc_status.from_call(failed.value)
    assert status is not None
    return status


async def _watchers_of_many(suite: Suite, served: Counter[str]) -> None:
    """Eight workflows watched at once, plus a stranger's watch of one of them: the
    stranger gets dataplatform's exact NOT_FOUND, every other watcher all its events."""
    async with grpc.aio.insecure_channel(suite.address("taskproc")) as channel:
        stub = pb_grpc.WorkflowServiceStub(channel)
        md = as_user(suite, OWNER)
        wids = [await _submit(stub, md, SHORT) for _ in range(8)]
        watchers = [asyncio.create_task(_events(stub, md, wid)) for wid in wids]
        with pytest.raises(grpc.aio.AioRpcError) as stranger:
            await _events(stub, as_user(suite, STRANGER), wids[0])
        assert stranger.value.code() == grpc.StatusCode.NOT_FOUND
        assert rpc_status.from_call(stranger.value) == await _alone(
            suite, wids[0], STRANGER.user_id
        )
        for events in await asyncio.gather(*watchers):
            assert [e.sequence for e in events] == list(range(1, len(events) + 1))
            assert events[-1].workflow_state == pb.WORKFLOW_STATE_SUCCEEDED
    await _until(lambda: _open_watches(suite) == 0, "dataplatform's watches to end")


async def test_watches_of_many_workflows_share_one_dataplatform_call(
    back_ends: Suite, served: Counter[str]
) -> None:
    """Watchers of eight different workflows and a stranger's watch of one are served by
    one WatchWorkflowEventsMany call: the stranger's NOT_FOUND (dataplatform's exact
    status) ends none of the others, which get every event to the end."""
    await _watchers_of_many(back_ends, served)
    assert served == {MANY: 1, ONE: 1}  # ONE: the test's own call, for the expected status
    assert back_ends.running["taskproc"].service.watches.calls == 1


async def test_the_last_watcher_leaving_frees_dataplatform_s_watch(
    back_ends: Suite, served: Counter[str]
) -> None:
    """A watcher leaving a workflow that never ends cancels its watch: dataplatform keeps
    no wake-up inbox for it, and the call stays open for the next watch."""
    suite = back_ends
    watches = suite.running["taskproc"].service.watches
    async with grpc.aio.insecure_channel(suite.address("taskproc")) as channel:
        stub = pb_grpc.WorkflowServiceStub(channel)
        md = as_user(suite, OWNER)
        waiting = [await _submit(stub, md, WAITS) for _ in range(2)]
        calls = [
            stub.WatchWorkflow(pb.WatchWorkflowRequest(workflow_id=wid), metadata=md)
            for wid in waiting
        ]
        for call in calls:
            assert (await call.read()).sequence == 1
        await _until(lambda: _open_watches(suite) == 2, "both watches to be open")
        calls[0].cancel()
        await _until(lambda: _open_watches(suite) == 1, "the left watch to be freed")
        assert watches.upstreams == 1
        calls[1].cancel()
        await _until(lambda: _open_watches(suite) == 0, "the other watch to be freed")
        assert watches.upstreams == 0 and watches.calls == 1
    assert served == {MANY: 1}


async def test_dataplatform_restarted_fails_every_watch_then_a_new_call_serves(
    back_ends: Suite, served: Counter[str]
) -> None:
    """dataplatform stopped mid-watch: every watcher (and run) on the call gets UNAVAILABLE
    naming dataplatform as the failed dependency; once it is back, a new watch opens a new
    call."""
    suite = back_ends
    async with grpc.aio.insecure_channel(suite.address("taskproc")) as channel:
        stub = pb_grpc.WorkflowServiceStub(channel)
        md = as_user(suite, OWNER)
        waiting = [await _submit(stub, md, WAITS) for _ in range(3)]
        calls = [
            stub.WatchWorkflow(pb.WatchWorkflowRequest(workflow_id=wid), metadata=md, timeout=30)
            for wid in waiting
        ]
        for call in calls:
            assert (await call.read()).sequence == 1
        run = stub.RunWorkflow(pb.RunWorkflowRequest(spec=spec(WAITS)), metadata=md, timeout=30)
        assert (await run.read()).HasField("workflow")
        assert (await run.read()).event.sequence == 1
        calls.append(run)
        dataplatform = suite.running.pop("dataplatform")
        port = dataplatform.port
        await dataplatform.stop(grace=0)
        for call in calls:
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                await call.read()
            assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
            status = rpc_status.from_call(failed.value)
            assert status is not None
            info = error_details_pb2.ErrorInfo()
            assert next(d for d in status.details if d.Unpack(info))
            assert info.metadata["dependency"] == "dataplatform", info
        suite.running["dataplatform"] = await start_service(
            DataPlatformService(suite.settings), host="127.0.0.1", port=port
        )
        end = time.monotonic() + 20
        while True:  # until taskproc's connection is back
            again = stub.WatchWorkflow(
                pb.WatchWorkflowRequest(workflow_id=waiting[0]), metadata=md, timeout=30
            )
            try:
                assert (await again.read()).sequence == 1
                break
            except grpc.aio.AioRpcError as exc:
                assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc
                assert time.monotonic() < end, "no watch after the restart"
                await asyncio.sleep(0.2)
        assert suite.running["taskproc"].service.watches.calls == 1
        again.cancel()
    assert served[ONE] == 0 and served[MANY] >= 2


@pytest.fixture
async def older_dataplatform(
    base_overrides: dict[str, Any], served: Counter[str], monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Suite]:
    """A dataplatform without WatchWorkflowEventsMany (UNIMPLEMENTED), as before #23's
    multiplexing, and a taskproc that has it."""

    async def missing(self: WorkflowStore, requests: Any, context: Any) -> AsyncIterator[Any]:
        served[MANY] += 1
        raise NotImplementedError
        yield  # pragma: no cover - makes this an async generator

    monkeypatch.setattr(WorkflowStore, MANY, missing)
    running = await start_suite(base_overrides, only=("dataplatform", "taskproc"))
    yield running
    await running.stop()


async def test_an_older_dataplatform_is_watched_with_a_stream_per_workflow(
    older_dataplatform: Suite, served: Counter[str]
) -> None:
    """Against a dataplatform answering UNIMPLEMENTED, the watches move to one
    WatchWorkflowEvents stream per workflow with nothing lost, and stay there; so do runs,
    each on a RunStoredWorkflow call of its own."""
    await _watchers_of_many(older_dataplatform, served)
    assert served[MANY] == 1
    assert served[ONE] == 10  # eight workflows, the stranger's watch and the test's own
    await _runs(older_dataplatform, 3)
    assert served[MANY] == 1 and served[RUN] == 3


async def _runs(suite: Suite, n: int, left_open: int = 0) -> None:
    """`n` RunWorkflow calls at once: each gets its stored workflow first, then every event
    in order to SUCCEEDED; then dataplatform watches `left_open` (the test's others)."""
    async with grpc.aio.insecure_channel(suite.address("taskproc")) as channel:
        stub = pb_grpc.WorkflowServiceStub(channel)
        md = as_user(suite, OWNER)

        async def run() -> None:
            call = stub.RunWorkflow(
                pb.RunWorkflowRequest(spec=spec(SHORT)), metadata=md, timeout=30
            )
            replies = [reply async for reply in call]
            assert replies[0].HasField("workflow"), replies[0]
            events = [r.event for r in replies[1:]]
            assert [e.sequence for e in events] == list(range(1, len(events) + 1))
            assert events[-1].workflow_state == pb.WORKFLOW_STATE_SUCCEEDED

        await asyncio.gather(*(run() for _ in range(n)))
    await _until(lambda: _open_watches(suite) == left_open, "dataplatform's watches to end")


async def test_runs_go_on_the_multiplexed_call(back_ends: Suite, served: Counter[str]) -> None:
    """32 RunWorkflow calls at once are runs on the replica's one WatchWorkflowEventsMany
    call, not RunStoredWorkflow calls of their own, each with all it got before; a caller
    leaving a run that never ends frees its watch in dataplatform and the call stays
    open."""
    suite = back_ends
    await _runs(suite, 32)
    assert served == {MANY: 1}
    async with grpc.aio.insecure_channel(suite.address("taskproc")) as channel:
        stub = pb_grpc.WorkflowServiceStub(channel)
        call = stub.RunWorkflow(
            pb.RunWorkflowRequest(spec=spec(WAITS)), metadata=as_user(suite, OWNER)
        )
        assert (await call.read()).HasField("workflow")
        assert (await call.read()).event.sequence == 1
        await _until(lambda: _open_watches(suite) == 1, "the run's watch to be open")
        call.cancel()
        await _until(lambda: _open_watches(suite) == 0, "the left run's watch to be freed")
    watches = suite.running["taskproc"].service.watches
    assert watches.calls == 1 and suite.running["taskproc"].service.streams.multiplexed == 0
    assert served == {MANY: 1}


@pytest.fixture
async def runless_dataplatform(
    base_overrides: dict[str, Any], served: Counter[str], monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Suite]:
    """A dataplatform whose WatchWorkflowEventsMany takes watches but not runs (before
    runs were added, it ignored them): it does not send the header."""
    monkeypatch.setattr("dataplatform.workflows.servicer.MANY_RUNS_HEADER", "x-aiwfe-older")
    running = await start_suite(base_overrides, only=("dataplatform", "taskproc"))
    yield running
    await running.stop()


async def test_a_dataplatform_without_runs_gets_a_call_per_run(
    runless_dataplatform: Suite, served: Counter[str]
) -> None:
    """No run is sent on a call whose dataplatform does not say it takes them: each goes as
    a RunStoredWorkflow call of its own, with nothing lost, and watches still share the
    multiplexed call."""
    await _runs(runless_dataplatform, 3)
    assert served == {MANY: 1, RUN: 3}
    await _watchers_of_many(runless_dataplatform, served)
    assert served == {MANY: 1, RUN: 3, ONE: 1}


async def test_an_old_call_takes_no_new_run_and_ends_with_its_last_watch(
    back_ends: Suite, served: Counter[str]
) -> None:
    """A call open for longer than `RENEW_SECONDS` (its identity assertion no longer fresh)
    takes no new run or watch: a new call does, while the old one's watch is served on to
    its end; then the old call ends cleanly (OK). A call without watches that is due ends
    when the next watch or run comes, which a new call takes."""
    suite = back_ends
    watches = suite.running["taskproc"].service.watches
    async with grpc.aio.insecure_channel(suite.address("taskproc")) as channel:
        stub = pb_grpc.WorkflowServiceStub(channel)
        md = as_user(suite, OWNER)
        waiting = await _submit(stub, md, WAITS)
        old = stub.WatchWorkflow(pb.WatchWorkflowRequest(workflow_id=waiting), metadata=md)
        assert (await old.read()).sequence == 1
        first = watches._muxes[0]
        first.opened -= RENEW_SECONDS + 1  # aged, not slept: the new call is not due in the test
        await _runs(suite, 2, left_open=1)  # on a new call
        assert served == {MANY: 2} and first.retired and not first.task.done()
        assert first not in watches._muxes and len(watches._muxes) == 1
        await stub.CancelWorkflow(pb.CancelWorkflowRequest(workflow_id=waiting), metadata=md)
        while (event := await old.read()) is not grpc.aio.EOF:
            last = event
        assert last.workflow_state == pb.WORKFLOW_STATE_CANCELLED
        await asyncio.wait_for(first.task, 10)  # ended by dataplatform, OK: no error raised
        renewed = watches._muxes[0]
        renewed.opened -= RENEW_SECONDS + 1
        again = stub.WatchWorkflow(
            pb.WatchWorkflowRequest(workflow_id=await _submit(stub, md, WAITS)), metadata=md
        )
        assert (await again.read()).sequence == 1
        assert served == {MANY: 3} and renewed.retired  # renewed has no watch: it ended
        await asyncio.wait_for(renewed.task, 10)
        again.cancel()
        await _until(lambda: _open_watches(suite) == 0, "dataplatform's watches to end")
