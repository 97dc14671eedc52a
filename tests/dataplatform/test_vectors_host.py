"""The embedded engine in a process of its own (dataplatform/vectors/host.py): the data
platform keeps serving while the engine is busy or stuck, an engine that dies fails only its
own calls (UNAVAILABLE) and comes back without losing an acknowledged write, and it never
outlives the data platform."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import textwrap
from pathlib import Path

import grpc
import pytest

from aiwfe.data.v1 import cache_store_service_pb2 as cache_pb
from aiwfe.data.v1 import cache_store_service_pb2_grpc as cache_grpc
from aiwfe.data.v1 import vector_store_service_pb2 as pb
from aiwfe.data.v1 import vector_store_service_pb2_grpc as pb_grpc
from aiwfe.runtime.config import LoggingSettings
from aiwfe.runtime.metrics import REGISTRY
from dataplatform.vectors import (
    CollectionNotFound,
    CollectionSpec,
    DimensionMismatch,
    VectorPoint,
    host,
)
from dataplatform.vectors.host import HostedVectorStore
from tests.conftest import error_reason

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="signals, /proc")

DIM = 4


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


async def _gone(pid: int) -> bool:
    """Whether `pid` has exited within 10 s."""
    for _ in range(500):
        if not _alive(pid):
            return True
        await asyncio.sleep(0.02)
    return False


async def _count_reopened(path: Path, name: str) -> int:
    """The points of `name` as a new engine on `path` finds them."""
    store = HostedVectorStore(path)
    try:
        return await store.count(name)
    finally:
        await store.close()


def _sample(name: str) -> float:
    return REGISTRY.get_sample_value(name) or 0.0


def _engine(dataplatform) -> HostedVectorStore:
    store = dataplatform.service.vectors.store
    assert isinstance(store, HostedVectorStore)
    return store


async def _collection(stub, md, name: str, points: int = 3) -> None:
    collection = pb.Collection(name=name, dimension=DIM)
    await stub.CreateCollection(
        pb.CreateCollectionRequest(collection=collection), metadata=md, timeout=30
    )
    batch = [pb.Point(id=f"p{i}", values=[1.0, float(i), 0.5, 0.25]) for i in range(points)]
    reply = await stub.UpsertPoints(
        pb.UpsertPointsRequest(collection=name, points=batch), metadata=md, timeout=30
    )
    assert reply.upserted == points


async def test_the_data_platform_serves_while_its_engine_is_stuck(
    dataplatform, data_channel, internal_md
) -> None:
    """With the engine's process stopped (as if a call held its GIL for seconds, like a
    shard's load), a search waits, and the same data platform's other RPCs are answered
    meanwhile; the search completes once the engine runs again."""
    stub = pb_grpc.VectorStoreServiceStub(data_channel)
    cache = cache_grpc.CacheStoreServiceStub(data_channel)
    assert _engine(dataplatform).pid is None  # started on first use, not with the service
    await _collection(stub, internal_md, "stuck")
    pid = _engine(dataplatform).pid
    assert pid is not None and pid != os.getpid()
    os.kill(pid, signal.SIGSTOP)
    try:
        search = asyncio.ensure_future(
            stub.SearchPoints(
                pb.SearchPointsRequest(collection="stuck", vector=[1, 0, 0, 0], top_k=2),
                metadata=internal_md,
                timeout=30,
            )
        )
        for _ in range(5):
            await cache.GetCacheEntries(
                cache_pb.GetCacheEntriesRequest(keys=["k"]), metadata=internal_md, timeout=2
            )
        assert not search.done()
    finally:
        os.kill(pid, signal.SIGCONT)
    reply = await search
    assert [h.id for h in reply.hits] == ["p0", "p1"]


async def test_an_engine_killed_mid_call_fails_that_call_and_comes_back_with_its_data(
    dataplatform, data_channel, internal_md, monkeypatch
) -> None:
    """kill -9 of the engine while a call waits: that call ends UNAVAILABLE
    (VECTOR_STORE_UNAVAILABLE), not INTERNAL; a call in the restart back-off is UNAVAILABLE
    without starting a process; after it, a new engine serves every acknowledged point."""
    monkeypatch.setattr(host, "RESTART_SECONDS", 60.0)  # aged by hand below, not waited out
    stub = pb_grpc.VectorStoreServiceStub(data_channel)
    starts = _sample("qdrant_engine_starts_total")
    await _collection(stub, internal_md, "killed", points=5)
    engine = _engine(dataplatform)
    pid = engine.pid
    assert pid is not None
    assert _sample("qdrant_engine_starts_total") == starts + 1
    assert _sample("qdrant_engine_resident_bytes") > 10 << 20  # the engine's, not 0
    os.kill(pid, signal.SIGSTOP)  # the call below is in the engine when it dies
    count = asyncio.ensure_future(
        stub.CountPoints(
            pb.CountPointsRequest(collection="killed"), metadata=internal_md, timeout=30
        )
    )
    await asyncio.sleep(0.2)
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await count
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
    assert error_reason(failed.value) == "VECTOR_STORE_UNAVAILABLE"
    assert await _gone(pid)

    with pytest.raises(grpc.aio.AioRpcError) as backoff:
        await stub.CountPoints(
            pb.CountPointsRequest(collection="killed"), metadata=internal_md, timeout=30
        )
    assert backoff.value.code() == grpc.StatusCode.UNAVAILABLE
    assert engine.pid is None  # no process was started for it
    assert _sample("qdrant_engine_resident_bytes") == 0

    engine._started_at -= 60.0  # the back-off has passed
    reply = await stub.CountPoints(
        pb.CountPointsRequest(collection="killed"), metadata=internal_md, timeout=30
    )
    assert reply.count == 5
    assert engine.pid not in (None, pid)
    assert _sample("qdrant_engine_starts_total") == starts + 2


async def test_errors_cross_the_process_as_their_own_types(tmp_path: Path) -> None:
    """The store's exceptions reach the caller as the same types with the same fields (the
    servicer maps them to NOT_FOUND, INVALID_ARGUMENT, ...), and close() answers the calls
    in flight before the engine exits."""
    store = HostedVectorStore(tmp_path, auto_optimize_threshold=None)
    try:
        with pytest.raises(CollectionNotFound) as missing:
            await store.count("nope")
        assert missing.value.name == "nope"
        await store.create_collection(CollectionSpec("c", dimension=DIM))
        with pytest.raises(DimensionMismatch) as mismatch:
            await store.upsert("c", [VectorPoint("x", [1.0, 2.0])])
        assert (mismatch.value.expected, mismatch.value.got) == (DIM, 2)
        pid = store.pid
        assert pid is not None
        writes = [
            asyncio.ensure_future(store.upsert("c", [VectorPoint(f"p{i}", [1.0, i, 0.0, 1.0])]))
            for i in range(20)
        ]
        await asyncio.sleep(0)  # sent, not yet answered
    finally:
        await store.close()
    assert await asyncio.gather(*writes) == [1] * 20
    assert not _alive(pid)
    assert await _count_reopened(tmp_path, "c") == 20
    with pytest.raises(RuntimeError, match="closed"):
        await store.count("c")


async def test_the_engine_exits_with_the_process_that_started_it(tmp_path: Path) -> None:
    """kill -9 of the data platform's process: its engine sees its socket close, flushes and
    exits (no orphan holding the shards' locks), and a new one opens the same data."""
    script = textwrap.dedent(
        f"""
        import asyncio, sys
        from pathlib import Path
        from dataplatform.vectors import CollectionSpec, VectorPoint
        from dataplatform.vectors.host import HostedVectorStore

        async def main():
            store = HostedVectorStore(Path({str(tmp_path)!r}))
            await store.create_collection(CollectionSpec("c", dimension={DIM}))
            await store.upsert("c", [VectorPoint("a", [1.0, 0.0, 0.0, 0.0])])
            print(store.pid, flush=True)
            await asyncio.sleep(3600)

        asyncio.run(main())
        """
    )
    parent = await asyncio.create_subprocess_exec(
        sys.executable, "-c", script, stdout=asyncio.subprocess.PIPE
    )
    try:
        assert parent.stdout is not None
        engine = int(await asyncio.wait_for(parent.stdout.readline(), 30))
        assert _alive(engine)
    finally:
        parent.kill()
        await parent.wait()
    assert await _gone(engine)
    assert await _count_reopened(tmp_path, "c") == 1


async def test_only_the_store_interface_is_callable(tmp_path: Path) -> None:
    """A name outside the store's interface is refused in the engine, not looked up."""
    store = HostedVectorStore(tmp_path)
    try:
        with pytest.raises(RuntimeError, match="no such vector store call"):
            await store._call("close")
        with pytest.raises(RuntimeError, match="no such vector store call"):
            await store._call("__class__")
        assert await store.list_collections() == []
    finally:
        await store.close()


async def test_a_call_its_caller_gave_up_leaves_the_engine_serving(tmp_path: Path) -> None:
    """A caller cancelled (its deadline passed) while the engine works: its late answer is
    dropped, and the calls after it get their own answers."""
    store = HostedVectorStore(tmp_path)
    try:
        await store.create_collection(CollectionSpec("c", dimension=DIM))
        await store.upsert("c", [VectorPoint("a", [1.0, 0.0, 0.0, 0.0])])
        pid = store.pid
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)
        try:
            given_up = asyncio.ensure_future(store.search("c", [1.0, 0.0, 0.0, 0.0], 1))
            await asyncio.sleep(0.1)
            given_up.cancel()
            with pytest.raises(asyncio.CancelledError):
                await given_up
        finally:
            os.kill(pid, signal.SIGCONT)
        assert await store.count("c") == 1
        hits = await store.search("c", [1.0, 0.0, 0.0, 0.0], 1)
        assert [h.id for h in hits] == ["a"]
        assert store._pending == {}
        assert store.pid == pid
    finally:
        await store.close()


