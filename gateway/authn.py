"""The gateway's policy interceptor: bearer token → principal → API rate limit → RBAC check
of the permission the contract declares → per-user response cache for cacheable RPCs.

Order note: CONVENTIONS put the rate limit before authentication, but the API limit is per
user, so it runs right after the token is authenticated, inside this one interceptor (and
before authorization, so denied calls count too). Unauthenticated calls never reach a back
end. Rejections are proper statuses for every RPC kind (streams included).
"""

from __future__ import annotations

import grpc

from aiwfe.runtime.errors import AiwfeError, PermissionDenied, Unauthenticated
from aiwfe.runtime.identity import Principal
from aiwfe.runtime.interceptors import (
    MethodInterceptor,
    metadata_value,
    rejecting_handler,
    with_principal,
)
from aiwfe.runtime.rbac import Rbac
from gateway.policies import MethodInfo
from gateway.ratelimit import ApiLimiter
from gateway.resources import ResourceGuard
from gateway.response_cache import ResponseCache, cache_directive
from gateway.tokens import TokenService

# The principal of the benchmark's "auth off" mode: a service acting for nobody.
ANONYMOUS = Principal(user_id="", username="", service="gateway")


class _Wait:
    """Admission cannot finish without waiting (the token is not in the cache yet)."""


WAIT = _Wait()
Admitted = Principal | None | _Wait


def bearer_token(authorization: str | None) -> str | None:
    """The token of an `authorization` header, None without one; Unauthenticated if the
    header is not 'Bearer <token>'."""
    if authorization is None:
        return None
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthenticated(
            "authorization metadata must be 'Bearer <token>'", reason="AUTHORIZATION_MALFORMED"
        )
    return token.strip()


class AuthInterceptor(MethodInterceptor):
    def __init__(
        self,
        methods: dict[str, MethodInfo],
        tokens: TokenService,
        rbac: Rbac,
        enabled: bool = True,
        limiter: ApiLimiter | None = None,
        cache: ResponseCache | None = None,
    ) -> None:
        self._methods = methods
        self._tokens = tokens
        self._rbac = rbac
        self._enabled = enabled
        self._limiter = limiter
        self._cache = cache
        self._resources = ResourceGuard(methods, rbac)

    def authenticate_now(
        self, info: MethodInfo | None, authorization: str | None, token: str | None = None
    ) -> Admitted:
        """The steps of admission that need no waiting, for both data planes: the method
        is exposed (PermissionDenied), a public one needs nobody (None), authentication
        off acts for ANONYMOUS, and otherwise the caller of a token already in the
        in-process cache (a revoked one raises). WAIT: the token must be verified first.
        `token`: `bearer_token(authorization)`, if the caller has read it already (the
        relay does, once per header block: the same str is then hashed once)."""
        if info is None or not info.declared:
            raise PermissionDenied(
                "this method is not exposed through the gateway", reason="METHOD_NOT_EXPOSED"
            )
        if info.public:
            return None
        if not self._enabled:
            return ANONYMOUS
        if token is None:
            token = bearer_token(authorization)
        principal = self._tokens.cached(token) if token else None
        return WAIT if principal is None else principal

    def authorize(self, info: MethodInfo, principal: Principal) -> None:
        """PermissionDenied unless `principal`'s roles grant the method's permission. A
        permission completed by the request (`resource_field`) is `resource_refusal`'s, on
        the decoded request."""
        if info.resource_field:
            return
        if not info.authenticated and not self._rbac.allows(principal.roles, info.permission):
            raise PermissionDenied(
                f"permission {info.permission!r} required",
                reason="PERMISSION_MISSING",
                metadata={"permission": info.permission, "method": info.path},
            )

    def resource_refusal(
        self, info: MethodInfo, principal: Principal, request: bytes
    ) -> AiwfeError | None:
        """Why `principal` may not make this call of a `resource_field` method, read from
        its request (gateway/resources.py), for both data planes; None: allowed (with
        authentication off nothing is checked, as for every permission)."""
        if principal is ANONYMOUS:
            return None
        return self._resources.refusal(info, principal, request)

    async def admit(self, info: MethodInfo | None, metadata: tuple | None) -> Principal | None:
        """The caller's principal (None for public RPCs), or a domain error."""
        authorization = metadata_value(metadata, "authorization")
        principal = self.authenticate_now(info, authorization)
        if principal is WAIT:
            principal = await self._tokens.authenticate(bearer_token(authorization))
        if principal is None:
            return None
        if info is None or not isinstance(principal, Principal):
            raise RuntimeError("admission reached authorization without a method or principal")
        # A denied call spends quota too (a caller probing permissions is limited like any
        # other); the relay sends every denial here, so both paths count it.
        if not self.spend_now(principal):
            if self._limiter is None:
                raise RuntimeError("no quota left in process and no limiter to wait on")
            await self._limiter.acquire(principal.user_id, principal.roles)
        self.authorize(info, principal)
        return principal

    def consults_cache(
        self, info: MethodInfo, principal: Principal, cache_control: str | None
    ) -> bool:
        """Whether the response cache takes part in this call (its answer, or storing it)."""
        return (
            self._cache is not None
            and ResponseCache.applies(info)
            and cache_directive(cache_control) != "no-store"
            and principal.is_user
        )

    def spend_now(self, principal: Principal) -> bool:
        """Spends one request of the caller's locally reserved quota, if any is left (with
        authentication off nothing is counted)."""
        return (
            principal is ANONYMOUS
            or self._limiter is None
            or self._limiter.try_local(principal.user_id)
        )

    async def intercept(
        self, method: str, handler: grpc.RpcMethodHandler, details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler:
        info = self._methods.get(method)
        try:
            principal = await self.admit(info, details.invocation_metadata)
        except AiwfeError as exc:
            return rejecting_handler(handler, exc)
        if principal is None:
            return handler
        if info is not None and info.resource_field and principal is not ANONYMOUS:
            handler = self._resources.wrap(method, handler)
        cacheable = principal.is_user and info is not None and ResponseCache.applies(info)
        if self._cache is not None and info is not None and cacheable:
            handler = self._cache.wrap(handler, info)
        return with_principal(handler, principal)
