"""Watchers of one workflow through the gateway share one upstream WatchWorkflow stream
(gateway/relay.py `_Fanout`): each still gets exactly what a watch of its own would, a
late joiner included; a watcher that never reads is reset alone; principals never share;
the upstream goes with the last watcher."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import grpc
import pytest
from google.protobuf.struct_pb2 import Struct

from aiwfe.app.suite import Suite
from aiwfe.auth.v1 import auth_service_pb2 as auth_pb
from aiwfe.auth.v1 import auth_service_pb2_grpc as auth_grpc
from aiwfe.taskproc.v1 import workflow_service_pb2 as pb
from aiwfe.taskproc.v1 import workflow_service_pb2_grpc as pb_grpc
from gateway import h2, relay
from taskproc.streams import WatchSlots
from tests.conftest import bearer, login
from tests.gateway.conformance.raw import REQUEST, RawClient, message
from tests.taskproc.helpers import new_user, spec

OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]
WATCH = b"/aiwfe.taskproc.v1.WorkflowService/WatchWorkflow"


def _slots(suite: Suite) -> WatchSlots:
    return suite.running["taskproc"].service.watch_slots


def _full(suite: Suite) -> int:
    """Calls the gateway's full path took: admitted there (e.g. while the caller's local
    quota lease is renewed), each a stream of its own, as before the fan-out."""
    return int(suite.running["gateway"].front.full_calls)


async def _until(check: Any, seconds: float = 10.0) -> None:
    end = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < end, "not reached in time"
        await asyncio.sleep(0.02)


def _waiting(*signals: str) -> pb.WorkflowSpec:
    """A workflow that stays running until each signal in turn was sent."""
    return spec(
        *(
            {
                "name": f"s{i}",
                "op": "wait_for_signal",
                "inputs": {"name": name},
                **({"depends_on": [f"s{i - 1}"]} if i else {}),
            }
            for i, name in enumerate(signals)
        )
    )


class _Watcher:
    """One WatchWorkflow call read into a list as it arrives."""

    def __init__(self, channel: grpc.aio.Channel, token: str, wid: str, after: int = 0) -> None:
        self.events: list[pb.WatchWorkflowResponse] = []
        self.call = pb_grpc.WorkflowServiceStub(channel).WatchWorkflow(
            pb.WatchWorkflowRequest(workflow_id=wid, after_sequence=after),
            metadata=bearer(token),
            timeout=60,
        )
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> list[pb.WatchWorkflowResponse]:
        async for event in self.call:
            self.events.append(event)
        return self.events


async def _signal(channel: grpc.aio.Channel, token: str, wid: str, name: str) -> None:
    await pb_grpc.WorkflowServiceStub(channel).SignalWorkflow(
        pb.SignalWorkflowRequest(workflow_id=wid, name=name, payload=Struct(), signal_id=name),
        metadata=bearer(token),
        timeout=10,
    )


async def _submit(channel: grpc.aio.Channel, token: str, workflow: pb.WorkflowSpec) -> str:
    reply = await pb_grpc.WorkflowServiceStub(channel).SubmitWorkflow(
        pb.SubmitWorkflowRequest(spec=workflow), metadata=bearer(token), timeout=10
    )
    return reply.workflow.workflow_id


async def test_watchers_share_one_upstream_and_a_late_joiner_gets_it_all(suite: Suite) -> None:
    """Six watchers on two connections hold one taskproc watch; all get every event in
    order and the terminal state; one joining after events gets the same as the first;
    another request (after_sequence) has its own upstream."""
    address = suite.address("gateway")
    async with (
        grpc.aio.insecure_channel(address) as one,
        grpc.aio.insecure_channel(address, options=OWN_CONNECTION) as two,
    ):
        token = await new_user(suite, one)
        wid = await _submit(one, token, _waiting("first", "second"))
        before = _full(suite)
        watchers = [_Watcher(ch, token, wid) for ch in (one, two) for _ in range(3)]
        await _until(lambda: all(w.events for w in watchers))
        own = _full(suite) - before  # each with a stream of its own
        assert own <= 2
        assert _slots(suite).in_flight == 1 + own
        await _signal(one, token, wid, "first")

        await _until(lambda: all(len(w.events) >= 3 for w in watchers))
        before = _full(suite)
        late = _Watcher(two, token, wid)
        resumed = _Watcher(one, token, wid, after=2)
        await _until(lambda: len(late.events) == len(watchers[0].events) and resumed.events)
        own += _full(suite) - before
        assert _slots(suite).in_flight == 2 + own  # the resumed one has its own
        await _signal(one, token, wid, "second")
        results = await asyncio.wait_for(
            asyncio.gather(*(w.task for w in [*watchers, late, resumed])), 20
        )
    first = results[0]
    assert [e.sequence for e in first] == list(range(1, len(first) + 1))
    assert first[-1].workflow_state == pb.WORKFLOW_STATE_SUCCEEDED
    for events in results[1:-1]:
        assert events == first
    assert results[-1] == first[2:]
    await _until(lambda: _slots(suite).in_flight == 0)


async def test_principals_never_share_and_the_last_watcher_leaving_cancels(
    suite: Suite,
) -> None:
    """The owner, another token of the owner and an admin watch the same workflow: three
    upstreams; cancelling every watcher ends them all in taskproc."""
    async with grpc.aio.insecure_channel(suite.address("gateway")) as channel:
        token = await new_user(suite, channel)
        wid = await _submit(channel, token, _waiting("never"))
        admin = await login(channel)
        name = await _username(channel, token)
        again = await login(channel, name, "workflow-test-password-1")
        for caller in (token, again, admin):  # tokens cached, quota leased: the fast path
            for _ in range(3):
                await _get(channel, caller, wid)
        before = _full(suite)
        watchers = [_Watcher(channel, t, wid) for t in (token, token, again, admin, admin)]
        await _until(lambda: all(w.events for w in watchers))
        assert _full(suite) == before
        assert _slots(suite).in_flight == 3
        for watcher in watchers:
            watcher.call.cancel()
        await _until(lambda: _slots(suite).in_flight == 0)


async def _get(channel: grpc.aio.Channel, token: str, wid: str) -> None:
    await pb_grpc.WorkflowServiceStub(channel).GetWorkflow(
        pb.GetWorkflowRequest(workflow_id=wid), metadata=bearer(token), timeout=10
    )


async def _username(channel: grpc.aio.Channel, token: str) -> str:
    me = await auth_grpc.AuthServiceStub(channel).WhoAmI(
        auth_pb.WhoAmIRequest(), metadata=bearer(token), timeout=5
    )
    return me.username


async def test_a_watcher_that_never_reads_is_reset_alone(
    suite: Suite, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client with a zero stream window joins a shared watch: once its unwritten bytes
    pass the cap (shrunk here so a short workflow passes it) it alone is reset
    (ENHANCE_YOUR_CALM), having been sent no byte; the others get it all."""
    monkeypatch.setattr(relay, "_WATCHER_LAG", 100)
    address = suite.address("gateway")
    async with grpc.aio.insecure_channel(address) as channel:
        token = await new_user(suite, channel)
        wid = await _submit(channel, token, _waiting("first", "second"))
        watchers = [_Watcher(channel, token, wid) for _ in range(2)]
        await _until(lambda: all(w.events for w in watchers))
        raw = await RawClient.connect(int(address.rsplit(":", 1)[1]), [(h2.INITIAL_WINDOW_SIZE, 0)])
        fields = [(n, WATCH if n == b":path" else v) for n, v in REQUEST]
        raw.headers(1, [*fields, (b"authorization", f"Bearer {token}".encode())])
        body = pb.WatchWorkflowRequest(workflow_id=wid).SerializeToString()
        raw.send(h2.frame(h2.DATA, h2.END_STREAM, 1, message(body)))
        await _signal(channel, token, wid, "first")
        assert await raw.reset_code(1, timeout=10) == h2.ENHANCE_YOUR_CALM
        await _signal(channel, token, wid, "second")
        results = await asyncio.wait_for(asyncio.gather(*(w.task for w in watchers)), 20)
        raw.close()
    assert results[0][-1].workflow_state == pb.WORKFLOW_STATE_SUCCEEDED
    assert results[1] == results[0]
    assert not any(f[0] == h2.DATA and f[2] == 1 for f in raw.seen)


