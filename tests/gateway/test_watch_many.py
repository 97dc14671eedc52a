"""Watchers of *different* workflows through the gateway: their shared streams go as watches
of one upstream WatchWorkflows stream (gateway/relay.py `_Many`) instead of a stream each.
Each watcher still gets exactly what a stream of its own would: its workflow's events, its
own end (OK, or its error with its details), its own deadline and cancellation."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from aiwfe.app.suite import Suite
from aiwfe.auth.v1 import auth_service_pb2 as auth_pb
from aiwfe.auth.v1 import auth_service_pb2_grpc as auth_grpc
from aiwfe.taskproc.v1 import workflow_service_pb2 as pb
from aiwfe.taskproc.v1 import workflow_service_pb2_grpc as pb_grpc
from gateway import relay
from taskproc.service import WorkflowServicer
from tests.conftest import until
from tests.gateway.test_watch_fanout import _get, _signal, _slots, _submit, _waiting, _Watcher
from tests.taskproc.helpers import new_user


def _relay(suite: Suite) -> relay.Relay:
    return suite.running["gateway"].front._relay


def _upstream_streams(suite: Suite) -> int:
    """Streams the gateway holds open to taskproc."""
    pools = _relay(suite).pools
    return sum(len(conn.streams) for name, pool in pools.items() if "taskproc" in name
               for conn in pool.conns)  # fmt: skip


def _watches(suite: Suite) -> int:
    return sum(len(many.watches) for many in _relay(suite).manys.values())


async def _fast(channel: grpc.aio.Channel, token: str, wid: str) -> None:
    """Calls until the caller's token is cached and its quota leased: the relay's path."""
    for _ in range(3):
        await _get(channel, token, wid)


async def _ended(watcher: _Watcher) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as ended:
        await asyncio.wait_for(watcher.task, 10)
    return ended.value


def _details(error: grpc.aio.AioRpcError) -> status_pb2.Status:
    for key, value in error.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            return status_pb2.Status.FromString(value)
    raise AssertionError(f"no details in {error}")


async def test_watchers_of_different_workflows_share_one_upstream_stream(suite: Suite) -> None:
    """Four watchers of four workflows (1 to 4 signals each) hold one upstream stream and
    four watch slots; each gets its own workflow's events, in order, to its terminal state;
    the stream ends with the last of them."""
    async with grpc.aio.insecure_channel(suite.address("gateway")) as channel:
        token = await new_user(suite, channel)
        signals = [[f"w{i}s{j}" for j in range(i + 1)] for i in range(4)]
        wids = [await _submit(channel, token, _waiting(*names)) for names in signals]
        await _fast(channel, token, wids[0])
        watchers = [_Watcher(channel, token, wid) for wid in wids]
        await until(lambda: all(w.events for w in watchers), 10)
        assert _watches(suite) == 4
        assert len(_relay(suite).manys) == 1
        assert len(_relay(suite).admissions) == 1  # one re-admission for the caller's four
        assert _upstream_streams(suite) == 1
        assert _slots(suite).in_flight == 4
        for wid, names in zip(wids, signals, strict=True):
            for name in names:
                await _signal(channel, token, wid, name)
        results = await asyncio.wait_for(asyncio.gather(*(w.task for w in watchers)), 20)
        await until(lambda: not _relay(suite).manys and _upstream_streams(suite) == 0, 10)
        # What a watch of its own returns now (a stream each: after a terminal state the
        # relay's watch is over), for comparison.
        for wid, events in zip(wids, results, strict=True):
            again = _Watcher(channel, token, wid)
            assert await asyncio.wait_for(again.task, 10) == events
    for names, events in zip(signals, results, strict=True):
        assert [e.sequence for e in events] == list(range(1, len(events) + 1))
        assert events[-1].workflow_state == pb.WORKFLOW_STATE_SUCCEEDED
        assert {e.step_name for e in events if e.step_name} == {f"s{j}" for j in range(len(names))}
    await until(lambda: _slots(suite).in_flight == 0, 10)


async def test_a_watch_error_is_its_watcher_alone_with_its_details(suite: Suite) -> None:
    """On one upstream stream: an unknown workflow ends NOT_FOUND, a malformed id ends
    INVALID_ARGUMENT with its field violation, a negative after_sequence too; a watcher
    of a live workflow beside them goes on to its end."""
    async with grpc.aio.insecure_channel(suite.address("gateway")) as channel:
        token = await new_user(suite, channel)
        wid = await _submit(channel, token, _waiting("go"))
        await _fast(channel, token, wid)
        live = _Watcher(channel, token, wid)
        await until(lambda: bool(live.events), 10)
        unknown = _Watcher(channel, token, "00000000-0000-4000-8000-000000000000")
        malformed = _Watcher(channel, token, "x" * 65)
        negative = _Watcher(channel, token, wid, after=-1)
        missing = await _ended(unknown)
        assert missing.code() == grpc.StatusCode.NOT_FOUND
        assert "not found" in (missing.details() or "").lower()
        for error, field in ((await _ended(malformed), "workflow_id"),
                             (await _ended(negative), "after_sequence")):  # fmt: skip
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
            status = _details(error)
            assert status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
            request = error_details_pb2.BadRequest()
            assert any(d.Unpack(request) for d in status.details)
            assert [v.field for v in request.field_violations] == [field]
        assert not live.task.done()
        assert _upstream_streams(suite) == 1
        await _signal(channel, token, wid, "go")
        events = await asyncio.wait_for(live.task, 10)
    assert events[-1].workflow_state == pb.WORKFLOW_STATE_SUCCEEDED


async def test_cancelled_and_expired_watchers_end_their_watch_upstream(suite: Suite) -> None:
    """A watcher that cancels and one whose deadline passes each end their upstream watch
    (its slot comes back); the third goes on; the stream goes with the last."""
    async with grpc.aio.insecure_channel(suite.address("gateway")) as channel:
        token = await new_user(suite, channel)
        wids = [await _submit(channel, token, _waiting("go")) for _ in range(3)]
        await _fast(channel, token, wids[0])
        stub = pb_grpc.WorkflowServiceStub(channel)
        watchers = [_Watcher(channel, token, wid) for wid in wids[:2]]
        short = stub.WatchWorkflow(
            pb.WatchWorkflowRequest(workflow_id=wids[2]),
            metadata=(("authorization", f"Bearer {token}"),),
            timeout=1.5,
        )
        await until(lambda: all(w.events for w in watchers) and _slots(suite).in_flight == 3, 10)
        assert _watches(suite) == 3
        watchers[0].call.cancel()
        await until(lambda: _slots(suite).in_flight == 2 and _watches(suite) == 2, 10)
        with pytest.raises(grpc.aio.AioRpcError) as expired:
            async for _ in short:
                pass
        assert expired.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        await until(lambda: _slots(suite).in_flight == 1 and _watches(suite) == 1, 10)
        assert _upstream_streams(suite) == 1
        await _signal(channel, token, wids[1], "go")
        events = await asyncio.wait_for(watchers[1].task, 10)
        assert events[-1].workflow_state == pb.WORKFLOW_STATE_SUCCEEDED
        await until(lambda: _upstream_streams(suite) == 0 and not _relay(suite).manys, 10)


async def test_a_broken_upstream_stream_ends_its_watchers_and_the_next_opens_anew(
    suite: Suite, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A message the relay cannot take (oversized here) ends the upstream stream: every
    watcher on it ends UNAVAILABLE, none hangs; a new watcher opens a new stream."""
    async with grpc.aio.insecure_channel(suite.address("gateway")) as channel:
        token = await new_user(suite, channel)
        wids = [await _submit(channel, token, _waiting("go")) for _ in range(2)]
        await _fast(channel, token, wids[0])
        monkeypatch.setattr(relay, "_MANY_MESSAGE", 8)
        watchers = [_Watcher(channel, token, wid) for wid in wids]
        for watcher in watchers:
            error = await _ended(watcher)
            assert error.code() == grpc.StatusCode.UNAVAILABLE
            assert "oversized" in (error.details() or "")
        assert not _relay(suite).manys
        monkeypatch.setattr(relay, "_MANY_MESSAGE", 4 << 20)
        again = _Watcher(channel, token, wids[0])
        await until(lambda: bool(again.events), 10)
        await _signal(channel, token, wids[0], "go")
        events = await asyncio.wait_for(again.task, 10)
    assert events[-1].workflow_state == pb.WORKFLOW_STATE_SUCCEEDED
    await until(lambda: _slots(suite).in_flight == 0, 10)


