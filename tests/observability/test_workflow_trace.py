"""One trace from submit to the last step (issue #20), recorded by an in-memory exporter:
step spans are the submit's children (or linked when late), the ops' cognitive and
dataplatform calls are under them, an external task's dispatch span is in the workflow's
trace, and idle polling loops export nothing."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import pytest
from opentelemetry import propagate, trace
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from aiwfe.app.suite import Suite, start_suite
from aiwfe.runtime.metrics import REGISTRY
from aiwfe.runtime.telemetry import continued
from aiwfe.taskproc.v1 import worker_service_pb2 as worker_pb
from aiwfe.taskproc.v1 import worker_service_pb2_grpc as worker_grpc
from aiwfe.taskproc.v1 import workflow_service_pb2 as wf_pb
from aiwfe.taskproc.v1 import workflow_service_pb2_grpc as wf_grpc
from tests.conftest import bearer
from tests.observability.memory import record_into
from tests.taskproc.helpers import finish, new_user, spec

EXPORTER = InMemorySpanExporter()
SUBMIT = "/aiwfe.taskproc.v1.WorkflowService/SubmitWorkflow"
EMBED = "/aiwfe.cognitive.v1.CognitiveService/Embed"
POLLING = (
    "ClaimSteps",
    "CompleteSteps",
    "CompleteStepsStream",
    "WatchWorkflowEventsMany",
    "ExtendLeases",
    "WaitForWork",
    "ListRevocations",
)
_tracer = trace.get_tracer("test")


@pytest.fixture(scope="module")
def exporter() -> Iterator[InMemorySpanExporter]:
    yield record_into(EXPORTER)


@pytest.fixture
async def traced(
    exporter: InMemorySpanExporter, private_overrides: dict[str, Any], request: Any
) -> AsyncIterator[Suite]:
    """A suite started after the SDK provider is installed, with the `telemetry` overrides
    a test passes as its (indirect) parameter, on a database of its own (an idle suite
    must find no step an earlier test left behind)."""
    telemetry = getattr(request, "param", {})
    running = await start_suite({**private_overrides, "telemetry": telemetry})
    yield running
    await running.stop()


def _metadata(token: str) -> tuple[tuple[str, str], ...]:
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return bearer(token) + tuple(carrier.items())


async def _spans_until(names: set[str], within: float = 10) -> list[ReadableSpan]:
    """The finished spans once every one of `names` has ended (a step span ends just after
    its result is recorded, so possibly after the workflow is seen to succeed)."""
    deadline = time.monotonic() + within
    while True:
        spans = list(EXPORTER.get_finished_spans())
        if names <= {s.name for s in spans} or time.monotonic() > deadline:
            return spans
        await asyncio.sleep(0.05)


def _one(spans: list[ReadableSpan], name: str, service: str | None = None) -> ReadableSpan:
    found = [
        s for s in spans
        if s.name == name and (service is None or s.attributes.get("aiwfe.service") == service)
    ]  # fmt: skip
    assert len(found) == 1, (name, service, sorted(s.name for s in spans))
    return found[0]


def _three_steps() -> wf_pb.WorkflowSpec:
    return spec(
        {"name": "a", "op": "noop", "inputs": {"echo": "traced"}},
        {
            "name": "embed",
            "op": "cognitive.embed",
            "depends_on": ["a"],
            "inputs": {"texts": [f"one trace {time.time_ns()}"]},
        },
        {"name": "c", "op": "noop", "depends_on": ["embed"], "inputs": {"echo": "end"}},
    )


async def _submit_traced(
    channel: grpc.aio.Channel, token: str, workflow: wf_pb.WorkflowSpec
) -> tuple[wf_pb.Workflow, Any]:
    """Submits under a client span; the workflow and that span's context."""
    with _tracer.start_as_current_span("client submit", kind=SpanKind.CLIENT) as root:
        reply = await wf_grpc.WorkflowServiceStub(channel).SubmitWorkflow(
            wf_pb.SubmitWorkflowRequest(spec=workflow), metadata=_metadata(token), timeout=10
        )
    return reply.workflow, root.get_span_context()


