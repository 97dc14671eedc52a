"""Ollama and OpenAI-compatible backends end to end through the gateway, against a local
server speaking their wire formats (NDJSON, SSE, JSON error bodies)."""

from __future__ import annotations

import copy
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from aiwfe.app.suite import Suite, start_suite
from aiwfe.cognitive.v1 import cognitive_service_pb2 as pb
from aiwfe.cognitive.v1 import cognitive_service_pb2_grpc as pb_grpc
from aiwfe.runtime.identity import IDENTITY_METADATA_KEY, InternalIdentity
from tests.cognitive.fake_llm import (
    FakeLLMServer,
    error,
    ndjson,
    ollama_routes,
    openai_routes,
    vector_for,
)
from tests.conftest import bearer, login


@pytest.fixture
async def fake() -> AsyncIterator[FakeLLMServer]:
    """A fake server that answers both Ollama and OpenAI paths."""
    server = await FakeLLMServer({**ollama_routes(), **openai_routes()}).start()
    yield server
    await server.stop()


async def _suite(base: dict[str, Any], cognitive: dict[str, Any]) -> Suite:
    overrides = copy.deepcopy(base)
    overrides["cognitive"] = cognitive
    return await start_suite(overrides)


def _backends(url: str) -> dict[str, Any]:
    return {
        "embedding": {
            "default": "builtin",
            "backends": {
                "builtin": {"kind": "builtin"},
                "oll": {"kind": "ollama", "url": url, "model": "nomic-embed-text"},
                "oai": {"kind": "openai", "url": f"{url}/v1", "model": "text-embedding-3-small"},
            },
        },
        "generation": {
            "default": "chat",
            "backends": {
                "chat": {"kind": "ollama", "url": url, "model": "llama3.2", "api": "chat"},
                "gen": {"kind": "ollama", "url": url, "model": "qwen", "api": "generate"},
                "oai": {"kind": "openai", "url": url, "model": "gpt-4o-mini"},
            },
        },
    }


@pytest.fixture
async def stub(
    base_overrides: dict[str, Any], fake: FakeLLMServer
) -> AsyncIterator[tuple[pb_grpc.CognitiveServiceStub, tuple, Suite]]:
    """A suite wired to the fake server, a gateway stub and an admin's bearer metadata."""
    suite = await _suite(base_overrides, _backends(fake.url))
    async with grpc.aio.insecure_channel(suite.address("gateway")) as channel:
        token = await login(channel)
        yield pb_grpc.CognitiveServiceStub(channel), bearer(token), suite
    await suite.stop()


async def _collect(call: Any) -> list[pb.GenerateResponse]:
    return [reply async for reply in call]


async def test_ollama_embed_batch_is_used_and_cached(stub, fake) -> None:
    """Embed with model=oll sends one /api/embed batch; a repeat is served from the cache."""
    cog, md, _ = stub
    texts = ["alpha", "be", "alpha"]
    reply = await cog.Embed(pb.EmbedRequest(texts=texts, model="oll"), metadata=md, timeout=10)
    assert reply.model == "ollama/nomic-embed-text"
    assert reply.dimension == 8
    assert [list(e.values) for e in reply.embeddings] == [
        pytest.approx(vector_for(t)) for t in texts
    ]
    embeds = [body for path, body in fake.requests if path == "/api/embed"]
    assert embeds == [{"model": "nomic-embed-text", "input": ["alpha", "be"]}]
    # Another request (the gateway's response cache keys on the whole request) for the same
    # texts: cognitive's content cache answers, the backend is not asked again.
    again = await cog.Embed(
        pb.EmbedRequest(texts=["be", "alpha"], model="oll"), metadata=md, timeout=10
    )
    assert again.cached_count == 2
    assert len([p for p, _ in fake.requests if p == "/api/embed"]) == 1


async def test_openai_embeddings_are_reordered_by_index(stub, fake) -> None:
    """OpenAI's data items are matched to inputs by their index, not by reply order."""
    cog, md, _ = stub
    texts = ["a", "bbb", "cc"]
    reply = await cog.Embed(
        pb.EmbedRequest(texts=texts, model="text-embedding-3-small"), metadata=md, timeout=10
    )
    assert reply.model == "openai/text-embedding-3-small"
    assert [e.values[0] for e in reply.embeddings] == [1.0, 3.0, 2.0]
    assert ("/v1/embeddings", {"model": "text-embedding-3-small", "input": texts}) in (
        fake.requests
    )


