"""CacheStoreService: the persistent L3 cache (bytes with a TTL) in PostgreSQL."""

from __future__ import annotations

import grpc

from aiwfe.data.v1 import cache_store_service_pb2 as pb
from aiwfe.data.v1 import cache_store_service_pb2_grpc as pb_grpc
from aiwfe.runtime.validation import Violations
from dataplatform.db import Database

MAX_KEYS = 1000
MAX_KEY_CHARS = 512
MAX_VALUE_BYTES = 1024 * 1024


def _check_keys(keys: list[str], v: Violations) -> None:
    v.check(1 <= len(keys) <= MAX_KEYS, "keys", f"must list 1 to {MAX_KEYS} keys")
    for i, key in enumerate(keys):
        v.text(key, f"keys[{i}]", max_chars=MAX_KEY_CHARS)


class CacheStore(pb_grpc.CacheStoreServiceServicer):
    def __init__(self, db: Database) -> None:
        self._db = db

    async def GetCacheEntries(
        self, request: pb.GetCacheEntriesRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetCacheEntriesResponse:
        keys = list(request.keys)
        v = Violations()
        _check_keys(keys, v)
        v.raise_if_any()
        async with self._db.autocommit() as conn:
            cur = await conn.execute(
                "SELECT key, value,"
                " COALESCE(ceil(extract(epoch FROM expires_at - now())), 0)::bigint AS ttl"
                " FROM cache_entries WHERE key = ANY(%s)"
                " AND (expires_at IS NULL OR expires_at > now())",
                (keys,),
            )
            rows = await cur.fetchall()
        return pb.GetCacheEntriesResponse(
            entries=[
                pb.CacheEntry(key=r["key"], value=r["value"], ttl_seconds=r["ttl"]) for r in rows
            ]
        )

    async def SetCacheEntries(
        self, request: pb.SetCacheEntriesRequest, context: grpc.aio.ServicerContext
    ) -> pb.SetCacheEntriesResponse:
        v = Violations()
        n = len(request.entries)
        v.check(1 <= n <= MAX_KEYS, "entries", f"must list 1 to {MAX_KEYS} entries")
        latest: dict[str, pb.CacheEntry] = {}
        for i, entry in enumerate(request.entries):
            v.text(entry.key, f"entries[{i}].key", max_chars=MAX_KEY_CHARS)
            v.check(
                len(entry.value) <= MAX_VALUE_BYTES,
                f"entries[{i}].value",
                f"must be at most {MAX_VALUE_BYTES} bytes",
            )
            v.check(entry.ttl_seconds >= 0, f"entries[{i}].ttl_seconds", "must not be negative")
            latest[entry.key] = entry  # the last write of a key in one batch wins
        v.raise_if_any()
        entries = list(latest.values())
        async with self._db.pool.connection() as conn:
            await conn.execute(
                "INSERT INTO cache_entries (key, value, expires_at)"
                " SELECT k, v, CASE WHEN t > 0 THEN now() + t * interval '1 second' END"
                " FROM unnest(%s::text[], %s::bytea[], %s::bigint[]) AS u(k, v, t)"
                " ON CONFLICT (key) DO UPDATE"
                " SET value = excluded.value, expires_at = excluded.expires_at",
                (
                    [e.key for e in entries],
                    [e.value for e in entries],
                    [e.ttl_seconds for e in entries],
                ),
            )
        return pb.SetCacheEntriesResponse(written=len(entries))

    async def DeleteCacheEntries(
        self, request: pb.DeleteCacheEntriesRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeleteCacheEntriesResponse:
        keys = list(request.keys)
        v = Violations()
        _check_keys(keys, v)
        v.raise_if_any()
        async with self._db.pool.connection() as conn:
            cur = await conn.execute("DELETE FROM cache_entries WHERE key = ANY(%s)", (keys,))
        return pb.DeleteCacheEntriesResponse(deleted=cur.rowcount)

    async def purge_expired(self) -> int:
        """Deletes expired entries (run periodically so the table does not grow forever)."""
        async with self._db.pool.connection() as conn:
            cur = await conn.execute(
                "DELETE FROM cache_entries WHERE expires_at IS NOT NULL AND expires_at <= now()"
            )
        return cur.rowcount