async def test_a_three_step_workflow_is_one_trace(traced) -> None:
    """Submit → `step a`, `step embed`, `step c` (each a child of taskproc's submit span,
    with workflow, step, attempt and op) → the embed step's cognitive client span →
    cognitive → dataplatform: one trace, with no claim or completion spans in it."""
    async with grpc.aio.insecure_channel(traced.address("gateway")) as ch:
        token = await new_user(traced, ch)
        EXPORTER.clear()
        workflow, root = await _submit_traced(ch, token, _three_steps())
        done = await finish(ch, token, workflow.workflow_id)
        assert done.state == wf_pb.WORKFLOW_STATE_SUCCEEDED, done.error
    spans = await _spans_until({"step a", "step embed", "step c"})
    mine = [s for s in spans if s.context.trace_id == root.trace_id]
    by_id = {s.context.span_id: s for s in mine}
    gateway = _one(mine, SUBMIT, "gateway")
    submit = _one(mine, SUBMIT, "taskproc")
    assert gateway.parent.span_id == root.span_id
    assert submit.parent.span_id == gateway.context.span_id
    for name, op in (("a", "noop"), ("embed", "cognitive.embed"), ("c", "noop")):
        step = _one(mine, f"step {name}")
        assert step.parent.span_id == submit.context.span_id, name
        assert not step.links
        assert dict(step.attributes) == {
            "aiwfe.workflow_id": workflow.workflow_id,
            "aiwfe.step": name,
            "aiwfe.attempt": 1,
            "aiwfe.op": op,
        }
    step = _one(mine, "step embed")
    client = _one(mine, f"cognitive {EMBED}")
    assert client.kind == SpanKind.CLIENT and client.parent.span_id == step.context.span_id
    cognitive = _one(mine, EMBED, "cognitive")
    assert cognitive.parent.span_id == client.context.span_id
    dataplatform = [s for s in mine if s.attributes.get("aiwfe.service") == "dataplatform"]
    assert any(by_id[s.parent.span_id].parent.span_id == cognitive.context.span_id
               for s in dataplatform), [s.name for s in dataplatform]  # fmt: skip
    # The steps ran in the order of their dependencies, each after the submit.
    starts = [_one(mine, f"step {n}").start_time for n in ("a", "embed", "c")]
    assert submit.start_time < starts[0] < starts[1] < starts[2]
    assert not [s.name for s in spans if s.name.rsplit("/", 1)[-1] in POLLING]


@pytest.mark.parametrize("traced", [{"step_link_after_seconds": 0}], indirect=True)
async def test_a_late_step_is_linked_not_parented(traced) -> None:
    """A step attempt starting after `step_link_after_seconds` (0 here) roots a trace of
    its own with a Link to the submit span, and its op's calls stay in that new trace."""
    async with grpc.aio.insecure_channel(traced.address("gateway")) as ch:
        token = await new_user(traced, ch)
        EXPORTER.clear()
        workflow, root = await _submit_traced(ch, token, _three_steps())
        done = await finish(ch, token, workflow.workflow_id)
        assert done.state == wf_pb.WORKFLOW_STATE_SUCCEEDED, done.error
    spans = await _spans_until({"step a", "step embed", "step c"})
    submit = _one([s for s in spans if s.context.trace_id == root.trace_id], SUBMIT, "taskproc")
    for name in ("a", "embed", "c"):
        step = _one(spans, f"step {name}")
        assert step.parent is None, name
        assert step.context.trace_id != root.trace_id
        assert [(link.context.trace_id, link.context.span_id) for link in step.links] == [
            (submit.context.trace_id, submit.context.span_id)
        ]
    step = _one(spans, "step embed")
    client = _one(spans, f"cognitive {EMBED}")
    assert client.context.trace_id == step.context.trace_id
    assert client.parent.span_id == step.context.span_id


async def _idle_spans(seconds: float) -> list[ReadableSpan]:
    await asyncio.sleep(1.0)  # start-up work (migrations, the first probes) is not idle
    EXPORTER.clear()
    await asyncio.sleep(seconds)
    return list(EXPORTER.get_finished_spans())


def _claims_counted() -> float:
    labels = {
        "service": "dataplatform",
        "method": "/aiwfe.data.v1.WorkflowStoreService/ClaimSteps",
        "code": "OK",
    }
    return REGISTRY.get_sample_value("request_rate_counter_total", labels) or 0.0