async def test_ollama_chat_streams_ndjson_tokens(stub, fake) -> None:
    """Generate relays Ollama /api/chat NDJSON pieces in order and ends with done."""
    cog, md, _ = stub
    replies = await _collect(
        cog.Generate(
            pb.GenerateRequest(prompt="Say hello", system="Be brief", temperature=0.5),
            metadata=md,
            timeout=10,
        )
    )
    assert "".join(r.text for r in replies) == "Hello world"
    assert [r.done for r in replies] == [False, False, False, True]
    assert {r.model for r in replies} == {"ollama/llama3.2"}
    path, body = fake.requests[-1]
    assert path == "/api/chat" and body["stream"] is True
    assert body["messages"] == [
        {"role": "system", "content": "Be brief"},
        {"role": "user", "content": "Say hello"},
    ]
    assert body["options"] == {"temperature": 0.5}


async def test_ollama_generate_api_streams(stub, fake) -> None:
    """A backend configured with api: generate uses /api/generate and its response pieces."""
    cog, md, _ = stub
    replies = await _collect(
        cog.Generate(pb.GenerateRequest(prompt="count", model="gen", max_tokens=7), metadata=md)
    )
    assert "".join(r.text for r in replies) == "One two"
    path, body = fake.requests[-1]
    assert path == "/api/generate"
    assert body["prompt"] == "count" and body["options"] == {"num_predict": 7}


async def test_openai_chat_streams_sse_until_done_marker(stub, fake) -> None:
    """Generate relays OpenAI SSE deltas, skipping keep-alives, until data: [DONE]."""
    cog, md, _ = stub
    replies = await _collect(
        cog.Generate(pb.GenerateRequest(prompt="hi", model="gpt-4o-mini"), metadata=md)
    )
    assert "".join(r.text for r in replies) == "Streamed!"
    assert replies[-1].done and replies[0].model == "openai/gpt-4o-mini"
    assert fake.requests[-1][0] == "/v1/chat/completions"


@pytest.mark.parametrize(
    ("status", "body", "code", "text"),
    [
        (404, {"error": "model 'llama3.2' not found, try pulling it first"},
         grpc.StatusCode.FAILED_PRECONDITION, "model 'llama3.2' not found"),
        (401, {"error": {"message": "Incorrect API key provided", "type": "auth"}},
         grpc.StatusCode.FAILED_PRECONDITION, "Incorrect API key provided"),
        (400, {"error": {"message": "prompt is too long", "type": "invalid_request_error"}},
         grpc.StatusCode.INVALID_ARGUMENT, "prompt is too long"),
        (500, {"error": "CUDA out of memory"}, grpc.StatusCode.UNAVAILABLE, "CUDA out of memory"),
    ],
)  # fmt: skip
async def test_backend_error_body_becomes_a_clear_status(
    stub, fake, status: int, body: dict, code: grpc.StatusCode, text: str
) -> None:
    """A backend's JSON error body surfaces in the status message with a fitting code."""
    cog, md, _ = stub
    fake.routes["/api/chat"] = error(status, body)
    fake.routes["/api/embed"] = error(status, body)
    with pytest.raises(grpc.aio.AioRpcError) as gen_err:
        await _collect(cog.Generate(pb.GenerateRequest(prompt="x"), metadata=md, timeout=10))
    with pytest.raises(grpc.aio.AioRpcError) as embed_err:
        await cog.Embed(pb.EmbedRequest(texts=["x"], model="oll"), metadata=md, timeout=10)
    for err in (gen_err.value, embed_err.value):
        assert err.code() == code
        assert text in err.details() and f"HTTP {status}" in err.details()


async def test_error_inside_a_stream_is_unavailable(stub, fake) -> None:
    """An Ollama stream that reports an error line mid-way ends UNAVAILABLE with its message."""
    cog, md, _ = stub
    fake.routes["/api/chat"] = lambda body: (
        200,
        "application/x-ndjson",
        ndjson({"message": {"content": "par"}, "done": False}, {"error": "runner crashed"}),
    )
    got: list[str] = []
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for reply in cog.Generate(pb.GenerateRequest(prompt="x"), metadata=md, timeout=10):
            got.append(reply.text)
    assert got == ["par"]
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "runner crashed" in err.value.details()


