"""Optional Redis for caches, rate limits and revocation push (the seed's key patterns).

Redis is optional on one machine: every call degrades (a miss, a skipped write) when Redis
is unconfigured or down, and after a failure Redis is skipped for a short back-off so a
dead server costs nothing per request. It comes back by itself on the next attempt. A
command never takes longer than the socket timeout in all (retry included).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, cast

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from aiwfe.runtime.config import RedisSettings

log = logging.getLogger("aiwfe.redis")
T = TypeVar("T")
_BACKOFF_SECONDS = 1.0
_RESUBSCRIBE_SECONDS = 1.0


def token_hash(token: str) -> str:
    """Tokens are never stored raw: keys use their SHA-256."""
    return hashlib.sha256(token.encode()).hexdigest()


class RedisClient:
    """A pooled asyncio Redis client (seed: 20 connections, retry on timeout, health check 60 s)."""

    def __init__(self, settings: RedisSettings) -> None:
        self.settings = settings
        self.prefix = settings.key_prefix
        pool = settings.connection_pool
        self.client: aioredis.Redis | None = None
        if settings.url:
            # Blocking pool: a burst beyond max_connections waits for a free connection
            # (bounded by socket_timeout) instead of failing with "Too many connections".
            connections = aioredis.BlockingConnectionPool.from_url(
                settings.url,
                max_connections=pool.max_connections,
                timeout=pool.socket_timeout,
                retry_on_timeout=pool.retry_on_timeout,
                health_check_interval=pool.health_check_interval,
                socket_timeout=pool.socket_timeout,
                socket_connect_timeout=pool.socket_timeout,
            )
            self.client = aioredis.Redis(connection_pool=connections)
        self._skip_until = 0.0

    @property
    def configured(self) -> bool:
        return self.client is not None

    @property
    def available(self) -> bool:
        """Configured and not inside the back-off after a failure."""
        return self.client is not None and time.monotonic() >= self._skip_until

    def key(self, raw: str) -> str:
        """Namespaces a key with the configured prefix."""
        return self.prefix + raw

    def session_key(self, token: str) -> str:
        return self.key(
            self.settings.cache_strategies.session_cache.key_pattern.format(token=token_hash(token))
        )

    def api_key(self, endpoint: str, user_id: str, params_hash: str) -> str:
        return self.key(f"api:{endpoint}:{user_id}:{params_hash}")

    def cognitive_key(self, service: str, input_hash: str) -> str:
        return self.key(
            self.settings.cache_strategies.cognitive_cache.key_pattern.format(
                service=service, input_hash=input_hash
            )
        )

    async def run(self, op: Callable[[aioredis.Redis], Awaitable[T]], default: T) -> T:
        """Runs `op` against Redis, or returns `default` when Redis is unavailable."""
        client = self.client
        if client is None or not self.available:
            return default
        try:
            # One budget for the whole command, retry on timeout and reconnect included: a
            # Redis that stops answering mid-call costs a call at most the socket timeout.
            async with asyncio.timeout(self.settings.connection_pool.socket_timeout):
                return await op(client)
        except (RedisError, OSError) as exc:  # the budget's TimeoutError is an OSError
            self._skip_until = time.monotonic() + _BACKOFF_SECONDS
            log.warning("redis unavailable, degrading for %.0f s: %s", _BACKOFF_SECONDS, exc)
            return default

    # decode_responses is off, so replies are bytes; redis-py's stubs also allow str.
    async def get(self, key: str) -> bytes | None:
        return cast("bytes | None", await self.run(lambda r: r.get(key), None))

    async def mget(self, keys: list[str]) -> list[bytes | None]:
        if not keys:
            return []
        return cast(
            "list[bytes | None]", await self.run(lambda r: r.mget(keys), [None] * len(keys))
        )

    async def set(self, key: str, value: bytes | str, ttl: float) -> bool:
        return bool(await self.run(lambda r: r.set(key, value, px=max(1, int(ttl * 1000))), False))

    async def delete(self, *keys: str) -> int:
        return int(await self.run(lambda r: r.delete(*keys), 0))

    async def publish(self, channel: str, message: str) -> int:
        return int(await self.run(lambda r: r.publish(self.key(channel), message), 0))

    async def ping(self) -> bool:
        return bool(await self.run(lambda r: r.ping(), False))

    async def eval_script(self, script: Any, keys: list[str], args: list[Any]) -> Any:
        """Runs a registered Lua script (`client.register_script`) atomically; None if down."""
        return await self.run(lambda r: script(keys=keys, args=args, client=r), None)

    async def close(self) -> None:
        if self.client is not None:
            await self.client.aclose()
            await self.client.connection_pool.disconnect()


class Subscription:
    """Follows one pub/sub channel until cancelled, resubscribing after a loss.

    Pub/sub is fire-and-forget: `on_subscribed` runs after every (re)subscription, so the
    owner can catch up on what it may have missed, and `up` says whether messages are
    arriving at all (while it is False, owners poll their record instead).
    """

    def __init__(
        self,
        redis: RedisClient,
        channel: str,
        on_message: Callable[[bytes], None],
        on_subscribed: Callable[[], Awaitable[object]],
        name: str,
    ) -> None:
        self._redis = redis
        self.channel = redis.key(channel)
        self._on_message = on_message
        self._on_subscribed = on_subscribed
        self._name = name
        self.up = False

    async def run(self) -> None:
        while True:
            client = self._redis.client
            if client is None:
                raise RuntimeError(f"{self._name}: subscribe only where Redis is configured")
            pubsub = client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self.channel)
                self.up = True
                with contextlib.suppress(Exception):
                    await self._on_subscribed()
                while True:
                    message = await pubsub.get_message(timeout=1.0)
                    if message is not None and message.get("type") == "message":
                        self._on_message(message["data"])
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self.up:
                    log.warning("%s push lost, polling: %s", self._name, type(exc).__name__)
            finally:
                self.up = False
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
            await asyncio.sleep(_RESUBSCRIBE_SECONDS)
