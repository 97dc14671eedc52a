"""VectorStoreService over gRPC on the embedded engine: collections, points, filtered search,
and precise statuses with field violations for bad input."""

from __future__ import annotations

import math
import uuid

import grpc
import numpy as np
import pytest

from aiwfe.data.v1 import vector_store_service_pb2 as pb
from aiwfe.data.v1 import vector_store_service_pb2_grpc as pb_grpc
from aiwfe.runtime.metrics import REGISTRY
from dataplatform.vectors import EdgeVectorStore
from dataplatform.vectors.host import HostedVectorStore
from tests.conftest import field_violations

DIM = 8


def unit(i: int, dim: int = DIM) -> list[float]:
    v = np.full(dim, 0.01)
    v[i % dim] = 1.0
    return (v / np.linalg.norm(v)).tolist()


@pytest.fixture
def stub(data_channel: grpc.aio.Channel) -> pb_grpc.VectorStoreServiceStub:
    return pb_grpc.VectorStoreServiceStub(data_channel)


@pytest.fixture
async def docs(stub, internal_md) -> str:
    """A collection of DIM points, `document_id` and `lang` indexed."""
    name = f"docs-{uuid.uuid4().hex[:8]}"
    await stub.CreateCollection(
        pb.CreateCollectionRequest(
            collection=pb.Collection(
                name=name, dimension=DIM, indexed_fields=["document_id", "lang"]
            )
        ),
        metadata=internal_md,
        timeout=10,
    )
    points = [
        pb.Point(
            id=f"d{i // 2}:{i % 2}",
            values=unit(i),
            payload={"document_id": f"d{i // 2}", "lang": "en" if i < 4 else "de", "text": f"t{i}"},
        )
        for i in range(DIM)
    ]
    reply = await stub.UpsertPoints(
        pb.UpsertPointsRequest(collection=name, points=points), metadata=internal_md, timeout=10
    )
    assert reply.upserted == DIM
    return name


async def expect_error(call, code: grpc.StatusCode) -> dict[str, str]:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    assert info.value.code() == code, info.value.details()
    return field_violations(info.value) if code == grpc.StatusCode.INVALID_ARGUMENT else {}


async def test_collection_defaults_come_from_the_seed(stub, internal_md) -> None:
    """A collection created with only a name is 768-d Cosine, and Get/List describe it."""
    name = f"seed-{uuid.uuid4().hex[:8]}"
    created = await stub.CreateCollection(
        pb.CreateCollectionRequest(collection=pb.Collection(name=name)), metadata=internal_md
    )
    assert (created.collection.dimension, created.collection.distance) == (768, "Cosine")
    got = await stub.GetCollection(pb.GetCollectionRequest(name=name), metadata=internal_md)
    assert got.collection.point_count == 0
    listed = await stub.ListCollections(pb.ListCollectionsRequest(), metadata=internal_md)
    assert name in [c.name for c in listed.collections]
    await stub.DeleteCollection(pb.DeleteCollectionRequest(name=name), metadata=internal_md)
    await expect_error(
        stub.GetCollection(pb.GetCollectionRequest(name=name), metadata=internal_md),
        grpc.StatusCode.NOT_FOUND,
    )


async def test_search_filter_threshold_count_and_delete(stub, internal_md, docs) -> None:
    """Nearest first with payload back; filters, score threshold, counts and deletes apply."""
    hits = (
        await stub.SearchPoints(
            pb.SearchPointsRequest(collection=docs, vector=unit(3), top_k=3),
            metadata=internal_md,
        )
    ).hits
    assert hits[0].id == "d1:1"
    assert hits[0].payload["text"] == "t3"
    assert hits[0].score == pytest.approx(1.0, abs=1e-3)
    filtered = await stub.SearchPoints(
        pb.SearchPointsRequest(collection=docs, vector=unit(3), top_k=8, filter={"lang": "de"}),
        metadata=internal_md,
    )
    assert {h.payload["lang"] for h in filtered.hits} == {"de"}
    assert len(filtered.hits) == 4
    strict = await stub.SearchPoints(
        pb.SearchPointsRequest(
            collection=docs, vector=unit(3), top_k=8, score_threshold=0.9, has_score_threshold=True
        ),
        metadata=internal_md,
    )
    assert [h.id for h in strict.hits] == ["d1:1"]
    count = await stub.CountPoints(
        pb.CountPointsRequest(collection=docs, filter={"document_id": "d1"}), metadata=internal_md
    )
    assert count.count == 2
    deleted = await stub.DeletePoints(
        pb.DeletePointsRequest(collection=docs, ids=["d1:0", "d1:1", "missing"]),
        metadata=internal_md,
    )
    assert deleted.deleted == 2
    count = await stub.CountPoints(
        pb.CountPointsRequest(collection=docs, filter={"document_id": "d1"}), metadata=internal_md
    )
    assert count.count == 0
    got = await stub.GetCollection(pb.GetCollectionRequest(name=docs), metadata=internal_md)
    assert got.collection.point_count == DIM - 2
    assert REGISTRY.get_sample_value("qdrant_query_latency_count", {"operation": "search"}) >= 3


