"""The seed's multi-layer embedding cache on real Redis and PostgreSQL: L1 → L2 → L3 with
backfill, single flight, bypass, per-layer metrics, and Redis being down."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import pytest
import redis.asyncio as aioredis

from aiwfe.app.suite import Suite, start_suite
from aiwfe.cognitive.v1 import cognitive_service_pb2 as pb
from aiwfe.cognitive.v1 import cognitive_service_pb2_grpc as pb_grpc
from aiwfe.runtime.identity import IDENTITY_METADATA_KEY, InternalIdentity
from aiwfe.runtime.metrics import REGISTRY
from cognitive.service import CognitiveService


def _hits(layer: str, result: str) -> float:
    value = REGISTRY.get_sample_value(
        "redis_cache_hit_rate_total", {"cache": "cognitive", "layer": layer, "result": result}
    )
    return value or 0.0


async def _start(base: dict[str, Any], redis_url: str) -> Suite:
    overrides = copy.deepcopy(base)
    overrides["redis"]["url"] = redis_url
    return await start_suite(overrides, only=("dataplatform", "cognitive"))


@pytest.fixture
async def cognitive(
    base_overrides, redis_url
) -> AsyncIterator[tuple[Any, tuple, CognitiveService]]:
    """Cognitive and dataplatform with Redis: a direct stub, internal metadata, the service."""
    suite = await _start(base_overrides, redis_url)
    md = ((IDENTITY_METADATA_KEY, InternalIdentity.from_settings(suite.settings).assertion(
        None, "test")),)  # fmt: skip
    async with grpc.aio.insecure_channel(suite.address("cognitive")) as channel:
        service = suite.running["cognitive"].service
        assert isinstance(service, CognitiveService)
        yield pb_grpc.CognitiveServiceStub(channel), md, service
    await suite.stop()


@contextlib.contextmanager
def _gated_backend(
    service: CognitiveService,
) -> Iterator[tuple[list[list[str]], asyncio.Event]]:
    """The default embedding backend made to record each call and wait for the gate;
    restored on exit."""
    backend = service.backends.default_embedding
    calls: list[list[str]] = []
    gate = asyncio.Event()
    original = backend.embed

    async def gated(texts):
        calls.append(list(texts))
        await gate.wait()
        return await original(texts)

    backend.embed = gated  # type: ignore[method-assign]
    try:
        yield calls, gate
    finally:
        backend.embed = original  # type: ignore[method-assign]


def _key(service: CognitiveService, text: str) -> str:
    model = service.backends.default_embedding.model
    return service.cache.key({"model": model, "text": text})


async def test_lower_layers_answer_and_backfill_upper_ones(cognitive, redis_url) -> None:
    """A miss fills L1, L2 and L3; L2 then L3 answer when the layers above forget it."""
    cog, md, service = cognitive
    text = f"layered cache probe {time.time_ns()}"
    key = _key(service, text)
    redis_key = service.redis.key(key)
    first = await cog.Embed(pb.EmbedRequest(texts=[text]), metadata=md, timeout=10)
    assert first.cached_count == 0
    client = aioredis.Redis.from_url(redis_url)
    try:
        ttl = await client.ttl(redis_key)
        assert 1790 <= ttl <= 1800  # seed: cognitive_cache ttl 1800 s
        # L1 hit.
        l1 = _hits("l1", "hit")
        assert (await cog.Embed(pb.EmbedRequest(texts=[text]), metadata=md)).cached_count == 1
        assert _hits("l1", "hit") == l1 + 1
        # L1 forgotten: Redis answers and L1 is backfilled.
        service.cache._l1.clear()
        l2 = _hits("l2", "hit")
        again = await cog.Embed(pb.EmbedRequest(texts=[text]), metadata=md)
        assert again.cached_count == 1 and _hits("l2", "hit") == l2 + 1
        assert list(again.embeddings[0].values) == list(first.embeddings[0].values)
        assert service.cache._l1.get(key) is not None
        # L1 and L2 forgotten: PostgreSQL answers and both upper layers are backfilled.
        service.cache._l1.clear()
        await client.delete(redis_key)
        l3 = _hits("l3", "hit")
        third = await cog.Embed(pb.EmbedRequest(texts=[text]), metadata=md)
        assert third.cached_count == 1 and _hits("l3", "hit") == l3 + 1
        assert await client.exists(redis_key) == 1
        assert service.cache._l1.get(key) is not None
    finally:
        await client.aclose()


async def test_concurrent_identical_misses_compute_once(cognitive) -> None:
    """Eight concurrent Embeds of one new text call the backend once and get one vector."""
    cog, md, service = cognitive
    with _gated_backend(service) as (calls, gate):
        text = f"single flight probe {time.time_ns()}"
        misses = _hits("l1", "miss")
        tasks = [
            asyncio.ensure_future(cog.Embed(pb.EmbedRequest(texts=[text]), metadata=md, timeout=10))
            for _ in range(8)
        ]
        # Release the computation only once all eight requests have missed L1 and are waiting.
        for _ in range(500):
            if _hits("l1", "miss") >= misses + 8:
                break
            await asyncio.sleep(0.01)
        gate.set()
        replies = await asyncio.gather(*tasks)
    assert calls == [[text]]
    assert len({tuple(r.embeddings[0].values) for r in replies}) == 1


async def test_bypass_recomputes_and_refreshes(cognitive) -> None:
    """bypass_cache computes afresh (cached_count 0) even when every layer holds the text."""
    cog, md, _ = cognitive
    text = f"bypass probe {time.time_ns()}"
    await cog.Embed(pb.EmbedRequest(texts=[text]), metadata=md)
    fresh = await cog.Embed(pb.EmbedRequest(texts=[text], bypass_cache=True), metadata=md)
    assert fresh.cached_count == 0
    assert (await cog.Embed(pb.EmbedRequest(texts=[text]), metadata=md)).cached_count == 1


async def test_works_with_redis_down(base_overrides) -> None:
    """With Redis unreachable, Embed still answers and PostgreSQL still serves cached vectors."""
    probe = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = probe.sockets[0].getsockname()[1]
    probe.close()
    await probe.wait_closed()  # nothing listens on `port` now
    suite = await _start(base_overrides, f"redis://127.0.0.1:{port}/0")
    try:
        md = ((IDENTITY_METADATA_KEY, InternalIdentity.from_settings(suite.settings).assertion(
            None, "test")),)  # fmt: skip
        service = suite.running["cognitive"].service
        async with grpc.aio.insecure_channel(suite.address("cognitive")) as channel:
            cog = pb_grpc.CognitiveServiceStub(channel)
            text = f"redis down probe {time.time_ns()}"
            first = await cog.Embed(pb.EmbedRequest(texts=[text, "other"]), metadata=md)
            assert first.dimension == 768
            service.cache._l1.clear()
            second = await cog.Embed(pb.EmbedRequest(texts=[text]), metadata=md)
            assert second.cached_count == 1  # from L3
    finally:
        await suite.stop()


async def test_joiner_computes_itself_when_the_owner_is_cancelled(cognitive) -> None:
    """If the request computing a text hits its deadline, a request waiting on it still succeeds."""
    cog, md, service = cognitive
    with _gated_backend(service) as (calls, gate):
        text = f"abandoned flight probe {time.time_ns()}"
        misses = _hits("l1", "miss")
        # Generous deadline: the joiner must join before it expires, even on a loaded machine.
        owner = asyncio.ensure_future(
            cog.Embed(pb.EmbedRequest(texts=[text]), metadata=md, timeout=3)
        )
        for _ in range(500):
            if calls:
                break
            await asyncio.sleep(0.01)
        joiner = asyncio.ensure_future(
            cog.Embed(pb.EmbedRequest(texts=[text]), metadata=md, timeout=10)
        )
        for _ in range(500):
            if _hits("l1", "miss") >= misses + 2:
                break
            await asyncio.sleep(0.01)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await owner
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        gate.set()
        reply = await joiner
    assert len(reply.embeddings[0].values) == 768
    # The joiner either computed the text itself (the owner's computation was cancelled
    # with it) or, if the server saw the owner's deadline only after the gate opened,
    # reused the owner's result; never a third computation, never a failure.
    assert calls in ([[text]], [[text], [text]])
