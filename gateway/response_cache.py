"""The API response cache (seed: `api:{endpoint}:{user_id}:{params_hash}`, 300 s).

Only for unary RPCs whose contract declares `cache_ttl_seconds` (read-only, deterministic
ones). The gateway proxies bytes, so it caches the response bytes keyed by the caller and
the SHA-256 of the request bytes: in process first, then Redis. Failures are never cached.
A request with `cache-control: no-cache` metadata skips the lookup (the fresh answer is
stored), `cache-control: no-store` bypasses the cache entirely; a message-level flag such
as EmbedRequest.bypass_cache changes the request bytes, so it never matches an entry
stored without it. Calls that miss the same entry in process at once (its copy expired
while they were in flight) share one Redis lookup.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable
from typing import Any

import grpc

from aiwfe.runtime import metrics
from aiwfe.runtime.cache import TTLCache
from aiwfe.runtime.identity import current_principal
from aiwfe.runtime.interceptors import Behavior, HandlerCache
from aiwfe.runtime.redis_client import RedisClient
from gateway.policies import MethodInfo

_L1_MAX_TTL = 60.0  # replicas' L1 copies stay short-lived; Redis holds the full TTL
_MAX_CACHED_BYTES = 1024 * 1024
_KEY_PREFIXES = 10_000  # (method, user) pairs whose key prefix is kept; then cleared

_counters = {
    (layer, result): metrics.redis_cache_hit_rate.labels("api", layer, result)
    for layer in ("l1", "redis")
    for result in ("hit", "miss")
}


class ResponseCache:
    """L1 + Redis cache of proxied response bytes per (method, user, request hash)."""

    def __init__(
        self, redis: RedisClient, methods: dict[str, MethodInfo], max_entries: int = 10_000
    ) -> None:
        self._redis = redis
        self._methods = methods
        self._l1: TTLCache[str, bytes] = TTLCache(max_entries)
        self._handlers = HandlerCache(self._guard_for)
        self._prefixes: dict[tuple[str, str], str] = {}
        self._lookups: dict[str, asyncio.Future[bytes | None]] = {}

    @staticmethod
    def applies(info: MethodInfo | None) -> bool:
        return bool(
            info and info.cache_ttl_seconds and not info.client_streaming
            and not info.server_streaming
        )  # fmt: skip

    def wrap(self, handler: grpc.RpcMethodHandler, info: MethodInfo) -> grpc.RpcMethodHandler:
        """`handler` answering from the cache when it can; built once per method (the
        caller comes from the principal ContextVar the auth interceptor sets)."""
        return self._handlers.get(info.path, handler)

    def answer_at_once(
        self, info: MethodInfo, user_id: str, request: bytes, admit: Callable[[], bool]
    ) -> bytes | None:
        """The in-process (L1) copy of the answer to `request`, if there is one and `admit()`
        lets the call be answered (quota). A hit is counted only when served: otherwise
        the call takes the full path, which counts what it does (a miss there included)."""
        hit = self._l1.get(self._key(info.path, user_id, request))
        if hit is None or not admit():
            return None
        _counters["l1", "hit"].inc()
        return hit

    def _key(self, method: str, user_id: str, request: bytes) -> str:
        """The key of `user_id`'s answer to `request` (`RedisClient.api_key`), all but the
        request's hash made once per method and user (the relay asks on every call)."""
        prefix = self._prefixes.get((method, user_id))
        if prefix is None:
            if len(self._prefixes) >= _KEY_PREFIXES:
                self._prefixes.clear()
            endpoint = method.lstrip("/").replace("/", ".")
            prefix = self._prefixes[method, user_id] = self._redis.api_key(endpoint, user_id, "")
        return prefix + hashlib.sha256(request).hexdigest()

    def _guard_for(self, method: str) -> Any:
        info = self._methods[method]
        ttl = float(info.cache_ttl_seconds)

        def guard(behavior: Behavior, streaming: bool) -> Behavior:
            async def cached(request: Any, context: grpc.aio.ServicerContext) -> Any:
                principal = current_principal.get()
                if not isinstance(request, bytes) or principal is None:
                    return await behavior(request, context)
                key = self._key(method, principal.user_id, request)
                directive = _cache_control(context)
                if directive == "no-store":  # neither answered from nor written to the cache
                    return await behavior(request, context)
                if directive == "no-cache":  # a fresh answer, which replaces the stored one
                    return await self._store(key, await behavior(request, context), ttl)
                hit = self._l1.get(key)
                if hit is not None:
                    _counters["l1", "hit"].inc()
                    return hit
                _counters["l1", "miss"].inc()
                if self._redis.available:
                    stored = await self._lookup(key)
                    if stored is not None:
                        _counters["redis", "hit"].inc()
                        self._l1.set(key, stored, min(ttl, _L1_MAX_TTL))
                        return stored
                    _counters["redis", "miss"].inc()
                return await self._store(key, await behavior(request, context), ttl)

            return cached

        return guard

    async def _lookup(self, key: str) -> bytes | None:
        """Redis's copy of `key`: one GET however many calls miss the key meanwhile (when
        an in-process copy expires, every call in flight for it misses at once). The GET
        runs on its own, so a caller that gives up cancels only its own wait."""
        lookup = self._lookups.get(key)
        if lookup is None:
            lookup = self._lookups[key] = asyncio.ensure_future(self._redis.get(key))
            lookup.add_done_callback(lambda done: self._looked_up(key, done))
        return await asyncio.shield(lookup)

    def _looked_up(self, key: str, done: asyncio.Future[bytes | None]) -> None:
        if self._lookups.get(key) is done:
            del self._lookups[key]
        if not done.cancelled():
            done.exception()  # retrieved here even when every caller gave up waiting

    async def _store(self, key: str, response: Any, ttl: float) -> Any:
        if isinstance(response, bytes) and len(response) <= _MAX_CACHED_BYTES:
            self._l1.set(key, response, min(ttl, _L1_MAX_TTL))
            await self._redis.set(key, response, ttl)
        return response


def cache_directive(value: str | None) -> str | None:
    """A `cache-control` value as in HTTP: "no-store" or "no-cache" (None otherwise)."""
    if value:
        if "no-store" in value:
            return "no-store"
        if "no-cache" in value:
            return "no-cache"
    return None


def _cache_control(context: grpc.aio.ServicerContext) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key == "cache-control":
            return cache_directive(value)
    return None
