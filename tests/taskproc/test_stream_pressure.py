"""Long-lived watch streams never starve taskproc's control traffic to dataplatform.

The servers here allow only 20 concurrent streams per HTTP/2 connection, and taskproc is
given room for 40 watches of 36 workflows: more upstreams than one connection to
dataplatform can carry. During that flood, submitted workflows keep completing, running
steps keep their leases (each runs once), no breaker opens, and watches above the limit
are refused at once with RESOURCE_EXHAUSTED + RetryInfo while the others carry on.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from aiwfe.app.suite import Suite, start_suite
from aiwfe.runtime import metrics
from aiwfe.runtime.channels import Upstream
from aiwfe.runtime.config import load_settings
from aiwfe.runtime.identity import InternalIdentity, Principal
from aiwfe.runtime.resilience.breaker import BreakerState, breakers_of
from aiwfe.taskproc.v1 import workflow_service_pb2 as pb
from aiwfe.taskproc.v1 import workflow_service_pb2_grpc as pb_grpc
from taskproc.streams import StreamPool
from tests.taskproc.helpers import TERMINAL, as_user, spec

MAX_STREAMS = 20  # per HTTP/2 connection, on every server of the suite
WATCH_LIMIT = 2 * MAX_STREAMS  # taskproc.max_watch_streams
PER_CLIENT_CHANNEL = 15  # the test's own connections to taskproc stay under MAX_STREAMS
LONG_WORKFLOWS = 4
LEASE_SECONDS = 2.0
LONG_STEP_MS = 6000  # three lease lengths: the lease is extended several times mid-flood
WATCHES_PER_CALL = 10  # taskproc.watches_per_stream: the 36 watches take 4 calls


@pytest.fixture
async def crowded(base_overrides: dict[str, Any]) -> AsyncIterator[Suite]:
    """dataplatform and taskproc with few streams per connection and short leases."""
    overrides = {
        **base_overrides,
        "grpc": {**base_overrides["grpc"], "max_concurrent_streams": MAX_STREAMS},
        "taskproc": {
            "max_watch_streams": WATCH_LIMIT,
            "watches_per_stream": WATCHES_PER_CALL,
            "lease_seconds": LEASE_SECONDS,
            "poll_interval": 0.2,
        },
    }
    running = await start_suite(overrides, only=("dataplatform", "taskproc"))
    yield running
    await running.stop()


def _connections_to(port: int) -> int:
    """Established TCP connections to local `port` (grpc uses IPv4-mapped IPv6 sockets)."""
    lines = [
        ln for f in ("tcp", "tcp6") for ln in Path(f"/proc/net/{f}").read_text().splitlines()[1:]
    ]
    return sum(
        1 for ln in lines if ln.split()[2].endswith(f":{port:04X}") and ln.split()[3] == "01"
    )


async def _wait_for(check: Any, seconds: float, what: str) -> None:
    end = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def test_watch_flood_never_starves_control_traffic(crowded: Suite) -> None:
    """3x one connection's streams are opened: workflows keep completing, leases hold, no
    breaker opens, and the watches above the limit get RESOURCE_EXHAUSTED + RetryInfo."""
    suite = crowded
    user = Principal(user_id="stream-user", username="stream-user", roles=("user",))
    md = as_user(suite, user)
    address = suite.address("taskproc")
    # Each its own connection (grpc would otherwise share one between equal channels).
    channels = [
        grpc.aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(-(-(WATCH_LIMIT + MAX_STREAMS) // PER_CLIENT_CHANNEL))
    ]
    stubs = [pb_grpc.WorkflowServiceStub(ch) for ch in channels]
    control = stubs[0]
    dataplatform_port = int(suite.address("dataplatform").rsplit(":", 1)[1])
    try:

        async def submit(workflow: pb.WorkflowSpec) -> str:
            reply = await control.SubmitWorkflow(
                pb.SubmitWorkflowRequest(spec=workflow), metadata=md, timeout=10
            )
            return reply.workflow.workflow_id

        long_step = {"name": "long", "op": "noop", "inputs": {"sleep_ms": LONG_STEP_MS}}
        long_ids = [await submit(spec(long_step)) for _ in range(LONG_WORKFLOWS)]
        # Parked: the first attempt fails and the retry is due long after the test.
        parked_step = {
            "name": "parked",
            "op": "noop",
            "inputs": {"fail_times": 1},
            "retry_policy": {"max_attempts": 2, "initial_backoff_seconds": 600},
        }
        parked_ids = [
            await submit(spec(parked_step)) for _ in range(WATCH_LIMIT - 2 * LONG_WORKFLOWS)
        ]
        # Two watchers per long workflow share one upstream; one per parked workflow.
        watched = [*long_ids, *long_ids, *parked_ids]
        before = _connections_to(dataplatform_port)

        async def watch(n: int) -> list[pb.WatchWorkflowResponse]:
            stream = stubs[n // PER_CLIENT_CHANNEL].WatchWorkflow(
                pb.WatchWorkflowRequest(workflow_id=watched[n % WATCH_LIMIT]),
                metadata=md,
                timeout=60,
            )
            return [event async for event in stream]

        watchers = [asyncio.create_task(watch(n)) for n in range(WATCH_LIMIT)]
        await _wait_for(
            lambda: metrics.REGISTRY.get_sample_value("workflow_watch_streams") == WATCH_LIMIT,
            20,
            "every watch to be in flight",
        )
        # One upstream watch per workflow, multiplexed WATCHES_PER_CALL to a call, the
        # calls on connections of their own, each below the servers' limit (the control
        # connection carries none of them).
        taskproc = suite.running["taskproc"].service
        upstreams = len(set(watched))
        calls = -(-upstreams // WATCHES_PER_CALL)
        await _wait_for(
            lambda: taskproc.watches.upstreams == upstreams,
            10,
            "one upstream watch per watched workflow",
        )
        assert taskproc.watches.calls == calls
        assert sum(c.streams for c in taskproc.streams.connections) == calls
        assert all(c.streams <= MAX_STREAMS for c in taskproc.streams.connections)
        assert _connections_to(dataplatform_port) - before >= 1

        # Above the limit: refused at once, with when to retry.
        for n in range(WATCH_LIMIT, WATCH_LIMIT + MAX_STREAMS // 2):
            started = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await watch(n)
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert time.monotonic() - started < 2
            status = rpc_status.from_call(refused.value)
            assert status is not None
            assert any(d.Is(error_details_pb2.RetryInfo.DESCRIPTOR) for d in status.details)

        # RunWorkflow is a watch too: refused before anything is created.
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            async for _ in control.RunWorkflow(
                pb.RunWorkflowRequest(spec=spec(long_step)), metadata=md, timeout=10
            ):
                pass
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

        # Meanwhile, workflows submitted are claimed, run and completed.
        short_ids = [
            (
                await control.SubmitWorkflow(
                    pb.SubmitWorkflowRequest(
                        spec=spec({"name": "short", "op": "noop", "inputs": {"sleep_ms": 10}})
                    ),
                    metadata=md,
                    timeout=10,
                )
            ).workflow.workflow_id
            for _ in range(10)
        ]
        for wid in short_ids:
            end = time.monotonic() + 30
            while True:
                workflow = (
                    await control.GetWorkflow(
                        pb.GetWorkflowRequest(workflow_id=wid), metadata=md, timeout=10
                    )
                ).workflow
                if workflow.state in TERMINAL:
                    break
                assert time.monotonic() < end, f"{wid} still {workflow.state} during the flood"
                await asyncio.sleep(0.1)
            assert workflow.state == pb.WORKFLOW_STATE_SUCCEEDED, workflow
        assert metrics.REGISTRY.get_sample_value("workflow_watch_streams") == WATCH_LIMIT

        # Every watch ran to the end: the long steps ran once, their leases held.
        for wid in parked_ids:
            await control.CancelWorkflow(
                pb.CancelWorkflowRequest(workflow_id=wid), metadata=md, timeout=10
            )
        results = await asyncio.wait_for(asyncio.gather(*watchers), 60)
        for wid, events in zip(watched, results, strict=True):
            assert [e.sequence for e in events] == list(range(1, len(events) + 1)), events
            if wid in parked_ids:
                assert events[-1].workflow_state == pb.WORKFLOW_STATE_CANCELLED
                continue
            assert events[-1].workflow_state == pb.WORKFLOW_STATE_SUCCEEDED
            running = Counter(e.step_name for e in events if e.step_state == pb.STEP_STATE_RUNNING)
            assert running == {"long": 1}, events
        for wid in long_ids:
            workflow = (
                await control.GetWorkflow(
                    pb.GetWorkflowRequest(workflow_id=wid), metadata=md, timeout=10
                )
            ).workflow
            assert [s.attempts for s in workflow.steps] == [1]
        await _wait_for(
            lambda: metrics.REGISTRY.get_sample_value("workflow_watch_streams") == 0,
            10,
            "the gauge to return to 0",
        )
        listed = await control.ListWorkflows(
            pb.ListWorkflowsRequest(page_size=1000), metadata=md, timeout=10
        )
        assert len(listed.workflows) == len(long_ids) + len(parked_ids) + len(short_ids)
        states = {b.name: b.state for b in breakers_of("taskproc")}
        assert states and set(states.values()) == {BreakerState.CLOSED}, states
    finally:
        for ch in channels:
            await ch.close()


async def test_lease_extension_retries_within_the_lease(crowded: Suite) -> None:
    """With three of every four ExtendLeases calls failing, a running step keeps its lease
    (retried at once, not a third of a lease later) and runs exactly once."""
    suite = crowded
    worker = suite.running["taskproc"].service.worker
    real_call = worker._call
    calls = Counter[str]()

    async def flaky(rpc: Any, request: Any, timeout: float) -> Any:
        if rpc is worker._stub.ExtendLeases:
            calls["extend"] += 1
            if calls["extend"] % 4:
                calls["failed"] += 1
                raise grpc.aio.AioRpcError(
                    grpc.StatusCode.UNAVAILABLE,
                    grpc.aio.Metadata(),
                    grpc.aio.Metadata(),
                    details="injected: dataplatform busy",
                )
        return await real_call(rpc, request, timeout)

    worker._call = flaky
    md = as_user(suite, Principal(user_id="lease-user", username="lease-user", roles=("user",)))
    async with grpc.aio.insecure_channel(suite.address("taskproc")) as channel:
        stub = pb_grpc.WorkflowServiceStub(channel)
        reply = await stub.SubmitWorkflow(
            pb.SubmitWorkflowRequest(
                spec=spec({"name": "long", "op": "noop", "inputs": {"sleep_ms": LONG_STEP_MS}})
            ),
            metadata=md,
            timeout=10,
        )
        events = [
            e
            async for e in stub.WatchWorkflow(
                pb.WatchWorkflowRequest(workflow_id=reply.workflow.workflow_id),
                metadata=md,
                timeout=60,
            )
        ]
    assert calls["failed"] >= 6, calls  # the extensions did fail, over several rounds
    assert events[-1].workflow_state == pb.WORKFLOW_STATE_SUCCEEDED
    running = [e for e in events if e.step_state == pb.STEP_STATE_RUNNING]
    assert len(running) == 1, events


async def test_watch_reread_interval_stretches_with_streams(base_overrides: dict[str, Any]) -> None:
    """Past watch_reads_per_second x watch_poll_interval streams, each new stream asks
    dataplatform to re-read less often, so the re-reads stay within budget (<= 30 s)."""
    settings = load_settings(
        env={},
        overrides={
            **base_overrides,
            "taskproc": {"watch_poll_interval": 1.0, "watch_reads_per_second": 10},
        },
    )
    store = Upstream(
        "dataplatform", "127.0.0.1:1", settings, InternalIdentity.from_settings(settings), "t"
    )
    pool = StreamPool(store, settings)
    try:
        assert pool.poll_interval() == 1.0
        for _ in range(99):
            pool._acquire()  # what each stream opened holds
        assert pool.poll_interval() == pytest.approx(10.0)
        for _ in range(1000):
            pool._acquire()
        assert pool.poll_interval() == 30.0
    finally:
        await pool.close()
        await store.close()
