"""Server interceptors shared by all services, and the helper that wraps method handlers.

Order, outermost first: (telemetry) → error mapping → load shedding → service-specific
(rate limit, authentication, authorization, caching at the gateway; internal identity at
back ends). Health and reflection are exempt from all of them.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf import descriptor_pool

from aiwfe.options.v1 import options_pb2
from aiwfe.runtime.errors import (
    AiwfeError,
    InvalidArgument,
    Status,
    internal_status,
    status_from_rpc_error,
)
from aiwfe.runtime.identity import (
    IDENTITY_METADATA_KEY,
    InternalIdentity,
    current_principal,
    request_deadline,
)
from aiwfe.runtime.resilience.limiter import ConcurrencyLimiter

log = logging.getLogger("aiwfe.errors")

EXEMPT_PREFIXES = ("/grpc.health.v1.", "/grpc.reflection.")

Behavior = Callable[[Any, grpc.aio.ServicerContext], Any]
Guard = Callable[[Behavior, bool], Behavior]


def is_exempt(method: str) -> bool:
    return method.startswith(EXEMPT_PREFIXES)


@functools.lru_cache(maxsize=1024)  # bounded: callers choose method names
def is_long_poll(method: str) -> bool:
    """Whether the contract marks `method` ("/pkg.Service/Method") `long_poll`."""
    try:
        found = descriptor_pool.Default().FindMethodByName(method[1:].replace("/", "."))
    except KeyError:
        return False
    return bool(found.GetOptions().Extensions[options_pb2.policy].long_poll)


def metadata_value(metadata: Any, key: str) -> str | None:
    for k, v in metadata or ():
        if k == key:
            return v
    return None


def wrap_handler(handler: grpc.RpcMethodHandler, guard: Guard) -> grpc.RpcMethodHandler:
    """Rebuilds `handler` of the same kind with `guard(behavior, response_streaming)` applied."""
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(
            guard(handler.unary_unary, False),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(
            guard(handler.unary_stream, True),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(
            guard(handler.stream_unary, False),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
    return grpc.stream_stream_rpc_method_handler(
        guard(handler.stream_stream, True),
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


def rejecting_handler(handler: grpc.RpcMethodHandler, error: AiwfeError) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` that fails with `error` (a proper status even
    for streams)."""

    def guard(_: Behavior, streaming: bool) -> Behavior:
        if streaming:

            async def reject_stream(
                request: Any, context: grpc.aio.ServicerContext
            ) -> AsyncIterator:
                raise error
                yield  # pragma: no cover - makes this an async generator

            return reject_stream

        async def reject(request: Any, context: grpc.aio.ServicerContext) -> Any:
            raise error

        return reject

    return wrap_handler(handler, guard)


async def abort_with(context: grpc.aio.ServicerContext, exc: BaseException) -> None:
    """Ends the RPC with the status `exc` maps to (the one error table in action)."""
    status = status_of(exc)
    await context.abort(status.code, status.details, tuple(status.trailing_metadata))


def status_of(exc: BaseException) -> grpc.Status:
    """The status `exc` maps to (the one error table), for a call or one part of a stream."""
    if isinstance(exc, AiwfeError):
        status = exc.to_status()
    elif isinstance(exc, NotImplementedError):
        status = Status(grpc.StatusCode.UNIMPLEMENTED, "method not implemented yet", ())
    elif isinstance(exc, grpc.aio.AioRpcError):
        # A downstream failure keeps its code and details (UNAVAILABLE stays UNAVAILABLE).
        status = status_from_rpc_error(exc)
    else:
        reference = uuid.uuid4().hex[:12]
        log.error("unhandled exception (reference %s)", reference, exc_info=exc)
        status = internal_status(reference)
    return status


def _enter(context: grpc.aio.ServicerContext) -> None:
    remaining = context.time_remaining()
    request_deadline.set(None if remaining is None else time.monotonic() + remaining)


def _error_guard(behavior: Behavior, streaming: bool) -> Behavior:
    if streaming:

        async def guarded_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator:
            _enter(context)
            try:
                result = behavior(_decoded(request), context)
                if inspect.isawaitable(result):  # a handler that writes with context.write()
                    await result
                    return
                async for item in result:
                    yield item
            except (grpc.aio.AbortError, asyncio.CancelledError):
                raise
            except Exception as exc:
                await abort_with(context, exc)

        return guarded_stream

    async def guarded(request: Any, context: grpc.aio.ServicerContext) -> Any:
        _enter(context)
        try:
            result = behavior(_decoded(request), context)
            return await result if inspect.isawaitable(result) else result
        except (grpc.aio.AbortError, asyncio.CancelledError):
            raise
        except Exception as exc:
            await abort_with(context, exc)

    return guarded


