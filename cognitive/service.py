# Over 600 lines on purpose: one servicer for one proto service (ten RPCs), each method
# short; backends, cache, chunking and collection access live in modules of their own.
"""CognitiveService: Embed, IndexDocuments, Search, Classify, streamed Generate, and the
collections' owners and sharing (ListCollections, Share/UnshareCollection, DeleteCollection).

Embeddings come from the configured backends (`cognitive/backends.py`) through the seed's
multi-layer cache (`cognitive/embed_cache.py`); vectors are stored and searched in
dataplatform's VectorStoreService. Indexing does not go through the cache: chunks are
one-off texts that would only evict the entries worth keeping.
"""

from __future__ import annotations

import asyncio
import math
import re
from collections.abc import AsyncIterator, Mapping, Sequence

import grpc
import numpy as np

from aiwfe.cognitive.v1 import cognitive_service_pb2 as pb
from aiwfe.cognitive.v1 import cognitive_service_pb2_grpc as pb_grpc
from aiwfe.data.v1 import cache_store_service_pb2, vector_store_service_pb2
from aiwfe.data.v1 import vector_store_service_pb2 as vs_pb
from aiwfe.data.v1 import vector_store_service_pb2_grpc as vs_grpc
from aiwfe.runtime.cache import TTLCache
from aiwfe.runtime.channels import Upstream
from aiwfe.runtime.config import Settings
from aiwfe.runtime.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unavailable,
)
from aiwfe.runtime.identity import InternalIdentity, Principal, require_principal
from aiwfe.runtime.interceptors import InternalIdentityInterceptor
from aiwfe.runtime.rbac import Rbac
from aiwfe.runtime.redis_client import RedisClient
from aiwfe.runtime.server import Service
from aiwfe.runtime.validation import Violations
from cognitive.backends import Backends, EmbeddingBackend, GenerationParams
from cognitive.chunking import chunk_text
from cognitive.collection_access import INDEX_PERMISSION, Rights, rights
from cognitive.embed_cache import EmbeddingCache

# Bounds from the contract (cognitive_service.proto comments).
MAX_TOP_K = 100
DEFAULT_TOP_K = 10
MIN_LABELS, MAX_LABELS = 2, 100
MAX_LABEL_CHARS = 200
MAX_EXAMPLES = 1000
DEFAULT_CONTEXT_TOP_K, MAX_CONTEXT_TOP_K = 4, 20
MAX_GENERATE_TOKENS = 32768
MAX_DOCUMENT_ID_CHARS = 200  # chunk ids `{id}#{n}` stay under the store's 256
MAX_METADATA_FIELDS = 32
MAX_METADATA_VALUE_CHARS = 1024
MAX_USERNAME_CHARS = 64  # the account store's limit
# Payload keys every chunk carries; metadata may not shadow them.
DOCUMENT_ID, TEXT = "document_id", "text"
RESERVED_KEYS = frozenset({DOCUMENT_ID, TEXT})
COLLECTION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
FIELD_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,63}$")
# Points per UpsertPoints: 256 x 768 floats plus 1,000-char texts stay near 1 MB, well under
# the 4 MB message limit (the store would take 1,000).
UPSERT_BATCH = 256
COUNT_CONCURRENCY = 32  # CountPoints calls in flight per IndexDocuments
COLLECTION_CACHE_TTL = 10.0  # seconds a collection's shape is trusted without asking again


