"""External workers against the real suite: the SDK worker, a worker on the generated
stubs alone, a Node worker, kill -9, cancellation, SIGTERM, bad input and a gateway
restart (issue #19's proof for the client side)."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import sys
import time
from typing import Any

import grpc
import pytest
from google.protobuf import json_format, struct_pb2

from aiwfe.runtime.server import start_service
from aiwfe.sdk import Worker, WorkerError, task
from aiwfe.taskproc.v1 import worker_service_pb2 as pb
from aiwfe.taskproc.v1 import worker_service_pb2_grpc as pb_grpc
from aiwfe.taskproc.v1 import workflow_service_pb2 as wf_pb
from aiwfe.taskproc.v1 import workflow_service_pb2_grpc as wf_grpc
from tests.conftest import bearer, until
from tests.taskproc.helpers import finish, get, new_user, spec, step_status, submit, watch
from tests.workers import worker_tasks
from tests.workers.conftest import ROOT, WorkerSuite, queue_name

SERVED = [worker_tasks.summarize, worker_tasks.shout, worker_tasks.first_attempt_hangs,
          worker_tasks.nap]  # fmt: skip
GRPC_JS = ROOT / ".tools/node_modules/@grpc/grpc-js"


def task_step(name: str, queue: str, type: str, input: Any, **fields: Any) -> dict[str, Any]:
    inputs = {"queue": queue, "type": type, "input": input}
    if "heartbeat_timeout_seconds" in fields:
        inputs["heartbeat_timeout_seconds"] = fields.pop("heartbeat_timeout_seconds")
    return {"name": name, "op": "task", "inputs": inputs, **fields}


RETRY_FAST = {"max_attempts": 3, "initial_backoff_seconds": 0.1, "max_backoff_seconds": 0.2,
              "backoff_multiplier": 2}  # fmt: skip


async def test_sdk_worker_runs_a_workflow_mixing_noop_and_tasks(
    ws: WorkerSuite, sdk_worker
) -> None:
    """noop → async task → sync task: each task's input references the step before, the
    outputs flow through, and the sync function's string comes back as {"result": ...}."""
    q = queue_name()
    sdk_worker(q, SERVED)
    workflow = spec(
        {"name": "a", "op": "noop", "inputs": {"echo": "one two three four"}},
        task_step("b", q, "summarize", {"text": "${steps.a.output.echo}", "max_words": 2},
                  depends_on=["a"]),
        task_step("c", q, "shout", {"text": "${steps.b.output.summary}"}, depends_on=["b"]),
    )  # fmt: skip
    wf = await submit(ws.channel, ws.admin, workflow)
    done = await finish(ws.channel, ws.admin, wf.workflow_id)
    assert done.state == wf_pb.WORKFLOW_STATE_SUCCEEDED, done
    assert json_format.MessageToDict(step_status(done, "b").output) == {"summary": "one two"}
    assert json_format.MessageToDict(step_status(done, "c").output) == {"result": "ONE TWO"}


