"""WorkerService through the real gateway, with a worker written only against the generated
stubs: task steps, long polls, per-queue permissions, heartbeats, cancellation, fencing of
stale tokens, failures and the task token's binding."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from google.protobuf import json_format, struct_pb2
from grpc_status import rpc_status

from aiwfe.app.suite import Suite, start_suite
from aiwfe.runtime.interceptors import is_long_poll
from aiwfe.runtime.metrics import REGISTRY
from aiwfe.taskproc.v1 import worker_service_pb2 as pb
from aiwfe.taskproc.v1 import worker_service_pb2_grpc as pb_grpc
from aiwfe.taskproc.v1 import workflow_service_pb2 as wf_pb
from aiwfe.taskproc.v1 import workflow_service_pb2_grpc as wf_grpc
from taskproc.tasks import MAX_ENDED_SESSIONS
from tests.conftest import bearer, field_violations, until
from tests.taskproc.helpers import finish, get, new_user, spec, step_status, submit

ROLES = {
    "admin": {"permissions": ["api:*", "cognitive:*", "data:*", "system:*"]},
    "user": {"permissions": ["api:read", "api:workflow:*", "cognitive:inference"]},
    "readonly": {"permissions": ["api:read"]},
    "worker": {"permissions": ["worker:queue:*"]},
    "alpha-worker": {"permissions": ["worker:queue:alpha"]},
}


@pytest.fixture
async def suite(base_overrides: dict[str, Any]) -> AsyncIterator[Suite]:
    running = await start_suite({**base_overrides, "rbac": {"roles": ROLES}})
    yield running
    await running.stop()


def task_step(name: str, queue: str = "alpha", **inputs: Any) -> dict[str, Any]:
    return {
        "name": name,
        "op": "task",
        "inputs": {"queue": queue, "type": "summarize", "input": {"text": "hi"}, **inputs},
    }


async def poll(
    channel: grpc.aio.Channel, token: str, queues: list[str], wait: float = 5, **kw: Any
) -> pb.PollTaskResponse:
    return await pb_grpc.WorkerServiceStub(channel).PollTask(
        pb.PollTaskRequest(queues=queues, wait_seconds=wait, **kw),
        metadata=bearer(token),
        timeout=wait + 5,
    )


def counted(name: str, queue: str = "alpha", task_type: str = "summarize") -> float:
    """A task counter's value (the suite runs in process: one registry)."""
    value = REGISTRY.get_sample_value(f"{name}_total", {"queue": queue, "type": task_type})
    return value or 0.0


def reason(error: grpc.aio.AioRpcError) -> tuple[str, dict[str, str]]:
    from google.rpc import error_details_pb2

    status = rpc_status.from_call(error)
    assert status is not None
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info.reason, dict(info.metadata)
    raise AssertionError("no ErrorInfo")


