"""CognitiveService: Embed with the built-in embedder and a content-hash cache.

IndexDocuments, Search, Classify and Generate answer UNIMPLEMENTED until the cognitive
services issue adds them.
"""

from __future__ import annotations

import asyncio

import grpc

from aiwfe.channels import Downstream
from aiwfe.cognitive.v1 import cognitive_service_pb2 as pb
from aiwfe.cognitive.v1 import cognitive_service_pb2_grpc as pb_grpc
from aiwfe.config import Settings
from aiwfe.data.v1 import cache_store_service_pb2
from aiwfe.errors import InvalidArgument
from aiwfe.identity import InternalIdentity
from aiwfe.interceptors import InternalIdentityInterceptor
from aiwfe.server import Service
from aiwfe.validation import Violations
from cognitive.builtin_embedder import HashingEmbedder
from cognitive.embed_cache import EmbeddingCache, cache_key

# Above this many texts to compute, embed off the event loop so other calls keep flowing.
_THREAD_THRESHOLD = 32


class CognitiveServicer(pb_grpc.CognitiveServiceServicer):
    def __init__(
        self, settings: Settings, embedder: HashingEmbedder, cache: EmbeddingCache
    ) -> None:
        self._limits = settings.cognitive
        self._embedder = embedder
        self._cache = cache

    def _validate_texts(self, texts: list[str], field: str = "texts") -> None:
        v = Violations()
        limit = self._limits.max_texts
        if v.check(
            1 <= len(texts) <= limit, field, f"must list 1 to {limit} texts (got {len(texts)})"
        ):
            for i, text in enumerate(texts):
                v.text(text, f"{field}[{i}]", max_chars=self._limits.max_text_chars)
        v.raise_if_any()

    async def Embed(
        self, request: pb.EmbedRequest, context: grpc.aio.ServicerContext
    ) -> pb.EmbedResponse:
        texts = list(request.texts)
        self._validate_texts(texts)
        if request.model and request.model != self._embedder.model:
            raise InvalidArgument(
                [("model", f"unknown model {request.model!r}; available: {self._embedder.model}")]
            )
        model = self._embedder.model
        keys = [cache_key("embed", {"model": model, "text": t}) for t in texts]
        cached = (
            {} if request.bypass_cache else await self._cache.get_many(list(dict.fromkeys(keys)))
        )
        todo = [i for i, k in enumerate(keys) if k not in cached]
        computed: dict[str, list[float]] = {}
        if todo:
            batch = [texts[i] for i in todo]
            if len(batch) > _THREAD_THRESHOLD:
                matrix = await asyncio.to_thread(self._embedder.embed, batch)
            else:
                matrix = self._embedder.embed(batch)
            for i, row in zip(todo, matrix.tolist(), strict=True):
                computed[keys[i]] = row
            await self._cache.put_many(computed)
        response = pb.EmbedResponse(
            dimension=self._embedder.dimension, model=model, cached_count=len(texts) - len(todo)
        )
        for key in keys:
            response.embeddings.add().values.extend(cached.get(key) or computed[key])
        return response


class CognitiveService(Service):
    name = "cognitive"

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.identity = InternalIdentity.from_settings(settings)
        self.dataplatform = Downstream(
            "dataplatform",
            settings.services.dataplatform.address,
            settings,
            self.identity,
            caller=self.name,
            files=[cache_store_service_pb2.DESCRIPTOR],
        )
        cfg = settings.cognitive
        self.embedder = HashingEmbedder(cfg.embedding_dimension)
        self.cache = EmbeddingCache(
            self.dataplatform,
            cfg.memory_cache_entries,
            cfg.memory_cache_ttl,
            settings.redis.cache_strategies.cognitive_cache.ttl,
        )

    def register(self, server: grpc.aio.Server) -> list[str]:
        pb_grpc.add_CognitiveServiceServicer_to_server(
            CognitiveServicer(self.settings, self.embedder, self.cache), server
        )
        return [pb.DESCRIPTOR.services_by_name["CognitiveService"].full_name]

    def interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        return [InternalIdentityInterceptor(self.identity)]

    async def stop(self) -> None:
        await self.dataplatform.close()