async def test_a_worker_on_the_generated_stubs_alone(ws: WorkerSuite) -> None:
    """No SDK: PollTask, HeartbeatTask (details kept on the step), CompleteTask, and a
    second task failed for good with FailTask; a replayed token is FAILED_PRECONDITION."""
    q = queue_name()
    md = bearer(ws.worker_key)
    stub = pb_grpc.WorkerServiceStub(ws.channel)
    workflow = spec(task_step("t", q, "double", 21, heartbeat_timeout_seconds=10))
    wf = await submit(ws.channel, ws.admin, workflow)
    got = await stub.PollTask(pb.PollTaskRequest(queues=[q], wait_seconds=10), metadata=md,
                              timeout=20)  # fmt: skip
    assert (got.workflow_id, got.step_name, got.type, got.queue, got.attempt) == (
        wf.workflow_id, "t", "double", q, 1
    )  # fmt: skip
    assert got.input.number_value == 21 and got.heartbeat_timeout_seconds == 10
    details = struct_pb2.Struct()
    details.update({"progress": 0.5})
    beat = await stub.HeartbeatTask(
        pb.HeartbeatTaskRequest(task_token=got.task_token, queue=q, details=details),
        metadata=md, timeout=5,
    )  # fmt: skip
    assert beat.cancel_requested is False
    running = await get(ws.channel, ws.admin, wf.workflow_id)
    assert json_format.MessageToDict(step_status(running, "t").details) == {"progress": 0.5}
    output = struct_pb2.Struct()
    output.update({"value": 42})
    complete = pb.CompleteTaskRequest(task_token=got.task_token, queue=q, output=output)
    await stub.CompleteTask(complete, metadata=md, timeout=5)
    done = await finish(ws.channel, ws.admin, wf.workflow_id)
    assert json_format.MessageToDict(step_status(done, "t").output) == {"value": 42}
    with pytest.raises(grpc.aio.AioRpcError) as replay:
        await stub.CompleteTask(complete, metadata=md, timeout=5)
    assert replay.value.code() == grpc.StatusCode.FAILED_PRECONDITION

    wf2 = await submit(ws.channel, ws.admin, spec(task_step("t", q, "double", 1,
                                                            retry_policy=RETRY_FAST)))  # fmt: skip
    got = await stub.PollTask(pb.PollTaskRequest(queues=[q], wait_seconds=10), metadata=md,
                              timeout=20)  # fmt: skip
    failed = await stub.FailTask(
        pb.FailTaskRequest(task_token=got.task_token, queue=q, message="no", retryable=False),
        metadata=md, timeout=5,
    )  # fmt: skip
    assert failed.will_retry is False
    done = await finish(ws.channel, ws.admin, wf2.workflow_id)
    assert done.state == wf_pb.WORKFLOW_STATE_FAILED
    assert step_status(done, "t").attempts == 1 and "no" in step_status(done, "t").error


async def test_a_node_grpc_js_worker_serves_a_task(ws: WorkerSuite) -> None:
    """A worker in Node (@grpc/grpc-js + @grpc/proto-loader, from the .proto alone) polls,
    heartbeats and completes a task whose output the next step reads."""
    node = shutil.which("node")
    if node is None or not GRPC_JS.exists():
        pytest.skip("needs node and @grpc/grpc-js: .ci/run installs them into .tools")
    q = queue_name()
    proc = await asyncio.create_subprocess_exec(
        node, str(ROOT / "tests/clients/task_worker.js"), ws.gateway, ws.worker_key, q, "1",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "NODE_PATH": str(GRPC_JS.parent.parent)},
    )  # fmt: skip
    workflow = spec(
        task_step("up", q, "upper", {"text": "polyglot"}),
        {"name": "after", "op": "noop", "depends_on": ["up"],
         "inputs": {"echo": "${steps.up.output.text}"}},
    )  # fmt: skip
    wf = await submit(ws.channel, ws.admin, workflow)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    done = await finish(ws.channel, ws.admin, wf.workflow_id)
    assert done.state == wf_pb.WORKFLOW_STATE_SUCCEEDED, done
    assert json_format.MessageToDict(step_status(done, "up").output) == {
        "text": "POLYGLOT", "worker": "node"
    }  # fmt: skip
    assert json_format.MessageToDict(step_status(done, "after").output)["echo"] == "POLYGLOT"
    assert f'"workflow_id":"{wf.workflow_id}"' in out.decode()


@pytest.mark.slow
async def test_kill_9_mid_task_redispatches_once_and_refuses_the_dead_token(
    ws: WorkerSuite, worker_process, sdk_worker
) -> None:
    """A worker process killed -9 mid-task: after its heartbeat timeout the task goes to
    another worker, the step succeeds exactly once (attempt 2), and the dead worker's
    token, replayed, is refused with FAILED_PRECONDITION."""
    q = queue_name()
    dead = worker_process(q)
    workflow = spec(task_step("t", q, "first_attempt_hangs", {}, heartbeat_timeout_seconds=2,
                              retry_policy=RETRY_FAST))  # fmt: skip
    wf = await submit(ws.channel, ws.admin, workflow)
    started = await dead.next_event()
    assert (started["workflow_id"], started["attempt"]) == (wf.workflow_id, 1)
    dead.proc.kill()
    dead.proc.wait(10)
    killed = time.monotonic()
    sdk_worker(q, SERVED)
    done = await finish(ws.channel, ws.admin, wf.workflow_id, timeout=60)
    assert done.state == wf_pb.WORKFLOW_STATE_SUCCEEDED, done
    assert time.monotonic() - killed >= 1.5  # not before the 2 s heartbeat timeout
    step = step_status(done, "t")
    assert json_format.MessageToDict(step.output) == {"attempt": 2}
    events = await watch(ws.channel, ws.admin, wf.workflow_id)
    succeeded = [e for e in events if e.step_name == "t"
                 and e.step_state == wf_pb.STEP_STATE_SUCCEEDED]  # fmt: skip
    assert len(succeeded) == 1
    stub = pb_grpc.WorkerServiceStub(ws.channel)
    late = pb.CompleteTaskRequest(task_token=started["token"], queue=q)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.CompleteTask(late, metadata=bearer(ws.worker_key), timeout=5)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    after = await get(ws.channel, ws.admin, wf.workflow_id)
    assert json_format.MessageToDict(step_status(after, "t").output) == {"attempt": 2}