async def test_breaker_opens_after_five_failures_and_answers_at_once(stub, fake) -> None:
    """Five 503s open the backend's breaker: the sixth call is UNAVAILABLE without any HTTP."""
    _, _, suite = stub
    # Straight to cognitive: through the gateway, its retries and its own breaker for
    # cognitive would blur which breaker answered.
    channel = grpc.aio.insecure_channel(suite.address("cognitive"))
    cog = pb_grpc.CognitiveServiceStub(channel)
    md = ((IDENTITY_METADATA_KEY, InternalIdentity.from_settings(suite.settings).assertion(
        None, "test")),)  # fmt: skip
    fake.routes["/api/embed"] = error(503, {"error": "server overloaded"})
    for i in range(5):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await cog.Embed(pb.EmbedRequest(texts=[f"t{i}"], model="oll"), metadata=md)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    sent = len(fake.requests)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await cog.Embed(pb.EmbedRequest(texts=["t9"], model="oll"), metadata=md)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "circuit open" in err.value.details()
    assert len(fake.requests) == sent
    # Other backends keep working: one breaker per backend.
    ok = await cog.Embed(pb.EmbedRequest(texts=["t9"], model="oai"), metadata=md)
    assert ok.dimension == 8
    await channel.close()


async def test_backend_call_is_bounded_by_the_callers_deadline(stub, fake) -> None:
    """A backend that never answers costs the caller its own deadline, not the 30 s timeout."""
    _, _, suite = stub
    fake.stalled.add("/api/embed")
    md = ((IDENTITY_METADATA_KEY, InternalIdentity.from_settings(suite.settings).assertion(
        None, "test")),)  # fmt: skip
    async with grpc.aio.insecure_channel(suite.address("cognitive")) as channel:
        cog = pb_grpc.CognitiveServiceStub(channel)
        start = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await cog.Embed(pb.EmbedRequest(texts=["x"], model="oll"), metadata=md, timeout=1)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - start < 5


async def test_unreachable_backend_is_unavailable(base_overrides) -> None:
    """A backend URL where nothing listens answers UNAVAILABLE naming the backend."""
    closed = await FakeLLMServer({}).start()
    await closed.stop()  # the port is now closed
    suite = await _suite(base_overrides, _backends(closed.url))
    try:
        async with grpc.aio.insecure_channel(suite.address("gateway")) as channel:
            md = bearer(await login(channel))
            cog = pb_grpc.CognitiveServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await cog.Embed(pb.EmbedRequest(texts=["x"], model="oll"), metadata=md)
    finally:
        await suite.stop()
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "'oll'" in err.value.details() and "unreachable" in err.value.details()


async def test_generate_without_llm_explains_how_to_configure(suite, gateway_channel) -> None:
    """With no generation backend configured, Generate is FAILED_PRECONDITION with the recipe."""
    md = bearer(await login(gateway_channel))
    cog = pb_grpc.CognitiveServiceStub(gateway_channel)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _collect(cog.Generate(pb.GenerateRequest(prompt="hi"), metadata=md, timeout=10))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "cognitive.generation.backends" in err.value.details()
    assert "AIWFE_COGNITIVE__GENERATION__BACKENDS" in err.value.details()


async def test_generate_with_context_cites_hits_on_first_message(stub, fake) -> None:
    """Grounded Generate retrieves chunks, puts them in the prompt and cites them first."""
    cog, md, _ = stub
    await cog.IndexDocuments(
        pb.IndexDocumentsRequest(
            collection="kb",
            documents=[
                pb.Document(id="oven", text="Bake sourdough bread at 250 degrees in the oven."),
                pb.Document(id="tax", text="File your tax return before the April deadline."),
            ],
        ),
        metadata=md,
        timeout=10,
    )
    replies = await _collect(
        cog.Generate(
            pb.GenerateRequest(
                prompt="how hot to bake bread?", context_collection="kb", context_top_k=1
            ),
            metadata=md,
            timeout=10,
        )
    )
    assert list(replies[0].citations) == ["oven#0"]
    assert all(not r.citations for r in replies[1:])
    prompt = fake.requests[-1][1]["messages"][-1]["content"]
    assert "[oven#0] Bake sourdough bread" in prompt and "how hot to bake bread?" in prompt
    assert "tax return" not in prompt


async def test_generate_bad_input_lists_field_violations(stub) -> None:
    """Empty prompt, out-of-range knobs and an unknown model are rejected before any backend."""
    cog, md, _ = stub
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _collect(
            cog.Generate(
                pb.GenerateRequest(prompt="", max_tokens=-1, temperature=3, context_top_k=50),
                metadata=md,
            )
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    for name in ("prompt", "max_tokens", "temperature", "context_top_k"):
        assert name in err.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _collect(cog.Generate(pb.GenerateRequest(prompt="x", model="nope"), metadata=md))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "chat, gen, oai" in err.value.details()
