"""The optional Redis helpers on the real Redis: the seed's key patterns and TTLs, degrading to
misses when Redis is unconfigured, refused or cut, and recovering by itself."""

from __future__ import annotations

import asyncio
import hashlib
import socket
import time
import uuid
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import pytest

from aiwfe.runtime.config import RedisSettings
from aiwfe.runtime.redis_client import RedisClient
from tests.faultproxy import FaultProxy


def _settings(url: str) -> RedisSettings:
    return RedisSettings(url=url, key_prefix=f"aiwfe-test:{uuid.uuid4().hex[:8]}:")


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[RedisClient]:
    """The run's Redis under a key prefix of its own, emptied afterwards."""
    client = RedisClient(_settings(redis_url))
    yield client
    assert client.client is not None
    keys = [k async for k in client.client.scan_iter(client.prefix + "*")]
    if keys:
        await client.client.delete(*keys)
    await client.close()


def _closed_port() -> int:
    """A port nothing listens on (bound once, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_seed_key_patterns_and_ttls(redis: RedisClient) -> None:
    """session/api/cognitive keys follow the seed's patterns and get its TTLs in Redis."""
    strategies = redis.settings.cache_strategies
    token = "header.payload.signature"
    session = redis.session_key(token)
    assert session == f"{redis.prefix}session:{hashlib.sha256(token.encode()).hexdigest()}"
    assert token not in session  # tokens are never stored raw
    api = redis.api_key("/aiwfe.cognitive.v1.CognitiveService/Embed", "u1", "abc")
    assert api == f"{redis.prefix}api:/aiwfe.cognitive.v1.CognitiveService/Embed:u1:abc"
    cognitive = redis.cognitive_key("embed", "f00d")
    assert cognitive == f"{redis.prefix}cognitive:embed:f00d"
    expected = {
        session: strategies.session_cache.ttl,
        api: 300,  # the contract's cache_ttl_seconds set the real ones
        cognitive: strategies.cognitive_cache.ttl,
    }
    assert sorted(expected.values()) == [300, 1800, 3600]
    for key, ttl in expected.items():
        assert await redis.set(key, b"v", ttl)
        remaining = await redis.run(lambda r, k=key: r.ttl(k), -2)
        assert ttl - 2 <= remaining <= ttl
    assert await redis.mget([session, cognitive, redis.key("absent")]) == [b"v", b"v", None]
    assert await redis.delete(session, api) == 2


async def test_unconfigured_redis_degrades_to_misses() -> None:
    """With no URL every helper answers its default and nothing raises."""
    client = RedisClient(RedisSettings())
    assert not client.configured
    assert await client.get("k") is None
    assert await client.set("k", b"v", 10) is False
    assert await client.mget(["a", "b"]) == [None, None]
    assert await client.ping() is False


async def test_refused_redis_degrades_fast() -> None:
    """A closed port costs one failed connect, then calls skip Redis during the back-off."""
    client = RedisClient(_settings(f"redis://127.0.0.1:{_closed_port()}/0"))
    try:
        start = time.monotonic()
        assert await client.get(client.key("k")) is None
        assert await client.set(client.key("k"), b"v", 10) is False
        assert not client.available
        assert await client.ping() is False
        assert time.monotonic() - start < 1.0
    finally:
        await client.close()


@pytest.mark.slow
async def test_cut_redis_degrades_then_recovers_by_itself(redis_url: str) -> None:
    """Through a fault proxy: cut → misses without errors; restore → hits again, no restart."""
    real = urlsplit(redis_url)
    async with FaultProxy(real.hostname or "127.0.0.1", real.port or 6379) as proxy:
        client = RedisClient(_settings(f"redis://127.0.0.1:{proxy.port}/0"))
        key = client.key("probe")
        try:
            assert await client.set(key, b"1", 60)
            assert await client.get(key) == b"1"
            proxy.cut()
            start = time.monotonic()
            assert await client.get(key) is None
            assert await client.set(key, b"2", 60) is False
            assert time.monotonic() - start < 2.0
            proxy.pass_through()
            deadline = time.monotonic() + 10
            while await client.get(key) != b"1":
                assert time.monotonic() < deadline, "redis did not recover within 10 s"
                await asyncio.sleep(0.2)
            assert await client.set(key, b"3", 60)
            assert await client.get(key) == b"3"
            await client.delete(key)
        finally:
            await client.close()
