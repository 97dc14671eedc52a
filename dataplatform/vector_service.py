"""VectorStoreService: collections and points on the configured vector store.

The store is a Qdrant server (`qdrant.url` set) or Qdrant's engine in process under
`qdrant.path` (default `<home>/qdrant`); the embedded engine allows one process per path.
Every request is validated here, whole, before the store sees it, so a bad batch writes
nothing and the caller gets every offending field at once (BadRequest field violations).
"""

from __future__ import annotations

import contextlib
import math
import re
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from aiwfe.data.v1 import vector_store_service_pb2 as pb
from aiwfe.data.v1 import vector_store_service_pb2_grpc as pb_grpc
from aiwfe.runtime.config import LoggingSettings, QdrantPerformanceSettings, QdrantSettings
from aiwfe.runtime.errors import AlreadyExists, InvalidArgument, NotFound, Unavailable
from aiwfe.runtime.metrics import qdrant_engine_resident_bytes, qdrant_query_latency
from aiwfe.runtime.validation import Violations
from dataplatform.collection_access import CollectionAccessStore
from dataplatform.vectors import (
    CollectionExists,
    CollectionNotFound,
    CollectionSpec,
    EdgeVectorStore,
    UnindexedFilterField,
    VectorPoint,
    VectorStore,
    open_vector_store,
)
from dataplatform.vectors.base import DISTANCES, ID_PAYLOAD_KEY, NAME_PATTERN
from dataplatform.vectors.host import HostedVectorStore, VectorEngineUnavailable

MAX_BATCH = 1000
MAX_DIMENSION = 65536
MAX_ID_CHARS = 256
MAX_INDEXED_FIELDS = 32
MAX_FIELD_CHARS = 128
MAX_PAYLOAD_FIELDS = 64
MAX_PAYLOAD_VALUE_CHARS = 65536
MAX_FILTER_FIELDS = 16
MAX_TOP_K = 100
# Qdrant reads '.' and '[]' in a filter key as a path into nested payload: keep indexed
# (filterable) field names plain so a filter always means the flat key it names.
FIELD_PATTERN = re.compile(r"[A-Za-z_][A-Za-z0-9_-]{0,127}")


def index_options(perf: QdrantPerformanceSettings) -> dict[str, Any]:
    """Store constructor options from `qdrant.performance` (both stores take the same ones,
    but for `release_originals_every`, the embedded engine's alone);
    benchmarks.vector_search builds its collections with these too."""
    return {
        "hnsw_m": perf.hnsw_config.m,
        "ef_construct": perf.hnsw_config.ef_construct,
        "quantization": perf.quantization_enabled,
        "vectors_on_disk": perf.vectors_on_disk,
        "hnsw_ef": perf.hnsw_ef,
        "oversampling": perf.oversampling,
        "release_originals_every": perf.release_originals_every,
    }


def open_configured_store(
    q: QdrantSettings, home: Path, log: LoggingSettings | None = None
) -> VectorStore:
    """The store chosen by config, with the seed's HNSW, quantization and client settings;
    the embedded engine's default directory is `home`/qdrant (its process logs by `log`)."""
    index = index_options(q.performance)
    if q.url:
        del index["release_originals_every"]  # the embedded engine's: a server maps its own
        conn = q.connection
        return open_vector_store(
            q.url,
            Path(),
            api_key=q.api_key,
            timeout=conn.timeout,
            retries=conn.retry_attempts,
            pool_size=conn.connection_pool_size,
            **index,
        )
    path = Path(q.path).expanduser() if q.path else home / "qdrant"
    if q.engine_process:
        return HostedVectorStore(path, log, **index)
    return open_vector_store(None, path, **index)


def _check_name(value: str, field: str, v: Violations) -> None:
    if not value:
        v.add(field, "must not be empty")
    elif not NAME_PATTERN.fullmatch(value):
        v.add(field, "must be 1-128 letters, digits, '_', '-' or '.', starting alphanumeric")