async def test_a_stub_worker_runs_a_task_between_builtin_steps(suite, gateway_channel) -> None:
    """A noop → task → noop workflow: the task's input has the first step's output resolved,
    the worker's output becomes the step's output and feeds the last step."""
    owner = await new_user(suite, gateway_channel)
    worker = await new_user(suite, gateway_channel, ("worker",))
    workflow = await submit(
        gateway_channel,
        owner,
        spec(
            {"name": "first", "op": "noop", "inputs": {"echo": "from-first"}},
            {
                "name": "work",
                "op": "task",
                "depends_on": ["first"],
                "timeout_seconds": 20,
                "inputs": {
                    "queue": "alpha",
                    "type": "summarize",
                    "input": {"text": "${steps.first.output.echo}", "n": 3},
                    "heartbeat_timeout_seconds": 7,
                },
            },
            {
                "name": "last",
                "op": "noop",
                "depends_on": ["work"],
                "inputs": {"echo": "${steps.work.output.summary}"},
            },
        ),
    )
    before = {m: counted(m) for m in ("workflow_tasks_dispatched", "workflow_tasks_completed")}
    task = await poll(gateway_channel, worker, ["alpha"], worker_identity="stub:1")
    assert task.task_token and task.workflow_id == workflow.workflow_id
    assert task.traceparent.startswith("00-") or task.traceparent == ""
    assert (task.step_name, task.queue, task.type, task.attempt) == (
        "work",
        "alpha",
        "summarize",
        1,
    )
    assert json_format.MessageToDict(task.input) == {"text": "from-first", "n": 3}
    assert task.heartbeat_timeout_seconds == 7
    left = task.attempt_deadline.ToDatetime().timestamp() - time.time()
    assert 15 < left <= 20.5, left
    stub = pb_grpc.WorkerServiceStub(gateway_channel)
    details = struct_pb2.Struct()
    details.update({"progress": 0.5})
    beat = await stub.HeartbeatTask(
        pb.HeartbeatTaskRequest(task_token=task.task_token, queue="alpha", details=details),
        metadata=bearer(worker),
        timeout=5,
    )
    assert not beat.cancel_requested
    running = step_status(await get(gateway_channel, owner, workflow.workflow_id), "work")
    assert json_format.MessageToDict(running.details) == {"progress": 0.5}
    output = struct_pb2.Struct()
    output.update({"summary": "short"})
    await stub.CompleteTask(
        pb.CompleteTaskRequest(task_token=task.task_token, queue="alpha", output=output),
        metadata=bearer(worker),
        timeout=5,
    )
    done = await finish(gateway_channel, owner, workflow.workflow_id)
    assert done.state == wf_pb.WORKFLOW_STATE_SUCCEEDED
    assert json_format.MessageToDict(step_status(done, "work").output) == {"summary": "short"}
    assert {m: counted(m) - v for m, v in before.items()} == {
        "workflow_tasks_dispatched": 1,
        "workflow_tasks_completed": 1,
    }
    assert json_format.MessageToDict(step_status(done, "last").output)["echo"] == "short"
    # A second completion of the same attempt is refused: the step is no longer leased.
    with pytest.raises(grpc.aio.AioRpcError) as again:
        await stub.CompleteTask(
            pb.CompleteTaskRequest(task_token=task.task_token, queue="alpha", output=output),
            metadata=bearer(worker),
            timeout=5,
        )
    assert again.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert reason(again.value)[0] == "TASK_TOKEN_STALE"


async def test_polling_needs_the_queue_permission(suite, gateway_channel) -> None:
    """worker:queue:<q> is checked per named queue at the gateway; a role without any
    worker permission, or without one of the queues, is refused before taskproc. Each
    refusal is asked twice: first with a token the gateway has not cached (the full path),
    then cached (the relay reads the request and checks it: never sent to taskproc). An
    allowed poll with a cached token goes straight to taskproc."""
    front = suite.running["gateway"].front
    alpha = await new_user(suite, gateway_channel, ("alpha-worker",))
    plain = await new_user(suite, gateway_channel, ("user",))
    for token, queues in ((alpha, ["beta"]), (alpha, ["alpha", "beta"]), (plain, ["alpha"])):
        for _ in range(2):
            fast_before = front.fast_calls
            with pytest.raises(grpc.aio.AioRpcError) as denied:
                await poll(gateway_channel, token, queues, wait=0.2)
            assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
            why, meta = reason(denied.value)
            assert why == "PERMISSION_MISSING"
            assert meta["permission"] in {"worker:queue:beta", "worker:queue:alpha"}
            assert front.fast_calls == fast_before
    fast_before = front.fast_calls
    started = time.monotonic()
    empty = await poll(gateway_channel, alpha, ["alpha"], wait=0.3)
    assert not empty.task_token
    assert 0.25 < time.monotonic() - started < 3
    assert front.fast_calls == fast_before + 1