async def test_an_idle_suite_exports_no_spans(traced) -> None:
    """Idle for 4 s, the suite's polling loops (workers' claims, wake-up streams, sweeps,
    revocation polls, health probes) export no span at all, while their calls still count
    in the RPC metrics."""
    before = _claims_counted()
    spans = await _idle_spans(4.0)
    assert spans == [], sorted({s.name for s in spans})
    assert _claims_counted() - before >= 4  # every taskproc.poll_interval (0.5 s)


@pytest.mark.parametrize("traced", [{"trace_polling": True}], indirect=True)
async def test_trace_polling_turns_the_loops_spans_back_on(traced) -> None:
    """With `telemetry.trace_polling` the same idle suite exports its claims again (so the
    quiet test above could fail)."""
    spans = await _idle_spans(2.0)
    claims = [s for s in spans if s.name == "/aiwfe.data.v1.WorkflowStoreService/ClaimSteps"]
    assert len(claims) >= 2, sorted({s.name for s in spans})


async def test_an_external_task_is_dispatched_in_the_workflows_trace(traced) -> None:
    """A task step's dispatch span `task <type>` is the submit span's child, PollTask's
    `traceparent` names it, and a worker's span under that traceparent is in the trace."""
    async with grpc.aio.insecure_channel(traced.address("gateway")) as ch:
        owner = await new_user(traced, ch)
        worker = await new_user(traced, ch, ("worker",))
        EXPORTER.clear()
        workflow, root = await _submit_traced(
            ch,
            owner,
            spec(
                {
                    "name": "work",
                    "op": "task",
                    "inputs": {"queue": "traced", "type": "summarize", "input": {"t": 1}},
                }
            ),
        )
        stub = worker_grpc.WorkerServiceStub(ch)
        # The worker's poll has a trace of its own: the task must not join it.
        with _tracer.start_as_current_span("worker poll") as poll_root:
            task = await stub.PollTask(
                worker_pb.PollTaskRequest(queues=["traced"], wait_seconds=5),
                metadata=_metadata(worker),
                timeout=10,
            )
        assert task.workflow_id == workflow.workflow_id
        parent = TraceContextTextMapPropagator().extract({"traceparent": task.traceparent})
        with _tracer.start_as_current_span("worker summarize", context=parent) as mine:
            await stub.CompleteTask(
                worker_pb.CompleteTaskRequest(
                    task_token=task.task_token, queue=task.queue, output={"ok": True}
                ),
                metadata=_metadata(worker),
                timeout=10,
            )
        done = await finish(ch, owner, workflow.workflow_id)
        assert done.state == wf_pb.WORKFLOW_STATE_SUCCEEDED, done.error
    spans = list(EXPORTER.get_finished_spans())
    submit = _one([s for s in spans if s.context.trace_id == root.trace_id], SUBMIT, "taskproc")
    dispatch = _one(spans, "task summarize")
    assert dispatch.kind == SpanKind.PRODUCER
    assert dispatch.context.trace_id == root.trace_id != poll_root.get_span_context().trace_id
    assert dispatch.parent.span_id == submit.context.span_id
    assert dispatch.attributes["aiwfe.workflow_id"] == workflow.workflow_id
    assert dispatch.attributes["aiwfe.queue"] == "traced"
    assert task.traceparent.split("-")[1:3] == [
        f"{root.trace_id:032x}",
        f"{dispatch.context.span_id:016x}",
    ]
    assert mine.get_span_context().trace_id == root.trace_id
    # CompleteTask's own calls are the worker's, under its span.
    complete = _one(spans, "/aiwfe.taskproc.v1.WorkerService/CompleteTask", "gateway")
    assert complete.parent.span_id == mine.get_span_context().span_id


