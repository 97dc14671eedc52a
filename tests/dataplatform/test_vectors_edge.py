"""Tests for the embedded (qdrant-edge) vector store."""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path

import numpy as np
import pytest

from dataplatform.vectors import (
    CollectionExists,
    CollectionNotFound,
    CollectionSpec,
    DimensionMismatch,
    EdgeVectorStore,
    UnindexedFilterField,
    VectorPoint,
    open_vector_store,
)

DIM = 16


def _unit(v: np.ndarray) -> list[float]:
    return (v / np.linalg.norm(v)).tolist()


def _basis(i: int, dim: int = DIM) -> list[float]:
    v = np.full(dim, 0.01)
    v[i] = 1.0
    return _unit(v)


@pytest.fixture
async def store(tmp_path: Path):
    s = EdgeVectorStore(tmp_path / "vec")
    yield s
    await s.close()


@pytest.fixture
async def docs(store: EdgeVectorStore) -> EdgeVectorStore:
    await store.create_collection(CollectionSpec("docs", dimension=DIM, indexed_fields=("lang",)))
    points = [
        VectorPoint(f"doc-{i}", _basis(i), {"lang": "en" if i % 2 == 0 else "de", "n": str(i)})
        for i in range(DIM)
    ]
    assert await store.upsert("docs", points) == DIM
    return store


async def test_open_vector_store_chooses_edge_without_url(tmp_path: Path) -> None:
    """open_vector_store returns the embedded store when no URL is configured."""
    s = open_vector_store(None, tmp_path)
    try:
        assert isinstance(s, EdgeVectorStore)
    finally:
        await s.close()


async def test_create_get_list_delete_collection(store: EdgeVectorStore) -> None:
    """A created collection is listed and retrievable with its spec, and gone after delete."""
    spec = CollectionSpec("a", dimension=DIM, indexed_fields=("lang", "kind"))
    await store.create_collection(spec)
    await store.create_collection(CollectionSpec("b", dimension=8))
    assert await store.get_collection("a") == spec
    assert [c.name for c in await store.list_collections()] == ["a", "b"]
    await store.delete_collection("a")
    assert [c.name for c in await store.list_collections()] == ["b"]
    with pytest.raises(CollectionNotFound):
        await store.get_collection("a")


async def test_defaults_are_768_cosine() -> None:
    """CollectionSpec defaults to 768 dimensions and Cosine distance."""
    spec = CollectionSpec("x")
    assert (spec.dimension, spec.distance, spec.indexed_fields) == (768, "Cosine", ())


def _vector_memory(store_path: Path, name: str) -> str:
    """The engine's persisted placement of a collection's float32 originals."""
    config = json.loads((store_path / name / "shard" / "edge_config.json").read_text())
    return config["vectors"][""]["memory"]


@pytest.mark.parametrize(("on_disk", "memory"), [(True, "cold"), (False, "cached")])
async def test_originals_on_disk_unless_told(tmp_path: Path, on_disk: bool, memory: str) -> None:
    """vectors_on_disk (the default) leaves the originals in an mmap'd file read on demand
    (engine memory "cold"); off, they are prefetched into RAM ("cached"). Search works both
    ways, from the int8 copies rescored on the originals."""
    store = EdgeVectorStore(tmp_path / "vec", vectors_on_disk=on_disk)
    try:
        await store.create_collection(CollectionSpec("docs", dimension=DIM))
        await store.upsert("docs", [VectorPoint(f"d{i}", _basis(i), {}) for i in range(DIM)])
        await store.optimize("docs")
        assert _vector_memory(tmp_path / "vec", "docs") == memory
        assert [h.id for h in await store.search("docs", _basis(5), top_k=1)] == ["d5"]
    finally:
        await store.close()


async def test_create_existing_raises(store: EdgeVectorStore) -> None:
    """Creating a collection twice raises CollectionExists."""
    await store.create_collection(CollectionSpec("a", dimension=DIM))
    with pytest.raises(CollectionExists):
        await store.create_collection(CollectionSpec("a", dimension=DIM))


