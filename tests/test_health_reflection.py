"""grpc.health.v1 and server reflection as the ecosystem's clients use them, on every
service: Health/List, reflection v1 (a client that knows only v1), member symbol lookup."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import grpc
import pytest
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2 as refl

from aiwfe.suite import SERVICE_ORDER, Suite

V1_METHOD = "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"


async def reflect_v1(channel: grpc.aio.Channel, *requests: refl.ServerReflectionRequest) -> list:
    """Asks grpc.reflection.v1 only (its messages are wire-identical to v1alpha's)."""
    call = channel.stream_stream(
        V1_METHOD,
        request_serializer=refl.ServerReflectionRequest.SerializeToString,
        response_deserializer=refl.ServerReflectionResponse.FromString,
    )(iter(requests), timeout=10)
    return [reply async for reply in call]


def files_of(reply: refl.ServerReflectionResponse) -> dict[str, descriptor_pb2.FileDescriptorProto]:
    assert reply.WhichOneof("message_response") == "file_descriptor_response", reply
    out = {}
    for raw in reply.file_descriptor_response.file_descriptor_proto:
        proto = descriptor_pb2.FileDescriptorProto.FromString(raw)
        out[proto.name] = proto
    return out


@pytest.fixture
async def channels(suite: Suite) -> AsyncIterator[dict[str, grpc.aio.Channel]]:
    opened = {name: grpc.aio.insecure_channel(suite.address(name)) for name in SERVICE_ORDER}
    yield opened
    for channel in opened.values():
        await channel.close()


async def test_health_list_answers_on_every_service_without_errors(channels, caplog) -> None:
    """Health/List (declared by health.proto, listed by reflection) answers every service's
    statuses, SERVING, and logs no ERROR."""
    caplog.set_level(logging.ERROR)
    for name, channel in channels.items():
        health = health_pb2_grpc.HealthStub(channel)
        reply = await health.List(health_pb2.HealthListRequest(), timeout=5)
        assert "" in reply.statuses, name
        assert len(reply.statuses) > 1, name
        for service, status in reply.statuses.items():
            assert status.status == health_pb2.HealthCheckResponse.SERVING, (name, service)
            check = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert check.status == status.status
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_reflection_v1_lists_and_resolves_methods_and_messages(channels) -> None:
    """A client speaking only grpc.reflection.v1 lists each service's services and resolves
    a service, a method symbol and a message symbol to the file that defines it."""
    for name, channel in channels.items():
        (listed,) = await reflect_v1(channel, refl.ServerReflectionRequest(list_services=""))
        services = {s.name for s in listed.list_services_response.service}
        assert {"grpc.reflection.v1.ServerReflection", "grpc.health.v1.Health"} <= services
        assert "grpc.reflection.v1alpha.ServerReflection" in services
        for service in sorted(services):
            (found,) = await reflect_v1(
                channel, refl.ServerReflectionRequest(file_containing_symbol=service)
            )
            files = files_of(found)
            package, _, short = service.rpartition(".")
            (home,) = [
                f for f in files.values()
                if f.package == package and short in {s.name for s in f.service}
            ]  # fmt: skip
            definition = next(s for s in home.service if s.name == short)
            method = definition.method[0]
            by_method, by_message = await reflect_v1(
                channel,
                refl.ServerReflectionRequest(file_containing_symbol=f"{service}.{method.name}"),
                refl.ServerReflectionRequest(file_containing_symbol=method.input_type.lstrip(".")),
            )
            assert home.name in files_of(by_method), (name, service, method.name)
            assert files_of(by_message), (name, method.input_type)


async def test_gateway_resolves_embed_over_both_reflection_versions(channels) -> None:
    """The gateway resolves `CognitiveService.Embed` to cognitive_service.proto over v1 and
    v1alpha alike; an unknown member is NOT_FOUND in the reflection answer."""
    gateway = channels["gateway"]
    symbol = "aiwfe.cognitive.v1.CognitiveService.Embed"
    (v1,) = await reflect_v1(gateway, refl.ServerReflectionRequest(file_containing_symbol=symbol))
    assert "aiwfe/cognitive/v1/cognitive_service.proto" in files_of(v1)
    alpha = gateway.stream_stream(
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        request_serializer=refl.ServerReflectionRequest.SerializeToString,
        response_deserializer=refl.ServerReflectionResponse.FromString,
    )
    request = refl.ServerReflectionRequest(file_containing_symbol=symbol)
    replies = [r async for r in alpha(iter([request]), timeout=10)]
    assert "aiwfe/cognitive/v1/cognitive_service.proto" in files_of(replies[0])
    (missing,) = await reflect_v1(
        gateway,
        refl.ServerReflectionRequest(file_containing_symbol=f"{symbol}Nope"),
    )
    assert missing.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]