def _check_filter(
    filter: Mapping[str, str], spec: CollectionSpec, field: str, v: Violations
) -> None:
    v.check(len(filter) <= MAX_FILTER_FIELDS, field, f"at most {MAX_FILTER_FIELDS} conditions")
    for key, value in filter.items():
        if key not in spec.indexed_fields:
            v.add(f"{field}.{key}", "is not an indexed field of this collection")
        elif len(value) > MAX_PAYLOAD_VALUE_CHARS:
            v.add(f"{field}.{key}", f"must be at most {MAX_PAYLOAD_VALUE_CHARS} characters")


def _check_vector(
    values: object, spec: CollectionSpec, field: str, v: Violations
) -> np.ndarray | None:
    arr = np.asarray(values, dtype=np.float32)
    if arr.shape[0] != spec.dimension:
        v.add(field, f"must have {spec.dimension} values (got {arr.shape[0]})")
        return None
    if not np.isfinite(arr).all():
        v.add(field, "must be finite numbers (no NaN or infinity)")
        return None
    if spec.distance == "Cosine" and not arr.any():
        v.add(field, "must not be all zeros under Cosine distance")
        return None
    return arr


def _collection(spec: CollectionSpec, count: int = 0) -> pb.Collection:
    return pb.Collection(
        name=spec.name,
        dimension=spec.dimension,
        distance=spec.distance,
        indexed_fields=list(spec.indexed_fields),
        point_count=count,
    )


