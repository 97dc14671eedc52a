"""The seed's multi-layer cache for embeddings, keyed by content hash.

L1 in process (bounded, TTL 300 s) → L2 Redis (TTL 1800 s) → L3 PostgreSQL through
dataplatform's CacheStoreService (TTL 1800 s). A hit in a lower layer backfills the upper
ones; concurrent identical misses compute once (single flight). A layer that cannot be
reached (Redis down, dataplatform's breaker open) is skipped, never fatal: the embedding is
computed instead. A request waits on the persistent layer at most its budget
(`cognitive.cache.persistent_budget_ms`) per lookup and per write: a slower call counts as a
miss (or a skipped write) and finishes in the background, so Embed, which does not need the
database, never waits on it longer than that. Keys follow the seed:
`cognitive:{service}:{sha256 of the canonical input}`.
"""

from __future__ import annotations

import array
import asyncio
import functools
import hashlib
import json
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import grpc

from aiwfe.data.v1 import cache_store_service_pb2 as cache_pb
from aiwfe.data.v1 import cache_store_service_pb2_grpc as cache_grpc
from aiwfe.runtime.cache import TTLCache
from aiwfe.runtime.channels import Upstream
from aiwfe.runtime.errors import AiwfeError
from aiwfe.runtime.metrics import redis_cache_hit_rate
from aiwfe.runtime.redis_client import RedisClient

log = logging.getLogger("aiwfe.cognitive.cache")

Vector = list[float]
T = TypeVar("T")
Compute = Callable[[list[str]], Awaitable[dict[str, Vector]]]


