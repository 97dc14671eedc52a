"""Authentication and authorization interceptor: bearer JWT → principal → RBAC check of
the permission the contract declares. Rejections are proper statuses for every RPC kind."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import grpc

from aiwfe.errors import AiwfeError, PermissionDenied, Unauthenticated
from aiwfe.identity import Principal
from aiwfe.interceptors import is_exempt, rejecting_handler, with_principal
from gateway.policies import MethodInfo
from gateway.rbac import Rbac
from gateway.tokens import TokenService

# The principal of the benchmark's "auth off" mode: a service acting for nobody.
ANONYMOUS = Principal(user_id="", username="", service="gateway")


def bearer_token(metadata: tuple[tuple[str, str], ...] | None) -> str | None:
    for key, value in metadata or ():
        if key == "authorization":
            scheme, _, token = value.partition(" ")
            if scheme.lower() != "bearer" or not token:
                raise Unauthenticated("authorization metadata must be 'Bearer <token>'")
            return token.strip()
    return None


class AuthInterceptor(grpc.aio.ServerInterceptor):
    def __init__(
        self,
        methods: dict[str, MethodInfo],
        tokens: TokenService,
        rbac: Rbac,
        enabled: bool = True,
    ) -> None:
        self._methods = methods
        self._tokens = tokens
        self._rbac = rbac
        self._enabled = enabled

    def authorize(self, info: MethodInfo | None, metadata: tuple | None) -> Principal | None:
        """The caller's principal (None for public RPCs), or a domain error."""
        if info is None or not info.declared:
            raise PermissionDenied("this method is not exposed through the gateway")
        if info.public:
            return None
        if not self._enabled:
            return ANONYMOUS
        principal = self._tokens.verify(bearer_token(metadata))
        if not info.authenticated and not self._rbac.allows(principal.roles, info.permission):
            raise PermissionDenied(f"permission {info.permission!r} required")
        return principal

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or is_exempt(method):
            return handler
        try:
            principal = self.authorize(
                self._methods.get(method), handler_call_details.invocation_metadata
            )
        except AiwfeError as exc:
            return rejecting_handler(handler, exc)
        return handler if principal is None else with_principal(handler, principal)