@pytest.fixture
async def older_taskproc(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[None]:
    """taskproc as a replica from before WatchWorkflows (UNIMPLEMENTED)."""
    monkeypatch.setattr(
        WorkflowServicer, "WatchWorkflows", pb_grpc.WorkflowServiceServicer.WatchWorkflows
    )
    yield


async def test_a_back_end_without_watchworkflows_gets_a_stream_per_watcher(
    older_taskproc: None, suite: Suite
) -> None:
    """An older taskproc answers WatchWorkflows UNIMPLEMENTED: the watchers that waited on
    it go on streams of their own, unharmed, and so do later ones (no stream is tried)."""
    async with grpc.aio.insecure_channel(suite.address("gateway")) as channel:
        token = await new_user(suite, channel)
        wids = [await _submit(channel, token, _waiting("go")) for _ in range(3)]
        await _fast(channel, token, wids[0])
        watchers = [_Watcher(channel, token, wid) for wid in wids[:2]]
        await until(lambda: all(w.events for w in watchers), 10)
        assert _relay(suite).many_refused
        late = _Watcher(channel, token, wids[2])
        await until(lambda: bool(late.events), 10)
        assert not _relay(suite).manys
        assert _upstream_streams(suite) == 3
        for wid in wids:
            await _signal(channel, token, wid, "go")
        results = await asyncio.wait_for(asyncio.gather(*(w.task for w in [*watchers, late])), 20)
    for events in results:
        assert events[-1].workflow_state == pb.WORKFLOW_STATE_SUCCEEDED


async def test_a_full_upstream_stream_takes_no_more_watches(
    suite: Suite, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past `_MANY_WATCHES` on a stream (2 here) the next watch opens another stream; both
    serve their watchers to the end."""
    monkeypatch.setattr(relay, "_MANY_WATCHES", 2)
    async with grpc.aio.insecure_channel(suite.address("gateway")) as channel:
        token = await new_user(suite, channel)
        wids = [await _submit(channel, token, _waiting("go")) for _ in range(3)]
        await _fast(channel, token, wids[0])
        watchers = [_Watcher(channel, token, wid) for wid in wids]
        await until(lambda: all(w.events for w in watchers), 10)
        assert _upstream_streams(suite) == 2
        assert _watches(suite) == 1  # the stream new watches go on; the full one is apart
        for wid in wids:
            await _signal(channel, token, wid, "go")
        results = await asyncio.wait_for(asyncio.gather(*(w.task for w in watchers)), 20)
        await until(lambda: _upstream_streams(suite) == 0, 10)
    for events in results:
        assert events[-1].workflow_state == pb.WORKFLOW_STATE_SUCCEEDED


async def test_a_lost_upstream_connection_ends_every_watcher_unavailable(suite: Suite) -> None:
    """The gateway's connection to taskproc breaks: each watcher on the stream ends
    UNAVAILABLE (as relayed streams of their own would), none hangs, slots come back, and a
    new watcher is served on a new connection."""
    async with grpc.aio.insecure_channel(suite.address("gateway")) as channel:
        token = await new_user(suite, channel)
        wids = [await _submit(channel, token, _waiting("go")) for _ in range(2)]
        await _fast(channel, token, wids[0])
        watchers = [_Watcher(channel, token, wid) for wid in wids]
        await until(lambda: all(w.events for w in watchers), 10)
        for name, pool in _relay(suite).pools.items():
            if "taskproc" in name:
                for conn in pool.conns:
                    if conn.streams and conn.transport is not None:
                        conn.transport.abort()
        for watcher in watchers:
            assert (await _ended(watcher)).code() == grpc.StatusCode.UNAVAILABLE
        assert not _relay(suite).manys
        await until(lambda: _slots(suite).in_flight == 0, 10)
        again = _Watcher(channel, token, wids[1])
        await until(lambda: bool(again.events), 10)
        await _signal(channel, token, wids[1], "go")
        events = await asyncio.wait_for(again.task, 10)
    assert events[-1].workflow_state == pb.WORKFLOW_STATE_SUCCEEDED


async def test_revoking_a_token_ends_its_watches_of_every_workflow(suite: Suite) -> None:
    """One re-admission per caller covers its watches of all workflows: once its token is
    revoked, each ends UNAUTHENTICATED within its next check, their upstream watches end
    (slots back), and the caller's re-admission is gone."""
    async with grpc.aio.insecure_channel(suite.address("gateway")) as channel:
        token = await new_user(suite, channel)
        wids = [await _submit(channel, token, _waiting("go")) for _ in range(3)]
        await _fast(channel, token, wids[0])
        watchers = [_Watcher(channel, token, wid) for wid in wids]
        await until(lambda: all(w.events for w in watchers), 10)
        await auth_grpc.AuthServiceStub(channel).Logout(
            auth_pb.LogoutRequest(), metadata=(("authorization", f"Bearer {token}"),), timeout=5
        )
        for watcher in watchers:
            assert (await _ended(watcher)).code() == grpc.StatusCode.UNAUTHENTICATED
        await until(lambda: _slots(suite).in_flight == 0 and _upstream_streams(suite) == 0, 10)
        assert not _relay(suite).admissions and not _relay(suite).fanouts


async def test_an_undecodable_request_fails_alone_not_on_the_shared_stream(suite: Suite) -> None:
    """A watch whose request bytes do not decode is not put on the caller's shared stream
    (taskproc would end the whole stream for it): it goes on a stream of its own and fails
    there, and the caller's watch already on the shared stream goes on."""
    async with grpc.aio.insecure_channel(suite.address("gateway")) as channel:
        token = await new_user(suite, channel)
        wid = await _submit(channel, token, _waiting("go"))
        await _fast(channel, token, wid)
        live = _Watcher(channel, token, wid)
        await until(lambda: bool(live.events), 10)
        bad = channel.unary_stream("/aiwfe.taskproc.v1.WorkflowService/WatchWorkflow")(
            b"\xff\xff\xff", metadata=(("authorization", f"Bearer {token}"),), timeout=10
        )
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            async for _ in bad:
                pass
        assert failed.value.code() != grpc.StatusCode.OK
        assert _watches(suite) == 1 and not live.task.done()
        await _signal(channel, token, wid, "go")
        events = await asyncio.wait_for(live.task, 10)
    assert events[-1].workflow_state == pb.WORKFLOW_STATE_SUCCEEDED