def input_hash(input_data: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of the input (sorted keys, no whitespace)."""
    canonical = json.dumps(input_data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def pack(vector: Sequence[float]) -> bytes:
    return array.array("f", vector).tobytes()


def unpack(data: bytes) -> Vector:
    return array.array("f", data).tolist()


class EmbeddingCache:
    """Three layers with backfill and single flight; `service` names the key space."""

    def __init__(
        self,
        dataplatform: Upstream,
        redis: RedisClient,
        *,
        l1_entries: int,
        l1_ttl: float,
        ttl: int,
        persistent_budget: float,
        key_pattern: str = "cognitive:{service}:{input_hash}",
        service: str = "embed",
    ) -> None:
        self._l1: TTLCache[str, Vector] = TTLCache(l1_entries)
        self._l1_ttl = l1_ttl
        self._ttl = ttl
        self._dp = dataplatform
        self._stub = cache_grpc.CacheStoreServiceStub(dataplatform.channel)
        self._redis = redis
        self._pattern = key_pattern
        self._service = service
        self._inflight: dict[str, asyncio.Future[Vector]] = {}
        self._budget = persistent_budget
        # Persistent-layer calls still running (some past their budget): held until done.
        self._persistent_calls: set[asyncio.Task[Any]] = set()

    def clear_memory(self) -> None:
        """Empties the in-process layer (L1) only: the next lookup goes to Redis (L2)."""
        self._l1.clear()

    def key(self, input_data: dict[str, Any]) -> str:
        """The L1/L3 key of an input (L2 adds the configured Redis key prefix)."""
        return self._pattern.format(service=self._service, input_hash=input_hash(input_data))

    async def get_or_compute(
        self, keys: Sequence[str], compute: Compute, *, bypass: bool = False
    ) -> tuple[dict[str, Vector], set[str]]:
        """Returns a vector for every key, and the keys a cache layer answered.

        Args:
            keys: Distinct cache keys.
            compute: Computes the vectors of the keys no layer holds.
            bypass: Skip every lookup (and joining other callers' computations); the
                fresh results still refresh all layers.
        """
        if bypass:
            computed = await compute(list(keys))
            await self._store(computed)
            return computed, set()
        found: dict[str, Vector] = {}
        missing: list[str] = []
        for key in keys:
            hit = self._l1.get(key)
            if hit is None:
                missing.append(key)
            else:
                found[key] = hit
        _count("l1", len(found), len(missing))
        if not missing:
            return found, set(found)
        joined: dict[str, asyncio.Future[Vector]] = {}
        owned: dict[str, asyncio.Future[Vector]] = {}
        loop = asyncio.get_running_loop()
        for key in missing:
            if (future := self._inflight.get(key)) is not None:
                joined[key] = future
            else:
                owned[key] = self._inflight[key] = loop.create_future()
        cached = set(found)
        try:
            if owned:
                lower, on_time = await self._lookup_lower(list(owned))
                cached.update(lower)
                todo = [k for k in owned if k not in lower]
                computed = await compute(todo) if todo else {}
                for key, future in owned.items():
                    future.set_result(lower.get(key) or computed[key])
                found.update(lower)
                found.update(computed)
                # A layer that just ran past its budget is not waited on again (one budget
                # per request): the write goes on in the background.
                await self._store(computed, wait=on_time)
        except BaseException as exc:
            for future in owned.values():
                if not future.done():
                    future.set_exception(exc if isinstance(exc, Exception) else _Abandoned())
                    future.exception()  # retrieved: joiners re-raise it, no "never retrieved"
            raise
        finally:
            for key in owned:
                self._inflight.pop(key, None)
        for key, future in joined.items():
            try:
                found[key] = await asyncio.shield(future)
            except _Abandoned:
                # The caller computing it went away (cancelled): compute it ourselves.
                computed = await compute([key])
                await self._store(computed)
                found.update(computed)
        return found, cached

    async def _lookup_lower(self, keys: list[str]) -> tuple[dict[str, Vector], bool]:
        """L2 then L3 for keys L1 missed, backfilling the layers above each hit; also whether
        L3 answered within its budget (or was not asked)."""
        found: dict[str, Vector] = {}
        if self._redis.configured:
            values = await self._redis.mget([self._redis.key(k) for k in keys])
            for key, value in zip(keys, values, strict=True):
                if value:
                    found[key] = vector = unpack(value)
                    self._l1.set(key, vector, self._l1_ttl)
            _count("l2", len(found), len(keys) - len(found))
        rest = [k for k in keys if k not in found]
        if not rest:
            return found, True
        reply = await self._within_budget(
            self._dp.call(self._stub.GetCacheEntries, cache_pb.GetCacheEntriesRequest(keys=rest)),
            "persistent cache unavailable, computing instead",
        )
        if reply is None or isinstance(reply, _Late):
            _count("l3", 0, len(rest))
            return found, reply is None
        l3: dict[str, Vector] = {}
        for entry in reply.entries:
            l3[entry.key] = vector = unpack(entry.value)
            self._l1.set(entry.key, vector, self._l1_ttl)
        _count("l3", len(l3), len(rest) - len(l3))
        if l3 and self._redis.configured:
            await self._redis_set(l3)
        found.update(l3)
        return found, True

    async def _store(self, items: dict[str, Vector], wait: bool = True) -> None:
        """Writes fresh vectors to every layer; a failing layer is logged and skipped. With
        `wait` False the persistent write is not waited on at all."""
        if not items:
            return
        for key, vector in items.items():
            self._l1.set(key, vector, self._l1_ttl)
        if self._redis.configured:
            await self._redis_set(items)
        request = cache_pb.SetCacheEntriesRequest(
            entries=[
                cache_pb.CacheEntry(key=k, value=pack(v), ttl_seconds=self._ttl)
                for k, v in items.items()
            ]
        )
        await self._within_budget(
            self._dp.call(self._stub.SetCacheEntries, request),
            "persistent cache write skipped",
            self._budget if wait else 0,
        )

    async def _within_budget(
        self, call: Awaitable[T], failed: str, budget: float | None = None
    ) -> T | _Late | None:
        """Awaits a persistent-layer call at most `budget` (default the configured one);
        None when it failed (logged with `failed`), _LATE when it is still running: it then
        finishes in the background (its breaker still sees how it ended), result unused."""
        task = asyncio.ensure_future(call)
        self._persistent_calls.add(task)
        task.add_done_callback(self._persistent_calls.discard)
        task.add_done_callback(functools.partial(_log_failure, failed))
        budget = self._budget if budget is None else budget
        done, _ = await asyncio.wait((task,), timeout=budget) if budget > 0 else ((), ())
        if not done:
            log.debug("persistent cache over its %.0f ms budget; skipped", budget * 1000)
            return _LATE
        if task.cancelled() or isinstance(task.exception(), grpc.aio.AioRpcError | AiwfeError):
            return None
        return task.result()

    async def _redis_set(self, items: dict[str, Vector]) -> None:
        ttl_ms = self._ttl * 1000

        async def write(client: Any) -> None:
            pipe = client.pipeline(transaction=False)
            for key, vector in items.items():
                pipe.set(self._redis.key(key), pack(vector), px=ttl_ms)
            await pipe.execute()

        await self._redis.run(write, None)


class _Late:
    """A persistent-layer call still running when its budget ran out."""


_LATE = _Late()


class _Abandoned(Exception):
    """The request computing a key was cancelled before it finished."""


def _count(layer: str, hits: int, misses: int) -> None:
    if hits:
        redis_cache_hit_rate.labels(cache="cognitive", layer=layer, result="hit").inc(hits)
    if misses:
        redis_cache_hit_rate.labels(cache="cognitive", layer=layer, result="miss").inc(misses)


def _log_failure(failed: str, task: asyncio.Task[Any]) -> None:
    """Logs a persistent-layer call that ended in an error the layer may have (skipped)."""
    if task.cancelled():
        return
    if isinstance(exc := task.exception(), grpc.aio.AioRpcError | AiwfeError):
        log.warning("%s: %s", failed, _describe(exc))


def _describe(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    return str(exc)
