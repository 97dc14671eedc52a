"""The gateway's policy interceptor: bearer token → principal → API rate limit → RBAC check
of the permission the contract declares → per-user response cache for cacheable RPCs.

Order note: CONVENTIONS put the rate limit before authentication, but the API limit is per
user, so it runs right after the token is authenticated, inside this one interceptor (and
before authorization, so denied calls count too). Unauthenticated calls never reach a back
end. Rejections are proper statuses for every RPC kind (streams included).
"""

from __future__ import annotations

import grpc

from aiwfe.errors import AiwfeError, PermissionDenied, Unauthenticated
from aiwfe.identity import Principal
from aiwfe.interceptors import MethodInterceptor, rejecting_handler, with_principal
from gateway.policies import MethodInfo
from gateway.ratelimit import ApiLimiter
from gateway.rbac import Rbac
from gateway.response_cache import ResponseCache, cache_directive
from gateway.tokens import TokenService

# The principal of the benchmark's "auth off" mode: a service acting for nobody.
ANONYMOUS = Principal(user_id="", username="", service="gateway")


def bearer_token(metadata: tuple[tuple[str, str], ...] | None) -> str | None:
    for key, value in metadata or ():
        if key == "authorization":
            scheme, _, token = value.partition(" ")
            if scheme.lower() != "bearer" or not token:
                raise Unauthenticated(
                    "authorization metadata must be 'Bearer <token>'",
                    reason="AUTHORIZATION_MALFORMED",
                )
            return token.strip()
    return None


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

    async def admit(self, info: MethodInfo | None, metadata: tuple | None) -> Principal | None:
        """The caller's principal (None for public RPCs), or a domain error."""
        if info is None or not info.declared:
            raise PermissionDenied(
                "this method is not exposed through the gateway", reason="METHOD_NOT_EXPOSED"
            )
        if info.public:
            return None
        if not self._enabled:
            return ANONYMOUS
        token = bearer_token(metadata)
        principal = (self._tokens.cached(token) if token else None) or (
            await self._tokens.authenticate(token)
        )
        limiter = self._limiter
        if limiter is not None and not limiter.try_local(principal.user_id):
            await limiter.acquire(principal.user_id, principal.roles)
        if not info.authenticated and not self._rbac.allows(principal.roles, info.permission):
            raise PermissionDenied(
                f"permission {info.permission!r} required",
                reason="PERMISSION_MISSING",
                metadata={"permission": info.permission, "method": info.path},
            )
        return principal

    def admit_at_once(
        self, info: MethodInfo, authorization: str | None, cache_control: str | None
    ) -> Principal | None:
        """The principal of a call that can be admitted without waiting: a token already
        in the in-process cache, a role that allows the method, locally reserved quota, and
        no response cache to consult. None means "not at once": the call takes the full
        path (`admit` and the response cache), which also makes every denial."""
        principal = self.known_caller(info, authorization)
        if principal is None or self.consults_cache(info, principal, cache_control):
            return None
        return principal if self.spend_at_once(principal) else None

    def known_caller(self, info: MethodInfo, authorization: str | None) -> Principal | None:
        """The caller, if its token is cached and its roles allow the method (no quota
        spent); None otherwise."""
        if not info.declared or info.public:
            return None
        if not self._enabled:
            return ANONYMOUS
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            return None
        try:
            principal = self._tokens.cached(token.strip())
        except AiwfeError:  # revoked or expired: the full path says so properly
            return None
        if principal is None:
            return None
        if not info.authenticated and not self._rbac.allows(principal.roles, info.permission):
            return None
        return principal

    def consults_cache(
        self, info: MethodInfo, principal: Principal, cache_control: str | None
    ) -> bool:
        """Whether the response cache takes part in this call (its answer, or storing it)."""
        return (
            self._cache is not None
            and principal.is_user
            and ResponseCache.applies(info)
            and cache_directive(cache_control) != "no-store"
        )

    def spend_at_once(self, principal: Principal) -> bool:
        """Spends one request of the caller's locally reserved quota, if any is left (with
        authentication off nothing is counted, as on the full path)."""
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
        if self._cache is not None and principal.is_user and ResponseCache.applies(info):
            assert info is not None
            handler = self._cache.wrap(handler, info)
        return with_principal(handler, principal)
