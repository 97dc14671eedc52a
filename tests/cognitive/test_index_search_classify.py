"""IndexDocuments, Search and Classify end to end through the gateway, on dataplatform's real
vector store: chunking, idempotent re-indexing, filters, thresholds, permissions, bad input."""

from __future__ import annotations

import time

import grpc
import pytest

from aiwfe.cognitive.v1 import cognitive_service_pb2 as pb
from aiwfe.cognitive.v1 import cognitive_service_pb2_grpc as pb_grpc
from aiwfe.data.v1 import user_store_service_pb2 as user_pb
from aiwfe.data.v1 import user_store_service_pb2_grpc as user_grpc
from aiwfe.data.v1 import vector_store_service_pb2 as vs_pb
from aiwfe.data.v1 import vector_store_service_pb2_grpc as vs_grpc
from aiwfe.runtime.identity import IDENTITY_METADATA_KEY, InternalIdentity
from aiwfe.runtime.passwords import hash_password
from tests.conftest import bearer, field_violations, login

DOCS = [
    pb.Document(
        id="bread",
        text="Knead the sourdough bread dough, let it rise, then bake the loaf in a hot oven.",
        metadata={"topic": "baking", "lang": "en"},
    ),
    pb.Document(
        id="marathon",
        text="Marathon runners build endurance with long slow runs and interval training.",
        metadata={"topic": "running", "lang": "en"},
    ),
    pb.Document(
        id="tomatoes",
        text="Plant tomato seedlings after the last frost and water the garden soil deeply.",
        metadata={"topic": "gardening", "lang": "en"},
    ),
]


def _internal(suite) -> tuple[tuple[str, str], ...]:
    identity = InternalIdentity.from_settings(suite.settings)
    return ((IDENTITY_METADATA_KEY, identity.assertion(None, "test")),)


async def _points(suite, collection: str, document_id: str) -> int:
    async with grpc.aio.insecure_channel(suite.address("dataplatform")) as channel:
        reply = await vs_grpc.VectorStoreServiceStub(channel).CountPoints(
            vs_pb.CountPointsRequest(collection=collection, filter={"document_id": document_id}),
            metadata=_internal(suite),
            timeout=5,
        )
    return reply.count


@pytest.fixture
async def admin(suite, gateway_channel):
    """A gateway stub and an admin's bearer metadata."""
    return pb_grpc.CognitiveServiceStub(gateway_channel), bearer(await login(gateway_channel))


async def test_index_then_search_finds_the_relevant_document(suite, admin) -> None:
    """Indexed documents are found by meaning-bearing words, with text, metadata and score."""
    cog, md = admin
    reply = await cog.IndexDocuments(
        pb.IndexDocumentsRequest(collection="kb1", documents=DOCS), metadata=md, timeout=10
    )
    assert (reply.document_count, reply.chunk_count) == (3, 3)
    found = await cog.Search(
        pb.SearchRequest(collection="kb1", query="how long should bread dough rise before baking"),
        metadata=md,
        timeout=10,
    )
    assert found.model.startswith("aiwfe-hashing")
    top = found.hits[0]
    assert (top.document_id, top.chunk_id) == ("bread", "bread#0")
    assert top.text == DOCS[0].text
    assert dict(top.metadata) == {"topic": "baking", "lang": "en"}
    assert 0 < top.score <= 1.0
    assert [h.score for h in found.hits] == sorted((h.score for h in found.hits), reverse=True)


async def test_search_filter_and_threshold(suite, admin) -> None:
    """A metadata filter restricts hits; a score threshold drops weak ones; top_k caps them."""
    cog, md = admin
    await cog.IndexDocuments(
        pb.IndexDocumentsRequest(collection="kb2", documents=DOCS), metadata=md, timeout=10
    )
    filtered = await cog.Search(
        pb.SearchRequest(collection="kb2", query="bread dough", filter={"topic": "running"}),
        metadata=md,
    )
    assert [h.document_id for h in filtered.hits] == ["marathon"]
    strict = await cog.Search(
        pb.SearchRequest(collection="kb2", query="bread dough", score_threshold=0.2),
        metadata=md,
    )
    assert [h.document_id for h in strict.hits] == ["bread"]
    one = await cog.Search(pb.SearchRequest(collection="kb2", query="soil", top_k=1), metadata=md)
    assert len(one.hits) == 1