async def test_a_caller_that_gives_up_during_the_start_does_not_abandon_it(
    tmp_path: Path, monkeypatch
) -> None:
    """The first caller's deadline passes while the engine starts (slowly, on a loaded
    machine): the start goes on, and the next caller is served by that one engine, not
    refused as "restarting" (seen in a soak under load: 20 calls refused at the start)."""
    real = asyncio.open_unix_connection

    async def slow(*args, **kwargs):
        await asyncio.sleep(0.3)
        return await real(*args, **kwargs)

    monkeypatch.setattr(asyncio, "open_unix_connection", slow)
    store = HostedVectorStore(tmp_path)
    starts = _sample("qdrant_engine_starts_total")
    try:
        first = asyncio.ensure_future(store.list_collections())
        await asyncio.sleep(0.1)
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        assert await store.list_collections() == []
        assert _sample("qdrant_engine_starts_total") == starts + 1
    finally:
        await store.close()


@pytest.mark.parametrize("level", ["INFO", "WARNING"])
async def test_the_engine_logs_as_dataplatform_does(tmp_path: Path, capfd, level: str) -> None:
    """The engine's process logs by dataplatform's settings: JSON lines of service
    `dataplatform` at its level (its start is an INFO line, absent at WARNING)."""
    store = HostedVectorStore(tmp_path, LoggingSettings(level=level, json_format=True))
    try:
        assert await store.list_collections() == []
        pid = store.pid
    finally:
        await store.close()
    lines = [json.loads(x) for x in capfd.readouterr().err.splitlines() if x.startswith("{")]
    started = [
        e
        for e in lines
        if e["service"] == "dataplatform"
        and e["logger"] == "aiwfe.dataplatform.vectors"
        and f"process {pid} serving" in e["msg"]
    ]
    assert len(started) == (1 if level == "INFO" else 0), lines
