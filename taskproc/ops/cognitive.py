"""`cognitive.*`: the cognitive RPCs as steps.

A cognitive op's inputs are its request message in JSON form (proto field names) and its
output is the response in the same form, so the contract defines both; Generate's stream
is joined into one `text`. Calls go through the cognitive `Upstream` (breaker, client
span, identity of the service acting for the workflow's owner) with the step's remaining
time as deadline.
"""

from __future__ import annotations

from typing import Any

from google.protobuf import json_format
from google.protobuf.message import Message

from aiwfe.cognitive.v1 import cognitive_service_pb2 as cog_pb
from aiwfe.cognitive.v1 import cognitive_service_pb2_grpc as cog_grpc
from taskproc.ops import InputCheck, Op, Runner, StepContext, StepError, op, register


def _request(cls: type[Message], inputs: dict[str, Any]) -> Message:
    try:
        return json_format.ParseDict(inputs, cls())
    except json_format.ParseError as exc:
        raise StepError(f"invalid inputs for {cls.DESCRIPTOR.name}: {exc}", False) from None


def _checker(cls: type[Message]) -> InputCheck:
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


for _name, _method, _request_cls, _response_cls in (
    ("cognitive.embed", "Embed", cog_pb.EmbedRequest, cog_pb.EmbedResponse),
    (
        "cognitive.index",
        "IndexDocuments",
        cog_pb.IndexDocumentsRequest,
        cog_pb.IndexDocumentsResponse,
    ),
    ("cognitive.search", "Search", cog_pb.SearchRequest, cog_pb.SearchResponse),
    ("cognitive.classify", "Classify", cog_pb.ClassifyRequest, cog_pb.ClassifyResponse),
):
    register(
        Op(_name, _unary(_method, _request_cls), _fields(_response_cls), _checker(_request_cls))
    )


@op(
    "cognitive.generate",
    frozenset({"text", "model", "citations"}),
    _checker(cog_pb.GenerateRequest),
)
async def generate(ctx: StepContext, inputs: dict[str, Any]) -> dict[str, Any]:
    """Generate's stream, read through the channel's streaming path, joined into one text."""
    stub = cog_grpc.CognitiveServiceStub(ctx.cognitive.channel)
    request = _request(cog_pb.GenerateRequest, inputs)
    parts: list[str] = []
    model, citations = "", []
    async for piece in ctx.cognitive.stream(stub.Generate, request, timeout=ctx.timeout):
        parts.append(piece.text)
        model = piece.model or model
        citations.extend(piece.citations)
    return {"text": "".join(parts), "model": model, "citations": citations}
