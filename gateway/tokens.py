"""Access tokens: JWTs signed with the current `kid` (HS256 by default, seed), verified with
the key their kid names and only that key's pinned algorithm; exp/iat/sub/jti/iss/aud
required, a small leeway.

Validated tokens are cached in layers: in process (bounded, TTL ≤ min(cache_ttl, time to
expiry)), then Redis `session:{sha256(token)}` (seed TTL, never past expiry), with JWT
verification as the fallback when Redis is down. Every layer's answer is checked against
the revocation state, so a cached token dies the moment it is revoked.

Service accounts' API keys (`aiwfe_sk_…`, gateway/api_keys.py) share the layers: the
record (dataplatform) replaces JWT verification, and a cached key principal that the
revocation state refuses is looked up again, since a watermark (role change, disabled
account) means "reload" for a key rather than "dead". Definite refusals of a key are
remembered in process for `_REFUSED_TTL`, so a revoked or guessed key hammering the
gateway costs the record one lookup per key per interval.
"""

from __future__ import annotations

import json
import logging
import math
import time
import uuid
from dataclasses import dataclass

import jwt

from aiwfe.runtime import metrics
from aiwfe.runtime.cache import TTLCache
from aiwfe.runtime.config import AuthenticationSettings, RedisSettings
from aiwfe.runtime.errors import Unauthenticated
from aiwfe.runtime.identity import Principal
from aiwfe.runtime.redis_client import RedisClient
from gateway.api_keys import API_KEY_PREFIX, ApiKeyVerifier, key_id_of
from gateway.keys import KeyRing, VerifyKey
from gateway.revocation import RevocationState

log = logging.getLogger("aiwfe.gateway.tokens")
MAX_TOKEN_CHARS = 4096  # real tokens are < 2 KiB; gRPC metadata is capped at 8 KiB
_REQUIRED = ["exp", "iat", "sub", "jti", "iss", "aud"]
_INVALID = "invalid token"
_REFUSED_TTL = 30.0  # seconds a refused API key is answered from memory
_HORIZON_MARGIN = 60.0

_hit_l1 = metrics.session_cache_hit_rate.labels("l1", "hit")
_miss_l1 = metrics.session_cache_hit_rate.labels("l1", "miss")
_hit_redis = metrics.session_cache_hit_rate.labels("redis", "hit")
_miss_redis = metrics.session_cache_hit_rate.labels("redis", "miss")
_time_redis = metrics.jwt_validation_time.labels("redis")
_time_verify = metrics.jwt_validation_time.labels("none")
_key_ok = metrics.authentication_success_rate.labels("api_key", "success")
_key_failed = metrics.authentication_success_rate.labels("api_key", "failure")


@dataclass(frozen=True, slots=True)
class IssuedToken:
    """A signed access token and the facts the session store needs about it."""

    token: str
    jti: str
    expires_at: float


def _principal(claims: dict) -> Principal:
    roles = claims.get("roles")
    if not isinstance(roles, list) or not all(isinstance(r, str) for r in roles):
        raise Unauthenticated(_INVALID, reason="TOKEN_INVALID")
    return Principal(
        user_id=str(claims["sub"]),
        username=str(claims.get("name", "")),
        roles=tuple(roles),
        token_id=str(claims["jti"]),
        token_exp=float(claims["exp"]),
        claims={"iat": float(claims["iat"]), "fam": str(claims.get("fam", ""))},
    )


