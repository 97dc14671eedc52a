"""Revocations seen by every gateway replica within a second.

Decision: PostgreSQL (through dataplatform's TokenStoreService) is the record; a replica
that revokes applies it locally at once, writes it to Redis (`jwt_cache:revoked:{jti}`,
`jwt_cache:not_before:{user}`) and publishes it on a Redis pub/sub channel that every
replica subscribes to, so the push reaches the others in milliseconds. Pub/sub is
fire-and-forget, so each replica also replays the record: every
`reconcile_interval_seconds` while subscribed, and every `poll_interval_seconds` (0.5 s)
while it is not (Redis unconfigured or down). At start-up a replica loads every revocation
still in force. Checking a token is two dict lookups: its jti, and the user's watermark
("tokens issued before T are invalid", set by role changes, disabling and admin action).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Iterable

import grpc

from aiwfe.data.v1 import token_store_service_pb2 as store_pb
from aiwfe.data.v1 import token_store_service_pb2_grpc as store_grpc
from aiwfe.runtime.channels import Upstream
from aiwfe.runtime.config import AuthenticationSettings
from aiwfe.runtime.identity import Principal
from aiwfe.runtime.redis_client import RedisClient, Subscription

log = logging.getLogger("aiwfe.gateway.revocation")
_LOOKBACK_SECONDS = 5  # re-read recent events: ids can commit out of order
_PAGE = 5000
_MAX_PAGES = 1000  # bounds one replay (5M events)
_STARTUP_TIMEOUT = 5.0


class RevocationState:
    """The in-process view: revoked jtis and per-user watermarks, pruned at expiry."""

    __slots__ = ("_expires", "_jtis", "_not_before")

    def __init__(self) -> None:
        self._jtis: dict[str, float] = {}  # jti → token expiry (epoch s)
        self._not_before: dict[str, float] = {}  # user_id → watermark (epoch s)
        self._expires: dict[str, float] = {}  # user_id → when the watermark can be forgotten

    def revoke(self, jti: str, expires: float) -> None:
        self._jtis[jti] = max(expires, self._jtis.get(jti, 0.0))

    def set_not_before(self, user_id: str, not_before: float, expires: float) -> None:
        if not_before > self._not_before.get(user_id, 0.0):
            self._not_before[user_id] = not_before
        self._expires[user_id] = max(expires, self._expires.get(user_id, 0.0))

    def is_revoked(self, principal: Principal) -> bool:
        if principal.token_id in self._jtis:
            return True
        not_before = self._not_before.get(principal.user_id)
        return not_before is not None and principal.claims.get("iat", 0.0) < not_before

    def prune(self, now: float | None = None) -> None:
        now = time.time() if now is None else now
        for jti in [j for j, exp in self._jtis.items() if exp <= now]:
            del self._jtis[jti]
        for user in [u for u, exp in self._expires.items() if exp <= now]:
            self._expires.pop(user, None)
            self._not_before.pop(user, None)

    def __len__(self) -> int:
        return len(self._jtis) + len(self._not_before)


class RevocationSync:
    """Publishes this replica's revocations and keeps its state in step with the others."""

    def __init__(
        self,
        state: RevocationState,
        redis: RedisClient,
        dataplatform: Upstream,
        settings: AuthenticationSettings,
    ) -> None:
        self.state = state
        self._redis = redis
        self._dp = dataplatform
        self._store = store_grpc.TokenStoreServiceStub(dataplatform.channel)
        self._cfg = settings.revocation
        self._prefix = settings.validation.redis_key_prefix
        self._push = Subscription(
            redis, self._cfg.channel, self.apply_message, self.replay, "revocation"
        )
        self._cursor = 0
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        """Loads the revocations in force (bounded wait), then follows the push and the record."""
        try:
            await asyncio.wait_for(self.replay(), _STARTUP_TIMEOUT)
        except (TimeoutError, grpc.aio.AioRpcError, Exception) as exc:
            log.warning("revocation replay at start-up failed, will retry: %s", type(exc).__name__)
        if self._redis.configured:
            self._tasks.append(asyncio.create_task(self._push.run()))
        self._tasks.append(asyncio.create_task(self._poll_loop()))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()

    # --- outgoing -----------------------------------------------------------------------

    async def publish(
        self,
        revoked: Iterable[store_pb.RevokedAccessToken],
        user_id: str = "",
        not_before: float = 0.0,
        watermark_expires: float = 0.0,
    ) -> None:
        """Applies revocations locally, records them in Redis and pushes them to replicas."""
        tokens = [(t.jti, t.expire_time.ToMicroseconds() / 1e6) for t in revoked]
        for jti, exp in tokens:
            self.state.revoke(jti, exp)
        if user_id:
            self.state.set_not_before(user_id, not_before, watermark_expires)
        if not self._redis.configured:
            return
        message = json.dumps({"j": tokens, "u": [user_id, not_before, watermark_expires]})
        now = time.time()

        async def write(r):  # one round trip: the record keys and the push
            pipe = r.pipeline(transaction=False)
            for jti, exp in tokens:
                pipe.set(self._redis.key(f"{self._prefix}revoked:{jti}"), "1",
                         px=max(1, int((exp - now) * 1000)))  # fmt: skip
            if user_id:
                pipe.set(
                    self._redis.key(f"{self._prefix}not_before:{user_id}"),
                    repr(not_before),
                    px=max(1, int((watermark_expires - now) * 1000)),
                )
            pipe.publish(self._push.channel, message)
            return await pipe.execute()

        await self._redis.run(write, None)

    # --- incoming -----------------------------------------------------------------------

    def apply_message(self, data: bytes | str) -> None:
        try:
            message = json.loads(data)
            for jti, exp in message.get("j", ()):
                self.state.revoke(str(jti), float(exp))
            user_id, not_before, expires = message.get("u", ("", 0, 0))
            if user_id:
                self.state.set_not_before(str(user_id), float(not_before), float(expires))
        except (ValueError, TypeError):
            log.warning("ignored a malformed revocation message")

    async def replay(self) -> int:
        """Applies every recorded revocation after the cursor; returns how many it saw."""
        seen = 0
        for _ in range(_MAX_PAGES):
            reply = await self._dp.call(
                self._store.ListRevocations,
                store_pb.ListRevocationsRequest(
                    after_id=self._cursor,
                    page_size=_PAGE,
                    lookback_seconds=_LOOKBACK_SECONDS if self._cursor else 0,
                ),
                timeout=5.0,
            )
            for event in reply.revocations:
                if event.HasField("access_token"):
                    token = event.access_token
                    self.state.revoke(token.jti, token.expire_time.ToMicroseconds() / 1e6)
                else:
                    self.state.set_not_before(
                        event.user_id,
                        event.not_before.ToMicroseconds() / 1e6,
                        event.expire_time.ToMicroseconds() / 1e6,
                    )
            seen += len(reply.revocations)
            self._cursor = reply.last_id
            if not reply.more:
                break
        return seen

    async def _poll_loop(self) -> None:
        last = time.monotonic()
        while True:
            # Ticks at the fast interval so a lost push is noticed within one tick.
            await asyncio.sleep(self._cfg.poll_interval_seconds)
            now = time.monotonic()
            if self._push.up and now - last < self._cfg.reconcile_interval_seconds:
                continue
            last = now
            try:
                await self.replay()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.debug("revocation poll failed: %s", type(exc).__name__)
            self.state.prune()