async def test_unknown_and_existing_collections(stub, internal_md, docs) -> None:
    """Unknown collection → NOT_FOUND on every RPC; a taken name → ALREADY_EXISTS."""
    missing = f"missing-{uuid.uuid4().hex[:8]}"
    for call in (
        stub.GetCollection(pb.GetCollectionRequest(name=missing), metadata=internal_md),
        stub.DeleteCollection(pb.DeleteCollectionRequest(name=missing), metadata=internal_md),
        stub.UpsertPoints(
            pb.UpsertPointsRequest(collection=missing, points=[pb.Point(id="a", values=unit(0))]),
            metadata=internal_md,
        ),
        stub.DeletePoints(
            pb.DeletePointsRequest(collection=missing, ids=["a"]), metadata=internal_md
        ),
        stub.SearchPoints(
            pb.SearchPointsRequest(collection=missing, vector=unit(0), top_k=1),
            metadata=internal_md,
        ),
        stub.CountPoints(pb.CountPointsRequest(collection=missing), metadata=internal_md),
    ):
        await expect_error(call, grpc.StatusCode.NOT_FOUND)
    await expect_error(
        stub.CreateCollection(
            pb.CreateCollectionRequest(collection=pb.Collection(name=docs, dimension=DIM)),
            metadata=internal_md,
        ),
        grpc.StatusCode.ALREADY_EXISTS,
    )