class VectorService(pb_grpc.VectorStoreServiceServicer):
    """Validates requests, calls the store, maps its errors and records qdrant_query_latency.

    With an access store, collections' owners and grants are kept in PostgreSQL alongside
    (created, listed and deleted with the collection).
    """

    def __init__(
        self,
        qdrant: QdrantSettings,
        home: Path,
        store: VectorStore | None = None,
        access: CollectionAccessStore | None = None,
        log: LoggingSettings | None = None,
    ) -> None:
        self._defaults = qdrant.collection_config.vectors
        self.store = store or open_configured_store(qdrant, home, log)
        self._store_is_server = not isinstance(self.store, (EdgeVectorStore, HostedVectorStore))
        if isinstance(self.store, HostedVectorStore):
            qdrant_engine_resident_bytes.set_function(self.store.resident_bytes)
        self._access = access

    @property
    def access(self) -> CollectionAccessStore:
        if self._access is None:
            raise Unavailable(
                "collection access is not configured on this data platform",
                reason="COLLECTION_ACCESS_UNAVAILABLE",
            )
        return self._access

    @contextlib.contextmanager
    def _op(self, operation: str) -> Iterator[None]:
        """Times one store operation and turns store errors into the caller's status."""
        start = time.perf_counter()
        try:
            yield
        except CollectionNotFound as exc:
            raise NotFound(
                f"collection {exc.name!r} not found",
                reason="COLLECTION_NOT_FOUND",
                metadata={"collection": exc.name},
            ) from None
        except CollectionExists as exc:
            raise AlreadyExists(
                f"collection {exc.name!r} already exists",
                reason="COLLECTION_ALREADY_EXISTS",
                metadata={"collection": exc.name},
            ) from None
        except UnindexedFilterField as exc:
            raise InvalidArgument(
                [(f"filter.{exc.field}", "is not an indexed field of this collection")]
            ) from None
        except VectorEngineUnavailable:
            raise Unavailable(
                "the vector engine is restarting, retry later",
                reason="VECTOR_STORE_UNAVAILABLE",
                metadata={"dependency": "qdrant"},
            ) from None
        except Exception as exc:
            if self._store_is_server and _server_transient(exc):
                raise Unavailable(
                    "vector store unavailable, retry later",
                    reason="VECTOR_STORE_UNAVAILABLE",
                    metadata={"dependency": "qdrant"},
                ) from None
            raise
        finally:
            qdrant_query_latency.labels(operation=operation).observe(time.perf_counter() - start)

    async def _spec(self, name: str, field: str) -> CollectionSpec:
        v = Violations()
        _check_name(name, field, v)
        v.raise_if_any()
        with self._op("get_collection"):
            return await self.store.get_collection(name)

    async def CreateCollection(
        self, request: pb.CreateCollectionRequest, context: grpc.aio.ServicerContext
    ) -> pb.CreateCollectionResponse:
        c = request.collection
        dimension = c.dimension or self._defaults.size
        distance = c.distance or self._defaults.distance
        fields = list(c.indexed_fields)
        v = Violations()
        _check_name(c.name, "collection.name", v)
        v.check(
            0 < dimension <= MAX_DIMENSION,
            "collection.dimension",
            f"must be between 1 and {MAX_DIMENSION} (0 means {self._defaults.size})",
        )
        v.check(distance in DISTANCES, "collection.distance", f"must be one of {DISTANCES}")
        v.check(
            len(fields) <= MAX_INDEXED_FIELDS,
            "collection.indexed_fields",
            f"at most {MAX_INDEXED_FIELDS} fields",
        )
        v.check(len(set(fields)) == len(fields), "collection.indexed_fields", "must be unique")
        for i, name in enumerate(fields):
            field = f"collection.indexed_fields[{i}]"
            if not name:
                v.add(field, "must not be empty")
            elif not FIELD_PATTERN.fullmatch(name):
                v.add(field, "must be a letter or '_' then up to 127 letters, digits, '_' or '-'")
            v.check(name != ID_PAYLOAD_KEY, field, "is reserved")
        v.raise_if_any()
        spec = CollectionSpec(c.name, dimension, distance, tuple(fields))
        with self._op("create_collection"):
            await self.store.create_collection(spec)
        if self._access is not None:
            try:
                if request.owner_id:
                    await self._access.set_owner(
                        spec.name, request.owner_id, request.owner_username
                    )
                else:
                    await self._access.forget(spec.name)  # a deleted namesake's grants
            except BaseException:
                # No collection without its owner row: it would silently become the admin's.
                with contextlib.suppress(Exception), self._op("delete_collection"):
                    await self.store.delete_collection(spec.name)
                raise
        return pb.CreateCollectionResponse(collection=_collection(spec))

    async def GetCollection(
        self, request: pb.GetCollectionRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetCollectionResponse:
        spec = await self._spec(request.name, "name")
        with self._op("count"):
            count = await self.store.count(spec.name)
        return pb.GetCollectionResponse(collection=_collection(spec, count))

    async def ListCollections(
        self, request: pb.ListCollectionsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListCollectionsResponse:
        with self._op("list_collections"):
            specs = await self.store.list_collections()
        out = []
        for spec in specs:
            try:
                with self._op("count"):
                    count = await self.store.count(spec.name)
            except NotFound:
                continue  # deleted while listing
            out.append(_collection(spec, count))
        if self._access is not None and out:
            found = await self._access.get_many([c.name for c in out])
            for c in out:
                c.access.CopyFrom(found[c.name])
        return pb.ListCollectionsResponse(collections=out)

    async def DeleteCollection(
        self, request: pb.DeleteCollectionRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeleteCollectionResponse:
        v = Violations()
        _check_name(request.name, "name", v)
        v.raise_if_any()
        try:
            with self._op("delete_collection"):
                await self.store.delete_collection(request.name)
        except NotFound:
            # Gone already: a retry after a delete whose database step failed must not
            # leave the owner and grant rows behind (any other failure keeps them).
            if self._access is not None:
                await self._access.forget(request.name)
            raise
        if self._access is not None:
            await self._access.forget(request.name)
        return pb.DeleteCollectionResponse()

    async def UpsertPoints(
        self, request: pb.UpsertPointsRequest, context: grpc.aio.ServicerContext
    ) -> pb.UpsertPointsResponse:
        n = len(request.points)
        v = Violations()
        v.check(1 <= n <= MAX_BATCH, "points", f"must list 1 to {MAX_BATCH} points (got {n})")
        v.raise_if_any()
        spec = await self._spec(request.collection, "collection")
        points = []
        for i, p in enumerate(request.points):
            v.text(p.id, f"points[{i}].id", max_chars=MAX_ID_CHARS)
            vector = _check_vector(p.values, spec, f"points[{i}].values", v)
            v.check(
                len(p.payload) <= MAX_PAYLOAD_FIELDS,
                f"points[{i}].payload",
                f"at most {MAX_PAYLOAD_FIELDS} fields",
            )
            for key, value in p.payload.items():
                field = f"points[{i}].payload.{key[:MAX_FIELD_CHARS]}"
                v.text(key, field, max_chars=MAX_FIELD_CHARS)
                v.check(key != ID_PAYLOAD_KEY, field, "is a reserved key")
                v.check(
                    len(value) <= MAX_PAYLOAD_VALUE_CHARS,
                    field,
                    f"value must be at most {MAX_PAYLOAD_VALUE_CHARS} characters",
                )
            if vector is not None:
                points.append(VectorPoint(p.id, vector, dict(p.payload)))
        v.raise_if_any()
        with self._op("upsert"):
            written = await self.store.upsert(spec.name, points)
        return pb.UpsertPointsResponse(upserted=written)

    async def DeletePoints(
        self, request: pb.DeletePointsRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeletePointsResponse:
        ids = list(request.ids)
        v = Violations()
        v.check(1 <= len(ids) <= MAX_BATCH, "ids", f"must list 1 to {MAX_BATCH} ids")
        for i, point_id in enumerate(ids):
            v.text(point_id, f"ids[{i}]", max_chars=MAX_ID_CHARS)
        v.raise_if_any()
        spec = await self._spec(request.collection, "collection")
        with self._op("delete"):
            deleted = await self.store.delete(spec.name, ids)
        return pb.DeletePointsResponse(deleted=deleted)

    async def SearchPoints(
        self, request: pb.SearchPointsRequest, context: grpc.aio.ServicerContext
    ) -> pb.SearchPointsResponse:
        spec = await self._spec(request.collection, "collection")
        v = Violations()
        vector = _check_vector(request.vector, spec, "vector", v)
        v.check(1 <= request.top_k <= MAX_TOP_K, "top_k", f"must be between 1 and {MAX_TOP_K}")
        threshold = request.score_threshold if request.has_score_threshold else None
        v.check(
            threshold is None or math.isfinite(threshold),
            "score_threshold",
            "must be a finite number",
        )
        _check_filter(request.filter, spec, "filter", v)
        v.raise_if_any()
        if vector is None:  # _check_vector returns None only with a violation recorded
            raise RuntimeError("vector check passed without a vector")
        with self._op("search"):
            hits = await self.store.search(
                spec.name, vector, request.top_k, dict(request.filter), threshold
            )
        return pb.SearchPointsResponse(
            hits=[pb.ScoredPoint(id=h.id, score=h.score, payload=h.payload) for h in hits]
        )

    async def CountPoints(
        self, request: pb.CountPointsRequest, context: grpc.aio.ServicerContext
    ) -> pb.CountPointsResponse:
        spec = await self._spec(request.collection, "collection")
        v = Violations()
        _check_filter(request.filter, spec, "filter", v)
        v.raise_if_any()
        with self._op("count"):
            count = await self.store.count(spec.name, dict(request.filter))
        return pb.CountPointsResponse(count=count)

    async def GetCollectionAccess(
        self, request: pb.GetCollectionAccessRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetCollectionAccessResponse:
        v = Violations()
        _check_name(request.name, "name", v)
        v.raise_if_any()
        return pb.GetCollectionAccessResponse(access=await self.access.get(request.name))

    async def GrantCollectionAccess(
        self, request: pb.GrantCollectionAccessRequest, context: grpc.aio.ServicerContext
    ) -> pb.GrantCollectionAccessResponse:
        v = Violations()
        _check_name(request.name, "name", v)
        v.raise_if_any()
        access = await self.access.grant(
            request.name, request.username, request.role, request.write
        )
        return pb.GrantCollectionAccessResponse(access=access)

    async def RevokeCollectionAccess(
        self, request: pb.RevokeCollectionAccessRequest, context: grpc.aio.ServicerContext
    ) -> pb.RevokeCollectionAccessResponse:
        v = Violations()
        _check_name(request.name, "name", v)
        v.raise_if_any()
        access = await self.access.revoke(request.name, request.username, request.role)
        return pb.RevokeCollectionAccessResponse(access=access)

    async def close(self) -> None:
        await self.store.close()


def _server_transient(exc: BaseException) -> bool:
    # Imported here: qdrant-client costs ~70 MB of RSS and only the server store needs it.
    from dataplatform.vectors.server import is_transient

    return is_transient(exc)