async def test_a_waiting_poll_finds_a_task_whose_wake_up_was_missed(suite, gateway_channel) -> None:
    """The fall-back claim: with dataplatform's wake-ups kept from the dispatcher, a task
    made runnable by its dependency's completion still reaches the poll already waiting
    for it, at the group's next fall-back claim (every taskproc.poll_interval, 0.5 s), not
    when the poll's time is up (10 s)."""
    service = suite.running["taskproc"].service
    service.worker.work_listeners.remove(service.tasks.wake)
    try:
        owner = await new_user(suite, gateway_channel)
        worker = await new_user(suite, gateway_channel, ("worker",))
        polling = asyncio.create_task(poll(gateway_channel, worker, ["alpha"], wait=10))
        await asyncio.sleep(0.3)  # waiting; its group's first claim found nothing
        workflow = await submit(
            gateway_channel,
            owner,
            spec({"name": "first", "op": "noop"}, {**task_step("work"), "depends_on": ["first"]}),
        )
        started = time.monotonic()
        task = await polling
        assert task.workflow_id == workflow.workflow_id and task.step_name == "work"
        assert time.monotonic() - started < 5
    finally:
        service.worker.work_listeners.append(service.tasks.wake)


async def test_a_poll_too_long_for_the_relay_to_hold_is_still_checked(
    suite, gateway_channel
) -> None:
    """A PollTask padded with an unknown field past what the relay holds to read (256 KiB)
    is not sent straight to taskproc unchecked: the full path refuses the queue the
    caller lacks, and serves one it has."""
    front = suite.running["gateway"].front
    alpha = await new_user(suite, gateway_channel, ("alpha-worker",))
    await poll(gateway_channel, alpha, ["alpha"], wait=0.1)  # the token is cached now
    padding = b"\xfa\x06" + _varint(300_000) + b"x" * 300_000  # field 111, length-delimited
    call = gateway_channel.unary_unary(
        "/aiwfe.taskproc.v1.WorkerService/PollTask",
        response_deserializer=pb.PollTaskResponse.FromString,
    )
    for queue, allowed in (("beta", False), ("alpha", True)):
        request = pb.PollTaskRequest(queues=[queue], wait_seconds=0.2).SerializeToString()
        fast_before = front.fast_calls
        if allowed:
            assert not (await call(request + padding, metadata=bearer(alpha), timeout=5)).task_token
        else:
            with pytest.raises(grpc.aio.AioRpcError) as denied:
                await call(request + padding, metadata=bearer(alpha), timeout=5)
            assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert reason(denied.value)[1]["permission"] == "worker:queue:beta"
        assert front.fast_calls == fast_before


def _varint(n: int) -> bytes:
    out = b""
    while n > 0x7F:
        out += bytes([n & 0x7F | 0x80])
        n >>= 7
    return out + bytes([n])


