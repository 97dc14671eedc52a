"""The byte-level proxy: every RPC the gateway does not serve itself goes to the back end
that owns its package, without deserializing the messages.

Handlers are chosen per method from the descriptors (unary fast path, streaming where the
contract streams), and carry the deadline, cancellation, the caller's internal identity
and the upstream's status with its details.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc

from aiwfe.channels import Downstream
from aiwfe.config import GrpcSettings
from aiwfe.identity import INTERNAL_METADATA_PREFIX
from gateway.policies import MethodInfo

# Client metadata never forwarded: credentials, our own internal keys, transport headers,
# and the client's trace context (replaced by the gateway span's, so back-end spans are its
# children).
_DROPPED = frozenset(
    {
        "authorization",
        "user-agent",
        "te",
        "content-type",
        "grpc-accept-encoding",
        "traceparent",
        "tracestate",
    }
)


def forwarded_metadata(
    context: grpc.aio.ServicerContext, downstream: Downstream
) -> tuple[tuple[str, Any], ...]:
    extra = tuple(
        (k, v)
        for k, v in context.invocation_metadata() or ()
        if k not in _DROPPED and not k.startswith((INTERNAL_METADATA_PREFIX, ":", "grpc-"))
    )
    return downstream.metadata() + extra


class ProxyHandler(grpc.GenericRpcHandler):
    """Maps each proxied method path to a prebuilt method handler."""

    def __init__(
        self,
        methods: dict[str, MethodInfo],
        routes: dict[str, Downstream],
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


def _method_handler(
    info: MethodInfo, downstream: Downstream, settings: GrpcSettings
) -> grpc.RpcMethodHandler:
    channel = downstream.channel
    breaker = downstream.breaker
    default_timeout = (
        settings.stream_deadline_seconds
        if info.server_streaming or info.client_streaming
        else settings.default_deadline_seconds
    )

    def timeout(context: grpc.aio.ServicerContext) -> float:
        remaining = context.time_remaining()
        return default_timeout if remaining is None else remaining

    if not info.client_streaming and not info.server_streaming:
        call = channel.unary_unary(info.path)

        async def unary_unary(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            breaker.before_call()
            try:
                response = await call(
                    request,
                    timeout=timeout(context),
                    metadata=forwarded_metadata(context, downstream),
                )
            except grpc.aio.AioRpcError as exc:
                breaker.record_error(exc)
                raise
            breaker.record_success()
            return response

        return grpc.unary_unary_rpc_method_handler(unary_unary)

    if not info.client_streaming:
        stream_call = channel.unary_stream(info.path)

        async def unary_stream(
            request: bytes, context: grpc.aio.ServicerContext
        ) -> AsyncIterator[bytes]:
            breaker.before_call()
            upstream = stream_call(
                request, timeout=timeout(context), metadata=forwarded_metadata(context, downstream)
            )
            try:
                async for message in upstream:
                    yield message
            except grpc.aio.AioRpcError as exc:
                breaker.record_error(exc)
                raise
            finally:
                upstream.cancel()  # a client that leaves frees the work behind it
            breaker.record_success()

        return grpc.unary_stream_rpc_method_handler(unary_stream)

    if not info.server_streaming:
        client_stream_call = channel.stream_unary(info.path)

        async def stream_unary(
            requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
        ) -> bytes:
            breaker.before_call()
            try:
                response = await client_stream_call(
                    requests,
                    timeout=timeout(context),
                    metadata=forwarded_metadata(context, downstream),
                )
            except grpc.aio.AioRpcError as exc:
                breaker.record_error(exc)
                raise
            breaker.record_success()
            return response

        return grpc.stream_unary_rpc_method_handler(stream_unary)

    bidi_call = channel.stream_stream(info.path)

    async def stream_stream(
        requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        breaker.before_call()
        upstream = bidi_call(
            requests, timeout=timeout(context), metadata=forwarded_metadata(context, downstream)
        )
        try:
            async for message in upstream:
                yield message
        except grpc.aio.AioRpcError as exc:
            breaker.record_error(exc)
            raise
        finally:
            upstream.cancel()
        breaker.record_success()

    return grpc.stream_stream_rpc_method_handler(stream_stream)
