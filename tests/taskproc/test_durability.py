"""Durable execution: racing workers, stale leases, kill -9 of a worker process mid-step,
and graceful SIGTERM releasing running steps."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import grpc
import psycopg
import pytest

from aiwfe.app.embedded import free_port
from aiwfe.app.suite import start_suite
from aiwfe.data.v1 import workflow_store_service_pb2 as store_pb
from aiwfe.data.v1 import workflow_store_service_pb2_grpc as store_grpc
from aiwfe.runtime.config import TaskProcSettings
from aiwfe.runtime.identity import IDENTITY_METADATA_KEY, InternalIdentity
from aiwfe.runtime.server import start_service
from aiwfe.taskproc.v1 import workflow_service_pb2 as S
from dataplatform.replica_bus import CHANNEL
from dataplatform.service import DataPlatformService
from taskproc.service import TaskProcService
from taskproc.spec import validate
from tests.conftest import field_violations, until_health
from tests.taskproc.helpers import (
    create_stored,
    deadline,
    finish,
    get,
    new_user,
    spec,
    step_status,
    submit,
    watch,
)


@pytest.fixture
async def roomy_suite(base_overrides) -> Any:
    """The suite with the per-user API rate limit lifted (these tests make many calls)."""
    overrides = {
        **base_overrides,
        "authentication": {
            **base_overrides["authentication"],
            "rate_limiting": {"api_requests": 100_000},
        },
    }
    running = await start_suite(overrides)
    yield running
    await running.stop()


async def test_two_workers_racing_never_run_a_step_twice(roomy_suite) -> None:
    """With two taskproc workers on one queue, every step runs exactly once (one RUNNING
    event, one recorded attempt) and both workers take work."""
    suite = roomy_suite
    gateway_channel = grpc.aio.insecure_channel(suite.address("gateway"))
    second = await start_service(TaskProcService(suite.settings), host="127.0.0.1", port=0)
    try:
        token = await new_user(suite, gateway_channel)
        workflow = spec(
            *({"name": f"s{i}", "op": "noop", "inputs": {"sleep_ms": 20}} for i in range(4))
        )
        wfs = await asyncio.gather(*(submit(gateway_channel, token, workflow) for _ in range(30)))
        workers: set[str] = set()
        for wf in wfs:
            done = await finish(gateway_channel, token, wf.workflow_id)
            assert done.state == S.WORKFLOW_STATE_SUCCEEDED
            assert all(s.attempts == 1 for s in done.steps)
            workers |= {s.output["worker"] for s in done.steps}
            events = await watch(gateway_channel, token, wf.workflow_id)
            running = Counter(e.step_name for e in events if e.step_state == S.STEP_STATE_RUNNING)
            assert set(running.values()) == {1}
        assert len(workers) == 2
        async with await psycopg.AsyncConnection.connect(
            suite.settings.database.postgres.dsn
        ) as conn:
            cur = await conn.execute(
                "SELECT count(*), count(DISTINCT (workflow_id, step_name))"
                " FROM workflow_step_attempts WHERE workflow_id = ANY(%s)",
                ([w.workflow_id for w in wfs],),
            )
            assert await cur.fetchone() == (120, 120)
    finally:
        await second.stop(grace=0.5)
        await gateway_channel.close()


async def test_concurrent_claims_are_disjoint_and_priority_ordered(store) -> None:
    """Eight claimers racing over 60 runnable steps never lease the same step twice, and
    higher-priority work is claimed first."""
    stub, md, _ = store
    owner = f"race{time.time_ns()}"
    low = [await create_stored(stub, md, owner, 10) for _ in range(5)]
    high = await create_stored(stub, md, owner, 10, lease_prio=5)
    first = await stub.ClaimSteps(
        store_pb.ClaimStepsRequest(worker_id="w-first", max_steps=10, lease_seconds=30),
        metadata=md,
        timeout=10,
    )
    assert {s.ref.workflow_id for s in first.steps} == {high}
    replies = await asyncio.gather(
        *(
            stub.ClaimSteps(
                store_pb.ClaimStepsRequest(worker_id=f"w{i}", max_steps=10, lease_seconds=30),
                metadata=md,
                timeout=10,
            )
            for i in range(8)
        )
    )
    claimed = [(s.ref.workflow_id, s.ref.step_name) for r in replies for s in r.steps]
    assert len(claimed) == len(set(claimed)) == 50
    assert {wf for wf, _ in claimed} == set(low)


async def test_stale_lease_cannot_complete_or_advance_twice(store) -> None:
    """A worker whose lease expired loses the step: the sweep hands it to another worker with
    a new attempt number, the old worker's result is discarded, its lease cannot be
    extended, and the step succeeds exactly once."""
    stub, md, _ = store
    owner = f"stale{time.time_ns()}"
    wid = await create_stored(stub, md, owner, 1)
    old = await stub.ClaimSteps(
        store_pb.ClaimStepsRequest(worker_id="old", max_steps=1, lease_seconds=0.2),
        metadata=md,
        timeout=10,
    )
    assert [s.ref.attempt for s in old.steps] == [1]
    new = store_pb.ClaimStepsResponse()
    until = deadline(5)
    while not new.steps:
        assert time.monotonic() < until
        await asyncio.sleep(0.1)
        new = await stub.ClaimSteps(
            store_pb.ClaimStepsRequest(worker_id="new", max_steps=1, lease_seconds=30),
            metadata=md,
            timeout=10,
        )
    assert new.steps[0].ref.attempt == 2
    stale = await stub.CompleteSteps(
        store_pb.CompleteStepsRequest(
            worker_id="old", results=[store_pb.StepResult(ref=old.steps[0].ref)]
        ),
        metadata=md,
        timeout=10,
    )
    assert list(stale.accepted) == [False]
    lost = await stub.ExtendLeases(
        store_pb.ExtendLeasesRequest(worker_id="old", steps=[old.steps[0].ref], lease_seconds=30),
        metadata=md,
        timeout=10,
    )
    assert len(lost.lost) == 1
    fresh = await stub.CompleteSteps(
        store_pb.CompleteStepsRequest(
            worker_id="new", results=[store_pb.StepResult(ref=new.steps[0].ref)] * 2
        ),
        metadata=md,
        timeout=10,
    )
    assert list(fresh.accepted) == [True, False]  # the duplicate in one batch is ignored too
    scope = store_pb.WorkflowScope(owner_id=owner)
    events = await stub.ListWorkflowEvents(
        store_pb.ListWorkflowEventsRequest(workflow_id=wid, scope=scope), metadata=md, timeout=10
    )
    assert events.workflow_state == S.WORKFLOW_STATE_SUCCEEDED
    succeeded = [e for e in events.events if e.step_state == S.STEP_STATE_SUCCEEDED]
    assert len(succeeded) == 1
    assert any("lease expired" in e.message for e in events.events)


async def _next_events(stream: Any, within: float) -> list[Any]:
    message = await asyncio.wait_for(stream.read(), within)
    assert message is not grpc.aio.EOF
    return list(message.events)


async def test_event_stream_is_pushed_polled_across_replicas_and_resumable(store) -> None:
    """WatchWorkflowEvents gets the events its own replica commits pushed at once (the poll
    interval here is 30 s); an event another replica committed is read from the database
    when a pushed one shows the gap, or on the poll interval; the stream ends after the
    terminal event, resumes after a sequence, and is owner-scoped."""
    stub, md, running = store
    owner = f"watch{time.time_ns()}"
    wid = await create_stored(stub, md, owner, 2)
    scope = store_pb.WorkflowScope(owner_id=owner)

    def open_watch(after: int, poll: float) -> Any:
        return stub.WatchWorkflowEvents(
            store_pb.WatchWorkflowEventsRequest(
                workflow_id=wid, scope=scope, after_sequence=after, poll_interval_seconds=poll
            ),
            metadata=md,
            timeout=20,
        )

    pushed = open_watch(0, 30)
    assert [e.sequence for e in await _next_events(pushed, 5)] == [1]
    claim = await stub.ClaimSteps(
        store_pb.ClaimStepsRequest(worker_id="w", max_steps=2, lease_seconds=30),
        metadata=md,
        timeout=10,
    )
    running_events = await _next_events(pushed, 5)  # long before the 30 s poll
    assert [(e.sequence, e.step_state) for e in running_events] == [
        (2, S.STEP_STATE_RUNNING),
        (3, S.STEP_STATE_RUNNING),
    ]
    first, second = (store_pb.StepResult(ref=step.ref) for step in claim.steps)
    polled = open_watch(3, 0.2)
    other = await start_service(DataPlatformService(running.settings), "127.0.0.1", 0)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{other.port}") as channel:
            done = await store_grpc.WorkflowStoreServiceStub(channel).CompleteSteps(
                store_pb.CompleteStepsRequest(worker_id="w", results=[first]),
                metadata=md,
                timeout=10,
            )
        assert list(done.accepted) == [True]
        # Sequence 4 was committed by the other replica: only polling finds it here.
        assert [e.sequence for e in await _next_events(polled, 3)] == [4]
        pending = asyncio.ensure_future(pushed.read())
        assert not (await asyncio.wait({pending}, timeout=0.5))[0]  # nothing pushed here
    finally:
        await other.stop(grace=0.5)
    # This replica commits 5 and 6 and pushes them; the 30 s stream sees the gap (it has
    # 3) and reads 4 from the database at once.
    done = await stub.CompleteSteps(
        store_pb.CompleteStepsRequest(worker_id="w", results=[second]), metadata=md, timeout=10
    )
    assert list(done.accepted) == [True]
    rest = list((await asyncio.wait_for(pending, 5)).events)
    rest += [] if rest[-1].sequence == 6 else await _next_events(pushed, 5)
    assert [e.sequence for e in rest] == [4, 5, 6]
    assert rest[-1].workflow_state == S.WORKFLOW_STATE_SUCCEEDED
    assert await pushed.read() is grpc.aio.EOF  # terminal and every event sent
    assert [e.sequence for e in await _next_events(polled, 5)] == [5, 6]
    assert await polled.read() is grpc.aio.EOF

    resumed = open_watch(4, 0)
    assert [e.sequence async for m in resumed for e in m.events] == [5, 6]

    for request, code in (
        (
            store_pb.WatchWorkflowEventsRequest(
                workflow_id=wid, scope=store_pb.WorkflowScope(owner_id="someone-else")
            ),
            grpc.StatusCode.NOT_FOUND,
        ),
        (
            store_pb.WatchWorkflowEventsRequest(
                workflow_id=wid, scope=scope, poll_interval_seconds=0.001
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            async for _ in stub.WatchWorkflowEvents(request, metadata=md, timeout=10):
                pass
        assert failed.value.code() == code
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            assert "poll_interval_seconds" in field_violations(failed.value)


async def test_the_watch_after_create_adopts_its_events_without_a_read(store) -> None:
    """CreateWorkflow watches its new workflow from before the insert, so the watch that
    follows on the same replica gets every event committed since (here one committed before
    it opened) with no database read; another owner still gets NOT_FOUND."""
    stub, md, running = store
    pool = running.running["dataplatform"].service.db.pool
    owner = f"adopt{time.time_ns()}"
    wid = await create_stored(stub, md, owner, 1)

    def open_watch(owner_id: str) -> Any:
        return stub.WatchWorkflowEvents(
            store_pb.WatchWorkflowEventsRequest(
                workflow_id=wid,
                scope=store_pb.WorkflowScope(owner_id=owner_id),
                poll_interval_seconds=30,
            ),
            metadata=md,
            timeout=20,
        )

    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await _next_events(open_watch("someone-else"), 5)
    assert failed.value.code() == grpc.StatusCode.NOT_FOUND
    claim = await stub.ClaimSteps(
        store_pb.ClaimStepsRequest(worker_id="w", max_steps=1, lease_seconds=30),
        metadata=md,
        timeout=10,
    )
    assert [s.ref.workflow_id for s in claim.steps] == [wid]
    reads = pool.get_stats()["requests_num"]
    watched = open_watch(owner)
    assert [e.sequence for e in await _next_events(watched, 5)] == [1, 2]
    assert pool.get_stats()["requests_num"] == reads  # adopted: no connection taken
    await stub.CompleteSteps(
        store_pb.CompleteStepsRequest(
            worker_id="w", results=[store_pb.StepResult(ref=claim.steps[0].ref)]
        ),
        metadata=md,
        timeout=10,
    )
    events = await _next_events(watched, 5)  # pushed, long before the 30 s poll
    assert [e.sequence for e in events] == [3, 4]
    assert events[-1].workflow_state == S.WORKFLOW_STATE_SUCCEEDED
    assert await watched.read() is grpc.aio.EOF


async def test_idle_watches_of_many_workflows_share_their_safety_net_queries(store) -> None:
    """Watches of 20 different workflows with nothing pushed, each re-checking every 0.2 s,
    check the database together (a few shared last-sequence queries a second) instead of
    each reading its events every interval; none gets an event it was not due."""
    stub, md, running = store
    service = running.running["dataplatform"].service
    owner = f"probe{time.time_ns()}"
    wids = [await create_stored(stub, md, owner, 1) for _ in range(20)]
    scope = store_pb.WorkflowScope(owner_id=owner)
    watches = [
        stub.WatchWorkflowEvents(
            store_pb.WatchWorkflowEventsRequest(
                workflow_id=wid, scope=scope, after_sequence=1, poll_interval_seconds=0.2
            ),
            metadata=md,
            timeout=20,
        )
        for wid in wids
    ]
    pending = [asyncio.ensure_future(w.read()) for w in watches]
    await asyncio.sleep(0.5)  # every watch open and past its first read
    reads = service.db.pool.get_stats()["requests_num"]
    await asyncio.sleep(2)  # ten intervals: 200 events reads without the shared check
    reads = service.db.pool.get_stats()["requests_num"] - reads
    # The shared checks (one per interval and window) and the timer loop's and the pool
    # maintenance's own queries: about 20 here, 200 more without sharing.
    assert reads <= 50
    assert service.workflows.probe.queries >= 8
    assert not any(p.done() for p in pending)
    for w in watches:
        w.cancel()
    for wid in wids:  # their steps would be claimed by the tests after this one
        await stub.CancelStoredWorkflow(
            store_pb.CancelStoredWorkflowRequest(workflow_id=wid, scope=scope),
            metadata=md,
            timeout=10,
        )


async def test_replicas_wake_each_others_streams_through_redis(base_overrides, redis_url) -> None:
    """With Redis configured, what replica A commits reaches replica B's streams at once
    (the poll interval here is 30 s): B's watcher gets A's events, B's WaitForWork stream
    hears of A's new work, and of A's cancellation only as a workflow B confirms stopped in
    the database (a forged notice cancels nothing)."""
    overrides = {**base_overrides, "redis": {**base_overrides["redis"], "url": redis_url}}
    a = await start_suite(overrides, only=("dataplatform",))
    b = await start_service(DataPlatformService(a.settings), "127.0.0.1", 0)
    buses = [a.running["dataplatform"].service.replicas, b.service.replicas]
    try:
        for _ in range(500):  # both subscribed and aware of the other
            if all(bus.active for bus in buses):
                break
            await asyncio.sleep(0.01)
        else:
            raise AssertionError("the replicas never heard of each other")
        identity = InternalIdentity.from_settings(a.settings)
        md = ((IDENTITY_METADATA_KEY, identity.assertion(None, "taskproc")),)
        async with (
            grpc.aio.insecure_channel(a.address("dataplatform")) as ch_a,
            grpc.aio.insecure_channel(f"127.0.0.1:{b.port}") as ch_b,
        ):
            on_a = store_grpc.WorkflowStoreServiceStub(ch_a)
            on_b = store_grpc.WorkflowStoreServiceStub(ch_b)
            wakes = on_b.WaitForWork(store_pb.WaitForWorkRequest(worker_id="w"), metadata=md)
            assert (await asyncio.wait_for(wakes.read(), 5)).work_available  # on subscribing

            owner = f"bus{time.time_ns()}"
            wid = await create_stored(on_a, md, owner, 1)
            wake = await asyncio.wait_for(wakes.read(), 5)  # A's new work, told to B
            assert wake.work_available and not wake.stopped_workflow_ids

            watched = on_b.WatchWorkflowEvents(
                store_pb.WatchWorkflowEventsRequest(
                    workflow_id=wid,
                    scope=store_pb.WorkflowScope(owner_id=owner),
                    poll_interval_seconds=30,
                ),
                metadata=md,
                timeout=20,
            )
            assert [e.sequence for e in await _next_events(watched, 5)] == [1]
            await on_a.ClaimSteps(
                store_pb.ClaimStepsRequest(worker_id="w", max_steps=1, lease_seconds=30),
                metadata=md,
                timeout=10,
            )
            running_events = await _next_events(watched, 5)  # long before the 30 s poll
            assert [(e.sequence, e.step_state) for e in running_events] == [
                (2, S.STEP_STATE_RUNNING)
            ]

            # A notice naming an active workflow (forged, or stale) cancels nobody's steps.
            pending = asyncio.ensure_future(wakes.read())
            forged = {"r": "someone", "s": [wid]}
            assert await buses[0]._redis.publish(CHANNEL, json.dumps(forged)) == 2
            assert not (await asyncio.wait({pending}, timeout=0.5))[0]
            await on_a.CancelStoredWorkflow(
                store_pb.CancelStoredWorkflowRequest(
                    workflow_id=wid, scope=store_pb.WorkflowScope(owner_id=owner)
                ),
                metadata=md,
                timeout=10,
            )
            wake = await asyncio.wait_for(pending, 5)
            assert list(wake.stopped_workflow_ids) == [wid]
            events = await _next_events(watched, 5)
            assert events[-1].workflow_state == S.WORKFLOW_STATE_CANCELLED
            wakes.cancel()
    finally:
        await b.stop(grace=0.5)
        await a.stop()


# --- worker processes ----------------------------------------------------------------------


@pytest.fixture
async def external_taskproc(base_overrides) -> Iterator[Any]:
    """dataplatform, cognitive and gateway in process; taskproc runs as subprocesses on one
    fixed port (`start()` launches one, configured only through the environment)."""
    port = free_port()
    overrides = {**base_overrides, "services": {"taskproc": {"port": port}}}
    running = await start_suite(overrides, only=("dataplatform", "cognitive", "gateway"))
    settings = running.settings
    env = {
        **os.environ,
        "AIWFE_INTERNAL_SECRET_KEY": settings.authentication.internal.secret_key,
        "AIWFE_SERVICES__TASKPROC__PORT": str(port),
        "AIWFE_SERVICES__DATAPLATFORM__PORT": str(running.running["dataplatform"].port),
        "AIWFE_SERVICES__COGNITIVE__PORT": str(running.running["cognitive"].port),
        "AIWFE_TASKPROC__LEASE_SECONDS": "1",
        "AIWFE_TASKPROC__POLL_INTERVAL": "0.2",
        "AIWFE_GRPC__SHUTDOWN_GRACE_SECONDS": "0.3",
        "AIWFE_LOGGING__JSON_FORMAT": "false",
    }
    procs: list[subprocess.Popen[str]] = []

    def launch(extra_env: dict[str, str]) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            [sys.executable, "-m", "taskproc"],
            env={**env, **extra_env},
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            start_new_session=True,
        )
        procs.append(proc)
        assert proc.stdout is not None
        line = proc.stdout.readline()  # the readiness line, "taskproc: host:port"
        assert line.startswith("taskproc:"), line
        return proc

    async def start(**extra_env: str) -> subprocess.Popen[str]:
        # Off the loop: the in-process gateway keeps running meanwhile (and notices the
        # old worker's dead connection before a new call could be sent down it).
        proc = await asyncio.to_thread(launch, extra_env)
        # Then as a client would: until the gateway's routed health says taskproc is up (its
        # probe may have met the port closed, and the channel waits out a reconnect backoff).
        async with grpc.aio.insecure_channel(running.address("gateway")) as channel:
            await until_health(channel, "aiwfe.taskproc.v1.WorkflowService", 1, within=15)
        # ...and until the gateway's own channel to it is connected: a channel that met the
        # port closed fails calls at once (UNAVAILABLE, "connection refused") until its
        # reconnect backoff ends, even after the probe saw the new process serving.
        gateway = running.running["gateway"].service
        await asyncio.wait_for(gateway.upstreams["aiwfe.taskproc.v1"].channel.channel_ready(), 15)
        return proc

    try:
        yield running, start
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        await running.stop()


async def _exit_code(proc: subprocess.Popen[str], timeout: float) -> int:
    """Waits for a process without blocking the loop (dataplatform runs in this loop)."""
    until = deadline(timeout)
    while proc.poll() is None:
        assert time.monotonic() < until, "process did not exit"
        await asyncio.sleep(0.05)
    return proc.returncode


async def _wait_running(channel, token, wid: str, step: str) -> None:
    until = deadline(15)
    while step_status(await get(channel, token, wid), step).state != S.STEP_STATE_RUNNING:
        assert time.monotonic() < until, "step never started"
        await asyncio.sleep(0.05)


@pytest.mark.slow
async def test_kill_9_worker_mid_step_workflow_still_completes(external_taskproc) -> None:
    """kill -9 of the worker process mid-step: after its lease expires a new worker runs the
    step again, the workflow completes, and no step's result is recorded twice."""
    running, start = external_taskproc
    worker = await start()
    async with grpc.aio.insecure_channel(running.address("gateway")) as ch:
        token = await new_user(running, ch)
        wf = await submit(
            ch,
            token,
            spec(
                {"name": "first", "op": "noop"},
                {
                    "name": "slow",
                    "op": "noop",
                    "depends_on": ["first"],
                    "inputs": {"sleep_ms": 1500},
                },
                {
                    "name": "last",
                    "op": "cognitive.embed",
                    "depends_on": ["slow"],
                    "inputs": {"texts": ["after the crash"]},
                },
            ),
        )
        await _wait_running(ch, token, wf.workflow_id, "slow")
        os.killpg(worker.pid, signal.SIGKILL)
        await _exit_code(worker, 10)
        await start()
        done = await finish(ch, token, wf.workflow_id, timeout=30)
        assert done.state == S.WORKFLOW_STATE_SUCCEEDED, done.error
        assert step_status(done, "slow").attempts == 2
        assert step_status(done, "first").attempts == 1
        events = await watch(ch, token, wf.workflow_id)
        assert any(e.step_name == "slow" and "lease expired" in e.message for e in events)
    async with await psycopg.AsyncConnection.connect(
        running.settings.database.postgres.dsn
    ) as conn:
        cur = await conn.execute(
            "SELECT step_name, count(*) FROM workflow_step_attempts"
            " WHERE workflow_id = %s AND succeeded GROUP BY step_name ORDER BY step_name",
            (wf.workflow_id,),
        )
        assert await cur.fetchall() == [("first", 1), ("last", 1), ("slow", 1)]


