"""The one factory for inter-service channels, and `Downstream`: a channel plus the
caller's identity, deadline and circuit breaker applied to every call.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from typing import Any, TypeVar

import grpc
from google.protobuf.descriptor import FileDescriptor

from aiwfe.config import Settings
from aiwfe.identity import (
    IDENTITY_METADATA_KEY,
    InternalIdentity,
    current_principal,
    request_deadline,
)
from aiwfe.options.v1 import options_pb2
from aiwfe.resilience.breaker import CircuitBreaker

T = TypeVar("T")
_DEADLINE_MARGIN = 0.005  # leave the caller a few ms to turn our failure into its answer


def channel_options(settings: Settings) -> list[tuple[str, Any]]:
    """The seed's keepalive options plus explicit message-size limits."""
    g = settings.grpc
    return [
        ("grpc.keepalive_time_ms", g.keepalive_time_ms),
        ("grpc.keepalive_timeout_ms", g.keepalive_timeout_ms),
        ("grpc.keepalive_permit_without_calls", int(g.keepalive_permit_without_calls)),
        ("grpc.http2.max_pings_without_data", g.http2_max_pings_without_data),
        ("grpc.http2.min_time_between_pings_ms", g.http2_min_time_between_pings_ms),
        (
            "grpc.http2.min_ping_interval_without_data_ms",
            g.http2_min_ping_interval_without_data_ms,
        ),
        ("grpc.max_send_message_length", g.max_message_bytes),
        ("grpc.max_receive_message_length", g.max_message_bytes),
    ]


def idempotent_methods(files: Iterable[FileDescriptor]) -> list[dict[str, str]]:
    """Service-config names of the RPCs whose contract declares them idempotent."""
    names = []
    for file in files:
        for service in file.services_by_name.values():
            for method in service.methods:
                policy = method.GetOptions().Extensions[options_pb2.policy]
                if policy.idempotent:
                    names.append({"service": service.full_name, "method": method.name})
    return names


def service_config(settings: Settings, files: Iterable[FileDescriptor]) -> str:
    """Retry UNAVAILABLE for idempotent RPCs only, with retry throttling."""
    names = idempotent_methods(files)
    config: dict[str, Any] = {
        "retryThrottling": {"maxTokens": 10, "tokenRatio": 0.1},
        "methodConfig": [],
    }
    if names:
        config["methodConfig"].append(
            {
                "name": names,
                "retryPolicy": {
                    "maxAttempts": settings.grpc.retry_max_attempts,
                    "initialBackoff": "0.05s",
                    "maxBackoff": "1s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        )
    return json.dumps(config)


def create_channel(
    target: str, settings: Settings, files: Iterable[FileDescriptor] = ()
) -> grpc.aio.Channel:
    """An insecure loopback/cluster channel with keepalive, limits and the retry policy."""
    options = [
        *channel_options(settings),
        ("grpc.service_config", service_config(settings, files)),
        ("grpc.enable_retries", 1),
    ]
    return grpc.aio.insecure_channel(target, options=options)


class Downstream:
    """A back end as a caller sees it: one channel, one breaker, identity and deadlines."""

    def __init__(
        self,
        name: str,
        target: str,
        settings: Settings,
        identity: InternalIdentity,
        caller: str,
        files: Iterable[FileDescriptor] = (),
    ) -> None:
        self.name = name
        self.target = target
        self.channel = create_channel(target, settings, files)
        self.breaker = CircuitBreaker(
            name, settings.circuit_breaker.failure_threshold, settings.circuit_breaker.timeout
        )
        self._identity = identity
        self._caller = caller
        self._default_deadline = settings.grpc.default_deadline_seconds

    def timeout(self) -> float:
        """What remains of the current RPC's deadline, capped by the default deadline."""
        deadline = request_deadline.get()
        if deadline is None:
            return self._default_deadline
        return max(
            0.001, min(self._default_deadline, deadline - time.monotonic() - _DEADLINE_MARGIN)
        )

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """This service's assertion, acting for the current user if there is one."""
        principal = current_principal.get()
        if principal is not None and not principal.is_user:
            principal = None
        return ((IDENTITY_METADATA_KEY, self._identity.assertion(principal, self._caller)),)

    async def call(self, rpc: Any, request: Any, timeout: float | None = None) -> Any:
        """Calls a unary stub method through the breaker with identity and deadline."""
        self.breaker.before_call()
        try:
            response = await rpc(
                request, timeout=timeout or self.timeout(), metadata=self.metadata()
            )
        except grpc.aio.AioRpcError as exc:
            self.breaker.record_failure(exc.code())
            raise
        self.breaker.record_success()
        return response

    async def close(self) -> None:
        await self.channel.close()