class CognitiveServicer(pb_grpc.CognitiveServiceServicer):
    """The RPCs; every input bounded and checked before any work is done. Collections are
    used under `cognitive/collection_access.py`'s rule, checked on every call."""

    def __init__(
        self,
        settings: Settings,
        backends: Backends,
        cache: EmbeddingCache,
        dataplatform: Upstream,
    ) -> None:
        self._cfg = settings.cognitive
        self._backends = backends
        self._cache = cache
        self._dp = dataplatform
        self._vectors = vs_grpc.VectorStoreServiceStub(dataplatform.channel)
        self._collections: TTLCache[str, vs_pb.Collection] = TTLCache(256)
        self._rbac = Rbac(settings.rbac)
        self._admin_username = settings.authentication.admin.username

    # --- embeddings -----------------------------------------------------------------------

    async def _embed(
        self, backend: EmbeddingBackend, texts: Sequence[str], *, bypass: bool = False
    ) -> tuple[list[list[float]], int]:
        """Vectors for `texts` through the cache, and how many texts a cache layer answered."""
        keys = [self._cache.key({"model": backend.model, "text": t}) for t in texts]
        text_of = dict(zip(keys, texts, strict=True))

        async def compute(todo: list[str]) -> dict[str, list[float]]:
            vectors = await self._compute(backend, [text_of[k] for k in todo])
            return dict(zip(todo, vectors, strict=True))

        found, cached = await self._cache.get_or_compute(
            list(dict.fromkeys(keys)), compute, bypass=bypass
        )
        return [found[k] for k in keys], sum(k in cached for k in keys)

    async def _compute(self, backend: EmbeddingBackend, texts: list[str]) -> list[list[float]]:
        """Embeds in backend-sized batches and checks the vectors are usable."""
        out: list[list[float]] = []
        step = self._cfg.max_texts
        for i in range(0, len(texts), step):
            out.extend(await backend.embed(texts[i : i + step]))
        lengths = {len(v) for v in out}
        if len(out) != len(texts) or len(lengths) != 1 or 0 in lengths:
            raise Unavailable(
                f"embedding backend {backend.name!r} returned malformed vectors",
                reason="BACKEND_REPLY_INVALID",
                metadata={"backend": backend.name},
            )
        return out

    def _check_texts(self, v: Violations, texts: Sequence[str], field: str) -> None:
        limit = self._cfg.max_texts
        if v.check(
            1 <= len(texts) <= limit, field, f"must list 1 to {limit} texts (got {len(texts)})"
        ):
            for i, text in enumerate(texts):
                v.text(text, f"{field}[{i}]", max_chars=self._cfg.max_text_chars)

    async def Embed(
        self, request: pb.EmbedRequest, context: grpc.aio.ServicerContext
    ) -> pb.EmbedResponse:
        v = Violations()
        self._check_texts(v, request.texts, "texts")
        v.raise_if_any()
        backend = self._backends.embedder(request.model)
        vectors, cached = await self._embed(
            backend, list(request.texts), bypass=request.bypass_cache
        )
        response = pb.EmbedResponse(
            dimension=len(vectors[0]), model=backend.model, cached_count=cached
        )
        for vector in vectors:
            response.embeddings.add().values.extend(vector)
        return response

    # --- collections ----------------------------------------------------------------------

    async def _get_collection(self, name: str, fresh: bool = False) -> vs_pb.Collection | None:
        """The collection's shape (cached briefly), or None when it does not exist."""
        if not fresh and (hit := self._collections.get(name)) is not None:
            return hit
        try:
            reply = await self._dp.call(
                self._vectors.GetCollection, vs_pb.GetCollectionRequest(name=name)
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise
        self._collections.set(name, reply.collection, COLLECTION_CACHE_TTL)
        return reply.collection

    async def _ensure_collection(
        self, name: str, dimension: int, fields: Sequence[str], owner: Principal
    ) -> tuple[vs_pb.Collection, bool]:
        """The collection, created on first use and owned by `owner`; True when this call
        created it."""
        existing = await self._get_collection(name)
        if existing is not None:
            return existing, False
        spec = vs_pb.Collection(
            name=name, dimension=dimension, distance="Cosine", indexed_fields=fields
        )
        request = vs_pb.CreateCollectionRequest(
            collection=spec, owner_id=owner.user_id, owner_username=owner.username
        )
        try:
            reply = await self._dp.call(self._vectors.CreateCollection, request)
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.ALREADY_EXISTS:
                raise
            # A concurrent first use won the race: use what it created (the caller checks
            # it may write there).
            found = await self._get_collection(name)
            if found is None:
                raise
            return found, False
        self._collections.set(name, reply.collection, COLLECTION_CACHE_TTL)
        return reply.collection, True

    def _check_dimension(
        self, collection: vs_pb.Collection, backend: EmbeddingBackend, dimension: int
    ) -> None:
        if collection.dimension != dimension:
            raise FailedPrecondition(
                f"collection {collection.name!r} holds {collection.dimension}-d vectors but "
                f"model {backend.model!r} produces {dimension}-d ones: name the model the "
                "collection was indexed with in the request's model field, or index into a "
                "new collection (vectors are never padded or projected)",
                reason="DIMENSION_MISMATCH",
                metadata={
                    "collection": collection.name,
                    "collectionDimension": str(collection.dimension),
                    "model": backend.model,
                    "modelDimension": str(dimension),
                },
            )

    # --- access ---------------------------------------------------------------------------

    @staticmethod
    def _not_found(name: str, field: str = "collection") -> NotFound:
        """The one answer for a missing collection and for one the caller may not use."""
        return NotFound(
            f"collection {name!r} does not exist: IndexDocuments creates it",
            reason="COLLECTION_NOT_FOUND",
            metadata={"field": field, "collection": name},
        )

    async def _access(self, name: str) -> vs_pb.CollectionAccess:
        """Owner and grants, asked afresh every call so an unshare takes effect at once."""
        reply = await self._dp.call(
            self._vectors.GetCollectionAccess, vs_pb.GetCollectionAccessRequest(name=name)
        )
        return reply.access

    async def _authorize(
        self, name: str, principal: Principal, need: str, field: str = "collection"
    ) -> Rights:
        """The caller's rights on `name`, raising NOT_FOUND without `need` ("read", "write"
        or "manage") unless it may read: then PERMISSION_DENIED (it knows the collection)."""
        granted = rights(principal, await self._access(name), self._rbac)
        if not granted.read:
            raise self._not_found(name, field)
        if not getattr(granted, need):
            action = "index into" if need == "write" else "share or delete"
            raise PermissionDenied(
                f"you may not {action} collection {name!r}: ask its owner",
                reason="COLLECTION_ACCESS_DENIED",
                metadata={"collection": name, "access": need},
            )
        return granted

    # --- IndexDocuments -------------------------------------------------------------------

    def _check_collection(self, v: Violations, name: str, field: str) -> None:
        if v.check(bool(name), field, "must not be empty"):
            v.check(
                bool(COLLECTION_RE.match(name)),
                field,
                "must be 1-128 letters, digits, '_', '-' or '.', starting with a letter or digit",
            )

    def _check_fields(
        self, v: Violations, fields: Mapping[str, str], field: str, reserved: frozenset[str]
    ) -> None:
        v.check(
            len(fields) <= MAX_METADATA_FIELDS,
            field,
            f"must have at most {MAX_METADATA_FIELDS} entries (got {len(fields)})",
        )
        for key, value in fields.items():
            path = f"{field}[{key!r}]"
            if not FIELD_RE.match(key):
                v.add(path, "key must be 1-64 letters, digits, '_', '-' or '.', letter first")
            elif key in reserved:
                v.add(path, f"key {key!r} is reserved ({', '.join(sorted(reserved))})")
            v.text(value, path, max_chars=MAX_METADATA_VALUE_CHARS, required=False)

    async def IndexDocuments(
        self, request: pb.IndexDocumentsRequest, context: grpc.aio.ServicerContext
    ) -> pb.IndexDocumentsResponse:
        cfg = self._cfg
        v = Violations()
        self._check_collection(v, request.collection, "collection")
        docs = request.documents
        v.check(
            1 <= len(docs) <= cfg.max_documents,
            "documents",
            f"must list 1 to {cfg.max_documents} documents (got {len(docs)})",
        )
        seen: set[str] = set()
        chunks: list[list[str]] = []
        for i, doc in enumerate(docs[: cfg.max_documents]):
            v.text(doc.id, f"documents[{i}].id", max_chars=MAX_DOCUMENT_ID_CHARS)
            if doc.id in seen:
                v.add(f"documents[{i}].id", f"duplicate document id {doc.id!r} in this call")
            seen.add(doc.id)
            v.text(doc.text, f"documents[{i}].text", max_chars=cfg.max_document_chars)
            self._check_fields(v, doc.metadata, f"documents[{i}].metadata", RESERVED_KEYS)
            chunks.append(
                chunk_text(doc.text, cfg.chunk_chars, cfg.chunk_overlap_chars)
                if doc.text and len(doc.text) <= cfg.max_document_chars
                else []
            )
        total = sum(len(c) for c in chunks)
        v.check(
            total <= cfg.max_chunks_per_call,
            "documents",
            f"would make {total} chunks, more than {cfg.max_chunks_per_call}: split the call",
        )
        for i, doc_chunks in enumerate(chunks):
            if docs[i].text and not doc_chunks:
                v.add(f"documents[{i}].text", "must contain more than whitespace")
        v.raise_if_any()
        principal = require_principal()
        # The gateway checks this too; a workflow step's call is checked only here.
        if not self._rbac.allows(principal.roles, INDEX_PERMISSION):
            raise PermissionDenied(
                f"permission {INDEX_PERMISSION!r} required",
                reason="PERMISSION_MISSING",
                metadata={"permission": INDEX_PERMISSION},
            )
        # An existing collection needs write access; a new one becomes the caller's. Asked
        # afresh: a shape cached before a delete must not refuse a new namesake.
        granted = rights(principal, await self._access(request.collection), self._rbac)
        if not granted.write and await self._get_collection(request.collection, fresh=True):
            await self._authorize(request.collection, principal, "write")
        backend = self._backends.embedder(request.model)

        flat = [c for doc_chunks in chunks for c in doc_chunks]
        vectors = await self._compute(backend, flat)
        fields = sorted({DOCUMENT_ID, *(k for doc in docs for k in doc.metadata)})
        collection, created = await self._ensure_collection(
            request.collection, len(vectors[0]), fields, principal
        )
        if not created and not granted.write:
            # Someone else may have created it while we embedded: their collection now.
            await self._authorize(request.collection, principal, "write")
        self._check_dimension(collection, backend, len(vectors[0]))

        # Chunks beyond the new count are stale (ids are `{id}#{n}`, n = 0..count-1).
        previous = {doc.id: 0 for doc in docs}
        if not created:
            previous = await self._chunk_counts(collection.name, [doc.id for doc in docs])
        points: list[vs_pb.Point] = []
        stale: list[str] = []
        it = iter(vectors)
        for doc, doc_chunks in zip(docs, chunks, strict=True):
            for n, text in enumerate(doc_chunks):
                payload = {**doc.metadata, DOCUMENT_ID: doc.id, TEXT: text}
                points.append(vs_pb.Point(id=f"{doc.id}#{n}", values=next(it), payload=payload))
            stale.extend(f"{doc.id}#{n}" for n in range(len(doc_chunks), previous[doc.id]))
        for i in range(0, len(points), UPSERT_BATCH):
            await self._dp.call(
                self._vectors.UpsertPoints,
                vs_pb.UpsertPointsRequest(
                    collection=collection.name, points=points[i : i + UPSERT_BATCH]
                ),
            )
        for i in range(0, len(stale), UPSERT_BATCH):
            await self._dp.call(
                self._vectors.DeletePoints,
                vs_pb.DeletePointsRequest(
                    collection=collection.name, ids=stale[i : i + UPSERT_BATCH]
                ),
            )
        return pb.IndexDocumentsResponse(document_count=len(docs), chunk_count=len(points))

    async def _chunk_counts(self, collection: str, ids: list[str]) -> dict[str, int]:
        """How many chunks each document has stored, asked a group at a time (bounded)."""

        async def count(doc_id: str) -> int:
            reply = await self._dp.call(
                self._vectors.CountPoints,
                vs_pb.CountPointsRequest(collection=collection, filter={DOCUMENT_ID: doc_id}),
            )
            return int(reply.count)

        counts: dict[str, int] = {}
        for i in range(0, len(ids), COUNT_CONCURRENCY):
            group = ids[i : i + COUNT_CONCURRENCY]
            counts.update(zip(group, await asyncio.gather(*map(count, group)), strict=True))
        return counts

    # --- Search ---------------------------------------------------------------------------

    async def _search(
        self,
        collection_name: str,
        query: str,
        top_k: int,
        filter: Mapping[str, str],
        threshold: float | None,
        model: str = "",
        field: str = "collection",
    ) -> tuple[list[pb.SearchHit], EmbeddingBackend]:
        backend = self._backends.embedder(model)
        await self._authorize(collection_name, require_principal(), "read", field)
        collection = await self._get_collection(collection_name)
        if collection is None:
            raise self._not_found(collection_name, field)
        unindexed = sorted(set(filter) - set(collection.indexed_fields))
        if unindexed:
            indexed = ", ".join(collection.indexed_fields)
            raise InvalidArgument(
                [
                    (f"filter[{k!r}]", f"field {k!r} is not indexed in {collection_name!r}"
                     f" (indexed: {indexed})")
                    for k in unindexed
                ]
            )  # fmt: skip
        (vector,), _ = await self._embed(backend, [query])
        self._check_dimension(collection, backend, len(vector))
        request = vs_pb.SearchPointsRequest(
            collection=collection_name,
            vector=vector,
            top_k=top_k,
            filter=dict(filter),
            score_threshold=threshold or 0.0,
            has_score_threshold=threshold is not None,
        )
        try:
            reply = await self._dp.call(self._vectors.SearchPoints, request)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                self._collections.pop(collection_name)  # deleted since we cached its shape
            raise
        hits = []
        for point in reply.hits:
            payload = dict(point.payload)
            document_id = payload.pop(DOCUMENT_ID, "")
            text = payload.pop(TEXT, "")
            hits.append(
                pb.SearchHit(
                    document_id=document_id,
                    chunk_id=point.id,
                    text=text,
                    metadata=payload,
                    score=point.score,
                )
            )
        return hits, backend

    async def Search(
        self, request: pb.SearchRequest, context: grpc.aio.ServicerContext
    ) -> pb.SearchResponse:
        v = Violations()
        self._check_collection(v, request.collection, "collection")
        v.text(request.query, "query", max_chars=self._cfg.max_text_chars)
        top_k = request.top_k or DEFAULT_TOP_K
        v.check(1 <= top_k <= MAX_TOP_K, "top_k", f"must be 1 to {MAX_TOP_K} (got {top_k})")
        self._check_fields(v, request.filter, "filter", frozenset())
        threshold = request.score_threshold
        v.check(
            math.isfinite(threshold) and -1.0 <= threshold <= 1.0,
            "score_threshold",
            f"must be a cosine similarity in [-1, 1] (got {threshold})",
        )
        v.raise_if_any()
        # proto3 cannot tell 0 from unset: 0 means "no threshold".
        hits, backend = await self._search(
            request.collection,
            request.query,
            top_k,
            request.filter,
            threshold or None,
            model=request.model,
        )
        return pb.SearchResponse(hits=hits, model=backend.model)

    # --- ListCollections, ShareCollection, UnshareCollection, DeleteCollection -----------

    def _public(
        self, collection: vs_pb.Collection, access: vs_pb.CollectionAccess, granted: Rights
    ) -> pb.Collection:
        """A collection as its user sees it: grants only for those who may manage it."""
        out = pb.Collection(
            name=collection.name,
            owner=access.owner_username if access.owner_id else self._admin_username,
            dimension=collection.dimension,
            document_chunk_count=collection.point_count,
            writable=granted.write,
        )
        if granted.manage:
            for grant in access.grants:
                if grant.role:
                    out.grants.add(role=grant.role, write=grant.write)
                else:
                    out.grants.add(username=grant.username, write=grant.write)
        return out

    async def ListCollections(
        self, request: pb.ListCollectionsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListCollectionsResponse:
        principal = require_principal()
        reply = await self._dp.call(self._vectors.ListCollections, vs_pb.ListCollectionsRequest())
        out = []
        for collection in reply.collections:
            granted = rights(principal, collection.access, self._rbac)
            if granted.read:
                out.append(self._public(collection, collection.access, granted))
        out.sort(key=lambda c: c.name)
        return pb.ListCollectionsResponse(collections=out)

    async def _managed(self, name: str) -> vs_pb.Collection:
        """The existing collection `name`, which the caller may manage."""
        v = Violations()
        self._check_collection(v, name, "collection")
        v.raise_if_any()
        await self._authorize(name, require_principal(), "manage")
        collection = await self._get_collection(name, fresh=True)
        if collection is None:
            raise self._not_found(name)
        return collection

    def _check_grantee(
        self, v: Violations, username: str, role: str, field: str, known: bool = True
    ) -> None:
        """One of username and role; `known`: the role must be configured (to grant it,
        not to take back a grant of a role since removed from the config)."""
        if v.check(bool(username) != bool(role), field, "set one of username and role"):
            v.text(username, f"{field}.username", max_chars=MAX_USERNAME_CHARS, required=False)
            v.text(role, f"{field}.role", max_chars=MAX_USERNAME_CHARS, required=False)
            if role and known:
                v.check(
                    self._rbac.known_role(role),
                    f"{field}.role",
                    f"{role[:64]!r} is not a configured role",
                )

    def _described(
        self, collection: vs_pb.Collection, access: vs_pb.CollectionAccess
    ) -> pb.Collection:
        """The collection after a change of its grants, as the caller sees it."""
        return self._public(collection, access, rights(require_principal(), access, self._rbac))

    async def ShareCollection(
        self, request: pb.ShareCollectionRequest, context: grpc.aio.ServicerContext
    ) -> pb.ShareCollectionResponse:
        grant = request.grant
        v = Violations()
        self._check_collection(v, request.collection, "collection")
        self._check_grantee(v, grant.username, grant.role, "grant")
        v.raise_if_any()
        collection = await self._managed(request.collection)
        reply = await self._dp.call(
            self._vectors.GrantCollectionAccess,
            vs_pb.GrantCollectionAccessRequest(
                name=request.collection, username=grant.username, role=grant.role, write=grant.write
            ),
        )
        return pb.ShareCollectionResponse(collection=self._described(collection, reply.access))

    async def UnshareCollection(
        self, request: pb.UnshareCollectionRequest, context: grpc.aio.ServicerContext
    ) -> pb.UnshareCollectionResponse:
        v = Violations()
        self._check_collection(v, request.collection, "collection")
        self._check_grantee(v, request.username, request.role, "grantee", known=False)
        v.raise_if_any()
        collection = await self._managed(request.collection)
        reply = await self._dp.call(
            self._vectors.RevokeCollectionAccess,
            vs_pb.RevokeCollectionAccessRequest(
                name=request.collection, username=request.username, role=request.role
            ),
        )
        return pb.UnshareCollectionResponse(collection=self._described(collection, reply.access))

    async def DeleteCollection(
        self, request: pb.DeleteCollectionRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeleteCollectionResponse:
        await self._managed(request.collection)
        try:
            await self._dp.call(
                self._vectors.DeleteCollection,
                vs_pb.DeleteCollectionRequest(name=request.collection),
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:
                raise
            raise self._not_found(request.collection) from None
        finally:
            self._collections.pop(request.collection)
        return pb.DeleteCollectionResponse()

    # --- Classify -------------------------------------------------------------------------

    async def Classify(
        self, request: pb.ClassifyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ClassifyResponse:
        v = Violations()
        v.text(request.text, "text", max_chars=self._cfg.max_text_chars)
        labels = list(request.labels)
        if v.check(
            MIN_LABELS <= len(labels) <= MAX_LABELS,
            "labels",
            f"must list {MIN_LABELS} to {MAX_LABELS} labels (got {len(labels)})",
        ):
            for i, label in enumerate(labels):
                v.text(label, f"labels[{i}]", max_chars=MAX_LABEL_CHARS)
            if len(set(labels)) != len(labels):
                v.add("labels", "must not repeat a label")
        v.check(
            len(request.examples) <= MAX_EXAMPLES,
            "examples",
            f"must list at most {MAX_EXAMPLES} examples (got {len(request.examples)})",
        )
        known = set(labels)
        for i, example in enumerate(request.examples[:MAX_EXAMPLES]):
            if example.label not in known:
                v.add(f"examples[{i}].label", f"{example.label!r} is not one of the labels")
            v.text(example.text, f"examples[{i}].text", max_chars=self._cfg.max_text_chars)
        v.raise_if_any()
        backend = self._backends.embedder("")
        texts = [request.text, *labels, *(e.text for e in request.examples)]
        vectors, _ = await self._embed(backend, texts)
        matrix = np.asarray(vectors, dtype=np.float64)
        norms = np.linalg.norm(matrix, axis=1, keepdims=True)
        matrix /= np.where(norms > 0, norms, 1.0)
        query, label_vecs = matrix[0], matrix[1 : 1 + len(labels)]
        scores = label_vecs @ query
        if request.examples:
            example_vecs = matrix[1 + len(labels) :]
            for index, label in enumerate(labels):
                rows = [i for i, e in enumerate(request.examples) if e.label == label]
                if rows:
                    centroid = example_vecs[rows].mean(axis=0)
                    norm = np.linalg.norm(centroid)
                    # Equal say for the label's name and its examples' centroid.
                    if norm > 0:
                        scores[index] = (scores[index] + centroid @ query / norm) / 2
        order = sorted(range(len(labels)), key=lambda i: (-scores[i], i))
        return pb.ClassifyResponse(
            labels=[pb.LabelScore(label=labels[i], score=float(scores[i])) for i in order],
            model=backend.model,
        )

    # --- Generate -------------------------------------------------------------------------

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        v = Violations()
        v.text(request.prompt, "prompt", max_chars=self._cfg.max_text_chars)
        v.text(request.system, "system", max_chars=self._cfg.max_text_chars, required=False)
        v.check(
            0 <= request.max_tokens <= MAX_GENERATE_TOKENS,
            "max_tokens",
            f"must be 0 (backend default) to {MAX_GENERATE_TOKENS}",
        )
        v.check(
            math.isfinite(request.temperature) and 0.0 <= request.temperature <= 2.0,
            "temperature",
            "must be 0 (backend default) to 2",
        )
        top_k = request.context_top_k or DEFAULT_CONTEXT_TOP_K
        v.check(
            1 <= top_k <= MAX_CONTEXT_TOP_K,
            "context_top_k",
            f"must be 0 (default {DEFAULT_CONTEXT_TOP_K}) to {MAX_CONTEXT_TOP_K}",
        )
        if request.context_collection:
            self._check_collection(v, request.context_collection, "context_collection")
        v.raise_if_any()
        backend = self._backends.generator(request.model)
        prompt, citations = request.prompt, []
        if request.context_collection:
            hits, _ = await self._search(
                request.context_collection,
                request.prompt,
                top_k,
                {},
                None,
                field="context_collection",
            )
            citations = [hit.chunk_id for hit in hits]
            prompt = grounded_prompt(request.prompt, hits)
        params = GenerationParams(
            prompt=prompt,
            system=request.system,
            max_tokens=request.max_tokens,
            temperature=request.temperature,
        )
        first = True
        async for piece in backend.generate(params):
            yield pb.GenerateResponse(
                text=piece, citations=citations if first else (), model=backend.model
            )
            first = False
        yield pb.GenerateResponse(
            done=True, citations=citations if first else (), model=backend.model
        )


def grounded_prompt(question: str, hits: Sequence[pb.SearchHit]) -> str:
    """The prompt with retrieved chunks as numbered context the model is asked to cite."""
    if not hits:
        return question
    context = "\n\n".join(f"[{hit.chunk_id}] {hit.text}" for hit in hits)
    return (
        "Answer the question using the context below. Cite the sources you use by their id "
        "in square brackets, e.g. [doc#0]. If the context does not answer it, say so.\n\n"
        f"Context:\n{context}\n\nQuestion: {question}"
    )


class CognitiveService(Service):
    name = "cognitive"

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        cfg = settings.cognitive  # chunk sizes checked by CognitiveSettings
        self.identity = InternalIdentity.from_settings(settings)
        self.dataplatform = Upstream(
            "dataplatform",
            settings.services.dataplatform.address,
            settings,
            self.identity,
            caller=self.name,
            files=[cache_store_service_pb2.DESCRIPTOR, vector_store_service_pb2.DESCRIPTOR],
        )
        self.redis = RedisClient(settings.redis)
        strategy = settings.redis.cache_strategies.cognitive_cache
        self.cache = EmbeddingCache(
            self.dataplatform,
            self.redis,
            l1_entries=cfg.memory_cache_entries,
            l1_ttl=cfg.memory_cache_ttl,
            ttl=strategy.ttl,
            persistent_budget=cfg.cache.persistent_budget_ms / 1000,
            key_pattern=strategy.key_pattern,
        )
        self.backends = Backends(settings)

    def register(self, server: grpc.aio.Server) -> list[str]:
        pb_grpc.add_CognitiveServiceServicer_to_server(
            CognitiveServicer(self.settings, self.backends, self.cache, self.dataplatform), server
        )
        return [pb.DESCRIPTOR.services_by_name["CognitiveService"].full_name]

    def interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        return [InternalIdentityInterceptor(self.identity)]

    async def stop(self) -> None:
        await self.backends.close()
        await self.redis.close()
        await self.dataplatform.close()
