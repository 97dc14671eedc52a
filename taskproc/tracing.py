"""One trace from submit to the last step (README "Observability").

A submission stores the submitter's W3C trace context with the workflow (taskproc's
SubmitWorkflow/RunWorkflow server span, through `CreateWorkflowRequest.trace_context`);
each claim hands it back with the step. Each step attempt then runs in a span `step <name>`
that is the submit span's child, or, when the attempt starts more than
`telemetry.step_link_after_seconds` after the submission (timers, signals, long retries), a
new root with a span Link to it (`aiwfe.runtime.telemetry.continued`). A task step's
dispatch span `task <type>`, the parent of the external worker's own span, follows the
same rule, so the worker lands in the workflow's trace too.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from aiwfe.data.v1 import workflow_store_service_pb2 as store_pb
from aiwfe.runtime.telemetry import continued, current_trace_context

_tracer = trace.get_tracer("aiwfe")
_W3C = TraceContextTextMapPropagator()


def submit_trace_context() -> store_pb.TraceContext | None:
    """The current (submit) span's W3C context to store with a workflow, None without one."""
    traceparent, tracestate = current_trace_context()
    if not traceparent:
        return None
    return store_pb.TraceContext(traceparent=traceparent, tracestate=tracestate)


def _start(
    step: store_pb.ClaimedStep,
    name: str,
    kind: SpanKind,
    link_after: float,
    attributes: dict[str, Any],
) -> tuple[Span, otel_context.Context]:
    """A step attempt's span, started now as the submit's child or a root linked to it."""
    age = 0.0
    if step.HasField("submit_time"):
        age = time.time() - step.submit_time.ToMicroseconds() / 1e6
    parent, links = continued(
        step.trace_context.traceparent, step.trace_context.tracestate, age, link_after
    )
    span = _tracer.start_span(
        name,
        context=parent,
        kind=kind,
        links=links,
        attributes={
            "aiwfe.workflow_id": step.ref.workflow_id,
            "aiwfe.step": step.ref.step_name,
            "aiwfe.attempt": step.ref.attempt,
            "aiwfe.op": step.op,
            **attributes,
        },
    )
    return span, trace.set_span_in_context(span, parent)


@contextlib.contextmanager
def step_attempt(step: store_pb.ClaimedStep, link_after: float) -> Iterator[Span]:
    """Runs the block in the attempt's span `step <name>` (current, ended on exit). The
    context is the workflow's, not the caller's: a quiet claim loop's suppression and
    unsampled span stay behind, so the op's cognitive calls join the workflow's trace."""
    span, context = _start(step, f"step {step.ref.step_name}", SpanKind.CONSUMER, link_after, {})
    token = otel_context.attach(context)
    try:
        yield span
    except BaseException as exc:
        span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
        raise
    finally:
        otel_context.detach(token)
        span.end()


def mark_failed(error: str) -> None:
    """Marks the current step span as failed with the attempt's error."""
    trace.get_current_span().set_status(Status(StatusCode.ERROR, error))


def dispatch_traceparent(
    step: store_pb.ClaimedStep, worker_identity: str, link_after: float
) -> str:
    """Records the dispatch span `task <type>` of a task handed to an external worker (the
    submit's child or linked, as a step attempt) and returns its `traceparent`, the parent
    of the worker's own span ("" when there is no trace to continue)."""
    span, context = _start(
        step,
        f"task {step.task_type}",
        SpanKind.PRODUCER,
        link_after,
        {"aiwfe.queue": step.queue, "aiwfe.worker": worker_identity},
    )
    carrier: dict[str, str] = {}
    _W3C.inject(carrier, context=context)
    span.end()
    return carrier.get("traceparent", "")