class TokenService:
    """Issues and verifies access tokens."""

    def __init__(
        self,
        settings: AuthenticationSettings,
        redis: RedisClient | None = None,
        revocations: RevocationState | None = None,
    ) -> None:
        jwt_cfg = settings.jwt
        self.keys = KeyRing(jwt_cfg)
        self._issuer = jwt_cfg.issuer
        self._audience = jwt_cfg.audience
        self._leeway = jwt_cfg.leeway_seconds
        self.access_ttl = int(jwt_cfg.expire_hours * 3600)
        self.refresh_ttl = int(jwt_cfg.refresh_expire_days * 86400)
        self._cache_enabled = settings.validation.cache_enabled
        self._cache_ttl = settings.validation.cache_ttl
        self._cache: TTLCache[str, Principal] = TTLCache(settings.validation.cache_max_entries)
        self._redis = redis if redis is not None else RedisClient(RedisSettings())
        self._session_ttl = self._redis.settings.cache_strategies.session_cache.ttl
        self.revocations = revocations if revocations is not None else RevocationState()
        # API keys: verified against the record when set (the gateway service sets it).
        self.api_keys: ApiKeyVerifier | None = None
        self.key_uses: dict[str, float] = {}  # key_id → latest use (epoch), flushed in batches
        self._refused: TTLCache[str, Unauthenticated] = TTLCache(
            settings.validation.cache_max_entries
        )

    @property
    def cache_horizon(self) -> float:
        """Seconds a principal can outlive its verification in some cache (Redis, then in
        process): how long a key's revocation event must be kept."""
        return self._session_ttl + self._cache_ttl + _HORIZON_MARGIN

    def issue(
        self,
        user_id: str,
        username: str,
        roles: list[str],
        family_id: str = "",
        *,
        jti: str | None = None,
        exp: float | None = None,
    ) -> IssuedToken:
        """A new access token; `family_id` ties it to its refresh family for revocation."""
        now = time.time()
        # Millisecond iat: a role change's watermark must not spare a token issued in the
        # same second before it.
        iat = round(now, 3)
        exp = int(now) + self.access_ttl if exp is None else int(exp)
        jti = jti or uuid.uuid4().hex
        claims = {
            "sub": user_id,
            "name": username,
            "roles": roles,
            "iat": iat,
            "exp": exp,
            "jti": jti,
            "iss": self._issuer,
            "aud": self._audience,
        }
        if family_id:
            claims["fam"] = family_id
        key = self.keys.signing
        token = jwt.encode(claims, key.key, algorithm=key.algorithm, headers={"kid": key.kid})
        return IssuedToken(token, jti, float(exp))

    def _live(self, principal: Principal) -> Principal:
        if self.revocations.is_revoked(principal):
            raise Unauthenticated("token revoked", reason="TOKEN_REVOKED")
        return principal

    def cached(self, token: str) -> Principal | None:
        """The in-process cache's answer (the hot path), or None on a miss."""
        principal = self._cache.get(token)
        if principal is None:
            return None
        _hit_l1.inc()
        key_id = principal.claims.get("key")
        if key_id is None:
            return self._live(principal)
        if self.revocations.is_revoked(principal):
            self._cache.pop(token)  # the record decides: revoked, disabled or new roles
            return None
        self.key_uses[key_id] = time.time()
        return principal

    def decode(self, token: str, key: VerifyKey) -> Principal:
        """Verifies signature and claims with `key` alone (its pinned algorithm only)."""
        try:
            claims = jwt.decode(
                token,
                key.key,
                algorithms=[key.algorithm],
                audience=self._audience,
                issuer=self._issuer,
                leeway=self._leeway,
                options={"require": _REQUIRED},
            )
        except jwt.ExpiredSignatureError:
            raise Unauthenticated("token expired", reason="TOKEN_EXPIRED") from None
        except jwt.ImmatureSignatureError:
            raise Unauthenticated("token not yet valid", reason="TOKEN_NOT_YET_VALID") from None
        except jwt.PyJWTError:
            raise Unauthenticated(_INVALID, reason="TOKEN_INVALID") from None
        return _principal(claims)

    async def verify_signature(self, token: str) -> Principal:
        """Full verification: header, kid → pinned key, signature and claims."""
        if len(token) > MAX_TOKEN_CHARS:
            raise Unauthenticated(_INVALID, reason="TOKEN_INVALID")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise Unauthenticated(_INVALID, reason="TOKEN_INVALID") from None
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise Unauthenticated(_INVALID, reason="TOKEN_INVALID")
        key = self.keys.lookup(kid)
        if key is None and self.keys.may_refetch:
            await self.keys.refetch()
            key = self.keys.lookup(kid)
        # The header's alg must be the key's: rejects "none" and HS/RS confusion up front.
        if key is None or header.get("alg") != key.algorithm:
            raise Unauthenticated(_INVALID, reason="TOKEN_INVALID")
        return self.decode(token, key)

    async def authenticate(self, token: str | None) -> Principal:
        """The principal of a valid, unrevoked access token.

        Raises:
            Unauthenticated: missing, malformed, forged, expired, revoked or foreign tokens.
        """
        if not token:
            raise Unauthenticated(
                "missing bearer token (metadata 'authorization: Bearer <token>')",
                reason="TOKEN_MISSING",
            )
        hit = self.cached(token)
        if hit is not None:
            return hit
        _miss_l1.inc()
        if token.startswith(API_KEY_PREFIX):
            return await self._authenticate_key(token)
        if len(token) > MAX_TOKEN_CHARS:
            raise Unauthenticated(_INVALID, reason="TOKEN_INVALID")
        started = time.perf_counter()
        principal = await self._from_redis(token)
        if principal is not None:
            _time_redis.observe(time.perf_counter() - started)
        else:
            principal = await self.verify_signature(token)
            _time_verify.observe(time.perf_counter() - started)
            await self._to_redis(token, principal)
        remaining = principal.token_exp - time.time()
        if remaining <= 0:
            raise Unauthenticated("token expired", reason="TOKEN_EXPIRED")
        self._live(principal)
        if self._cache_enabled:
            self._cache.set(token, principal, min(self._cache_ttl, remaining))
        return principal

    async def _authenticate_key(self, token: str) -> Principal:
        """A service account's API key: Redis, else the record (gateway/api_keys.py)."""
        key_id = key_id_of(token)
        if key_id is None or self.api_keys is None:
            _key_failed.inc()
            raise Unauthenticated("invalid API key", reason="API_KEY_INVALID")
        refused = self._refused.get(token)
        if refused is not None:
            _key_failed.inc()
            raise refused.with_traceback(None)  # a fresh traceback, not a growing one
        started = time.perf_counter()
        principal = await self._from_redis(token)
        if principal is not None and (
            principal.claims.get("key") != key_id
            or principal.token_exp <= time.time()
            or self.revocations.is_revoked(principal)
        ):
            principal = None  # stale: the record decides
        if principal is not None:
            _time_redis.observe(time.perf_counter() - started)
        else:
            try:
                principal = await self.api_keys.verify(token)
            except Unauthenticated as exc:
                _key_failed.inc()
                self._refused.set(token, exc, _REFUSED_TTL)
                raise
            _time_verify.observe(time.perf_counter() - started)
            await self._to_redis(token, principal)
        if self._cache_enabled:
            remaining = principal.token_exp - time.time()
            self._cache.set(token, principal, min(self._cache_ttl, remaining))
        _key_ok.inc()
        self.key_uses[key_id] = time.time()
        return principal

    async def _from_redis(self, token: str) -> Principal | None:
        if not (self._cache_enabled and self._redis.available):
            return None
        raw = await self._redis.get(self._redis.session_key(token))
        if raw is None:
            _miss_redis.inc()
            return None
        try:
            d = json.loads(raw)
            principal = Principal(
                user_id=d["sub"],
                username=d["name"],
                roles=tuple(d["roles"]),
                token_id=d["jti"],
                token_exp=float(d["exp"]),
                claims={"iat": float(d["iat"]), "fam": d["fam"]},
            )
            if d.get("key"):
                principal.claims["key"] = str(d["key"])
        except (ValueError, KeyError, TypeError):
            return None
        _hit_redis.inc()
        return principal

    async def _to_redis(self, token: str, p: Principal) -> None:
        if not (self._cache_enabled and self._redis.available):
            return
        ttl = min(self._session_ttl, p.token_exp - time.time())
        if ttl <= 0:
            return
        entry = {
            "sub": p.user_id,
            "name": p.username,
            "roles": list(p.roles),
            "jti": p.token_id,
            "exp": p.token_exp if math.isfinite(p.token_exp) else 1e18,  # a key without expiry
            "iat": p.claims["iat"],
            "fam": p.claims["fam"],
        }
        if "key" in p.claims:
            entry["key"] = p.claims["key"]
        value = json.dumps(entry)
        await self._redis.set(self._redis.session_key(token), value, ttl)

    def forget(self, token: str) -> None:
        """Drops a token from the in-process cache (logout of this token)."""
        self._cache.pop(token)
