"""SystemService: each service reports its own circuit breakers; the gateway's version
(gateway/system.py) adds every back end's, for admins (`system:read`)."""

from __future__ import annotations

import grpc

from aiwfe.runtime.resilience.breaker import breakers_of
from aiwfe.system.v1 import system_service_pb2 as pb
from aiwfe.system.v1 import system_service_pb2_grpc as pb_grpc

_STATES = {0: pb.BREAKER_STATE_CLOSED, 1: pb.BREAKER_STATE_OPEN, 2: pb.BREAKER_STATE_HALF_OPEN}


def local_breakers(service: str) -> list[pb.CircuitBreaker]:
    return [
        pb.CircuitBreaker(
            service=service,
            downstream=b.name,
            state=_STATES[b.state.value],
            failure_count=b.failure_count,
            open_remaining_seconds=b.open_remaining(),
        )
        for b in breakers_of(service)
    ]


class LocalSystemServicer(pb_grpc.SystemServiceServicer):
    """This process's breakers for one service."""

    def __init__(self, service: str) -> None:
        self._service = service

    async def ListCircuitBreakers(
        self, request: pb.ListCircuitBreakersRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListCircuitBreakersResponse:
        return pb.ListCircuitBreakersResponse(breakers=local_breakers(self._service))