async def test_a_lapsed_lease_is_dispatched_again_and_the_old_token_refused(
    suite, gateway_channel
) -> None:
    """No heartbeat within the heartbeat timeout: the task goes to the next poller as
    attempt 2, and the first worker's late CompleteTask is FAILED_PRECONDITION."""
    owner = await new_user(suite, gateway_channel)
    worker = await new_user(suite, gateway_channel, ("worker",))
    workflow = await submit(
        gateway_channel, owner, spec(task_step("work", heartbeat_timeout_seconds=1))
    )
    timeouts = counted("workflow_task_heartbeat_timeouts")
    first = await poll(gateway_channel, worker, ["alpha"])
    assert first.attempt == 1
    second = await poll(gateway_channel, worker, ["alpha"], wait=10)
    assert second.attempt == 2 and second.workflow_id == workflow.workflow_id
    assert counted("workflow_task_heartbeat_timeouts") == timeouts + 1
    stub = pb_grpc.WorkerServiceStub(gateway_channel)
    output = struct_pb2.Struct()
    output.update({"by": "late"})
    for call, request in (
        (stub.CompleteTask, pb.CompleteTaskRequest(task_token=first.task_token, queue="alpha")),
        (stub.HeartbeatTask, pb.HeartbeatTaskRequest(task_token=first.task_token, queue="alpha")),
        (stub.FailTask, pb.FailTaskRequest(task_token=first.task_token, queue="alpha")),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as stale:
            await call(request, metadata=bearer(worker), timeout=5)
        assert stale.value.code() == grpc.StatusCode.FAILED_PRECONDITION, call
        assert reason(stale.value) == (
            "TASK_TOKEN_STALE",
            {"workflowId": workflow.workflow_id, "stepName": "work", "attempt": "1"},
        )
    output.update({"by": "second"})
    await stub.CompleteTask(
        pb.CompleteTaskRequest(task_token=second.task_token, queue="alpha", output=output),
        metadata=bearer(worker),
        timeout=5,
    )
    done = await finish(gateway_channel, owner, workflow.workflow_id)
    assert done.state == wf_pb.WORKFLOW_STATE_SUCCEEDED
    assert json_format.MessageToDict(step_status(done, "work").output) == {"by": "second"}
    assert step_status(done, "work").attempts == 2


async def test_cancelling_the_workflow_reaches_the_next_heartbeat(suite, gateway_channel) -> None:
    """A cancelled workflow answers the running task's heartbeat with cancel_requested, and
    its completion is refused."""
    owner = await new_user(suite, gateway_channel)
    worker = await new_user(suite, gateway_channel, ("worker",))
    workflow = await submit(gateway_channel, owner, spec(task_step("work")))
    task = await poll(gateway_channel, worker, ["alpha"])
    stub = pb_grpc.WorkerServiceStub(gateway_channel)
    request = pb.HeartbeatTaskRequest(task_token=task.task_token, queue="alpha")
    assert not (await stub.HeartbeatTask(request, metadata=bearer(worker))).cancel_requested
    await wf_grpc.WorkflowServiceStub(gateway_channel).CancelWorkflow(
        wf_pb.CancelWorkflowRequest(workflow_id=workflow.workflow_id), metadata=bearer(owner)
    )
    assert (await stub.HeartbeatTask(request, metadata=bearer(worker))).cancel_requested
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.CompleteTask(
            pb.CompleteTaskRequest(task_token=task.task_token, queue="alpha"),
            metadata=bearer(worker),
        )
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    done = await get(gateway_channel, owner, workflow.workflow_id)
    assert done.state == wf_pb.WORKFLOW_STATE_CANCELLED


async def test_fail_task_retries_then_fails_for_good(suite, gateway_channel) -> None:
    """A retryable FailTask schedules attempt 2 by the step's policy; a non-retryable one
    fails the workflow with the worker's message."""
    owner = await new_user(suite, gateway_channel)
    worker = await new_user(suite, gateway_channel, ("worker",))
    step = task_step("work")
    step["retry_policy"] = {"max_attempts": 3, "initial_backoff_seconds": 0.2}
    workflow = await submit(gateway_channel, owner, spec(step))
    stub = pb_grpc.WorkerServiceStub(gateway_channel)
    failed = counted("workflow_tasks_failed")
    first = await poll(gateway_channel, worker, ["alpha"])
    details = struct_pb2.Struct()
    details.update({"http": 503})
    retry = await stub.FailTask(
        pb.FailTaskRequest(
            task_token=first.task_token,
            queue="alpha",
            message="billing API down",
            retryable=True,
            details=details,
        ),
        metadata=bearer(worker),
    )
    assert retry.will_retry and retry.HasField("next_attempt_time")
    second = await poll(gateway_channel, worker, ["alpha"], wait=10)
    assert second.attempt == 2
    final = await stub.FailTask(
        pb.FailTaskRequest(task_token=second.task_token, queue="alpha", message="bad input"),
        metadata=bearer(worker),
    )
    assert not final.will_retry
    done = await finish(gateway_channel, owner, workflow.workflow_id)
    assert done.state == wf_pb.WORKFLOW_STATE_FAILED
    assert "bad input" in done.error and "attempt 2" in done.error
    assert counted("workflow_tasks_failed") == failed + 2


async def test_a_task_token_is_bound_to_its_caller_and_queue(suite, gateway_channel) -> None:
    """A token sent with another queue, by another principal, or edited is INVALID_ARGUMENT
    on task_token; the task stays leased to its poller."""
    owner = await new_user(suite, gateway_channel)
    worker = await new_user(suite, gateway_channel, ("worker",))
    other = await new_user(suite, gateway_channel, ("worker",))
    await submit(gateway_channel, owner, spec(task_step("work")))
    task = await poll(gateway_channel, worker, ["alpha"])
    stub = pb_grpc.WorkerServiceStub(gateway_channel)
    edited = task.task_token[:-6] + (
        "AAAAAA" if not task.task_token.endswith("AAAAAA") else "BBBBBB"
    )
    for token, queue, who in (
        (task.task_token, "beta", worker),
        (task.task_token, "alpha", other),
        (edited, "alpha", worker),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as bad:
            await stub.CompleteTask(
                pb.CompleteTaskRequest(task_token=token, queue=queue), metadata=bearer(who)
            )
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "task_token" in field_violations(bad.value)
    beat = await stub.HeartbeatTask(
        pb.HeartbeatTaskRequest(task_token=task.task_token, queue="alpha"), metadata=bearer(worker)
    )
    assert not beat.cancel_requested


async def test_task_specs_and_polls_are_validated(suite, gateway_channel) -> None:
    """A queue that is a pattern or a reference, an unknown input or a heartbeat out of range
    is refused at submit; a poll with no queue or too long a wait is refused."""
    owner = await new_user(suite, gateway_channel)
    worker = await new_user(suite, gateway_channel, ("worker",))
    bad_steps = [
        task_step("a", queue="*"),
        task_step("a", queue="${steps.x.output.q}"),
        task_step("a", heartbeat_timeout_seconds=0),
        task_step("a", colour="red"),
    ]
    for step in bad_steps:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await submit(gateway_channel, owner, spec(step))
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, step
        assert "spec.steps[0].inputs" in field_violations(refused.value), step
    for request, field in (
        (pb.PollTaskRequest(), "queues"),
        (pb.PollTaskRequest(queues=["alpha"], wait_seconds=61), "wait_seconds"),
        (pb.PollTaskRequest(queues=["alpha"], types=["no spaces"]), "types[0]"),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as invalid:
            await pb_grpc.WorkerServiceStub(gateway_channel).PollTask(
                request, metadata=bearer(worker), timeout=5
            )
        assert invalid.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field in field_violations(invalid.value)


async def test_waiting_pollers_share_one_claim_and_each_gets_one_task(
    suite, gateway_channel
) -> None:
    """Eight pollers waiting on one queue, then eight tasks submitted: each poller gets a
    different task, and a poller of another type gets none of them."""
    owner = await new_user(suite, gateway_channel)
    worker = await new_user(suite, gateway_channel, ("worker",))
    pollers = [asyncio.create_task(poll(gateway_channel, worker, ["alpha"], 10)) for _ in range(8)]
    other = asyncio.create_task(poll(gateway_channel, worker, ["alpha"], 2, types=["translate"]))
    await asyncio.sleep(0.3)
    for i in range(8):
        await submit(gateway_channel, owner, spec(task_step(f"s{i}")))
    tasks = await asyncio.gather(*pollers)
    assert len({(t.workflow_id, t.step_name) for t in tasks}) == 8
    assert not (await other).task_token


def test_long_polls_are_not_load_shed() -> None:
    """The contract marks PollTask long_poll (load shedding skips it), and nothing else."""
    assert is_long_poll("/aiwfe.taskproc.v1.WorkerService/PollTask")
    assert not is_long_poll("/aiwfe.taskproc.v1.WorkerService/CompleteTask")
    assert not is_long_poll("/aiwfe.cognitive.v1.CognitiveService/Embed")
    assert not is_long_poll("/no.such/Method")


async def test_queue_depth_and_oldest_age_are_exported_per_queue(suite, gateway_channel) -> None:
    """Waiting tasks show as their queue's depth and oldest age; a drained queue's series
    goes away."""
    owner = await new_user(suite, gateway_channel)
    worker = await new_user(suite, gateway_channel, ("worker",))
    for i in range(3):
        await submit(gateway_channel, owner, spec(task_step(f"s{i}", queue="gauge")))

    async def depth(wanted: float | None) -> float | None:
        for _ in range(100):
            value = REGISTRY.get_sample_value("workflow_task_queue_depth", {"queue": "gauge"})
            if value == wanted:
                return value
            await asyncio.sleep(0.05)
        raise AssertionError(f"depth stayed {value}, wanted {wanted}")

    await depth(3)
    age = REGISTRY.get_sample_value("workflow_task_queue_oldest_age_seconds", {"queue": "gauge"})
    assert age is not None and age >= 0
    for _ in range(3):
        assert (await poll(gateway_channel, worker, ["gauge"])).task_token
    await depth(None)


async def test_waiting_polls_are_bounded_per_replica(base_overrides) -> None:
    """Past taskproc.max_task_polls waiting polls, the next is RESOURCE_EXHAUSTED with its
    reason at once, and a slot frees when a poll ends."""
    overrides = {**base_overrides, "rbac": {"roles": ROLES}, "taskproc": {"max_task_polls": 2}}
    running = await start_suite(overrides)
    try:
        async with grpc.aio.insecure_channel(running.address("gateway")) as channel:
            worker = await new_user(running, channel, ("worker",))
            held = [asyncio.create_task(poll(channel, worker, ["alpha"], 3)) for _ in range(2)]
            await asyncio.sleep(0.5)
            started = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await poll(channel, worker, ["alpha"], 3)
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert reason(refused.value) == ("TASK_POLLS_EXHAUSTED", {"limit": "2"})
            assert time.monotonic() - started < 1
            await asyncio.gather(*held)
            assert not (await poll(channel, worker, ["alpha"], 0.2)).task_token
    finally:
        await running.stop()


async def test_wake_ups_name_what_became_runnable(suite, gateway_channel) -> None:
    """dataplatform's WaitForWork says which kind of step became runnable: a task-only
    submission wakes its queue and not the built-in workers, a built-in one the reverse,
    so neither side runs an empty claim for the other's work."""
    from aiwfe.data.v1 import workflow_store_service_pb2 as store_pb
    from aiwfe.data.v1 import workflow_store_service_pb2_grpc as store_grpc
    from aiwfe.runtime.identity import IDENTITY_METADATA_KEY, InternalIdentity

    owner = await new_user(suite, gateway_channel)
    identity = InternalIdentity.from_settings(suite.settings)
    metadata = ((IDENTITY_METADATA_KEY, identity.assertion(None, "taskproc")),)
    async with grpc.aio.insecure_channel(suite.address("dataplatform")) as channel:
        stream = store_grpc.WorkflowStoreServiceStub(channel).WaitForWork(
            store_pb.WaitForWorkRequest(worker_id="test"), metadata=metadata, timeout=20
        )
        first = await stream.read()  # a new subscriber looks for everything once
        assert first.builtin_work and list(first.task_queues) == ["*"]
        await submit(gateway_channel, owner, spec(task_step("t", queue="wakes")))
        wake = await stream.read()
        assert (wake.work_available, wake.builtin_work, list(wake.task_queues)) == (
            True,
            False,
            ["wakes"],
        )
        # With eager dispatch the submission leases a built-in root to taskproc's own worker
        # and wakes no one; without it the built-in workers are woken.
        worker = suite.running["taskproc"].service.worker
        worker.cfg = worker.cfg.model_copy(update={"eager_dispatch": False})
        await submit(gateway_channel, owner, spec({"name": "n", "op": "noop", "inputs": {}}))
        wake = await stream.read()
        while not wake.work_available:  # skip heartbeats and the built-in step's own events
            wake = await stream.read()
        assert (wake.builtin_work, list(wake.task_queues)) == (True, [])
        stream.cancel()


async def test_concurrent_completions_share_store_calls(suite, gateway_channel) -> None:
    """Twenty tasks completed at once are all recorded, exactly once each, in fewer
    CompleteSteps calls than completions (one batch per in-flight call)."""
    owner = await new_user(suite, gateway_channel)
    worker = await new_user(suite, gateway_channel, ("worker",))
    workflows = [
        await submit(gateway_channel, owner, spec(task_step("work", queue="batch")))
        for _ in range(20)
    ]
    tasks = await asyncio.gather(*(poll(gateway_channel, worker, ["batch"], 10) for _ in range(20)))
    assert len({t.workflow_id for t in tasks}) == 20

    def store_calls() -> float:
        return (
            REGISTRY.get_sample_value(
                "request_rate_counter_total",
                {
                    "service": "dataplatform",
                    "method": "/aiwfe.data.v1.WorkflowStoreService/CompleteSteps",
                    "code": "OK",
                },
            )
            or 0.0
        )

    before = store_calls()
    stub = pb_grpc.WorkerServiceStub(gateway_channel)
    await asyncio.gather(
        *(
            stub.CompleteTask(
                pb.CompleteTaskRequest(task_token=t.task_token, queue="batch"),
                metadata=bearer(worker),
                timeout=10,
            )
            for t in tasks
        )
    )
    calls = store_calls() - before
    assert 1 <= calls < 20, calls
    for wf in workflows:
        done = await finish(gateway_channel, owner, wf.workflow_id)
        assert done.state == wf_pb.WORKFLOW_STATE_SUCCEEDED
        assert step_status(done, "work").attempts == 1


async def test_a_waiting_poller_gets_a_new_task_by_eager_dispatch(suite, gateway_channel) -> None:
    """With a poller of its queue and type waiting, a submitted task step is leased to the
    replica in the insert and handed straight to that poller (no wake-up, no claim), as
    attempt 1 with a working token; a poller of another type waiting alone gets nothing
    eagerly, and the step is claimed for the next poller that takes it."""
    owner = await new_user(suite, gateway_channel)
    worker = await new_user(suite, gateway_channel, ("worker",))
    dispatcher = suite.running["taskproc"].service.tasks
    before = dispatcher.eager_tasks
    waiting = asyncio.create_task(poll(gateway_channel, worker, ["eagerq"], 10))
    await asyncio.sleep(0.3)
    wf = await submit(gateway_channel, owner, spec(task_step("t", queue="eagerq")))
    task = await waiting
    assert (task.workflow_id, task.step_name, task.attempt) == (wf.workflow_id, "t", 1)
    assert dispatcher.eager_tasks == before + 1
    await pb_grpc.WorkerServiceStub(gateway_channel).CompleteTask(
        pb.CompleteTaskRequest(task_token=task.task_token, queue="eagerq"),
        metadata=bearer(worker),
        timeout=10,
    )
    assert (await finish(gateway_channel, owner, wf.workflow_id)).state == (
        wf_pb.WORKFLOW_STATE_SUCCEEDED
    )
    other = asyncio.create_task(poll(gateway_channel, worker, ["eagerq"], 1, types=["translate"]))
    await asyncio.sleep(0.3)
    wf = await submit(gateway_channel, owner, spec(task_step("u", queue="eagerq")))
    assert not (await other).task_token
    assert dispatcher.eager_tasks == before + 1
    task = await poll(gateway_channel, worker, ["eagerq"], 5)
    assert (task.workflow_id, task.attempt) == (wf.workflow_id, 1)


async def test_shutdown_worker_answers_only_its_callers_polls_of_that_session(
    suite, gateway_channel
) -> None:
    """ShutdownWorker answers the caller's waiting polls of one poll_session empty at once
    (not after their 30 s), and a later poll of that session too; the caller's other
    session and another principal's session of the same name keep waiting, and the latter
    still gets the next task."""
    owner = await new_user(suite, gateway_channel)
    worker = await new_user(suite, gateway_channel, ("worker",))
    other = await new_user(suite, gateway_channel, ("worker",))
    stub = pb_grpc.WorkerServiceStub(gateway_channel)
    dispatcher = suite.running["taskproc"].service.tasks
    ending = [
        asyncio.create_task(poll(gateway_channel, worker, ["endq"], 30, poll_session="s-1"))
        for _ in range(2)
    ]
    kept = asyncio.create_task(poll(gateway_channel, worker, ["endq"], 30, poll_session="s-2"))
    theirs = asyncio.create_task(poll(gateway_channel, other, ["endq"], 30, poll_session="s-1"))
    await until(lambda: dispatcher.waiting == 4)
    t0 = time.monotonic()
    reply = await stub.ShutdownWorker(
        pb.ShutdownWorkerRequest(poll_session="s-1"), metadata=bearer(worker), timeout=5
    )
    assert reply.polls_ended == 2
    assert not any(p.task_token for p in await asyncio.gather(*ending))
    late = await poll(gateway_channel, worker, ["endq"], 30, poll_session="s-1")
    assert not late.task_token
    assert time.monotonic() - t0 < 5
    await asyncio.sleep(0.2)
    assert not kept.done() and not theirs.done()
    again = await stub.ShutdownWorker(
        pb.ShutdownWorkerRequest(poll_session="s-1"), metadata=bearer(worker), timeout=5
    )
    assert again.polls_ended == 0 and not theirs.done()
    ended = await stub.ShutdownWorker(
        pb.ShutdownWorkerRequest(poll_session="s-2"), metadata=bearer(worker), timeout=5
    )
    assert ended.polls_ended == 1 and not (await kept).task_token
    wf = await submit(gateway_channel, owner, spec(task_step("t", queue="endq")))
    task = await theirs
    assert (task.workflow_id, task.attempt) == (wf.workflow_id, 1)
    # Ended sessions are remembered up to a bound, whatever a caller sends: the oldest go.
    for i in range(MAX_ENDED_SESSIONS + 10):
        dispatcher.end_session(("flood", str(i)))
    assert len(dispatcher._ended) == MAX_ENDED_SESSIONS
    assert ("flood", "9") not in dispatcher._ended and ("flood", "10") in dispatcher._ended


async def test_poll_sessions_are_validated(suite, gateway_channel) -> None:
    """A poll_session is 1-64 characters of A-Z a-z 0-9 . _ -: ShutdownWorker needs one,
    PollTask may omit it; anything else is INVALID_ARGUMENT naming the field."""
    worker = await new_user(suite, gateway_channel, ("worker",))
    stub = pb_grpc.WorkerServiceStub(gateway_channel)
    for session in ("", "x" * 65, "has space", "${input.x}"):
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await stub.ShutdownWorker(
                pb.ShutdownWorkerRequest(poll_session=session), metadata=bearer(worker), timeout=5
            )
        assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "poll_session" in field_violations(exc.value)
        if session:
            with pytest.raises(grpc.aio.AioRpcError) as exc:
                await poll(gateway_channel, worker, ["alpha"], 1, poll_session=session)
            assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "poll_session" in field_violations(exc.value)
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await stub.ShutdownWorker(pb.ShutdownWorkerRequest(poll_session="s"), timeout=5)
    assert exc.value.code() == grpc.StatusCode.UNAUTHENTICATED