async def test_missing_collection_raises(store: EdgeVectorStore) -> None:
    """Every operation on an unknown collection raises CollectionNotFound."""
    with pytest.raises(CollectionNotFound):
        await store.get_collection("nope")
    with pytest.raises(CollectionNotFound):
        await store.delete_collection("nope")
    with pytest.raises(CollectionNotFound):
        await store.upsert("nope", [VectorPoint("x", _basis(0), {})])
    with pytest.raises(CollectionNotFound):
        await store.search("nope", _basis(0), top_k=1)


async def test_search_nearest_first_with_ids_and_payload(docs: EdgeVectorStore) -> None:
    """Search returns the nearest point first, with the original string id and payload."""
    query = _unit(np.array(_basis(3)) + 0.3 * np.array(_basis(5)))
    hits = await docs.search("docs", query, top_k=3)
    assert [h.id for h in hits[:2]] == ["doc-3", "doc-5"]
    assert hits[0].payload == {"lang": "de", "n": "3"}
    assert hits[0].score >= hits[1].score >= hits[2].score
    assert hits[0].score == pytest.approx(float(np.dot(query, _basis(3))), abs=1e-3)


async def test_score_threshold_drops_far_points(docs: EdgeVectorStore) -> None:
    """Hits below score_threshold are not returned."""
    hits = await docs.search("docs", _basis(2), top_k=10, score_threshold=0.5)
    assert [h.id for h in hits] == ["doc-2"]


async def test_payload_filter_matches_exactly(docs: EdgeVectorStore) -> None:
    """A filter on an indexed field returns only matching points, and count honours it."""
    hits = await docs.search("docs", _basis(3), top_k=5, filter={"lang": "en"})
    assert len(hits) == 5
    assert all(h.payload["lang"] == "en" for h in hits)
    assert "doc-3" not in {h.id for h in hits}
    assert await docs.count("docs", {"lang": "de"}) == DIM // 2
    assert await docs.count("docs", {"lang": "fr"}) == 0


async def test_filter_on_undeclared_field_raises(docs: EdgeVectorStore) -> None:
    """Filtering on a payload field not in indexed_fields raises UnindexedFilterField."""
    with pytest.raises(UnindexedFilterField):
        await docs.search("docs", _basis(0), top_k=1, filter={"n": "1"})
    with pytest.raises(UnindexedFilterField):
        await docs.count("docs", {"n": "1"})


async def test_wrong_dimension_raises(docs: EdgeVectorStore) -> None:
    """Vectors of the wrong length raise DimensionMismatch and write nothing."""
    good = VectorPoint("new-ok", _basis(0), {})
    bad = VectorPoint("new-bad", [1.0] * (DIM + 1), {})
    with pytest.raises(DimensionMismatch) as err:
        await docs.upsert("docs", [good, bad])
    assert (err.value.expected, err.value.got) == (DIM, DIM + 1)
    assert await docs.count("docs") == DIM
    with pytest.raises(DimensionMismatch):
        await docs.search("docs", [1.0] * 3, top_k=1)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
async def test_non_finite_values_raise(docs: EdgeVectorStore, value: float) -> None:
    """NaN or infinite components raise ValueError on upsert and search."""
    vec = _basis(0)
    vec[1] = value
    with pytest.raises(ValueError, match="NaN or infinite"):
        await docs.upsert("docs", [VectorPoint("x", vec, {})])
    with pytest.raises(ValueError, match="NaN or infinite"):
        await docs.search("docs", vec, top_k=1)
    assert await docs.count("docs") == DIM


async def test_upsert_same_id_replaces(docs: EdgeVectorStore) -> None:
    """Upserting an existing id replaces its vector and payload without adding a point."""
    await docs.upsert("docs", [VectorPoint("doc-0", _basis(7), {"lang": "fr"})])
    assert await docs.count("docs") == DIM
    hits = await docs.search("docs", _basis(7), top_k=2)
    assert {h.id for h in hits} == {"doc-0", "doc-7"}
    assert hits[0].score == pytest.approx(hits[1].score, abs=1e-3)
    assert await docs.count("docs", {"lang": "fr"}) == 1


