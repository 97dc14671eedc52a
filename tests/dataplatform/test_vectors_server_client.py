"""Tests for QdrantServerStore's logic against qdrant-client's local mode.

No Qdrant server runs here. These tests pass a pre-built ``AsyncQdrantClient(location=":memory:")``
(or ``path=...``) through the store's ``client=`` hook, so they exercise the client calls the
store makes (collection options, metadata round-trip, id mapping, filters, error mapping,
retries), not the gRPC/REST wire protocol. Local mode searches exactly and ignores HNSW,
quantization and payload-index settings, so it says nothing about recall or latency, and it
does not report ``payload_schema``: the spec round-trips through collection metadata here.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
from qdrant_client import AsyncQdrantClient

from dataplatform.vectors import (
    CollectionExists,
    CollectionNotFound,
    CollectionSpec,
    DimensionMismatch,
    QdrantServerStore,
    UnindexedFilterField,
    VectorPoint,
    open_vector_store,
)

DIM = 8

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _basis(i: int) -> list[float]:
    v = np.full(DIM, 0.01)
    v[i] = 1.0
    return (v / np.linalg.norm(v)).tolist()


@pytest.fixture
async def store():
    client = AsyncQdrantClient(location=":memory:")
    s = QdrantServerStore("unused", client=client, backoff=0.0)
    yield s
    await client.close()


@pytest.fixture
async def docs(store: QdrantServerStore) -> QdrantServerStore:
    await store.create_collection(CollectionSpec("docs", dimension=DIM, indexed_fields=("lang",)))
    await store.upsert(
        "docs",
        [
            VectorPoint(f"doc-{i}", _basis(i), {"lang": "en" if i % 2 == 0 else "de"})
            for i in range(DIM)
        ],
    )
    return store


class _Transient(Exception):
    """Looks like an HTTP 503 from the client."""

    status_code = 503


async def test_open_vector_store_chooses_server_with_url(tmp_path: Path) -> None:
    """open_vector_store returns the server store when a URL is configured."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s = open_vector_store("http://localhost:6333", tmp_path, prefer_grpc=False)
    try:
        assert isinstance(s, QdrantServerStore)
    finally:
        await s.close()


async def test_catalog_and_errors(store: QdrantServerStore) -> None:
    """Create/get/list/delete work and map to CollectionExists / CollectionNotFound."""
    spec = CollectionSpec("a", dimension=DIM, indexed_fields=("lang",))
    await store.create_collection(spec)
    with pytest.raises(CollectionExists):
        await store.create_collection(spec)
    assert await store.get_collection("a") == spec
    assert await store.list_collections() == [spec]
    await store.delete_collection("a")
    with pytest.raises(CollectionNotFound):
        await store.get_collection("a")
    with pytest.raises(CollectionNotFound):
        await store.delete_collection("a")


async def test_spec_read_back_from_collection_metadata(store: QdrantServerStore) -> None:
    """A fresh store on the same server recovers the spec, including indexed fields."""
    spec = CollectionSpec("a", dimension=DIM, distance="Dot", indexed_fields=("x", "y"))
    await store.create_collection(spec)
    fresh = QdrantServerStore("unused", client=store._client)
    assert await fresh.get_collection("a") == spec


@pytest.mark.parametrize("on_disk", [True, False])
async def test_originals_on_disk_is_passed_to_the_server(on_disk: bool) -> None:
    """vectors_on_disk reaches the collection's vector params (the server mmaps them)."""
    client = AsyncQdrantClient(location=":memory:")
    try:
        store = QdrantServerStore("unused", client=client, vectors_on_disk=on_disk)
        await store.create_collection(CollectionSpec("a", dimension=DIM))
        params = (await client.get_collection("a")).config.params.vectors
        assert params.on_disk is on_disk
    finally:
        await client.close()


async def test_search_ids_payload_filter_threshold(docs: QdrantServerStore) -> None:
    """Search maps ids back to strings, filters on indexed fields and honours the threshold."""
    hits = await docs.search("docs", _basis(3), top_k=3)
    assert hits[0].id == "doc-3" and hits[0].payload == {"lang": "de"}
    hits = await docs.search("docs", _basis(3), top_k=3, filter={"lang": "en"})
    assert len(hits) == 3 and all(h.payload["lang"] == "en" for h in hits)
    assert [h.id for h in await docs.search("docs", _basis(3), 10, score_threshold=0.5)] == [
        "doc-3"
    ]
    with pytest.raises(UnindexedFilterField):
        await docs.search("docs", _basis(3), top_k=3, filter={"other": "x"})


async def test_validation_replace_delete_count(docs: QdrantServerStore) -> None:
    """Bad vectors raise; same-id upsert replaces; delete reports existing ids."""
    with pytest.raises(DimensionMismatch):
        await docs.upsert("docs", [VectorPoint("x", [1.0] * (DIM + 1), {})])
    with pytest.raises(ValueError):
        await docs.upsert("docs", [VectorPoint("x", [float("nan")] * DIM, {})])
    await docs.upsert("docs", [VectorPoint("doc-0", _basis(1), {"lang": "fr"})])
    assert await docs.count("docs") == DIM
    assert await docs.count("docs", {"lang": "fr"}) == 1
    assert await docs.delete("docs", ["doc-0", "missing"]) == 1
    assert await docs.count("docs") == DIM - 1


async def test_spec_and_points_survive_client_restart(tmp_path: Path) -> None:
    """With an on-disk local client, a new client and store see the same spec and points."""
    spec = CollectionSpec("docs", dimension=DIM, indexed_fields=("lang",))
    c1 = AsyncQdrantClient(path=str(tmp_path / "q"))
    s1 = QdrantServerStore("unused", client=c1)
    await s1.create_collection(spec)
    await s1.upsert("docs", [VectorPoint("d1", _basis(1), {"lang": "en"})])
    await c1.close()

    c2 = AsyncQdrantClient(path=str(tmp_path / "q"))
    try:
        s2 = QdrantServerStore("unused", client=c2)
        assert await s2.get_collection("docs") == spec
        hits = await s2.search("docs", _basis(1), top_k=1, filter={"lang": "en"})
        assert [h.id for h in hits] == ["d1"]
    finally:
        await c2.close()


async def test_transient_errors_are_retried(
    docs: QdrantServerStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 503 is retried up to the attempt limit; other errors are raised at once."""
    real_count = docs._client.count
    calls = 0

    async def flaky(*args, **kwargs):
        nonlocal calls
        calls += 1
        if calls < 3:
            raise _Transient("unavailable")
        return await real_count(*args, **kwargs)

    monkeypatch.setattr(docs._client, "count", flaky)
    assert await docs.count("docs") == DIM
    assert calls == 3

    calls = -10  # would need 13 attempts; the store gives up after 3
    with pytest.raises(_Transient):
        await docs.count("docs")
    assert calls == -7

    async def broken(*args, **kwargs):
        nonlocal calls
        calls += 1
        raise RuntimeError("bad request")

    calls = 0
    monkeypatch.setattr(docs._client, "count", broken)
    with pytest.raises(RuntimeError):
        await docs.count("docs")
    assert calls == 1
