"""Access tokens: HS256 JWTs (seed) with kid, pinned algorithm, required claims, iss/aud
checks and a small leeway. Validated tokens are cached in process, bounded, for at most
min(cache_ttl, time to expiry)."""

from __future__ import annotations

import time
import uuid

import jwt

from aiwfe.cache import TTLCache
from aiwfe.config import AuthenticationSettings
from aiwfe.errors import Unauthenticated
from aiwfe.identity import Principal

MAX_TOKEN_CHARS = 8192


class TokenService:
    """Issues and verifies access tokens."""

    def __init__(self, settings: AuthenticationSettings) -> None:
        jwt_cfg = settings.jwt
        if not jwt_cfg.secret_key:
            from aiwfe.config import ConfigError

            raise ConfigError(
                "configuration key 'authentication.jwt.secret_key' is required "
                "(YAML or AIWFE_AUTHENTICATION__JWT__SECRET_KEY / ${JWT_SECRET_KEY})"
            )
        self._key = jwt_cfg.secret_key
        self._alg = jwt_cfg.algorithm
        self._kid = jwt_cfg.key_id
        self._issuer = jwt_cfg.issuer
        self._audience = jwt_cfg.audience
        self._leeway = jwt_cfg.leeway_seconds
        self.access_ttl = int(jwt_cfg.expire_hours * 3600)
        self._cache_enabled = settings.validation.cache_enabled
        self._cache_ttl = settings.validation.cache_ttl
        self._cache: TTLCache[str, Principal] = TTLCache(settings.validation.cache_max_entries)

    def issue(self, user_id: str, username: str, roles: list[str]) -> str:
        now = int(time.time())
        claims = {
            "sub": user_id,
            "name": username,
            "roles": roles,
            "iat": now,
            "exp": now + self.access_ttl,
            "jti": uuid.uuid4().hex,
            "iss": self._issuer,
            "aud": self._audience,
        }
        return jwt.encode(claims, self._key, algorithm=self._alg, headers={"kid": self._kid})

    def verify(self, token: str | None) -> Principal:
        """The principal of a valid access token.

        Raises:
            Unauthenticated: missing, malformed, forged, expired or foreign tokens.
        """
        if not token:
            raise Unauthenticated("missing bearer token (metadata 'authorization: Bearer <token>')")
        cached = self._cache.get(token)
        if cached is not None:
            return cached
        if len(token) > MAX_TOKEN_CHARS:
            raise Unauthenticated("invalid token")
        try:
            claims = jwt.decode(
                token,
                self._key,
                algorithms=[self._alg],
                audience=self._audience,
                issuer=self._issuer,
                leeway=self._leeway,
                options={"require": ["exp", "iat", "sub", "jti", "iss", "aud"]},
            )
        except jwt.ExpiredSignatureError:
            raise Unauthenticated("token expired") from None
        except jwt.PyJWTError:
            raise Unauthenticated("invalid token") from None
        roles = claims.get("roles")
        if not isinstance(roles, list) or not all(isinstance(r, str) for r in roles):
            raise Unauthenticated("invalid token")
        principal = Principal(
            user_id=str(claims["sub"]),
            username=str(claims.get("name", "")),
            roles=tuple(roles),
            token_id=str(claims["jti"]),
            token_exp=float(claims["exp"]),
        )
        if self._cache_enabled:
            self._cache.set(token, principal, min(self._cache_ttl, claims["exp"] - time.time()))
        return principal
