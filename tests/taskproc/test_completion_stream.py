"""The worker's completions on one CompleteStepsStream (taskproc/completions.py), against a
real dataplatform and against real gRPC servers that lack the method or never answer."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from aiwfe.data.v1 import workflow_store_service_pb2 as store_pb
from aiwfe.data.v1 import workflow_store_service_pb2_grpc as store_grpc
from aiwfe.runtime.channels import Upstream
from aiwfe.runtime.config import TaskProcSettings
from aiwfe.runtime.identity import InternalIdentity
from aiwfe.taskproc.v1 import workflow_service_pb2 as S
from taskproc import completions
from taskproc.completions import CompletionStream
from taskproc.worker import Worker
from tests.conftest import field_violations
from tests.taskproc.helpers import create_stored


class _CountingStub:
    """The real stub, counting the streams opened through it."""

    def __init__(self, stub: store_grpc.WorkflowStoreServiceStub) -> None:
        self._stub = stub
        self.opened: list[Any] = []

    def CompleteStepsStream(self, **kwargs: Any) -> Any:
        call = self._stub.CompleteStepsStream(**kwargs)
        self.opened.append(call)
        return call

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stub, name)


async def _claim(stub: Any, md: Any, worker: str) -> store_pb.ClaimedStep:
    reply = await stub.ClaimSteps(
        store_pb.ClaimStepsRequest(worker_id=worker, max_steps=1, lease_seconds=30),
        metadata=md,
        timeout=10,
    )
    assert len(reply.steps) == 1
    return reply.steps[0]


def _done(worker: str, *refs: store_pb.StepRef, eager: int = 0) -> store_pb.CompleteStepsRequest:
    return store_pb.CompleteStepsRequest(
        worker_id=worker,
        results=[store_pb.StepResult(ref=r) for r in refs],
        eager_max_steps=eager,
        eager_lease_seconds=30.0 if eager else 0.0,
    )


async def test_a_chain_completes_on_one_stream_with_complete_steps_answers(store) -> None:
    """Every batch of a 2-step chain goes on the one stream: the first leases its successor
    (eager dispatch), the second finishes the workflow, a repeated result is refused as
    CompleteSteps refuses it, and the workflow is SUCCEEDED in the store."""
    stub, md, _ = store
    owner = f"cs{time.time_ns()}"
    worker = f"w-{owner}"
    wid = await create_stored(stub, md, owner, 2, chain=True)
    counting = _CountingStub(stub)
    stream = CompletionStream(counting, lambda: md)  # type: ignore[arg-type]
    first = await _claim(stub, md, worker)
    assert first.ref.workflow_id == wid
    reply = await stream.complete(_done(worker, first.ref, eager=1), timeout=10)
    assert list(reply.accepted) == [True]
    assert [s.ref.step_name for s in reply.eager_steps] == ["s1"]
    again = await stream.complete(_done(worker, first.ref), timeout=10)
    assert list(again.accepted) == [False]
    last = await stream.complete(_done(worker, reply.eager_steps[0].ref), timeout=10)
    assert list(last.accepted) == [True]
    assert len(counting.opened) == 1
    events = await stub.ListWorkflowEvents(
        store_pb.ListWorkflowEventsRequest(
            workflow_id=wid, scope=store_pb.WorkflowScope(owner_id=owner)
        ),
        metadata=md,
        timeout=10,
    )
    assert events.workflow_state == S.WORKFLOW_STATE_SUCCEEDED
    await stream.close()
    assert await counting.opened[0].code() == grpc.StatusCode.OK


async def test_a_rejected_batch_raises_its_own_status_and_the_next_opens_a_new_stream(
    store,
) -> None:
    """A batch dataplatform rejects ends the stream with CompleteSteps' own status
    (INVALID_ARGUMENT with the field violation); the next batch is recorded on a new one."""
    stub, md, _ = store
    owner = f"cs{time.time_ns()}"
    await create_stored(stub, md, owner, 1)
    counting = _CountingStub(stub)
    stream = CompletionStream(counting, lambda: md)  # type: ignore[arg-type]
    step = await _claim(stub, md, f"w-{owner}")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stream.complete(_done("", step.ref), timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "worker_id" in field_violations(caught.value)
    reply = await stream.complete(_done(f"w-{owner}", step.ref), timeout=10)
    assert list(reply.accepted) == [True]
    assert len(counting.opened) == 2
    await stream.close()


async def test_a_stream_due_for_renewal_is_closed_cleanly_and_replaced(store, monkeypatch) -> None:
    """Past its renewal age the stream is half-closed (dataplatform ends it with OK, no
    request lost in it) and the batch goes on a fresh one, with a fresh assertion."""
    stub, md, _ = store
    owner = f"cs{time.time_ns()}"
    await create_stored(stub, md, owner, 1)
    await create_stored(stub, md, owner, 1)
    counting = _CountingStub(stub)
    asked = 0

    def metadata() -> Any:
        nonlocal asked
        asked += 1
        return md

    stream = CompletionStream(counting, metadata)  # type: ignore[arg-type]
    one = await _claim(stub, md, f"w-{owner}")
    assert list((await stream.complete(_done(f"w-{owner}", one.ref), timeout=10)).accepted) == [
        True
    ]
    monkeypatch.setattr(completions, "RENEW_SECONDS", 0.0)
    two = await _claim(stub, md, f"w-{owner}")
    assert list((await stream.complete(_done(f"w-{owner}", two.ref), timeout=10)).accepted) == [
        True
    ]
    assert len(counting.opened) == asked == 2
    assert await asyncio.wait_for(counting.opened[0].code(), 5) == grpc.StatusCode.OK
    await stream.close()


class _Replica(store_grpc.WorkflowStoreServiceServicer):
    """A dataplatform replica of another version: CompleteSteps forwarded to the real one;
    CompleteStepsStream as `stream_mode` says ("missing": UNIMPLEMENTED, "silent": reads
    requests and never answers)."""

    def __init__(self, real: Any, md: Any, stream_mode: str) -> None:
        self.real, self.md, self.mode = real, md, stream_mode
        self.unary_calls = 0
        self.stream_calls = 0
        self.stream_ended = asyncio.Event()

    async def CompleteSteps(self, request: Any, context: Any) -> Any:
        self.unary_calls += 1
        return await self.real.CompleteSteps(request, metadata=self.md, timeout=10)

    async def CompleteStepsStream(self, requests: Any, context: Any) -> AsyncIterator[Any]:
        self.stream_calls += 1
        if self.mode == "missing":
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "Method not implemented!")
        try:
            async for _ in requests:
                await asyncio.sleep(3600)
        finally:
            self.stream_ended.set()
        yield store_pb.CompleteStepsStreamResponse()  # unreachable: makes this a generator


async def _serve(replica: _Replica) -> tuple[grpc.aio.Server, grpc.aio.Channel]:
    server = grpc.aio.server()
    store_grpc.add_WorkflowStoreServiceServicer_to_server(replica, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, grpc.aio.insecure_channel(f"127.0.0.1:{port}")


async def test_a_replica_without_the_stream_gets_unary_calls_from_then_on(store) -> None:
    """UNIMPLEMENTED (an older dataplatform during a rolling upgrade) is not an error: the
    batch goes as a unary CompleteSteps and so does every later one, without asking again."""
    stub, md, _ = store
    owner = f"cs{time.time_ns()}"
    await create_stored(stub, md, owner, 1)
    await create_stored(stub, md, owner, 1)
    replica = _Replica(stub, md, "missing")
    server, channel = await _serve(replica)
    try:
        stream = CompletionStream(store_grpc.WorkflowStoreServiceStub(channel), lambda: md)
        for _ in range(2):
            step = await _claim(stub, md, f"w-{owner}")
            reply = await stream.complete(_done(f"w-{owner}", step.ref), timeout=10)
            assert list(reply.accepted) == [True]
        assert (replica.stream_calls, replica.unary_calls) == (1, 2)
    finally:
        await channel.close()
        await server.stop(0)


async def test_a_replica_that_never_answers_times_out_and_its_stream_is_cancelled(store) -> None:
    """The request's deadline holds on a stream too: TimeoutError after `timeout`, and the
    stream is cancelled (the replica's handler ends), not left open for the next batch."""
    _, md, _ = store
    replica = _Replica(None, md, "silent")
    server, channel = await _serve(replica)
    try:
        stream = CompletionStream(store_grpc.WorkflowStoreServiceStub(channel), lambda: md)
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            await stream.complete(_done("w", store_pb.StepRef(workflow_id="x")), timeout=0.3)
        assert time.monotonic() - started < 3
        await asyncio.wait_for(replica.stream_ended.wait(), 5)
        assert replica.stream_calls == 1
    finally:
        await channel.close()
        await server.stop(0)


async def test_steps_an_answer_leased_to_a_stopping_worker_are_given_back_before_stop_returns(
    store,
) -> None:
    """A completion sent before stop() can come back with dependants leased to this worker
    (eager dispatch); the stopping worker gives them back, and stop() waits for that, so
    another worker can claim them at once instead of after the lease expires."""
    stub, md, running = store
    identity = InternalIdentity.from_settings(running.settings)
    upstream = Upstream(
        "dataplatform", running.address("dataplatform"), running.settings, identity, "taskproc"
    )
    unused = Upstream("cognitive", "127.0.0.1:1", running.settings, identity, "taskproc")
    worker = Worker(TaskProcSettings(), 0.5, upstream, unused)
    try:
        owner = f"cs{time.time_ns()}"
        await create_stored(stub, md, owner, 1)
        leased = await _claim(stub, md, worker.id)
        worker._stopping = True  # stop() has begun: the answer arrives now
        worker.adopt([leased], 0, time.monotonic())
        await worker.stop()
        other = await _claim(stub, md, "other")
        assert (other.ref.workflow_id, other.ref.step_name) == (
            leased.ref.workflow_id,
            leased.ref.step_name,
        )  # at once: released, not left to its 30 s lease
    finally:
        await upstream.close()
        await unused.close()


async def test_bytes_that_are_no_request_end_the_stream_with_invalid_argument(store) -> None:
    """A message on the stream that does not decode is the caller's mistake, answered
    INVALID_ARGUMENT where it is read (not INTERNAL, as grpc itself would)."""
    _, md, running = store
    async with grpc.aio.insecure_channel(running.address("dataplatform")) as channel:
        call = channel.stream_stream("/aiwfe.data.v1.WorkflowStoreService/CompleteStepsStream")(
            metadata=md, timeout=10
        )
        await call.write(b"\x00")
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call.read()
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "is not a valid request message" in (caught.value.details() or "")
