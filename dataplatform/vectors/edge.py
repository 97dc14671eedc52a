"""Embedded vector store on Qdrant's engine in process (qdrant-edge-py, module ``qdrant_edge``).

Layout under ``path``::

    <path>/<collection>/spec.json   CollectionSpec, written last (its presence = collection exists)
    <path>/<collection>/shard/      qdrant-edge shard (WAL, segments, edge_config.json)

Engine facts this module is built around (measured on qdrant-edge-py 0.9.0):

* There are no background optimizers: new points land in a plain (brute-force) segment and
  stay there until ``EdgeShard.optimize()`` runs. Brute force costs ~5 ms per query at 50k x
  768 d; after optimize HNSW search is ~0.2-0.5 ms.
* ``optimize()`` holds the GIL for its whole run (seconds for 10^5 points), so
  ``asyncio.to_thread`` does not keep the event loop responsive. By default we therefore close
  the shard and optimize it in a child process, then reopen it (searches on that collection
  wait; other collections and the event loop keep running). ``load()`` after that takes ~1 s
  per 50k points.
* ``query``/``count`` are safe to call concurrently with ``update`` from several threads, so
  searches run in worker threads without a lock against writers; but like ``load()`` (1.6 s
  at 200k x 768) and ``update`` they hold the GIL throughout (measured 2026-12-02: a Python
  thread ran once in 1.6 s of load, and only at the 5 ms switch interval during searches),
  so the data platform runs this store in a process of its own (``host.py``). The shard
  holds an exclusive WAL lock: one process can have it open at a time.
* Scalar int8 quantization with ``rescore`` but oversampling 1 loses recall on clustered data
  (0.87-0.97 recall@10 in our tests, unaffected by ``hnsw_ef``); oversampling 2 restores ~1.0
  at negligible cost, hence the default.
* With quantization the HNSW search runs on the int8 copies (kept in RAM); the float32
  originals are read only to rescore ``oversampling x top_k`` candidates. So by default they
  stay on disk (``Memory.Cold``: mmap, not prefetched) and only the pages rescoring touches
  are resident: 1M x 768 d is 3 GB of originals but ~0.8 GB of int8 in RAM.

Auto-optimize policy: after an ``upsert`` call, if the points written since the last optimize
reach ``auto_optimize_threshold`` (default 10,000), the same call runs ``optimize`` before it
returns. The caller that loads data pays for indexing, not a random later search, and no
background task has to be supervised. Pass ``None`` to disable and call ``optimize`` yourself
(bulk loads: optimize once at the end).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import sys
import threading
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import qdrant_edge as qe

from .base import (
    ID_PAYLOAD_KEY,
    CollectionExists,
    CollectionNotFound,
    CollectionSpec,
    ScoredPoint,
    Vector,
    VectorPoint,
    VectorStore,
    check_filter,
    engine_id,
    validate_matrix,
    validate_vector,
)
from .mapped import release_originals

T = TypeVar("T")

__all__ = ["EdgeVectorStore"]

_SPEC_FILE = "spec.json"
_SHARD_DIR = "shard"
_DISTANCE = {
    "Cosine": qe.Distance.Cosine,
    "Dot": qe.Distance.Dot,
    "Euclid": qe.Distance.Euclid,
    "Manhattan": qe.Distance.Manhattan,
}
# Run by the child process in subprocess-optimize mode; argv[1] is the shard directory.
_OPTIMIZE_SCRIPT = (
    "import sys, qdrant_edge as q\n"
    "s = q.EdgeShard.load(sys.argv[1])\n"
    "try:\n"
    "    s.optimize()\n"
    "    s.flush()\n"
    "finally:\n"
    "    s.close()\n"
)


class _RWLock:
    """Async readers-writer lock: many readers, or one writer (who closes/reopens the shard)."""

    def __init__(self) -> None:
        self._cond = asyncio.Condition()
        self._readers = 0
        self._writer = False

    @contextlib.asynccontextmanager
    async def read(self) -> AsyncIterator[None]:
        async with self._cond:
            await self._cond.wait_for(lambda: not self._writer)
            self._readers += 1
        try:
            yield
        finally:
            async with self._cond:
                self._readers -= 1
                self._cond.notify_all()

    @contextlib.asynccontextmanager
    async def write(self) -> AsyncIterator[None]:
        async with self._cond:
            await self._cond.wait_for(lambda: not self._writer and self._readers == 0)
            self._writer = True
        try:
            yield
        finally:
            async with self._cond:
                self._writer = False
                self._cond.notify_all()


class _Collection:
    """Per-collection state: spec, open shard (lazily), locks and un-optimized point count."""

    def __init__(self, spec: CollectionSpec, directory: Path) -> None:
        self.spec = spec
        self.dir = directory
        self.shard: qe.EdgeShard | None = None
        # Readers use the shard; the writer closes/reopens it (optimize, delete, close).
        self.rw = _RWLock()
        # Serialises mutations so the pending counter and auto-optimize stay consistent.
        self.write_lock = asyncio.Lock()
        self.open_lock = asyncio.Lock()
        self.pending = 0
        self.deleted = False
        self.searches = 0  # since its mapped originals were last given back
        # An optimize in a worker thread drops segments (and unmaps their files) while
        # searches go on: it and a release of the originals' mappings never overlap.
        self.segments_lock = threading.Lock()

    @property
    def shard_dir(self) -> Path:
        return self.dir / _SHARD_DIR


class EdgeVectorStore(VectorStore):
    """Vector store on the in-process Qdrant engine, persisted under ``path``.

    Args:
        path: Root directory; one sub-directory per collection.
        hnsw_m: HNSW edges per node.
        ef_construct: HNSW build-time candidate list size.
        quantization: Scalar int8 quantization (kept in RAM) with rescoring.
        hnsw_ef: Search-time candidate list size; ``None`` uses the engine default.
        oversampling: Quantized candidates fetched per result before rescoring.
        batch_size: Points per engine update call.
        auto_optimize_threshold: Points written since the last optimize that trigger one at the
            end of ``upsert``; ``None`` disables.
        optimize_in_subprocess: Optimize in a child process so the GIL-holding index build does
            not block the event loop; ``False`` runs it in a worker thread instead.
        full_scan_threshold_kb: Below this vector-data size per segment the engine brute-forces.
        vectors_on_disk: Keep the float32 originals in an mmap'd file read on demand instead
            of prefetched into RAM; applies to collections created from now on.
        release_originals_every: With the originals on disk, every this many searches of a
            collection the last one gives the pages of its originals this process has
            mapped back to the page cache (`mapped.py`), so the RSS does not grow with every
            distinct query; ``None`` never does.
        threads: Run engine calls in worker threads (the event loop reads its sockets at the
            GIL's switch interval meanwhile); ``False`` runs them on the loop's thread, as
            the engine's own process does (``host.py``): nothing else runs there, and the
            hand-off to a thread cost 0.4-0.7 ms of CPU per search at 2 in flight.
    """

    def __init__(
        self,
        path: Path,
        hnsw_m: int = 16,
        ef_construct: int = 100,
        quantization: bool = True,
        *,
        hnsw_ef: int | None = None,
        oversampling: float = 2.0,
        batch_size: int = 512,
        auto_optimize_threshold: int | None = 10_000,
        optimize_in_subprocess: bool = True,
        full_scan_threshold_kb: int = 10_000,
        vectors_on_disk: bool = True,
        release_originals_every: int | None = 256,
        threads: bool = True,
    ) -> None:
        self._run = asyncio.to_thread if threads else _inline
        self._path = Path(path)
        self._path.mkdir(parents=True, exist_ok=True)
        self._hnsw_m = hnsw_m
        self._ef_construct = ef_construct
        self._quantization = quantization
        self._hnsw_ef = hnsw_ef
        self._oversampling = oversampling
        self._batch_size = max(1, batch_size)
        self._auto_optimize_threshold = auto_optimize_threshold
        self._optimize_in_subprocess = optimize_in_subprocess
        self._full_scan_threshold_kb = full_scan_threshold_kb
        self._vectors_memory = qe.Memory.Cold if vectors_on_disk else qe.Memory.Cached
        self._release_every = release_originals_every if vectors_on_disk else None
        self._catalog_lock = asyncio.Lock()
        self._closed = False
        self._collections: dict[str, _Collection] = {}
        # Scanning small JSON files at construction is cheap; shards open lazily on first use.
        for spec_file in sorted(self._path.glob(f"*/{_SPEC_FILE}")):
            spec = _read_spec(spec_file)
            self._collections[spec.name] = _Collection(spec, spec_file.parent)

    # ----------------------------------------------------------------- catalog

    async def create_collection(self, spec: CollectionSpec) -> None:
        """Create the shard, its keyword payload indexes, then persist the spec."""
        self._check_open()
        async with self._catalog_lock:
            if spec.name in self._collections:
                raise CollectionExists(spec.name)
            directory = self._path / spec.name
            coll = _Collection(spec, directory)
            await self._run(self._create_on_disk, coll)
            self._collections[spec.name] = coll

    def _create_on_disk(self, coll: _Collection) -> None:
        # A directory without spec.json is a create or delete that died half-way.
        if coll.dir.exists():
            shutil.rmtree(coll.dir)
        coll.dir.mkdir(parents=True)
        shard = qe.EdgeShard.create(str(coll.shard_dir), self._edge_config(coll.spec))
        try:
            for field_name in coll.spec.indexed_fields:
                shard.update(
                    qe.UpdateOperation.create_field_index(field_name, qe.PayloadSchemaType.Keyword)
                )
            shard.flush()
            _write_spec(coll.dir / _SPEC_FILE, coll.spec)
        except BaseException:
            shard.close()
            shutil.rmtree(coll.dir, ignore_errors=True)
            raise
        coll.shard = shard

    async def get_collection(self, name: str) -> CollectionSpec:
        """Return the spec of ``name``."""
        return self._get(name).spec

    async def list_collections(self) -> list[CollectionSpec]:
        """Return all specs sorted by name."""
        self._check_open()
        return [self._collections[n].spec for n in sorted(self._collections)]

    async def delete_collection(self, name: str) -> None:
        """Close the shard and remove the collection directory."""
        async with self._catalog_lock:
            coll = self._get(name)
            async with coll.rw.write():
                coll.deleted = True
                del self._collections[name]
                await self._run(_close_and_remove, coll)

    # ------------------------------------------------------------------ points

    async def upsert(self, name: str, points: Sequence[VectorPoint]) -> int:
        """Validate the whole batch, then write it in ``batch_size`` chunks."""
        coll = self._get(name)
        vectors = validate_matrix(coll.spec, points)
        if not points:
            return 0
        async with coll.write_lock:
            async with coll.rw.read():
                shard = await self._shard(coll)
                for start in range(0, len(points), self._batch_size):
                    stop = start + self._batch_size
                    # Building Point objects is Python work too: keep it off the event loop.
                    await self._run(_upsert_batch, shard, points[start:stop], vectors[start:stop])
            coll.pending += len(points)
            threshold = self._auto_optimize_threshold
            if threshold is not None and coll.pending >= threshold:
                await self._optimize_locked(coll)
        return len(points)

    async def delete(self, name: str, ids: Sequence[str]) -> int:
        """Delete by string id; returns how many of them existed."""
        coll = self._get(name)
        engine_ids: list[qe.PointId] = list(dict.fromkeys(engine_id(i) for i in ids))
        if not engine_ids:
            return 0
        async with coll.write_lock, coll.rw.read():
            shard = await self._shard(coll)
            return await self._run(_delete_existing, shard, engine_ids)

    async def search(
        self,
        name: str,
        vector: Vector,
        top_k: int,
        filter: Mapping[str, str] | None = None,
        score_threshold: float | None = None,
    ) -> list[ScoredPoint]:
        """HNSW (after optimize) or brute-force search with int8 rescoring."""
        coll = self._get(name)
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        query = validate_vector(coll.spec, vector)
        request = qe.QueryRequest(
            limit=top_k,
            query=qe.Query.Nearest(query.tolist()),
            filter=_edge_filter(check_filter(coll.spec, filter)),
            score_threshold=score_threshold,
            with_payload=True,
            with_vector=False,
            params=self._search_params(),
        )
        release = None
        coll.searches += 1
        if self._release_every is not None and coll.searches >= self._release_every:
            coll.searches = 0
            release = coll
        async with coll.rw.read():  # held while releasing: the shard is not closed meanwhile
            shard = await self._shard(coll)
            hits = await self._run(_query, shard, request, release)
        return [_scored(h) for h in hits]

    async def count(self, name: str, filter: Mapping[str, str] | None = None) -> int:
        """Exact count, optionally filtered on indexed fields."""
        coll = self._get(name)
        request = qe.CountRequest(exact=True, filter=_edge_filter(check_filter(coll.spec, filter)))
        async with coll.rw.read():
            shard = await self._shard(coll)
            return await self._run(shard.count, request)

    async def optimize(self, name: str) -> None:
        """Merge segments and build HNSW + quantized vectors (no-op when already optimal)."""
        coll = self._get(name)
        async with coll.write_lock:
            await self._optimize_locked(coll)

    async def stats(self, name: str) -> dict[str, int]:
        """Engine counters: points, segments and vectors covered by an HNSW index."""
        coll = self._get(name)
        async with coll.rw.read():
            shard = await self._shard(coll)
            info = await self._run(shard.info)
        return {
            "points": info.points_count,
            "segments": info.segments_count,
            "indexed_vectors": info.indexed_vectors_count,
            "pending": coll.pending,
        }

    async def close(self) -> None:
        """Flush and close every open shard."""
        if self._closed:
            return
        self._closed = True
        for coll in list(self._collections.values()):
            async with coll.rw.write():
                if coll.shard is not None:
                    shard, coll.shard = coll.shard, None
                    await self._run(_flush_close, shard)

    # ----------------------------------------------------------------- helpers

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("EdgeVectorStore is closed")

    def _get(self, name: str) -> _Collection:
        self._check_open()
        try:
            return self._collections[name]
        except KeyError:
            raise CollectionNotFound(name) from None

    async def _shard(self, coll: _Collection) -> qe.EdgeShard:
        """Return the open shard, loading it on first use. Caller holds a read lock."""
        self._check_open()
        if coll.deleted:
            raise CollectionNotFound(coll.spec.name)
        if coll.shard is None:
            # Concurrent first users could both load; the WAL lock makes the second fail.
            async with coll.open_lock:
                if coll.shard is None:
                    coll.shard = await self._run(qe.EdgeShard.load, str(coll.shard_dir))
        return coll.shard

    async def _optimize_locked(self, coll: _Collection) -> None:
        """Optimize; caller holds ``coll.write_lock``."""
        if not self._optimize_in_subprocess:
            async with coll.rw.read():
                shard = await self._shard(coll)
                await self._run(_optimize_in_thread, shard, coll)
            coll.pending = 0
            return
        async with coll.rw.write():
            if coll.deleted:
                raise CollectionNotFound(coll.spec.name)
            if coll.shard is not None:
                shard, coll.shard = coll.shard, None
                await self._run(_flush_close, shard)
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-c",
                _OPTIMIZE_SCRIPT,
                str(coll.shard_dir),
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
            )
            _, stderr = await proc.communicate()
            # Reopen even if the child failed: the shard on disk is still consistent (WAL).
            coll.shard = await self._run(qe.EdgeShard.load, str(coll.shard_dir))
            if proc.returncode != 0:
                raise RuntimeError(
                    f"optimize of {coll.spec.name!r} failed: {stderr.decode(errors='replace')}"
                )
        coll.pending = 0

    def _edge_config(self, spec: CollectionSpec) -> qe.EdgeConfig:
        quant = (
            qe.ScalarQuantizationConfig(type=qe.ScalarType.Int8, always_ram=True)
            if self._quantization
            else None
        )
        return qe.EdgeConfig(
            vectors=qe.EdgeVectorParams(
                size=spec.dimension,
                distance=_DISTANCE[spec.distance],
                memory=self._vectors_memory,
            ),
            hnsw_config=qe.HnswIndexConfig(
                m=self._hnsw_m,
                ef_construct=self._ef_construct,
                full_scan_threshold=self._full_scan_threshold_kb,
            ),
            quantization_config=quant,
        )

    def _search_params(self) -> qe.SearchParams:
        quant = (
            qe.QuantizationSearchParams(rescore=True, oversampling=self._oversampling)
            if self._quantization
            else None
        )
        return qe.SearchParams(hnsw_ef=self._hnsw_ef, quantization=quant)


# ---------------------------------------------------------------- sync helpers


async def _inline(call: Callable[..., T], *args: Any) -> T:
    """`call(*args)` on the event loop's thread (``threads=False``)."""
    return call(*args)


def _query(shard: qe.EdgeShard, request: qe.QueryRequest, release: _Collection | None) -> list[Any]:
    """The search, then (`release`: its collection) the pages of the originals this process
    mapped given back, in the same worker thread; skipped while an optimize runs."""
    hits = shard.query(request)
    if release is not None and release.segments_lock.acquire(blocking=False):
        try:
            release_originals(release.shard_dir)
        finally:
            release.segments_lock.release()
    return hits


def _optimize_in_thread(shard: qe.EdgeShard, coll: _Collection) -> None:
    with coll.segments_lock:
        shard.optimize()


def _upsert_batch(shard: qe.EdgeShard, points: Sequence[VectorPoint], vectors: np.ndarray) -> None:
    batch = [
        qe.Point(
            id=engine_id(p.id),
            vector=vec.tolist(),
            payload={**p.payload, ID_PAYLOAD_KEY: p.id},
        )
        for p, vec in zip(points, vectors, strict=True)
    ]
    shard.update(qe.UpdateOperation.upsert_points(batch))


def _delete_existing(shard: qe.EdgeShard, ids: list[qe.PointId]) -> int:
    # The engine's delete reports nothing, so count the ids that exist first.
    existing = shard.retrieve(ids, with_payload=False, with_vector=False)
    if existing:
        shard.update(qe.UpdateOperation.delete_points([r.id for r in existing]))
    return len(existing)


def _scored(hit: Any) -> ScoredPoint:
    payload = dict(hit.payload or {})
    original = payload.pop(ID_PAYLOAD_KEY, None)
    return ScoredPoint(
        id=original if original is not None else str(hit.id), score=hit.score, payload=payload
    )


def _edge_filter(conditions: dict[str, str]) -> qe.Filter | None:
    if not conditions:
        return None
    return qe.Filter(
        must=[qe.FieldCondition(key=k, match=qe.MatchValue(v)) for k, v in conditions.items()]
    )


def _flush_close(shard: qe.EdgeShard) -> None:
    shard.flush()
    shard.close()


def _close_and_remove(coll: _Collection) -> None:
    if coll.shard is not None:
        shard, coll.shard = coll.shard, None
        shard.close()
    # Remove the spec first so a crash mid-rmtree leaves a directory we ignore on startup.
    (coll.dir / _SPEC_FILE).unlink(missing_ok=True)
    shutil.rmtree(coll.dir, ignore_errors=True)


def _write_spec(path: Path, spec: CollectionSpec) -> None:
    data = {
        "name": spec.name,
        "dimension": spec.dimension,
        "distance": spec.distance,
        "indexed_fields": list(spec.indexed_fields),
    }
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(data, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)  # atomic: the spec is either absent or complete


def _read_spec(path: Path) -> CollectionSpec:
    data = json.loads(path.read_text(encoding="utf-8"))
    return CollectionSpec(
        name=data["name"],
        dimension=int(data["dimension"]),
        distance=data["distance"],
        indexed_fields=tuple(data["indexed_fields"]),
    )