class HandlerCache:
    """Wrapped handlers per method: servers hand out the same handler object for a method
    on every call, so wrapping once per method keeps per-call work to a dict lookup."""

    __slots__ = ("_guard_for", "_lenient", "_wrapped")

    def __init__(self, guard_for: Callable[[str], Guard], lenient: bool = False) -> None:
        self._guard_for = guard_for
        self._lenient = lenient
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    def get(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        entry = self._wrapped.get(method)
        if entry is not None and entry[0] is handler:
            return entry[1]
        wrapped = wrap_handler(handler, self._guard_for(method))
        if self._lenient and handler.request_deserializer is not None:
            wrapped = wrapped._replace(
                request_deserializer=_lenient(handler.request_deserializer, method)
            )
        self._wrapped[method] = (handler, wrapped)
        return wrapped


class _Undecodable:
    """Stands for request bytes that do not parse, so the caller gets INVALID_ARGUMENT
    (grpc itself would answer INTERNAL for a deserialization failure)."""

    __slots__ = ("method",)

    def __init__(self, method: str) -> None:
        self.method = method


def _lenient(deserializer: Callable[[bytes], Any], method: str) -> Callable[[bytes], Any]:
    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception:
            return _Undecodable(method)

    return deserialize


def _reject_undecodable(request: Any) -> None:
    if type(request) is _Undecodable:
        raise InvalidArgument([("request", f"is not a valid request message for {request.method}")])


def _decoded(request: Any) -> Any:
    """The request, or a request stream whose messages are checked as they are read: an
    undecodable one ends the call with INVALID_ARGUMENT where the handler reads it."""
    if hasattr(request, "__aiter__"):
        return _decoded_stream(request)
    _reject_undecodable(request)
    return request


async def _decoded_stream(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    async for request in requests:
        _reject_undecodable(request)
        yield request


class MethodInterceptor(grpc.aio.ServerInterceptor):
    """Base of every interceptor here: unknown methods (UNIMPLEMENTED), health and
    reflection pass untouched; subclasses see only the suite's own RPCs."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or is_exempt(method):
            return handler
        return await self.intercept(method, handler, handler_call_details)

    async def intercept(
        self, method: str, handler: grpc.RpcMethodHandler, details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler:
        """The handler to run for `method` (a wrapped one, or a rejecting one)."""
        raise NotImplementedError


class ErrorMappingInterceptor(MethodInterceptor):
    """Maps domain exceptions to statuses; unknown ones become INTERNAL with a reference."""

    def __init__(self) -> None:
        self._cache = HandlerCache(lambda _: _error_guard, lenient=True)

    async def intercept(
        self, method: str, handler: grpc.RpcMethodHandler, details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler:
        return self._cache.get(method, handler)


class InternalIdentityInterceptor(MethodInterceptor):
    """Back ends: every call must carry a valid gateway- or service-signed assertion."""

    def __init__(self, identity: InternalIdentity) -> None:
        self._identity = identity

    async def intercept(
        self, method: str, handler: grpc.RpcMethodHandler, details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler:
        token = metadata_value(details.invocation_metadata, IDENTITY_METADATA_KEY)
        try:
            principal = self._identity.verify(token)
        except AiwfeError as exc:
            return rejecting_handler(handler, exc)
        return with_principal(handler, principal)


def with_principal(handler: grpc.RpcMethodHandler, principal: Any) -> grpc.RpcMethodHandler:
    """Makes `principal` the current principal of the RPC being intercepted.

    grpc.aio runs interceptors in the RPC's own task, before the handler, so a ContextVar
    set here is what the handler sees; no per-call wrapper is needed.
    """
    current_principal.set(principal)
    return handler


class LoadSheddingInterceptor(MethodInterceptor):
    """Refuses unary calls over the concurrency limit at once: RESOURCE_EXHAUSTED with
    RetryInfo and reason OVERLOADED, instead of a place in the event loop's queue.

    Streams are not counted (a watch would hold a slot for its whole life; the streams'
    own caps bound them). The slot is taken inside the handler, once the request has
    arrived (a call cancelled before never holds one), and given back when the call is
    done (grpc runs done-callbacks for every end: answered, failed or cancelled).
    """

    def __init__(self, limiter: ConcurrencyLimiter, service: str = "server") -> None:
        self.limiter = limiter
        self._service = service  # named in the refusal's message
        self._cache = HandlerCache(lambda _: self._guard)

    async def intercept(
        self, method: str, handler: grpc.RpcMethodHandler, details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler:
        if handler.request_streaming or handler.response_streaming or is_long_poll(method):
            return handler
        return self._cache.get(method, handler)

    def _guard(self, behavior: Behavior, streaming: bool) -> Behavior:
        limiter, service = self.limiter, self._service

        async def limited(request: Any, context: grpc.aio.ServicerContext) -> Any:
            started = limiter.try_acquire(context.time_remaining())
            if started is None:
                raise limiter.refusal(service)
            # The slot is held until the call is over, its response sent: a handler that
            # answers in one step (an Embed from the in-process cache) leaves most of its
            # work to serialising and sending, which a slot given back on return would miss.
            context.add_done_callback(lambda _: limiter.release(started))
            result = behavior(request, context)
            return await result if inspect.isawaitable(result) else result

        return limited
