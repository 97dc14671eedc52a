"""grpc.health.v1 as the ecosystem expects it: Check, Watch and List.

grpcio-health-checking 1.85.1's asyncio servicer answers Check and Watch from its status
map but not List (the base class raises NotImplementedError, which grpc logs as an ERROR
with a traceback and answers UNKNOWN), though health.proto declares it and reflection
lists it. `HealthServicer` answers List from the same map.
"""

from __future__ import annotations

from typing import Any

from grpc_health.v1 import health, health_pb2

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class HealthServicer(health.aio.HealthServicer):
    """The reference asyncio servicer plus List (a snapshot of every status it holds)."""

    async def List(
        self, request: health_pb2.HealthListRequest, context: Any
    ) -> health_pb2.HealthListResponse:
        return health_pb2.HealthListResponse(
            statuses={
                name: health_pb2.HealthCheckResponse(status=status)
                for name, status in dict(self._server_status).items()
            }
        )
