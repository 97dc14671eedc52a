"""Permissions that name a resource of the request: the contract's `resource_field`.

A method whose policy has `permission: "worker:queue:"` and `resource_field: "queues"`
needs worker:queue:<q> for every q the request names. The header-only checks
(`AuthInterceptor.authorize`) cannot see the request, so `ResourceGuard.refusal` decodes it
and asks the same RBAC as every other check before a byte goes upstream, on both data
planes: the full path wraps the method's handler with it, and the relay holds the request
until it is read and asks it too (gateway/front.py), sending the call straight to its back
end only when it finds nothing to refuse.
"""

from __future__ import annotations

from typing import Any

import grpc
from google.protobuf import message_factory
from google.protobuf.message import DecodeError, Message

from aiwfe.runtime.errors import AiwfeError, InvalidArgument, PermissionDenied
from aiwfe.runtime.identity import Principal, current_principal
from aiwfe.runtime.interceptors import Behavior, HandlerCache
from aiwfe.runtime.rbac import Rbac
from gateway.policies import MethodInfo


def resource_permissions(info: MethodInfo, request: Message) -> list[str]:
    """The permissions a decoded request of `info` needs (one per named resource)."""
    value: Any = getattr(request, info.resource_field)
    values = [value] if isinstance(value, str) else list(value)
    return [info.permission + v if v else "" for v in values]


class ResourceGuard:
    """The check of methods with a `resource_field` policy: their handlers wrapped on the
    full path, and `refusal` asked by the relay (one policy, one place)."""

    def __init__(self, methods: dict[str, MethodInfo], rbac: Rbac) -> None:
        self._methods = methods
        self._rbac = rbac
        self._cache = HandlerCache(self._guard_for)
        self._classes: dict[str, tuple[Any, str]] = {}  # path -> request class, its name
        for path, info in methods.items():
            if info.resource_field:
                if info.client_streaming or info.input_type is None:
                    raise ValueError(f"{path}: resource_field needs a unary request")
                request_class = message_factory.GetMessageClass(info.input_type)
                self._classes[path] = (request_class, info.input_type.name)

    def wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        return self._cache.get(method, handler)

    def refusal(self, info: MethodInfo, principal: Principal, request: bytes) -> AiwfeError | None:
        """Why `principal` may not make this call of `info` (a `resource_field` method):
        an undecodable request or one naming no resource is INVALID_ARGUMENT, a resource
        the roles do not grant PERMISSION_DENIED; None when every named one is granted."""
        request_class, name = self._classes[info.path]
        try:
            decoded = request_class.FromString(request)
        except DecodeError:
            return InvalidArgument([("request", f"is not a valid {name}")])
        needed = resource_permissions(info, decoded)
        if not needed or "" in needed:  # nothing named: nothing can be allowed
            return InvalidArgument([(info.resource_field, "must name the resource")])
        for permission in needed:
            if not self._rbac.allows(principal.roles, permission):
                return PermissionDenied(
                    f"permission {permission!r} required",
                    reason="PERMISSION_MISSING",
                    metadata={"permission": permission, "method": info.path},
                )
        return None

    def _guard_for(self, method: str) -> Any:
        info = self._methods[method]

        def guard(behavior: Behavior, streaming: bool) -> Behavior:
            def check(request: bytes) -> None:
                principal = current_principal.get()
                if not isinstance(principal, Principal):
                    raise RuntimeError("a resource check ran without a principal")
                refused = self.refusal(info, principal, request)
                if refused is not None:
                    raise refused

            if streaming:

                async def checked_stream(request: bytes, context: grpc.aio.ServicerContext) -> Any:
                    check(request)
                    async for message in behavior(request, context):
                        yield message

                return checked_stream

            async def checked(request: bytes, context: grpc.aio.ServicerContext) -> Any:
                check(request)
                return await behavior(request, context)

            return checked

        return guard
