"""The embedded engine's on-disk originals: the pages a search mapped are given back to the
page cache (dataplatform/vectors/mapped.py), so a serving process's RSS does not grow with
every distinct query; results stay the same, and no other mapping is touched."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import pytest

from dataplatform.vectors import CollectionSpec, EdgeVectorStore, VectorPoint
from dataplatform.vectors.mapped import release_originals

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="reads /proc/self/smaps, madvise(2)"
)

DIM = 768  # 5,000 points = 15 MB of originals: above the engine's indexing threshold (10 MB)
POINTS = 5000


def _resident_kb(shard_dir: Path, suffix: str) -> int:
    """Resident KB of this process's mappings of the shard's files ending in `suffix`."""
    total, current = 0, False
    with open("/proc/self/smaps", encoding="utf-8", errors="replace") as smaps:
        for line in smaps:
            if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
                path = line.rstrip("\n").split(maxsplit=5)[-1]
                current = path.startswith(str(shard_dir)) and path.endswith(suffix)
            elif current and line.startswith("Rss:"):
                total += int(line.split()[1])
    return total


async def _collection(root: Path, release: int | None) -> tuple[EdgeVectorStore, Path]:
    """An optimized collection of POINTS random unit vectors, originals on disk."""
    store = EdgeVectorStore(root, release_originals_every=release, optimize_in_subprocess=False)
    await store.create_collection(CollectionSpec("docs", dimension=DIM))
    rng = np.random.default_rng(7)
    vectors = rng.standard_normal((POINTS, DIM))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    await store.upsert(
        "docs", [VectorPoint(f"p{i}", v.tolist(), {}) for i, v in enumerate(vectors)]
    )
    await store.optimize("docs")
    return store, root / "docs" / "shard"


def _queries(n: int) -> list[list[float]]:
    rng = np.random.default_rng(11)
    q = rng.standard_normal((n, DIM))
    return (q / np.linalg.norm(q, axis=1, keepdims=True)).tolist()


async def _search_all(store: EdgeVectorStore, queries: list[list[float]]) -> list[list[str]]:
    return [[h.id for h in await store.search("docs", q, top_k=10)] for q in queries]


async def test_release_drops_the_originals_pages_and_nothing_else(tmp_path: Path) -> None:
    """Searches map the originals' pages they rescore (resident in this process);
    `release_originals` unmaps exactly those (the HNSW links and the WAL stay resident),
    and the same searches afterwards give the same answers, read back from the file."""
    store, shard = await _collection(tmp_path / "vec", release=None)
    try:
        queries = _queries(200)
        before = await _search_all(store, queries)
        originals = _resident_kb(shard, "/vector_storage/matrix.dat")
        links = _resident_kb(shard, "/vector_index/links_compressed.bin")
        wal = _resident_kb(shard / "wal", "")
        assert originals > 0, "the searches mapped no originals: nothing to prove"
        assert links > 0

        assert release_originals(shard) > 0
        assert _resident_kb(shard, "/vector_storage/matrix.dat") == 0
        assert _resident_kb(shard, "/vector_index/links_compressed.bin") == links
        assert _resident_kb(shard / "wal", "") == wal
        assert release_originals(tmp_path / "elsewhere") == 0  # another shard's are its own

        assert await _search_all(store, queries) == before
    finally:
        await store.close()


async def test_every_nth_search_gives_the_pages_back(tmp_path: Path) -> None:
    """With `release_originals_every` N, the originals' pages mapped by a collection's
    searches accumulate for N - 1 searches and the N-th gives them all back; without it
    they only accumulate. Each stored point, searched for, still comes first (rescored on
    originals read back from the file)."""
    kept, kept_shard = await _collection(tmp_path / "kept", release=None)
    given, given_shard = await _collection(tmp_path / "given", release=50)
    try:
        rng = np.random.default_rng(7)  # the points _collection stored
        points = rng.standard_normal((POINTS, DIM))
        points /= np.linalg.norm(points, axis=1, keepdims=True)
        for store, shard in ((kept, kept_shard), (given, given_shard)):
            for n, i in enumerate(range(0, 49 * 50, 50), start=1):  # 49 searches
                hits = await store.search("docs", points[i].tolist(), top_k=10)
                assert hits[0].id == f"p{i}", n
            assert _resident_kb(shard, "/vector_storage/matrix.dat") > 0
            hits = await store.search("docs", points[1].tolist(), top_k=10)  # the 50th
            assert hits[0].id == "p1"
        assert _resident_kb(kept_shard, "/vector_storage/matrix.dat") > 0
        assert _resident_kb(given_shard, "/vector_storage/matrix.dat") == 0
    finally:
        await kept.close()
        await given.close()


async def test_no_release_while_an_optimize_drops_segments(tmp_path: Path) -> None:
    """An optimize in a worker thread unmaps the segments it replaces while searches go on:
    a search due to release while it runs (its segments lock held) leaves the mappings
    alone, and the next one due after it releases them."""
    store, shard = await _collection(tmp_path / "vec", release=1)
    try:
        coll = store._collections["docs"]  # type: ignore[attr-defined]
        query = _queries(1)[0]
        with coll.segments_lock:  # as _optimize_in_thread holds it
            await store.search("docs", query, top_k=10)
            assert _resident_kb(shard, "/vector_storage/matrix.dat") > 0
        await store.search("docs", query, top_k=10)
        assert _resident_kb(shard, "/vector_storage/matrix.dat") == 0
    finally:
        await store.close()
