"""Hostile input on every data RPC: SQL-injection payloads in every string field are stored
and returned literally (parameterised queries only), and unique conflicts are ALREADY_EXISTS."""

from __future__ import annotations

import uuid

import grpc
import psycopg
import pytest

from aiwfe.data.v1 import cache_store_service_pb2 as cache_pb
from aiwfe.data.v1 import cache_store_service_pb2_grpc as cache_grpc
from aiwfe.data.v1 import user_store_service_pb2 as user_pb
from aiwfe.data.v1 import user_store_service_pb2_grpc as user_grpc
from aiwfe.data.v1 import vector_store_service_pb2 as vec_pb
from aiwfe.data.v1 import vector_store_service_pb2_grpc as vec_grpc
from tests.conftest import field_violations
from tests.dataplatform.test_vector_service import DIM, unit

# Classic payloads: quote breaking, stacked statements, comments, dollar quoting, psycopg and
# Python placeholders, LIKE wildcards, backslashes and non-ASCII.
PAYLOADS = [
    "'; DROP TABLE users; --",
    '" OR "1"="1',
    "admin' OR '1'='1' --",
    "1; SELECT pg_sleep(10); --",
    "$$; DELETE FROM cache_entries; $$",
    "%s %(name)s {0} %%",
    "x' UNION SELECT password_hash FROM users --",
    "_%\\' \\\\ ünï ☃ \t\n",
]


def _unique(payload: str) -> str:
    """The payload with a per-run suffix, kept within the 64-character username limit."""
    return f"{payload[:50]}#{uuid.uuid4().hex[:6]}"


async def _tables_intact(dsn: str) -> None:
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute(
            "SELECT to_regclass('users')::text, to_regclass('cache_entries')::text"
        )
        assert await cur.fetchone() == ("users", "cache_entries")


@pytest.mark.parametrize("payload", PAYLOADS)
async def test_user_fields_are_stored_literally(
    data_channel, internal_md, database_dsn, payload
) -> None:
    """username, password_hash and roles round-trip byte for byte through Create/Get/Update/List."""
    stub = user_grpc.UserStoreServiceStub(data_channel)
    username = _unique(payload)
    created = await stub.CreateUser(
        user_pb.CreateUserRequest(username=username, password_hash=payload, roles=[payload]),
        metadata=internal_md,
    )
    assert (created.user.username, created.user.password_hash) == (username, payload)
    got = await stub.GetUser(user_pb.GetUserRequest(username=username), metadata=internal_md)
    assert (got.user.username, got.user.password_hash, list(got.user.roles)) == (
        username,
        payload,
        [payload],
    )
    updated = await stub.UpdateUser(
        user_pb.UpdateUserRequest(username=username, set_roles=True, roles=[payload, "user"]),
        metadata=internal_md,
    )
    assert list(updated.user.roles) == [payload, "user"]
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.GetUser(user_pb.GetUserRequest(username=payload), metadata=internal_md)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND  # no wildcard or injected match
    listed = await stub.ListUsers(user_pb.ListUsersRequest(page_size=1000), metadata=internal_md)
    assert username in [u.username for u in listed.users]
    await _tables_intact(database_dsn)


async def test_duplicate_username_is_already_exists(data_channel, internal_md) -> None:
    """A second CreateUser with a taken username answers ALREADY_EXISTS and changes nothing."""
    stub = user_grpc.UserStoreServiceStub(data_channel)
    username = _unique("dup")
    await stub.CreateUser(
        user_pb.CreateUserRequest(username=username, password_hash="h1"), metadata=internal_md
    )
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.CreateUser(
            user_pb.CreateUserRequest(username=username, password_hash="h2"), metadata=internal_md
        )
    assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS
    got = await stub.GetUser(user_pb.GetUserRequest(username=username), metadata=internal_md)
    assert got.user.password_hash == "h1"


async def test_cache_keys_and_values_are_stored_literally(
    data_channel, internal_md, database_dsn
) -> None:
    """Every payload as a cache key and value round-trips; delete removes exactly those keys."""
    stub = cache_grpc.CacheStoreServiceStub(data_channel)
    keys = [_unique(p) for p in PAYLOADS]
    entries = [
        cache_pb.CacheEntry(key=k, value=p.encode(), ttl_seconds=60)
        for k, p in zip(keys, PAYLOADS, strict=True)
    ]
    written = await stub.SetCacheEntries(
        cache_pb.SetCacheEntriesRequest(entries=entries), metadata=internal_md
    )
    assert written.written == len(PAYLOADS)
    got = await stub.GetCacheEntries(
        cache_pb.GetCacheEntriesRequest(keys=[*keys, *PAYLOADS]), metadata=internal_md
    )
    assert {e.key: e.value.decode() for e in got.entries} == dict(zip(keys, PAYLOADS, strict=True))
    deleted = await stub.DeleteCacheEntries(
        cache_pb.DeleteCacheEntriesRequest(keys=[*PAYLOADS, keys[0]]), metadata=internal_md
    )
    assert deleted.deleted == 1
    await _tables_intact(database_dsn)


async def test_vector_strings_are_stored_literally(data_channel, internal_md) -> None:
    """Payloads as point ids, payload keys/values and filter values round-trip exactly;
    as a collection name they are refused with a field violation."""
    stub = vec_grpc.VectorStoreServiceStub(data_channel)
    name = f"inj-{uuid.uuid4().hex[:8]}"
    await stub.CreateCollection(
        vec_pb.CreateCollectionRequest(
            collection=vec_pb.Collection(name=name, dimension=DIM, indexed_fields=["document_id"])
        ),
        metadata=internal_md,
    )
    points = [
        vec_pb.Point(
            id=p, values=unit(i), payload={"document_id": p, "text": p, p.strip() or "k": p}
        )
        for i, p in enumerate(PAYLOADS)
    ]
    await stub.UpsertPoints(
        vec_pb.UpsertPointsRequest(collection=name, points=points), metadata=internal_md
    )
    for i, p in enumerate(PAYLOADS):
        count = await stub.CountPoints(
            vec_pb.CountPointsRequest(collection=name, filter={"document_id": p}),
            metadata=internal_md,
        )
        assert count.count == 1, p
        hits = await stub.SearchPoints(
            vec_pb.SearchPointsRequest(
                collection=name, vector=unit(i), top_k=1, filter={"document_id": p}
            ),
            metadata=internal_md,
        )
        assert hits.hits[0].id == p
        assert dict(hits.hits[0].payload) == {"document_id": p, "text": p, p.strip() or "k": p}
    deleted = await stub.DeletePoints(
        vec_pb.DeletePointsRequest(collection=name, ids=PAYLOADS), metadata=internal_md
    )
    assert deleted.deleted == len(PAYLOADS)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.CreateCollection(
            vec_pb.CreateCollectionRequest(collection=vec_pb.Collection(name=PAYLOADS[0])),
            metadata=internal_md,
        )
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "collection.name" in field_violations(info.value)
