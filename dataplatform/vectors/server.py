"""Vector store backed by a Qdrant server through ``qdrant_client.AsyncQdrantClient``.

The CollectionSpec survives restarts on the server itself: it is written to the collection's
``metadata`` (Qdrant >= 1.16) and, for older collections or servers, the indexed fields are
recovered from ``payload_schema`` (keyword indexes). Nothing is kept locally except a cache.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar

from qdrant_client import AsyncQdrantClient, models

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

__all__ = ["QdrantServerStore", "is_transient"]

log = logging.getLogger(__name__)

T = TypeVar("T")

_META_KEY = "aiwfe_spec"
_DISTANCE = {
    "Cosine": models.Distance.COSINE,
    "Dot": models.Distance.DOT,
    "Euclid": models.Distance.EUCLID,
    "Manhattan": models.Distance.MANHATTAN,
}
_DISTANCE_NAME = {v: k for k, v in _DISTANCE.items()}
# gRPC status names (grpc.StatusCode.X.name) and HTTP statuses worth retrying.
_TRANSIENT_GRPC = {"UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "ABORTED"}
_TRANSIENT_HTTP = {408, 429, 502, 503, 504}


class QdrantServerStore(VectorStore):
    """Vector store on a Qdrant server.

    Args:
        url: Server URL, e.g. ``http://qdrant:6333`` (gRPC uses port 6334 when preferred).
        api_key: Optional API key.
        timeout: Per-request timeout in seconds.
        retries: Total attempts for idempotent calls on transient errors.
        prefer_grpc: Use gRPC rather than REST.
        pool_size: Connection pool size (gRPC channels or HTTP connections).
        hnsw_m: HNSW edges per node for new collections.
        ef_construct: HNSW build-time candidate list size.
        quantization: Scalar int8 quantization (always in RAM) with rescoring.
        hnsw_ef: Search-time candidate list size; ``None`` uses the server default.
        oversampling: Quantized candidates per result before rescoring (see edge.py on recall).
        vectors_on_disk: Keep the float32 originals on the server's disk (mmap), see edge.py.
        batch_size: Points per upsert request.
        backoff: First retry delay in seconds; doubles each retry.
        client: Pre-built client (tests, or callers who need custom options); ``url`` and the
            connection arguments are then ignored and ``close`` does not close it.
    """

    def __init__(
        self,
        url: str,
        api_key: str | None = None,
        timeout: float = 30,
        retries: int = 3,
        prefer_grpc: bool = True,
        pool_size: int = 10,
        *,
        hnsw_m: int = 16,
        ef_construct: int = 100,
        quantization: bool = True,
        hnsw_ef: int | None = None,
        oversampling: float = 2.0,
        vectors_on_disk: bool = True,
        batch_size: int = 256,
        backoff: float = 0.2,
        client: AsyncQdrantClient | None = None,
    ) -> None:
        self._owns_client = client is None
        if client is None:
            client = AsyncQdrantClient(
                url=url,
                api_key=api_key,
                timeout=max(1, round(timeout)),  # the client takes whole seconds
                prefer_grpc=prefer_grpc,
                pool_size=pool_size,
                # The check is a blocking HTTP call in the constructor; skip it.
                check_compatibility=False,
            )
        self._client = client
        self._attempts = max(1, retries)
        self._backoff = backoff
        self._hnsw_m = hnsw_m
        self._ef_construct = ef_construct
        self._quantization = quantization
        self._hnsw_ef = hnsw_ef
        self._oversampling = oversampling
        self._vectors_on_disk = vectors_on_disk
        self._batch_size = max(1, batch_size)
        self._specs: dict[str, CollectionSpec] = {}

    # ----------------------------------------------------------------- catalog

    async def create_collection(self, spec: CollectionSpec) -> None:
        """Create the collection with HNSW, int8 quantization and keyword payload indexes."""
        if await self._retry(lambda: self._client.collection_exists(spec.name)):
            raise CollectionExists(spec.name)
        quant = (
            models.ScalarQuantization(
                scalar=models.ScalarQuantizationConfig(type=models.ScalarType.INT8, always_ram=True)
            )
            if self._quantization
            else None
        )
        # Not retried: a retry after a lost response would report "already exists".
        try:
            await self._client.create_collection(
                spec.name,
                vectors_config=models.VectorParams(
                    size=spec.dimension,
                    distance=_DISTANCE[spec.distance],
                    on_disk=self._vectors_on_disk,
                ),
                hnsw_config=models.HnswConfigDiff(m=self._hnsw_m, ef_construct=self._ef_construct),
                quantization_config=quant,
                metadata={_META_KEY: _spec_to_json(spec)},
            )
        except Exception as exc:
            if _is_already_exists(exc):
                raise CollectionExists(spec.name) from exc
            raise
        for field_name in spec.indexed_fields:
            await self._retry(
                functools.partial(
                    self._client.create_payload_index,
                    spec.name,
                    field_name,
                    models.PayloadSchemaType.KEYWORD,
                    wait=True,
                )
            )
        self._specs[spec.name] = spec

    async def get_collection(self, name: str) -> CollectionSpec:
        """Read the spec from the server (cached after the first read)."""
        cached = self._specs.get(name)
        if cached is not None:
            return cached
        info = await self._call(name, lambda: self._client.get_collection(name))
        spec = _spec_from_info(name, info)
        self._specs[name] = spec
        return spec

    async def list_collections(self) -> list[CollectionSpec]:
        """Specs of all collections on the server, sorted by name."""
        resp = await self._retry(self._client.get_collections)
        specs = []
        for desc in sorted(resp.collections, key=lambda d: d.name):
            try:
                specs.append(await self.get_collection(desc.name))
            except CollectionNotFound:
                continue  # deleted between the two calls
        return specs

    async def delete_collection(self, name: str) -> None:
        """Delete the collection on the server."""
        self._specs.pop(name, None)
        deleted = await self._retry(lambda: self._client.delete_collection(name))
        if not deleted:
            raise CollectionNotFound(name)

    # ------------------------------------------------------------------ points

    async def upsert(self, name: str, points: Sequence[VectorPoint]) -> int:
        """Validate the whole batch, then upsert in ``batch_size`` requests (idempotent ids)."""
        spec = await self.get_collection(name)
        vectors = validate_matrix(spec, points)
        for start in range(0, len(points), self._batch_size):
            batch = [
                models.PointStruct(
                    id=engine_id(p.id),
                    vector=vec.tolist(),
                    payload={**p.payload, ID_PAYLOAD_KEY: p.id},
                )
                for p, vec in zip(
                    points[start : start + self._batch_size],
                    vectors[start : start + self._batch_size],
                    strict=True,
                )
            ]
            await self._call(name, functools.partial(self._client.upsert, name, batch, wait=True))
        return len(points)

    async def delete(self, name: str, ids: Sequence[str]) -> int:
        """Delete by string id; returns how many existed."""
        await self.get_collection(name)
        engine_ids = list(dict.fromkeys(engine_id(i) for i in ids))
        if not engine_ids:
            return 0
        existing = await self._call(
            name,
            lambda: self._client.retrieve(name, engine_ids, with_payload=False, with_vectors=False),
        )
        if existing:
            selector = models.PointIdsList(points=[r.id for r in existing])
            await self._call(name, lambda: self._client.delete(name, selector, wait=True))
        return len(existing)

    async def search(
        self,
        name: str,
        vector: Vector,
        top_k: int,
        filter: Mapping[str, str] | None = None,
        score_threshold: float | None = None,
    ) -> list[ScoredPoint]:
        """Query with HNSW and int8 rescoring; best first."""
        spec = await self.get_collection(name)
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        query = validate_vector(spec, vector).tolist()
        flt = _filter(check_filter(spec, filter))
        params = models.SearchParams(
            hnsw_ef=self._hnsw_ef,
            quantization=models.QuantizationSearchParams(
                rescore=True, oversampling=self._oversampling
            )
            if self._quantization
            else None,
        )
        resp = await self._call(
            name,
            lambda: self._client.query_points(
                name,
                query=query,
                query_filter=flt,
                search_params=params,
                limit=top_k,
                score_threshold=score_threshold,
                with_payload=True,
            ),
        )
        return [_scored(p) for p in resp.points]

    async def count(self, name: str, filter: Mapping[str, str] | None = None) -> int:
        """Exact count, optionally filtered on indexed fields."""
        spec = await self.get_collection(name)
        flt = _filter(check_filter(spec, filter))
        resp = await self._call(
            name, lambda: self._client.count(name, count_filter=flt, exact=True)
        )
        return resp.count

    async def optimize(self, name: str) -> None:
        """No-op apart from the existence check: the server indexes in the background."""
        await self.get_collection(name)

    async def close(self) -> None:
        """Close the client if this store created it."""
        if self._owns_client:
            await self._client.close()

    # ----------------------------------------------------------------- helpers

    async def _call(self, name: str, fn: Callable[[], Awaitable[T]]) -> T:
        """Retry ``fn`` and map "collection not found" to CollectionNotFound."""
        try:
            return await self._retry(fn)
        except Exception as exc:
            if _is_not_found(exc):
                self._specs.pop(name, None)
                raise CollectionNotFound(name) from exc
            raise

    async def _retry(self, fn: Callable[[], Awaitable[T]]) -> T:
        """Run ``fn`` up to ``retries`` times with exponential backoff on transient errors."""
        for attempt in range(1, self._attempts + 1):
            try:
                return await fn()
            except Exception as exc:
                if attempt >= self._attempts or not is_transient(exc):
                    raise
                delay = self._backoff * 2 ** (attempt - 1)
                log.warning("qdrant call failed (%s), retry %d in %.1fs", exc, attempt, delay)
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")


# ------------------------------------------------------------------- helpers


def _spec_to_json(spec: CollectionSpec) -> dict[str, Any]:
    return {
        "dimension": spec.dimension,
        "distance": spec.distance,
        "indexed_fields": list(spec.indexed_fields),
    }


def _spec_from_info(name: str, info: models.CollectionInfo) -> CollectionSpec:
    meta = (getattr(info.config, "metadata", None) or {}).get(_META_KEY)
    if isinstance(meta, dict):
        return CollectionSpec(
            name=name,
            dimension=int(meta["dimension"]),
            distance=str(meta["distance"]),
            indexed_fields=tuple(meta["indexed_fields"]),
        )
    # Collections created elsewhere: derive the spec from the vector config and indexes.
    vectors = info.config.params.vectors
    if not isinstance(vectors, models.VectorParams):
        raise ValueError(f"collection {name!r} uses named vectors; not supported")
    keyword_fields = tuple(
        sorted(
            field_name
            for field_name, schema in (info.payload_schema or {}).items()
            if schema.data_type == models.PayloadSchemaType.KEYWORD
        )
    )
    return CollectionSpec(
        name=name,
        dimension=vectors.size,
        distance=_DISTANCE_NAME[vectors.distance],
        indexed_fields=keyword_fields,
    )


def _filter(conditions: dict[str, str]) -> models.Filter | None:
    if not conditions:
        return None
    return models.Filter(
        must=[
            models.FieldCondition(key=k, match=models.MatchValue(value=v))
            for k, v in conditions.items()
        ]
    )


def _scored(point: models.ScoredPoint) -> ScoredPoint:
    payload = dict(point.payload or {})
    original = payload.pop(ID_PAYLOAD_KEY, None)
    return ScoredPoint(
        id=original if original is not None else str(point.id),
        score=point.score,
        payload=payload,
    )


def _grpc_code(exc: BaseException) -> str | None:
    code = getattr(exc, "code", None)
    if callable(code):
        try:
            return getattr(code(), "name", None)
        except Exception:  # not a gRPC error after all
            return None
    return None


def _http_status(exc: BaseException) -> int | None:
    status = getattr(exc, "status_code", None)
    return status if isinstance(status, int) else None


def is_transient(exc: BaseException) -> bool:
    if _grpc_code(exc) in _TRANSIENT_GRPC or _http_status(exc) in _TRANSIENT_HTTP:
        return True
    # ResponseHandlingException wraps httpx transport errors (connect/read timeouts).
    from qdrant_client.http.exceptions import ResponseHandlingException

    return isinstance(exc, ResponseHandlingException | TimeoutError | ConnectionError)


def _is_not_found(exc: BaseException) -> bool:
    if _grpc_code(exc) == "NOT_FOUND" or _http_status(exc) == 404:
        return True
    # Local mode (tests) raises ValueError("Collection x not found").
    return isinstance(exc, ValueError) and "not found" in str(exc).lower()


def _is_already_exists(exc: BaseException) -> bool:
    if _grpc_code(exc) == "ALREADY_EXISTS" or _http_status(exc) == 409:
        return True
    return "already exists" in str(exc).lower()
