"""The gateway's SystemService: its own breakers plus each back end's, asked over gRPC."""

from __future__ import annotations

import grpc

from aiwfe.runtime.channels import Upstream
from aiwfe.runtime.errors import AiwfeError
from aiwfe.runtime.system_service import local_breakers
from aiwfe.system.v1 import system_service_pb2 as pb
from aiwfe.system.v1 import system_service_pb2_grpc as pb_grpc


class GatewaySystemServicer(pb_grpc.SystemServiceServicer):
    def __init__(self, upstreams: list[Upstream]) -> None:
        self._upstreams = upstreams

    async def ListCircuitBreakers(
        self, request: pb.ListCircuitBreakersRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListCircuitBreakersResponse:
        reply = pb.ListCircuitBreakersResponse(breakers=local_breakers("gateway"))
        for downstream in self._upstreams:
            stub = pb_grpc.SystemServiceStub(downstream.channel)
            try:
                theirs = await downstream.call(stub.ListCircuitBreakers, request, timeout=2.0)
            except (grpc.aio.AioRpcError, AiwfeError):
                reply.unreachable_services.append(downstream.name)
                continue
            reply.breakers.extend(theirs.breakers)
        reply.breakers.sort(key=lambda b: (b.service, b.downstream))
        return reply