async def test_cancelling_the_workflow_cancels_the_async_function(
    ws: WorkerSuite, sdk_worker
) -> None:
    """CancelWorkflow while a task runs: the next heartbeat says cancel_requested and the
    async function gets CancelledError within one heartbeat interval."""
    q = queue_name()
    started, cancelled = asyncio.Event(), asyncio.Event()

    @task("wait_forever")
    async def wait_forever() -> None:
        started.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    sdk_worker(q, [wait_forever])
    workflow = spec(task_step("t", q, "wait_forever", None, heartbeat_timeout_seconds=1.5))
    wf = await submit(ws.channel, ws.admin, workflow)
    await asyncio.wait_for(started.wait(), 20)
    await wf_grpc.WorkflowServiceStub(ws.channel).CancelWorkflow(
        wf_pb.CancelWorkflowRequest(workflow_id=wf.workflow_id), metadata=bearer(ws.admin),
        timeout=5,
    )  # fmt: skip
    t0 = time.monotonic()
    await asyncio.wait_for(cancelled.wait(), 5)
    assert time.monotonic() - t0 < 1.5  # heartbeats every 0.5 s
    done = await get(ws.channel, ws.admin, wf.workflow_id)
    assert done.state == wf_pb.WORKFLOW_STATE_CANCELLED


@pytest.mark.slow
async def test_sigterm_finishes_running_tasks_and_hands_back_the_rest(
    ws: WorkerSuite, worker_process, sdk_worker
) -> None:
    """SIGTERM to `aiwfe worker run`: it stops polling, the task that ends within the
    grace completes, the one that does not is failed retryable and runs again at once
    elsewhere (long before its 60 s heartbeat timeout), and the process exits 0."""
    q = queue_name()
    worker = worker_process(q, "--shutdown-grace", "1.5")
    quick = await submit(ws.channel, ws.admin, spec(task_step("t", q, "nap", 0.5)))
    slow = await submit(ws.channel, ws.admin, spec(task_step(
        "t", q, "first_attempt_hangs", {}, heartbeat_timeout_seconds=60, retry_policy=RETRY_FAST
    )))  # fmt: skip
    seen = {(await worker.next_event())["workflow_id"] for _ in range(2)}
    assert seen == {quick.workflow_id, slow.workflow_id}
    worker.signal(signal.SIGTERM)
    t0 = time.monotonic()
    assert await worker.wait(20) == 0, worker.stderr()
    assert time.monotonic() - t0 < 6
    done = await finish(ws.channel, ws.admin, quick.workflow_id)
    assert json_format.MessageToDict(step_status(done, "t").output) == {"slept": 0.5,
                                                                         "attempt": 1}  # fmt: skip
    sdk_worker(q, SERVED)
    done = await finish(ws.channel, ws.admin, slow.workflow_id, timeout=20)
    assert done.state == wf_pb.WORKFLOW_STATE_SUCCEEDED
    assert json_format.MessageToDict(step_status(done, "t").output) == {"attempt": 2}
    assert time.monotonic() - t0 < 20