async def test_revoking_a_token_ends_its_shared_watches_and_refuses_joiners(
    suite: Suite,
) -> None:
    """Admission stays per call: once a token is revoked (Logout), a watch with it is
    refused, and the shared stream its watchers hold ends UNAUTHENTICATED at its next
    re-admission (every 0.5 s; 10 s allowed: a CI run beside the container stage took over
    1.5 s); another principal's watch of the same workflow goes on."""
    async with grpc.aio.insecure_channel(suite.address("gateway")) as channel:
        token = await new_user(suite, channel)
        wid = await _submit(channel, token, _waiting("first"))
        for _ in range(3):
            await _get(channel, token, wid)
        admin = await login(channel)
        for _ in range(3):
            await _get(channel, admin, wid)
        watchers = [_Watcher(channel, token, wid) for _ in range(2)]
        other = _Watcher(channel, admin, wid)
        await _until(lambda: all(w.events for w in [*watchers, other]))
        await auth_grpc.AuthServiceStub(channel).Logout(
            auth_pb.LogoutRequest(), metadata=bearer(token), timeout=5
        )
        late = _Watcher(channel, token, wid)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await asyncio.wait_for(late.task, 10)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert not late.events
        for watcher in watchers:
            with pytest.raises(grpc.aio.AioRpcError) as ended:
                await asyncio.wait_for(watcher.task, 10)
            assert ended.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert not other.task.done()
        await _until(lambda: _slots(suite).in_flight == 1)
        other.call.cancel()


async def test_a_fan_out_past_its_kept_bytes_takes_no_joiner(
    suite: Suite, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past the frames a fan-out may keep (shrunk here), those watching go on and a late
    caller opens a stream of its own, still getting every event from the first."""
    monkeypatch.setattr(relay, "_FANOUT_HISTORY", 100)
    async with grpc.aio.insecure_channel(suite.address("gateway")) as channel:
        token = await new_user(suite, channel)
        wid = await _submit(channel, token, _waiting("first", "second"))
        for _ in range(3):
            await _get(channel, token, wid)
        before = _full(suite)
        watchers = [_Watcher(channel, token, wid) for _ in range(2)]
        await _until(lambda: all(w.events for w in watchers))
        own = _full(suite) - before
        assert _slots(suite).in_flight == 1 + own
        await _signal(channel, token, wid, "first")
        await _until(lambda: all(len(w.events) >= 3 for w in watchers))
        before = _full(suite)
        late = _Watcher(channel, token, wid)
        await _until(lambda: len(late.events) >= 3)
        assert _slots(suite).in_flight == 2 + own + _full(suite) - before
        assert not suite.running["gateway"].front._relay.fanouts
        await _signal(channel, token, wid, "second")
        results = await asyncio.wait_for(asyncio.gather(*(w.task for w in [*watchers, late])), 20)
    assert results[0][-1].workflow_state == pb.WORKFLOW_STATE_SUCCEEDED
    assert results[1] == results[0] == results[2]
    assert suite.running["gateway"].front._relay.fanout_bytes == 0