@pytest.mark.slow
async def test_sigterm_releases_running_steps(external_taskproc) -> None:
    """SIGTERM: the worker exits cleanly within its grace, releasing the step it could not
    finish, and the next worker runs it at once (no lease wait, no failure counted)."""
    running, start = external_taskproc
    # A lease far longer than the step: with the fixture's 1 s, a loaded machine could
    # delay a renewal past it, and the second attempt failed as "worker lost". A step
    # that was not released would wait out this lease and then fail (one attempt only).
    lease = {"AIWFE_TASKPROC__LEASE_SECONDS": "20"}
    worker = await start(**lease)
    async with grpc.aio.insecure_channel(running.address("gateway")) as ch:
        token = await new_user(running, ch)
        wf = await submit(
            ch,
            token,
            spec({"name": "long", "op": "noop", "inputs": {"sleep_ms": 2000},
                  "retry_policy": {"max_attempts": 1}}),
        )  # fmt: skip
        await _wait_running(ch, token, wf.workflow_id, "long")
        worker.send_signal(signal.SIGTERM)
        assert await _exit_code(worker, 15) == 0
        await start(**lease)
        done = await finish(ch, token, wf.workflow_id, timeout=30)
        assert done.state == S.WORKFLOW_STATE_SUCCEEDED, done.error
        events = await watch(ch, token, wf.workflow_id)
        assert any(e.step_name == "long" and "released" in e.message for e in events)


async def test_run_stored_workflow_rejects_bad_input_before_storing(store) -> None:
    """A bad poll interval or a bad spec is INVALID_ARGUMENT naming the field, and nothing
    is stored for that owner."""
    stub, md, _ = store
    owner = f"bad{time.time_ns()}"
    good = validate(spec({"name": "s", "op": "noop"}), TaskProcSettings())
    create = store_pb.CreateWorkflowRequest(
        owner=store_pb.WorkflowOwner(user_id=owner, username=owner), spec=good
    )
    empty = store_pb.CreateWorkflowRequest(owner=create.owner)  # no steps, no timeout
    for request, field in (
        (store_pb.RunStoredWorkflowRequest(create=create, poll_interval_seconds=0.001),
         "poll_interval_seconds"),
        (store_pb.RunStoredWorkflowRequest(create=empty), "spec.steps"),
    ):  # fmt: skip
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            async for _ in stub.RunStoredWorkflow(request, metadata=md, timeout=10):
                pass
        assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field in field_violations(failed.value)
    listed = await stub.ListStoredWorkflows(
        store_pb.ListStoredWorkflowsRequest(scope=store_pb.WorkflowScope(owner_id=owner)),
        metadata=md,
        timeout=10,
    )
    assert not listed.workflows
