"""Login sessions: opaque refresh tokens in families (RFC 9700 rotation, reuse detection),
logout, and per-user revocation, recorded by dataplatform and pushed to every replica."""

from __future__ import annotations

import hashlib
import logging
import secrets
import time
import uuid
from dataclasses import dataclass

from google.protobuf.timestamp_pb2 import Timestamp

from aiwfe.data.v1 import token_store_service_pb2 as store_pb
from aiwfe.data.v1 import token_store_service_pb2_grpc as store_grpc
from aiwfe.runtime.channels import Upstream
from aiwfe.runtime.errors import Unauthenticated
from aiwfe.runtime.identity import Principal
from gateway.revocation import RevocationSync
from gateway.tokens import IssuedToken, TokenService

log = logging.getLogger("aiwfe.gateway.sessions")
REFRESH_PREFIX = "rt_"
MAX_REFRESH_CHARS = 128
_INVALID_REFRESH = "invalid refresh token"


@dataclass(frozen=True, slots=True)
class TokenPair:
    access: IssuedToken
    refresh: str


def _ts(epoch: float) -> Timestamp:
    ts = Timestamp()
    ts.FromMicroseconds(int(epoch * 1e6))
    return ts


def _digest(refresh_token: str) -> bytes:
    return hashlib.sha256(refresh_token.encode()).digest()


def _access(issued: IssuedToken) -> store_pb.RevokedAccessToken:
    return store_pb.RevokedAccessToken(jti=issued.jti, expire_time=_ts(issued.expires_at))


class SessionManager:
    def __init__(self, tokens: TokenService, dataplatform: Upstream, sync: RevocationSync) -> None:
        self._tokens = tokens
        self._dp = dataplatform
        self._store = store_grpc.TokenStoreServiceStub(dataplatform.channel)
        self._sync = sync
        self._watermark_ttl = tokens.access_ttl + 300  # outlives every token issued before it

    def _new_refresh(self) -> tuple[str, bytes, Timestamp]:
        token = REFRESH_PREFIX + secrets.token_urlsafe(32)
        return token, _digest(token), _ts(time.time() + self._tokens.refresh_ttl)

    async def create(self, user_id: str, username: str, roles: list[str]) -> TokenPair:
        """A new family: an access token and its first refresh token."""
        family = str(uuid.uuid4())
        access = self._tokens.issue(user_id, username, roles, family)
        refresh, digest, expires = self._new_refresh()
        await self._dp.call(
            self._store.CreateSession,
            store_pb.CreateSessionRequest(
                user_id=user_id,
                family_id=family,
                refresh_token_hash=digest,
                refresh_expire_time=expires,
                access_token=_access(access),
            ),
        )
        return TokenPair(access, refresh)

    async def rotate(self, refresh_token: str) -> TokenPair:
        """Spends `refresh_token` for a new pair; a spent one revokes its family.

        Raises:
            Unauthenticated: unknown, expired, revoked or reused refresh tokens.
        """
        if not refresh_token.startswith(REFRESH_PREFIX) or len(refresh_token) > MAX_REFRESH_CHARS:
            raise Unauthenticated(_INVALID_REFRESH, reason="REFRESH_TOKEN_INVALID")
        refresh, digest, expires = self._new_refresh()
        # The access token's id is fixed before the user is known, so the store can record
        # it in the same transaction that spends the refresh token.
        jti = uuid.uuid4().hex
        exp = float(int(time.time()) + self._tokens.access_ttl)
        reply = await self._dp.call(
            self._store.RotateRefreshToken,
            store_pb.RotateRefreshTokenRequest(
                refresh_token_hash=_digest(refresh_token),
                new_refresh_token_hash=digest,
                refresh_expire_time=expires,
                access_token=store_pb.RevokedAccessToken(jti=jti, expire_time=_ts(exp)),
            ),
        )
        if reply.outcome == store_pb.ROTATE_OUTCOME_REUSED:
            log.warning(
                "refresh token reuse: family %s of user %s revoked (%d access tokens)",
                reply.family_id, reply.user_id, len(reply.revoked),
            )  # fmt: skip
            await self._sync.publish(reply.revoked)
            raise Unauthenticated(
                "refresh token already used; the session is revoked", reason="REFRESH_TOKEN_REUSED"
            )
        if reply.outcome != store_pb.ROTATE_OUTCOME_ROTATED:
            raise Unauthenticated(_INVALID_REFRESH, reason="REFRESH_TOKEN_INVALID")
        access = self._tokens.issue(
            reply.user_id, reply.username, list(reply.roles), reply.family_id, jti=jti, exp=exp
        )
        return TokenPair(access, refresh)

    async def logout(self, principal: Principal) -> None:
        """Revokes the calling access token and its refresh family."""
        family = principal.claims.get("fam", "")
        reply = await self._dp.call(
            self._store.RevokeTokens,
            store_pb.RevokeTokensRequest(
                access_tokens=[
                    store_pb.RevokedAccessToken(
                        jti=principal.token_id, expire_time=_ts(principal.token_exp)
                    )
                ],
                family_ids=[family] if family else [],
                reason="logout",
            ),
        )
        await self._sync.publish(reply.revoked)

    async def revoke_user(self, user_id: str, *, families: bool, reason: str) -> None:
        """Invalidates every access token the user holds (watermark), and with `families`
        every refresh family too (disabling); without, the user may refresh into new roles."""
        watermark_expires = time.time() + self._watermark_ttl
        reply = await self._dp.call(
            self._store.RevokeTokens,
            store_pb.RevokeTokensRequest(
                user_id=user_id,
                revoke_user_families=families,
                watermark_expire_time=_ts(watermark_expires),
                reason=reason,
            ),
        )
        await self._sync.publish(
            reply.revoked,
            user_id=user_id,
            not_before=reply.not_before.ToMicroseconds() / 1e6,
            watermark_expires=watermark_expires,
        )