async def test_delete_points(docs: EdgeVectorStore) -> None:
    """Delete removes points by string id and reports how many existed."""
    assert await docs.delete("docs", ["doc-1", "doc-2", "missing"]) == 2
    assert await docs.count("docs") == DIM - 2
    hits = await docs.search("docs", _basis(1), top_k=DIM)
    assert {"doc-1", "doc-2"}.isdisjoint(h.id for h in hits)


async def test_data_survives_reopen(tmp_path: Path) -> None:
    """Collections, points, payload indexes and specs survive closing and reopening."""
    path = tmp_path / "vec"
    s1 = EdgeVectorStore(path)
    spec = CollectionSpec("docs", dimension=DIM, indexed_fields=("lang",))
    await s1.create_collection(spec)
    await s1.upsert(
        "docs", [VectorPoint(f"d{i}", _basis(i), {"lang": str(i % 2)}) for i in range(4)]
    )
    await s1.close()
    with pytest.raises(RuntimeError):
        await s1.count("docs")

    s2 = EdgeVectorStore(path)
    try:
        assert await s2.list_collections() == [spec]
        assert await s2.count("docs") == 4
        assert await s2.count("docs", {"lang": "1"}) == 2
        hits = await s2.search("docs", _basis(2), top_k=1)
        assert (hits[0].id, hits[0].payload) == ("d2", {"lang": "0"})
    finally:
        await s2.close()


async def test_concurrent_searches_and_upserts(docs: EdgeVectorStore) -> None:
    """Concurrent searches and upserts on one collection all succeed."""
    writes = [
        docs.upsert("docs", [VectorPoint(f"c{i}", _basis(i % DIM), {"lang": "en"})])
        for i in range(20)
    ]
    reads = [docs.search("docs", _basis(i % DIM), top_k=3) for i in range(40)]
    results = await asyncio.gather(*writes, *reads)
    assert all(len(r) == 3 for r in results[20:])
    assert await docs.count("docs") == DIM + 20


def _clustered(n: int, dim: int, clusters: int, seed: int) -> np.ndarray:
    """Gaussian cluster centres plus per-point noise, normalised (like real embeddings)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    x = centres[rng.integers(0, clusters, n)]
    x = x + rng.normal(scale=1.0 / np.sqrt(dim), size=(n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


async def test_recall_after_optimize(tmp_path: Path) -> None:
    """After optimize the HNSW index is built and recall@10 vs exact search is >= 0.95."""
    n, dim, k = 5_000, 768, 10
    data = _clustered(n + 100, dim, clusters=100, seed=7)
    base, queries = data[:n], data[n:]
    store = EdgeVectorStore(tmp_path / "vec", auto_optimize_threshold=None)
    try:
        await store.create_collection(CollectionSpec("emb"))
        points = [VectorPoint(f"p{i}", base[i], {}) for i in range(n)]
        assert await store.upsert("emb", points) == n
        assert (await store.stats("emb"))["indexed_vectors"] == 0
        await store.optimize("emb")
        stats = await store.stats("emb")
        assert stats["indexed_vectors"] == n and stats["points"] == n

        exact = np.argsort(-(queries @ base.T), axis=1)[:, :k]
        recalls = []
        for q, truth in zip(queries, exact, strict=True):
            hits = await store.search("emb", q, top_k=k)
            found = {int(h.id[1:]) for h in hits}
            recalls.append(len(found & set(truth.tolist())) / k)
        assert float(np.mean(recalls)) >= 0.95
    finally:
        await store.close()


async def test_auto_optimize_after_large_upsert(tmp_path: Path) -> None:
    """An upsert reaching auto_optimize_threshold builds the index before returning."""
    data = _clustered(4_000, 768, clusters=20, seed=3)
    store = EdgeVectorStore(tmp_path / "vec", auto_optimize_threshold=4_000)
    try:
        await store.create_collection(CollectionSpec("emb"))
        await store.upsert("emb", [VectorPoint(f"p{i}", v, {}) for i, v in enumerate(data)])
        stats = await store.stats("emb")
        assert stats["indexed_vectors"] == 4_000 and stats["pending"] == 0
        hits = await store.search("emb", data[17], top_k=1)
        assert hits[0].id == "p17"
    finally:
        await store.close()
