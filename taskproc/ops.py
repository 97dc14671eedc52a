"""Step operations: `noop` (deterministic test/benchmark step) and the cognitive RPCs.

A cognitive op's inputs are its request message in JSON form (proto field names) and its
output is the response in the same form, so the contract defines both; Generate's stream
is joined into one `text`. Calls go through the cognitive `Downstream` (breaker, identity of
the service acting for the workflow's owner) with the step's remaining time as deadline.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message

from aiwfe.channels import Downstream
from aiwfe.cognitive.v1 import cognitive_service_pb2 as cog_pb
from aiwfe.cognitive.v1 import cognitive_service_pb2_grpc as cog_grpc

MAX_NOOP_SLEEP_MS = 600_000

# Downstream failures a retry cannot fix: the step fails at once.
PERMANENT_CODES = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.OUT_OF_RANGE,
    }
)


class StepError(Exception):
    """A failure of the step itself; `retryable` False ends the workflow without retries."""

    def __init__(self, message: str, retryable: bool = True) -> None:
        super().__init__(message)
        self.retryable = retryable


@dataclass(frozen=True)
class StepContext:
    """What an op may use: its attempt number, the worker, cognitive and its deadline."""

    attempt: int
    worker_id: str
    cognitive: Downstream
    timeout: float


Runner = Callable[[StepContext, dict[str, Any]], Awaitable[dict[str, Any]]]


@dataclass(frozen=True)
class Op:
    """An operation: validates inputs at submit time, runs at step time."""

    name: str
    run: Runner
    output_fields: frozenset[str] | None
    check: Callable[[dict[str, Any]], str | None]

    def check_inputs(self, inputs: dict[str, Any]) -> str | None:
        return self.check(inputs)


def _number(inputs: dict[str, Any], key: str, maximum: float) -> str | None:
    value = inputs.get(key, 0)
    if not isinstance(value, int | float) or isinstance(value, bool):
        return f"{key} must be a number"
    if not 0 <= value <= maximum:
        return f"{key} must be between 0 and {maximum:g}"
    return None


def _check_noop(inputs: dict[str, Any]) -> str | None:
    return _number(inputs, "sleep_ms", MAX_NOOP_SLEEP_MS) or _number(inputs, "fail_times", 1000)


async def _noop(ctx: StepContext, inputs: dict[str, Any]) -> dict[str, Any]:
    """Sleeps `sleep_ms`, fails (retryably) while attempt <= `fail_times`, or for good when
    `fail` is "permanent"; echoes `echo`."""
    sleep_ms = float(inputs.get("sleep_ms", 0))
    if sleep_ms:
        await asyncio.sleep(sleep_ms / 1000)
    if inputs.get("fail") == "permanent":
        raise StepError("noop asked to fail permanently", retryable=False)
    if ctx.attempt <= int(inputs.get("fail_times", 0)):
        raise StepError(f"noop failing attempt {ctx.attempt} as asked")
    return {"echo": inputs.get("echo"), "attempt": ctx.attempt, "worker": ctx.worker_id}


def _request(cls: type[Message], inputs: dict[str, Any]) -> Message:
    try:
        return json_format.ParseDict(inputs, cls())
    except json_format.ParseError as exc:
        raise StepError(f"invalid inputs for {cls.DESCRIPTOR.name}: {exc}", False) from None


def _checker(cls: type[Message]) -> Callable[[dict[str, Any]], str | None]:
    def check(inputs: dict[str, Any]) -> str | None:
        try:
            json_format.ParseDict(inputs, cls())
        except json_format.ParseError as exc:
            return f"not a valid {cls.DESCRIPTOR.name}: {exc}"
        return None

    return check


def _fields(cls: type[Message]) -> frozenset[str]:
    return frozenset(f.name for f in cls.DESCRIPTOR.fields)


def _as_dict(message: Message) -> dict[str, Any]:
    return json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


def _unary(method: str, request_cls: type[Message]) -> Runner:
    async def run(ctx: StepContext, inputs: dict[str, Any]) -> dict[str, Any]:
        stub = cog_grpc.CognitiveServiceStub(ctx.cognitive.channel)
        reply = await ctx.cognitive.call(
            getattr(stub, method), _request(request_cls, inputs), timeout=ctx.timeout
        )
        return _as_dict(reply)

    return run


async def _generate(ctx: StepContext, inputs: dict[str, Any]) -> dict[str, Any]:
    stub = cog_grpc.CognitiveServiceStub(ctx.cognitive.channel)
    request = _request(cog_pb.GenerateRequest, inputs)
    ctx.cognitive.breaker.before_call()
    parts: list[str] = []
    model, citations = "", []
    try:
        async for piece in stub.Generate(
            request, timeout=ctx.timeout, metadata=ctx.cognitive.metadata()
        ):
            parts.append(piece.text)
            model = piece.model or model
            citations.extend(piece.citations)
    except grpc.aio.AioRpcError as exc:
        ctx.cognitive.breaker.record_error(exc)
        raise
    ctx.cognitive.breaker.record_success()
    return {"text": "".join(parts), "model": model, "citations": citations}


OPS: dict[str, Op] = {
    "noop": Op("noop", _noop, frozenset({"echo", "attempt", "worker"}), _check_noop),
    "cognitive.embed": Op(
        "cognitive.embed",
        _unary("Embed", cog_pb.EmbedRequest),
        _fields(cog_pb.EmbedResponse),
        _checker(cog_pb.EmbedRequest),
    ),
    "cognitive.index": Op(
        "cognitive.index",
        _unary("IndexDocuments", cog_pb.IndexDocumentsRequest),
        _fields(cog_pb.IndexDocumentsResponse),
        _checker(cog_pb.IndexDocumentsRequest),
    ),
    "cognitive.search": Op(
        "cognitive.search",
        _unary("Search", cog_pb.SearchRequest),
        _fields(cog_pb.SearchResponse),
        _checker(cog_pb.SearchRequest),
    ),
    "cognitive.classify": Op(
        "cognitive.classify",
        _unary("Classify", cog_pb.ClassifyRequest),
        _fields(cog_pb.ClassifyResponse),
        _checker(cog_pb.ClassifyRequest),
    ),
    "cognitive.generate": Op(
        "cognitive.generate",
        _generate,
        frozenset({"text", "model", "citations"}),
        _checker(cog_pb.GenerateRequest),
    ),
}
