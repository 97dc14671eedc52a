"""Embedding cache by content hash: L1 in process, then the persistent store in dataplatform.

Keys follow the seed: `cognitive:{service}:{sha256 of the canonical input}`. A cache that
cannot be reached is skipped, never fatal: the embedding is computed instead.
"""

from __future__ import annotations

import array
import hashlib
import json
import logging

import grpc

from aiwfe.cache import TTLCache
from aiwfe.channels import Downstream
from aiwfe.data.v1 import cache_store_service_pb2 as cache_pb
from aiwfe.data.v1 import cache_store_service_pb2_grpc as cache_grpc
from aiwfe.errors import AiwfeError

log = logging.getLogger("aiwfe.cognitive.cache")


def cache_key(service: str, input_data: dict) -> str:
    """The seed's content key: sha256 of the canonical JSON of the input."""
    canonical = json.dumps(input_data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return f"cognitive:{service}:{hashlib.sha256(canonical.encode()).hexdigest()}"


def pack(vector: list[float]) -> bytes:
    return array.array("f", vector).tobytes()


def unpack(data: bytes) -> list[float]:
    return array.array("f", data).tolist()


class EmbeddingCache:
    """L1 (bounded, seed TTL 300 s) over L3 (dataplatform, seed TTL 1800 s), with backfill."""

    def __init__(
        self, dataplatform: Downstream, l1_entries: int, l1_ttl: float, persistent_ttl: int
    ) -> None:
        self._l1: TTLCache[str, list[float]] = TTLCache(l1_entries)
        self._l1_ttl = l1_ttl
        self._ttl = persistent_ttl
        self._dp = dataplatform
        self._stub = cache_grpc.CacheStoreServiceStub(dataplatform.channel)

    async def get_many(self, keys: list[str]) -> dict[str, list[float]]:
        found: dict[str, list[float]] = {}
        missing = []
        for key in keys:
            hit = self._l1.get(key)
            if hit is None:
                missing.append(key)
            else:
                found[key] = hit
        if not missing:
            return found
        try:
            reply = await self._dp.call(
                self._stub.GetCacheEntries, cache_pb.GetCacheEntriesRequest(keys=missing)
            )
        except (grpc.aio.AioRpcError, AiwfeError) as exc:
            log.warning("persistent cache unavailable, computing instead: %s", _describe(exc))
            return found
        for entry in reply.entries:
            vector = unpack(entry.value)
            found[entry.key] = vector
            self._l1.set(entry.key, vector, self._l1_ttl)  # backfill L1
        return found

    async def put_many(self, items: dict[str, list[float]]) -> None:
        for key, vector in items.items():
            self._l1.set(key, vector, self._l1_ttl)
        if not items:
            return
        request = cache_pb.SetCacheEntriesRequest(
            entries=[
                cache_pb.CacheEntry(key=k, value=pack(v), ttl_seconds=self._ttl)
                for k, v in items.items()
            ]
        )
        try:
            await self._dp.call(self._stub.SetCacheEntries, request)
        except (grpc.aio.AioRpcError, AiwfeError) as exc:
            log.warning("persistent cache write skipped: %s", _describe(exc))


def _describe(exc: Exception) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    return str(exc)