async def test_bad_vectors_and_batches_are_invalid_argument(stub, internal_md, docs) -> None:
    """Wrong dimension, NaN, inf, zero vectors and oversized batches name the exact field;
    nothing of a rejected batch is written."""
    bad = [
        pb.Point(id="ok", values=unit(0)),
        pb.Point(id="short", values=[1.0] * (DIM - 1)),
        pb.Point(id="nan", values=[math.nan] + [1.0] * (DIM - 1)),
        pb.Point(id="inf", values=[math.inf] + [1.0] * (DIM - 1)),
        pb.Point(id="zero", values=[0.0] * DIM),
        pb.Point(id="", values=unit(0), payload={"_aiwfe_id": "x"}),
    ]
    v = await expect_error(
        stub.UpsertPoints(
            pb.UpsertPointsRequest(collection=docs, points=bad), metadata=internal_md
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert v["points[1].values"] == f"must have {DIM} values (got {DIM - 1})"
    assert "finite" in v["points[2].values"]
    assert "finite" in v["points[3].values"]
    assert "zeros" in v["points[4].values"]
    assert v["points[5].id"] == "must not be empty"
    assert "reserved" in v["points[5].payload._aiwfe_id"]
    assert "points[0].values" not in v
    count = await stub.CountPoints(pb.CountPointsRequest(collection=docs), metadata=internal_md)
    assert count.count == DIM
    big = [pb.Point(id=str(i), values=unit(i)) for i in range(1001)]
    v = await expect_error(
        stub.UpsertPoints(
            pb.UpsertPointsRequest(collection=docs, points=big), metadata=internal_md
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert "1 to 1000" in v["points"]
    v = await expect_error(
        stub.SearchPoints(
            pb.SearchPointsRequest(
                collection=docs,
                vector=[math.nan] * DIM,
                top_k=0,
                score_threshold=math.inf,
                has_score_threshold=True,
            ),
            metadata=internal_md,
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert set(v) == {"vector", "top_k", "score_threshold"}


async def test_bad_names_and_unindexed_filters(stub, internal_md, docs) -> None:
    """Bad collection names, bad shapes and filters on unindexed fields are INVALID_ARGUMENT."""
    v = await expect_error(
        stub.CreateCollection(
            pb.CreateCollectionRequest(
                collection=pb.Collection(
                    name="../etc", dimension=-1, distance="Hamming", indexed_fields=["a", "a", ""]
                )
            ),
            metadata=internal_md,
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert {"collection.name", "collection.dimension", "collection.distance"} <= set(v)
    assert v["collection.indexed_fields"] == "must be unique"
    assert v["collection.indexed_fields[2]"] == "must not be empty"
    v = await expect_error(
        stub.CountPoints(
            pb.CountPointsRequest(collection=docs, filter={"text": "t1"}), metadata=internal_md
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert v == {"filter.text": "is not an indexed field of this collection"}
    v = await expect_error(
        stub.SearchPoints(
            pb.SearchPointsRequest(collection=docs, vector=unit(0), top_k=1, filter={"text": "x"}),
            metadata=internal_md,
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert "filter.text" in v
    v = await expect_error(
        stub.GetCollection(pb.GetCollectionRequest(name="a b"), metadata=internal_md),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert "name" in v


async def test_vector_rpcs_require_internal_identity(stub) -> None:
    """Without the gateway-signed assertion the vector RPCs answer UNAUTHENTICATED."""
    await expect_error(
        stub.ListCollections(pb.ListCollectionsRequest()), grpc.StatusCode.UNAUTHENTICATED
    )


async def test_performance_settings_reach_the_embedded_store(base_overrides, tmp_path) -> None:
    """qdrant.performance's vectors_on_disk, hnsw_ef, oversampling and
    release_originals_every configure the store the service opens; defaults: originals on
    disk, ef 200, oversampling 2, their mapped pages given back every 256 searches (never when
    the originals are in RAM: there is nothing to give back)."""
    import json

    from aiwfe.runtime.config import ConfigError, load_settings
    from dataplatform.vector_service import VectorService, index_options

    defaults = load_settings(env={}, overrides=base_overrides).qdrant.performance
    assert (defaults.vectors_on_disk, defaults.hnsw_ef, defaults.oversampling) == (True, 200, 2)
    assert defaults.release_originals_every == 256
    on_disk = VectorService(load_settings(env={}, overrides=base_overrides).qdrant, tmp_path)
    assert isinstance(on_disk.store, HostedVectorStore)  # the engine in its own process
    assert on_disk.store.options["release_originals_every"] == 256
    await on_disk.close()
    perf = {
        "vectors_on_disk": False,
        "hnsw_ef": 64,
        "oversampling": 3,
        "release_originals_every": 5,
    }
    overrides = {**base_overrides, "qdrant": {"performance": perf}}
    settings = load_settings(env={}, overrides=overrides)
    assert index_options(settings.qdrant.performance) == {
        "hnsw_m": 16,
        "ef_construct": 100,
        "quantization": True,
        **perf,
    }
    service = VectorService(settings.qdrant, settings.home_path)
    try:
        assert isinstance(service.store, HostedVectorStore)
        edge = EdgeVectorStore(tmp_path / "options", **service.store.options)
        params = edge._search_params()
        assert (params.hnsw_ef, params.quantization.oversampling) == (64, 3.0)
        assert edge._release_every is None
        collection = pb.Collection(name="perf", dimension=DIM)
        await service.CreateCollection(pb.CreateCollectionRequest(collection=collection), None)
        shard = settings.home_path / "qdrant" / "perf" / "shard"
        config = json.loads((shard / "edge_config.json").read_text())
        assert config["vectors"][""]["memory"] == "cached"
    finally:
        await service.close()
    for bad in ({"hnsw_ef": 0}, {"oversampling": 0.5}, {"release_originals_every": 0}):
        with pytest.raises(ConfigError, match=r"qdrant\.performance"):
            load_settings(env={}, overrides={**base_overrides, "qdrant": {"performance": bad}})


@pytest.mark.filterwarnings("ignore:.*local Qdrant:UserWarning", "ignore:Local mode:UserWarning")
async def test_servicer_runs_unchanged_on_the_server_store(base_overrides) -> None:
    """The same servicer on QdrantServerStore (qdrant-client local mode: its calls, not the
    wire) validates, writes, filters and maps NOT_FOUND identically."""
    from qdrant_client import AsyncQdrantClient

    from aiwfe.runtime.config import load_settings
    from aiwfe.runtime.errors import InvalidArgument, NotFound
    from dataplatform.vector_service import VectorService
    from dataplatform.vectors import QdrantServerStore

    settings = load_settings(env={}, overrides=base_overrides)
    store = QdrantServerStore("unused", client=AsyncQdrantClient(location=":memory:"))
    service = VectorService(settings.qdrant, settings.home_path, store=store)
    try:
        collection = pb.Collection(name="srv", dimension=DIM, indexed_fields=["document_id"])
        await service.CreateCollection(pb.CreateCollectionRequest(collection=collection), None)
        points = [
            pb.Point(id=f"p{i}", values=unit(i), payload={"document_id": f"d{i % 2}"})
            for i in range(DIM)
        ]
        await service.UpsertPoints(pb.UpsertPointsRequest(collection="srv", points=points), None)
        count = await service.CountPoints(
            pb.CountPointsRequest(collection="srv", filter={"document_id": "d1"}), None
        )
        assert count.count == DIM // 2
        hits = await service.SearchPoints(
            pb.SearchPointsRequest(collection="srv", vector=unit(5), top_k=1), None
        )
        assert hits.hits[0].id == "p5"
        with pytest.raises(InvalidArgument) as info:
            await service.CountPoints(
                pb.CountPointsRequest(collection="srv", filter={"x": "y"}), None
            )
        assert info.value.violations == [("filter.x", "is not an indexed field of this collection")]
        with pytest.raises(NotFound):
            await service.CountPoints(pb.CountPointsRequest(collection="nope"), None)
    finally:
        await service.close()