async def test_long_documents_are_chunked_with_overlap_and_reindex_is_idempotent(
    suite, admin
) -> None:
    """A long text becomes overlapping chunks `{id}#{n}`; re-indexing shorter deletes stale ones."""
    cog, md = admin
    words = [f"word{i}" for i in range(600)]  # ~4,700 characters: several 1,000-char chunks
    long_doc = pb.Document(id="long", text=" ".join(words), metadata={"topic": "x"})
    first = await cog.IndexDocuments(
        pb.IndexDocumentsRequest(collection="kb3", documents=[long_doc, DOCS[0]]), metadata=md
    )
    assert first.chunk_count >= 6
    chunks = first.chunk_count - 1
    assert await _points(suite, "kb3", "long") == chunks
    hit = await cog.Search(
        pb.SearchRequest(collection="kb3", query="word599", filter={"document_id": "long"}),
        metadata=md,
    )
    assert hit.hits[0].chunk_id == f"long#{chunks - 1}"
    # Neighbouring chunks overlap: the end of chunk 0 reappears at the start of chunk 1.
    all_hits = await cog.Search(
        pb.SearchRequest(
            collection="kb3", query="word1", top_k=100, filter={"document_id": "long"}
        ),
        metadata=md,
    )
    texts = {h.chunk_id: h.text for h in all_hits.hits}
    assert texts["long#0"].split()[-1] in texts["long#1"].split()[:40]
    # Same call again: nothing duplicated.
    await cog.IndexDocuments(
        pb.IndexDocumentsRequest(collection="kb3", documents=[long_doc]), metadata=md
    )
    assert await _points(suite, "kb3", "long") == chunks
    # Re-index shorter: the chunks beyond the new count are deleted.
    short = pb.Document(id="long", text="now it is short", metadata={"topic": "x"})
    again = await cog.IndexDocuments(
        pb.IndexDocumentsRequest(collection="kb3", documents=[short]), metadata=md
    )
    assert again.chunk_count == 1
    assert await _points(suite, "kb3", "long") == 1
    assert await _points(suite, "kb3", "bread") == 1


async def test_collection_is_created_with_indexed_metadata_fields(suite, admin) -> None:
    """First use creates a 768-d cosine collection indexing document_id and the metadata keys."""
    cog, md = admin
    await cog.IndexDocuments(
        pb.IndexDocumentsRequest(collection="kb4", documents=DOCS[:1]), metadata=md
    )
    async with grpc.aio.insecure_channel(suite.address("dataplatform")) as channel:
        reply = await vs_grpc.VectorStoreServiceStub(channel).GetCollection(
            vs_pb.GetCollectionRequest(name="kb4"), metadata=_internal(suite), timeout=5
        )
    assert reply.collection.dimension == 768
    assert reply.collection.distance == "Cosine"
    assert set(reply.collection.indexed_fields) == {"document_id", "topic", "lang"}


async def test_index_requires_cognitive_index_permission(suite, gateway_channel) -> None:
    """A `user` may search (cognitive:inference) a collection shared with it but not index
    (cognitive:index, admin only)."""
    name = f"user{time.time_ns()}"
    async with grpc.aio.insecure_channel(suite.address("dataplatform")) as channel:
        await user_grpc.UserStoreServiceStub(channel).CreateUser(
            user_pb.CreateUserRequest(
                username=name, password_hash=hash_password("user-password-12"), roles=["user"]
            ),
            metadata=_internal(suite),
            timeout=5,
        )
    md = bearer(await login(gateway_channel, name, "user-password-12"))
    cog = pb_grpc.CognitiveServiceStub(gateway_channel)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await cog.IndexDocuments(
            pb.IndexDocumentsRequest(collection="kb5", documents=DOCS), metadata=md, timeout=5
        )
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "cognitive:index" in err.value.details()
    admin_md = bearer(await login(gateway_channel))
    await cog.IndexDocuments(
        pb.IndexDocumentsRequest(collection="kb5", documents=DOCS), metadata=admin_md
    )
    await cog.ShareCollection(
        pb.ShareCollectionRequest(collection="kb5", grant=pb.CollectionGrant(username=name)),
        metadata=admin_md,
    )
    found = await cog.Search(pb.SearchRequest(collection="kb5", query="tomato"), metadata=md)
    assert found.hits[0].document_id == "tomatoes"