async def test_run_workflow_steps_are_children_of_its_span(traced) -> None:
    """RunWorkflow (submit and watch in one call) stores its own server span's context:
    the steps are children of taskproc's RunWorkflow span."""
    run = "/aiwfe.taskproc.v1.WorkflowService/RunWorkflow"
    async with grpc.aio.insecure_channel(traced.address("gateway")) as ch:
        token = await new_user(traced, ch)
        EXPORTER.clear()
        with _tracer.start_as_current_span("client run") as root:
            stream = wf_grpc.WorkflowServiceStub(ch).RunWorkflow(
                wf_pb.RunWorkflowRequest(spec=_three_steps()),
                metadata=_metadata(token),
                timeout=30,
            )
            updates = [u async for u in stream]
    assert updates[-1].event.workflow_state == wf_pb.WORKFLOW_STATE_SUCCEEDED
    spans = await _spans_until({"step a", "step embed", "step c", run})
    trace_id = root.get_span_context().trace_id
    server = _one([s for s in spans if s.context.trace_id == trace_id], run, "taskproc")
    for name in ("a", "embed", "c"):
        step = _one(spans, f"step {name}")
        assert step.context.trace_id == trace_id
        assert step.parent.span_id == server.context.span_id


@pytest.mark.parametrize("traced", [{"step_link_after_seconds": 1.5}], indirect=True)
async def test_a_task_dispatched_late_is_linked_and_an_early_step_is_a_child(traced) -> None:
    """In one workflow, a step run at once is the submit's child, and a task first polled
    2 s after the submit (threshold 1.5 s) gets a dispatch span rooting a new trace linked
    to the submit, whose traceparent the worker receives."""
    async with grpc.aio.insecure_channel(traced.address("gateway")) as ch:
        owner = await new_user(traced, ch)
        worker = await new_user(traced, ch, ("worker",))
        EXPORTER.clear()
        workflow, root = await _submit_traced(
            ch,
            owner,
            spec(
                {"name": "early", "op": "noop", "inputs": {"echo": 1}},
                {
                    "name": "late",
                    "op": "task",
                    "inputs": {"queue": "late", "type": "review", "input": {}},
                },
            ),
        )
        await asyncio.sleep(2.0)
        stub = worker_grpc.WorkerServiceStub(ch)
        task = await stub.PollTask(
            worker_pb.PollTaskRequest(queues=["late"], wait_seconds=5),
            metadata=_metadata(worker),
            timeout=10,
        )
        await stub.CompleteTask(
            worker_pb.CompleteTaskRequest(task_token=task.task_token, queue=task.queue),
            metadata=_metadata(worker),
            timeout=10,
        )
        done = await finish(ch, owner, workflow.workflow_id)
        assert done.state == wf_pb.WORKFLOW_STATE_SUCCEEDED, done.error
    spans = await _spans_until({"step early", "task review"})
    submit = _one([s for s in spans if s.context.trace_id == root.trace_id], SUBMIT, "taskproc")
    early = _one(spans, "step early")
    assert early.parent.span_id == submit.context.span_id and not early.links
    dispatch = _one(spans, "task review")
    assert dispatch.parent is None and dispatch.context.trace_id != root.trace_id
    assert [(k.context.trace_id, k.context.span_id) for k in dispatch.links] == [
        (root.trace_id, submit.context.span_id)
    ]
    assert task.traceparent.split("-")[1] == f"{dispatch.context.trace_id:032x}"


def test_continued_is_a_child_within_the_threshold_else_a_linked_root() -> None:
    """`continued`: no or a malformed stored context → a root without links; within the
    threshold → the stored span as parent; past it → a root linked to the stored span."""
    traceparent = f"00-{'ab' * 16}-{'cd' * 8}-01"
    for bad in ("", "00-zz-yy-01", f"00-{'0' * 32}-{'cd' * 8}-01"):
        context, links = continued(bad, "", 0.0, 60)
        assert not trace.get_current_span(context).get_span_context().is_valid
        assert links == []
    context, links = continued(traceparent, "vendor=x", 59.0, 60)
    parent = trace.get_current_span(context).get_span_context()
    assert (parent.trace_id, parent.span_id, links) == (int("ab" * 16, 16), int("cd" * 8, 16), [])
    assert parent.trace_state.get("vendor") == "x"
    context, links = continued(traceparent, "", 61.0, 60)
    assert not trace.get_current_span(context).get_span_context().is_valid
    assert [(k.context.trace_id, k.context.span_id) for k in links] == [
        (int("ab" * 16, 16), int("cd" * 8, 16))
    ]
