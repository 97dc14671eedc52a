"""Rows to protobuf messages and back: timestamps, JSON structs, workflow and event
messages, workflow ids and list page tokens."""

from __future__ import annotations

import base64
import uuid
from datetime import datetime
from typing import Any

from google.protobuf import json_format, struct_pb2, timestamp_pb2
from psycopg.types.json import Jsonb

from aiwfe.runtime.errors import InvalidArgument, NotFound
from aiwfe.taskproc.v1 import workflow_service_pb2 as wf_pb


def timestamp(value: datetime) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(value)
    return stamp


def struct(value: dict[str, Any] | None) -> struct_pb2.Struct:
    out = struct_pb2.Struct()
    if value:
        out.update(value)
    return out


def value(item: Any) -> struct_pb2.Value:
    """Any JSON value as a protobuf Value (a fan-out item)."""
    return json_format.ParseDict(item, struct_pb2.Value())


def as_dict(value: struct_pb2.Struct) -> dict[str, Any]:
    return json_format.MessageToDict(value)


def workflow(row: dict[str, Any], steps: list[dict[str, Any]]) -> wf_pb.Workflow:
    """The Workflow message for a workflow row and its step rows (in spec order)."""
    wf = wf_pb.Workflow(
        workflow_id=str(row["workflow_id"]),
        owner=row["owner_id"],
        state=row["state"],
        error=row["error"],
        create_time=timestamp(row["created_at"]),
        update_time=timestamp(row["updated_at"]),
    )
    wf.spec.ParseFromString(row["spec"])
    for s in steps:
        status = wf.steps.add(
            name=s["name"], state=s["state"], attempts=s["attempt"], error=s["error"]
        )
        if s["output"] is not None:
            status.output.CopyFrom(struct(s["output"]))
        if s.get("details") is not None:
            status.details.CopyFrom(struct(s["details"]))
    return wf


def event(e: dict[str, Any]) -> wf_pb.WatchWorkflowResponse:
    return wf_pb.WatchWorkflowResponse(
        sequence=e["sequence"],
        workflow_state=e["workflow_state"],
        step_name=e["step_name"],
        step_state=e["step_state"],
        message=e["message"],
        event_time=timestamp(e["created_at"]),
    )


def not_found(workflow_id: str) -> NotFound:
    return NotFound(
        "workflow not found", reason="WORKFLOW_NOT_FOUND", metadata={"workflowId": workflow_id}
    )


def workflow_id(value: str) -> uuid.UUID:
    """A workflow id; anything that is not a UUID cannot exist, so it is NOT_FOUND."""
    try:
        return uuid.UUID(value)
    except (ValueError, AttributeError, TypeError):
        raise not_found(value) from None


def page_token(created: datetime, wid: uuid.UUID) -> str:
    return base64.urlsafe_b64encode(f"{created.isoformat()}|{wid}".encode()).decode()


def page_after(token: str) -> tuple[datetime, uuid.UUID]:
    try:
        created, wid = base64.urlsafe_b64decode(token.encode()).decode().split("|")
        return datetime.fromisoformat(created), uuid.UUID(wid)
    except (ValueError, UnicodeDecodeError):
        raise InvalidArgument([("page_token", "is not a token this service issued")]) from None


def trace_context_json(request: Any) -> Jsonb | None:
    """A CreateWorkflowRequest's trace context as the `workflows.trace_context` value
    (migration 009), None when the submission carried none."""
    if not request.HasField("trace_context") or not request.trace_context.traceparent:
        return None
    tc = request.trace_context
    return Jsonb({"traceparent": tc.traceparent, "tracestate": tc.tracestate})


def set_trace_context(step: Any, stored: dict[str, str] | None, submitted: datetime) -> None:
    """Fills a ClaimedStep's submitter trace context and submit time."""
    if stored:
        step.trace_context.traceparent = stored.get("traceparent", "")
        step.trace_context.tracestate = stored.get("tracestate", "")
    step.submit_time.CopyFrom(timestamp(submitted))