async def test_index_bad_input_lists_every_violation(suite, admin) -> None:
    """Bad collection name, duplicate ids, empty text, reserved/invalid metadata keys → fields."""
    cog, md = admin
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await cog.IndexDocuments(
            pb.IndexDocumentsRequest(
                collection="bad name!",
                documents=[
                    pb.Document(id="a", text="fine"),
                    pb.Document(id="a", text=""),
                    pb.Document(id="", text="x", metadata={"text": "v", "9bad": "v"}),
                ],
            ),
            metadata=md,
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    fields = field_violations(err.value)
    assert set(fields) >= {
        "collection",
        "documents[1].id",
        "documents[1].text",
        "documents[2].id",
        "documents[2].metadata['text']",
        "documents[2].metadata['9bad']",
    }
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await cog.IndexDocuments(pb.IndexDocumentsRequest(collection="c"), metadata=md)
    assert "documents" in field_violations(err.value)
    too_many = [pb.Document(id=str(i), text="x") for i in range(257)]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await cog.IndexDocuments(
            pb.IndexDocumentsRequest(collection="c", documents=too_many), metadata=md
        )
    assert "257" in field_violations(err.value)["documents"]
    huge = pb.Document(id="h", text="y" * 200_001)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await cog.IndexDocuments(
            pb.IndexDocumentsRequest(collection="c", documents=[huge]), metadata=md
        )
    assert "documents[0].text" in field_violations(err.value)


async def test_search_bad_input_and_unknown_collection(suite, admin) -> None:
    """top_k out of range, empty query, unknown collection and unindexed filter are precise."""
    cog, md = admin
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await cog.Search(
            pb.SearchRequest(collection="kb6", query="", top_k=101, score_threshold=2),
            metadata=md,
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert set(field_violations(err.value)) == {"query", "top_k", "score_threshold"}
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await cog.Search(pb.SearchRequest(collection="nope", query="x"), metadata=md)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert "'nope'" in err.value.details()
    await cog.IndexDocuments(
        pb.IndexDocumentsRequest(collection="kb6", documents=DOCS[:1]), metadata=md
    )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await cog.Search(
            pb.SearchRequest(collection="kb6", query="x", filter={"colour": "red"}), metadata=md
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not indexed" in field_violations(err.value)["filter['colour']"]


async def test_embed_bad_input_and_unknown_model(suite, admin) -> None:
    """Too many texts, an empty or over-long text and an unknown model name are rejected."""
    cog, md = admin
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await cog.Embed(pb.EmbedRequest(texts=["x"] * 257), metadata=md)
    assert "texts" in field_violations(err.value)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await cog.Embed(pb.EmbedRequest(texts=["ok", "", "z" * 32769]), metadata=md)
    assert set(field_violations(err.value)) == {"texts[1]", "texts[2]"}
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await cog.Embed(pb.EmbedRequest(texts=["x"], model="gpt-17"), metadata=md)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "builtin" in field_violations(err.value)["model"]


async def test_classify_ranks_labels_by_similarity(suite, admin) -> None:
    """Labels are ranked by similarity to the text; examples pull their label's score."""
    cog, md = admin
    reply = await cog.Classify(
        pb.ClassifyRequest(
            text="my sourdough loaf did not rise in the oven",
            labels=["gardening", "baking bread", "running"],
        ),
        metadata=md,
    )
    assert reply.labels[0].label == "baking bread"
    assert len(reply.labels) == 3
    assert reply.labels[0].score >= reply.labels[1].score >= reply.labels[2].score
    # With examples, a label whose name shares nothing with the text can still win.
    with_examples = await cog.Classify(
        pb.ClassifyRequest(
            text="the marathon training plan has interval runs",
            labels=["sport", "food"],
            examples=[
                pb.LabelExample(label="sport", text="interval training for a marathon runner"),
                pb.LabelExample(label="food", text="bake bread with sourdough starter"),
            ],
        ),
        metadata=md,
    )
    assert [s.label for s in with_examples.labels] == ["sport", "food"]


async def test_classify_bad_input(suite, admin) -> None:
    """One label, duplicate labels, and examples for unknown labels are field violations."""
    cog, md = admin
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await cog.Classify(pb.ClassifyRequest(text="x", labels=["only"]), metadata=md)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "labels" in field_violations(err.value)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await cog.Classify(
            pb.ClassifyRequest(
                text="",
                labels=["a", "a"],
                examples=[pb.LabelExample(label="b", text="t")],
            ),
            metadata=md,
        )
    assert set(field_violations(err.value)) == {"text", "labels", "examples[0].label"}
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await cog.Classify(pb.ClassifyRequest(text="x", labels=[]), metadata=md)
    assert "labels" in field_violations(err.value)