async def test_a_task_handed_out_as_the_worker_stops_is_run_not_lost(ws: WorkerSuite) -> None:
    """stop() just as a submission hands its task to the worker's waiting poll (eager
    dispatch answers the poll before the submission): the worker does not cancel that
    poll (ShutdownWorker has taskproc answer it), so the task runs in the worker's drain
    or is still claimable, and a second worker finishes the workflow at once. Cancelling
    the poll, as the SDK did, lost the task in a cancelled call until its 60 s heartbeat
    timeout in most rounds."""
    dispatcher = ws.suite.running["taskproc"].service.tasks
    q = queue_name()
    drained = 0
    for _ in range(6):
        first = Worker(ws.gateway, ws.worker_key, queues=[q], tasks=SERVED, concurrency=1)
        serving = asyncio.create_task(first.run_async())
        await until(lambda: dispatcher.waiting == 1)
        step = task_step("t", q, "summarize", {"text": "a b"}, heartbeat_timeout_seconds=60)
        wf = await submit(ws.channel, ws.admin, spec(step))
        first.stop()
        await asyncio.wait_for(serving, 15)
        if (
            await get(ws.channel, ws.admin, wf.workflow_id)
        ).state == wf_pb.WORKFLOW_STATE_SUCCEEDED:
            drained += 1
        second = Worker(ws.gateway, ws.worker_key, queues=[q], tasks=SERVED)
        serving = asyncio.create_task(second.run_async())
        try:
            done = await finish(ws.channel, ws.admin, wf.workflow_id, timeout=10)
        finally:
            second.stop()
            await asyncio.wait_for(serving, 15)
        assert done.state == wf_pb.WORKFLOW_STATE_SUCCEEDED
        assert step_status(done, "t").attempts == 1  # never timed out and retried
    assert drained >= 1  # the stopping worker ran tasks it was handed


async def test_input_that_does_not_fit_fails_the_step_for_good(ws: WorkerSuite, sdk_worker) -> None:
    """An input the function cannot take fails the workflow after one attempt (though the
    retry policy allows three), saying which parameter was wrong."""
    q = queue_name()
    sdk_worker(q, SERVED)
    workflow = spec(task_step("t", q, "summarize", {"txt": "typo"}, retry_policy=RETRY_FAST))
    wf = await submit(ws.channel, ws.admin, workflow)
    done = await finish(ws.channel, ws.admin, wf.workflow_id)
    assert done.state == wf_pb.WORKFLOW_STATE_FAILED
    step = step_status(done, "t")
    assert step.attempts == 1
    assert "unexpected keyword argument 'txt'" in step.error
    assert "summarize(text, max_words=50)" in step.error


@pytest.mark.slow
async def test_the_worker_reconnects_after_the_gateway_restarts(
    ws: WorkerSuite, sdk_worker
) -> None:
    """The gateway stopped for 2 s and started again on its port: the SDK worker, polling
    all along, backs off and serves the next task (backoff capped at 5 s)."""
    q = queue_name()
    sdk_worker(q, SERVED)
    first = await submit(ws.channel, ws.admin, spec(task_step("t", q, "shout", "before")))
    assert (await finish(ws.channel, ws.admin, first.workflow_id)).state == (
        wf_pb.WORKFLOW_STATE_SUCCEEDED
    )  # fmt: skip
    gateway = ws.suite.running["gateway"]
    service, port = gateway.service, gateway.port
    await gateway.stop(grace=0.5)
    await asyncio.sleep(2)
    ws.suite.running["gateway"] = await start_service(
        type(service)(ws.suite.settings), host="127.0.0.1", port=port
    )
    restarted = time.monotonic()
    wf = await submit(ws.channel, ws.admin, spec(task_step("t", q, "shout", "after")))
    done = await finish(ws.channel, ws.admin, wf.workflow_id, timeout=30)
    assert json_format.MessageToDict(step_status(done, "t").output) == {"result": "AFTER"}
    assert time.monotonic() - restarted < 8


async def test_a_worker_without_the_queue_permission_stops_with_an_error(
    ws: WorkerSuite, tmp_path
) -> None:
    """An SDK worker whose principal lacks worker:queue:<queue> stops at its first poll
    with WorkerError naming PERMISSION_DENIED; `aiwfe worker run` exits 1 saying so."""
    plain = await new_user(ws.suite, ws.channel, roles=("user",))
    worker = Worker(ws.gateway, plain, queues=[queue_name()], tasks=SERVED)
    with pytest.raises(WorkerError, match="PollTask refused: PERMISSION_DENIED"):
        await asyncio.wait_for(worker.run_async(), 20)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "aiwfe.app.cli", "worker", "run", "tests.workers.worker_tasks",
        "--queue", queue_name(), "--gateway", ws.gateway, cwd=ROOT,
        env={**os.environ, "AIWFE_API_KEY": plain}, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 1
    assert "aiwfe: PollTask refused: PERMISSION_DENIED" in err.decode()
