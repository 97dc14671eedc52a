"""API keys of service accounts: issued once, stored as a hash, verified against the record.

A key is `aiwfe_sk_<key_id>_<secret>`: the prefix tells it from a JWT without decoding
anything, `key_id` (16 hex characters, public) names its row, and the secret is 32 random
bytes (`secrets.token_urlsafe`, 256 bits). dataplatform stores only the SHA-256 of the
whole key: a key of 256 random bits needs no slow hash, and SHA-256 is compared in
constant time. The key is never logged; logs name its key_id.

A verified key becomes a `Principal` like an access token's (user_id = the service
account, token_id = `apikey:<key_id>`), which the token service caches in the same layers
(in process, then Redis), so the relay's fast path admits it alike. Revocation reuses the
token machinery (gateway/revocation.py): RevokeApiKey records and pushes the revoked
token_id; disabling the account or changing its roles sets the account's watermark, and a
cached key principal older than it is reloaded from the record (new roles, or refused).
The principal's `iat` is the database's clock at the read, the clock the watermark uses.

Last use: each replica notes a key's latest use in memory (a dict write on the call path)
and writes the batch every `USE_FLUSH_SECONDS`, so a key costs at most one write a minute
per replica whatever its call rate.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import math
import re
import secrets
from dataclasses import dataclass

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from aiwfe.data.v1 import token_store_service_pb2 as store_pb
from aiwfe.data.v1 import token_store_service_pb2_grpc as store_grpc
from aiwfe.data.v1 import user_store_service_pb2 as user_pb
from aiwfe.runtime.channels import Upstream
from aiwfe.runtime.errors import Unauthenticated
from aiwfe.runtime.identity import Principal
from gateway.revocation import RevocationState

log = logging.getLogger("aiwfe.gateway.api_keys")
API_KEY_PREFIX = "aiwfe_sk_"
TOKEN_ID_PREFIX = "apikey:"
USE_FLUSH_SECONDS = 60.0
_KEY = re.compile(r"aiwfe_sk_([0-9a-f]{16})_([A-Za-z0-9_-]{43})")
_MAX_USES_PER_CALL = 10_000
_INVALID = "invalid API key"


@dataclass(frozen=True, slots=True)
class NewKey:
    """A freshly generated key: shown to its creator once, stored as `digest`."""

    key: str
    key_id: str
    digest: bytes


def new_key() -> NewKey:
    key_id = secrets.token_hex(8)
    key = f"{API_KEY_PREFIX}{key_id}_{secrets.token_urlsafe(32)}"
    return NewKey(key, key_id, digest(key))


def digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def key_id_of(key: str) -> str | None:
    """The key_id of a well-formed key, None for anything else (checked before any lookup)."""
    match = _KEY.fullmatch(key)
    return match.group(1) if match else None


def token_id(key_id: str) -> str:
    """The principal's token_id for a key: what a revocation event names."""
    return TOKEN_ID_PREFIX + key_id


def _epoch(ts: Timestamp) -> float:
    return ts.ToMicroseconds() / 1e6


class ApiKeyVerifier:
    """Checks a presented key against dataplatform's record and builds its principal."""

    def __init__(self, dataplatform: Upstream, revocations: RevocationState) -> None:
        self._dp = dataplatform
        self._store = store_grpc.TokenStoreServiceStub(dataplatform.channel)
        self._revocations = revocations

    async def verify(self, key: str) -> Principal:
        """The principal of a valid key.

        Raises:
            Unauthenticated: API_KEY_INVALID (malformed, unknown, wrong secret),
                API_KEY_EXPIRED, API_KEY_REVOKED (revoked, or the account disabled).
        """
        key_id = key_id_of(key)
        if key_id is None:
            raise Unauthenticated(_INVALID, reason="API_KEY_INVALID")
        # Twice at most: a watermark newer than the read (a role change racing it) means
        # the answer may hold old roles; the second read is after the watermark.
        for _ in range(2):
            principal = await self._read(key, key_id)
            if not self._revocations.is_revoked(principal):
                return principal
        raise Unauthenticated("API key revoked", reason="API_KEY_REVOKED")

    async def _read(self, key: str, key_id: str) -> Principal:
        try:
            reply = await self._dp.call(
                self._store.GetApiKey, store_pb.GetApiKeyRequest(key_id=key_id)
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                raise Unauthenticated(_INVALID, reason="API_KEY_INVALID") from None
            raise
        stored, account = reply.api_key, reply.account
        # The secret first: only its holder learns whether the key is revoked or expired.
        if not hmac.compare_digest(stored.secret_hash, digest(key)):
            raise Unauthenticated(_INVALID, reason="API_KEY_INVALID")
        if account.kind != user_pb.ACCOUNT_KIND_SERVICE:  # the store only links them
            raise Unauthenticated(_INVALID, reason="API_KEY_INVALID")
        if stored.HasField("revoke_time") or account.disabled:
            raise Unauthenticated("API key revoked", reason="API_KEY_REVOKED")
        read_at = _epoch(reply.read_time)
        expires = _epoch(stored.expire_time) if stored.HasField("expire_time") else math.inf
        if expires <= read_at:
            raise Unauthenticated("API key expired", reason="API_KEY_EXPIRED")
        return Principal(
            user_id=account.user_id,
            username=account.username,
            roles=tuple(account.roles),
            token_id=token_id(key_id),
            token_exp=expires,
            claims={"iat": read_at, "fam": "", "key": key_id},
        )


class KeyUseRecorder:
    """Writes the keys' latest uses (noted by the token service) to the record in batches."""

    def __init__(
        self, uses: dict[str, float], dataplatform: Upstream, interval: float = USE_FLUSH_SECONDS
    ) -> None:
        self.uses = uses  # the token service's dict: key_id → epoch of the latest use
        self._dp = dataplatform
        self._store = store_grpc.TokenStoreServiceStub(dataplatform.channel)
        self._interval = interval
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()

    async def flush(self) -> int:
        """Writes the uses noted since the last flush; returns how many keys it wrote."""
        async with self._lock:
            if not self.uses:
                return 0
            batch = dict(self.uses)
            written = 0
            try:
                items = list(batch.items())
                for start in range(0, len(items), _MAX_USES_PER_CALL):
                    chunk = items[start : start + _MAX_USES_PER_CALL]
                    request = store_pb.RecordApiKeyUseRequest()
                    for key_id, at in chunk:
                        use = request.uses.add(key_id=key_id)
                        use.last_used_time.FromMicroseconds(int(at * 1e6))
                    await self._dp.call(self._store.RecordApiKeyUse, request, timeout=5.0)
                    written += len(chunk)
            finally:
                # Forget what was written unless a newer use arrived meanwhile; what was
                # not written stays for the next flush.
                for key_id, at in list(batch.items())[:written]:
                    if self.uses.get(key_id) == at:
                        del self.uses[key_id]
            return written

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.flush()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the record is down: keep the uses, try next time
                log.debug("recording API key uses failed: %s", type(exc).__name__)

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.flush(), 2.0)
