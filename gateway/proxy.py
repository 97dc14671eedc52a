"""The byte-level proxy: every RPC the gateway does not serve itself goes to the back end
that owns its package, without deserializing the messages.

Handlers are chosen per method from the descriptors (unary fast path, streaming where the
contract streams), and carry the deadline, cancellation, the caller's internal identity
and the upstream's status with its details. What is forwarded, the deadline and how the
outcome reaches the breaker come from gateway/forwarding.py, as on the relay's fast path.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import Any

import grpc

from aiwfe.runtime.channels import Upstream
from aiwfe.runtime.config import GrpcSettings
from aiwfe.runtime.resilience.breaker import has_details
from gateway.forwarding import Deadline, deadline_cap, forwarded_metadata
from gateway.policies import MethodInfo


class ProxyHandler(grpc.GenericRpcHandler):
    """Maps each proxied method path to a prebuilt method handler."""

    def __init__(
        self,
        methods: dict[str, MethodInfo],
        routes: dict[str, Upstream],
        settings: GrpcSettings,
    ) -> None:
        self._handlers: dict[str, grpc.RpcMethodHandler] = {}
        for path, info in methods.items():
            downstream = routes.get(info.package)
            if downstream is not None:
                self._handlers[path] = _method_handler(info, downstream, settings)

    def service(
        self, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        return self._handlers.get(handler_call_details.method)


class _Upstream:
    """One proxied call's way to the back end: its metadata and deadline, decided before
    the breaker is asked."""

    __slots__ = ("deadline", "metadata", "timeout")

    def __init__(self, context: grpc.aio.ServicerContext, downstream: Upstream, cap: float) -> None:
        client = forwarded_metadata(context.invocation_metadata() or ())
        self.metadata: tuple[tuple[str, Any], ...] = (*downstream.metadata(), *client)
        self.deadline = Deadline(downstream.breaker, context.time_remaining(), cap)
        self.timeout = self.deadline.seconds


@contextmanager
def _recorded(downstream: Upstream, call: _Upstream) -> Iterator[None]:
    """Asks the breaker, then tells it how the call ended (once)."""
    downstream.breaker.before_call()
    try:
        yield
    except grpc.aio.AioRpcError as exc:
        call.deadline.record(exc.code(), has_details(exc.trailing_metadata()), exc.details() or "")
        raise
    except BaseException:  # the client left (cancelled, or stopped reading a stream)
        call.deadline.record(grpc.StatusCode.CANCELLED, False)
        raise
    call.deadline.record(grpc.StatusCode.OK, False)


def _method_handler(
    info: MethodInfo, downstream: Upstream, settings: GrpcSettings
) -> grpc.RpcMethodHandler:
    channel = downstream.channel
    cap = deadline_cap(info, settings)

    if not info.client_streaming and not info.server_streaming:
        call = channel.unary_unary(info.path)

        async def unary_unary(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            up = _Upstream(context, downstream, cap)
            with _recorded(downstream, up):
                response: bytes = await call(request, timeout=up.timeout, metadata=up.metadata)
            return response

        return grpc.unary_unary_rpc_method_handler(unary_unary)

    if not info.client_streaming:
        stream_call = channel.unary_stream(info.path)

        async def unary_stream(
            request: bytes, context: grpc.aio.ServicerContext
        ) -> AsyncIterator[bytes]:
            up = _Upstream(context, downstream, cap)
            with _recorded(downstream, up):
                upstream = stream_call(request, timeout=up.timeout, metadata=up.metadata)
                try:
                    async for message in upstream:
                        yield message
                finally:
                    upstream.cancel()  # a client that leaves frees the work behind it

        return grpc.unary_stream_rpc_method_handler(unary_stream)

    if not info.server_streaming:
        client_stream_call = channel.stream_unary(info.path)

        async def stream_unary(
            requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
        ) -> bytes:
            up = _Upstream(context, downstream, cap)
            with _recorded(downstream, up):
                response: bytes = await client_stream_call(
                    requests, timeout=up.timeout, metadata=up.metadata
                )
            return response

        return grpc.stream_unary_rpc_method_handler(stream_unary)

    bidi_call = channel.stream_stream(info.path)

    async def stream_stream(
        requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        up = _Upstream(context, downstream, cap)
        with _recorded(downstream, up):
            upstream = bidi_call(requests, timeout=up.timeout, metadata=up.metadata)
            try:
                async for message in upstream:
                    yield message
            finally:
                upstream.cancel()

    return grpc.stream_stream_rpc_method_handler(stream_stream)
