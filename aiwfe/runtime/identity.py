"""Who is calling: the principal ContextVar and the gateway-signed internal assertion.

The gateway verifies the user's JWT, then attaches a short-lived HS256 assertion signed
with a separate internal key (audience "aiwfe-internal") under `x-aiwfe-identity`. Back
ends accept nothing else, so a client that reaches a back-end port directly gets
UNAUTHENTICATED. Service-to-service calls sign their own service identity plus the user
on whose behalf they act.
"""

from __future__ import annotations

import hashlib
import hmac
import time
import uuid
from contextvars import ContextVar
from dataclasses import dataclass, field

import jwt

from aiwfe.runtime.cache import TTLCache
from aiwfe.runtime.config import Settings
from aiwfe.runtime.errors import Unauthenticated

IDENTITY_METADATA_KEY = "x-aiwfe-identity"
INTERNAL_METADATA_PREFIX = "x-aiwfe-"
_ALGORITHM = "HS256"


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated caller: a user, a service acting for a user, or a bare service."""

    user_id: str
    username: str
    roles: tuple[str, ...] = ()
    service: str = ""  # set when a service makes the call
    token_id: str = ""  # the access token's jti (gateway only)
    token_exp: float = 0.0
    claims: dict = field(default_factory=dict, compare=False, hash=False, repr=False)

    @property
    def is_user(self) -> bool:
        return bool(self.user_id)


current_principal: ContextVar[Principal | None] = ContextVar("aiwfe_principal", default=None)
# Absolute monotonic deadline of the RPC being served, so downstream calls get what remains.
request_deadline: ContextVar[float | None] = ContextVar("aiwfe_deadline", default=None)


def require_principal() -> Principal:
    """The principal of the current RPC; handlers behind an identity interceptor always have one."""
    principal = current_principal.get()
    if principal is None:
        raise Unauthenticated("no caller identity", reason="IDENTITY_MISSING")
    return principal


class InternalIdentity:
    """Signs and verifies internal assertions, caching both sides (signing is per principal)."""

    def __init__(
        self, secret: str, audience: str = "aiwfe-internal", ttl_seconds: int = 60
    ) -> None:
        self._secret = secret
        self._audience = audience
        self._ttl = ttl_seconds
        self._signed: TTLCache[tuple, str] = TTLCache(max_entries=10_000)
        self._verified: TTLCache[str, Principal] = TTLCache(max_entries=10_000)

    @classmethod
    def from_settings(cls, settings: Settings) -> InternalIdentity:
        internal = settings.authentication.internal
        return cls(
            settings.require("authentication.internal.secret_key"),
            internal.audience,
            internal.ttl_seconds,
        )

    def derived_key(self, purpose: str) -> bytes:
        """A key for `purpose` (e.g. signing page tokens) derived from the internal secret,
        so no other use of the secret can be made to produce it."""
        return hmac.new(self._secret.encode(), purpose.encode(), hashlib.sha256).digest()

    def assertion(self, principal: Principal | None, service: str) -> str:
        """An assertion for `service` acting for `principal` (None: the service itself)."""
        key = (
            (service, principal.user_id, principal.username, principal.roles)
            if principal
            else (service,)
        )
        token = self._signed.get(key)
        if token is not None:
            return token
        now = int(time.time())
        claims = {
            "aud": self._audience,
            "iat": now,
            "exp": now + self._ttl,
            "jti": uuid.uuid4().hex,
            "svc": service,
            "sub": principal.user_id if principal else "",
            "usr": principal.username if principal else "",
            "roles": list(principal.roles) if principal else [],
        }
        token = jwt.encode(claims, self._secret, algorithm=_ALGORITHM)
        # Re-sign at half-life so a cached assertion always has time left downstream.
        self._signed.set(key, token, self._ttl / 2)
        return token

    def verify(self, token: str | None) -> Principal:
        """The principal an assertion carries.

        Raises:
            Unauthenticated: when the assertion is missing, forged, expired or for another audience.
        """
        if not token:
            raise Unauthenticated(
                "missing internal identity: call this service through the gateway",
                reason="IDENTITY_MISSING",
            )
        cached = self._verified.get(token)
        if cached is not None:
            return cached
        try:
            claims = jwt.decode(
                token,
                self._secret,
                algorithms=[_ALGORITHM],
                audience=self._audience,
                options={"require": ["exp", "iat", "aud", "svc"]},
                leeway=5,
            )
        except jwt.PyJWTError:
            raise Unauthenticated("invalid internal identity", reason="IDENTITY_INVALID") from None
        principal = Principal(
            user_id=str(claims.get("sub", "")),
            username=str(claims.get("usr", "")),
            roles=tuple(claims.get("roles") or ()),
            service=str(claims["svc"]),
        )
        self._verified.set(token, principal, max(0.0, claims["exp"] - time.time()))
        return principal
