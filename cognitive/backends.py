"""Embedding and generation backends, chosen by configuration.

Embedding: a sentence encoder on ONNX Runtime (`cognitive/onnx_backend.py`, the default:
all-MiniLM-L6-v2), the built-in hashing embedder (always available, no download), Ollama
and OpenAI-compatible servers over HTTP (`cognitive/http_backends.py`). Generation: Ollama
or OpenAI-compatible. Each kind registers itself in `cognitive/registry.py`; importing its
module here is what makes it known. Several may be configured; requests pick one by
backend name or model name, else the configured default answers.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

# Imported for their registrations: kinds ollama and openai (onnx comes with its import below).
import cognitive.http_backends  # noqa: F401
from aiwfe.runtime.config import (
    CognitiveSettings,
    ConfigError,
    EmbeddingBackendSettings,
    Settings,
)
from aiwfe.runtime.errors import FailedPrecondition, InvalidArgument
from cognitive.builtin_embedder import HashingEmbedder
from cognitive.onnx_backend import WeightsUnavailable
from cognitive.registry import (
    EmbeddingBackend,
    GenerationBackend,
    GenerationParams,
    embedding_factory,
    embedding_kind,
    generation_factory,
)

__all__ = ["Backends", "EmbeddingBackend", "GenerationBackend", "GenerationParams"]

log = logging.getLogger("aiwfe.cognitive.backends")

# Above this many texts, CPU-bound embedding runs off the event loop so other calls flow.
_THREAD_THRESHOLD = 32
FALLBACK_NAME = "builtin"


class BuiltinBackend:
    """The deterministic hashing embedder (`cognitive/builtin_embedder.py`)."""

    def __init__(self, name: str, dimension: int) -> None:
        self.name = name
        self.embedder = HashingEmbedder(dimension)
        self.model = self.embedder.model

    async def embed(self, texts: Sequence[str]) -> list[list[float]]:
        if len(texts) > _THREAD_THRESHOLD:
            matrix = await asyncio.to_thread(self.embedder.embed, list(texts))
        else:
            matrix = self.embedder.embed(list(texts))
        return matrix.tolist()

    async def close(self) -> None:
        return None


@embedding_kind("builtin")
def make_builtin_backend(
    name: str, cfg: EmbeddingBackendSettings, settings: Settings
) -> BuiltinBackend:
    return BuiltinBackend(name, settings.cognitive.embedding_dimension)


def _names(backend: EmbeddingBackend | GenerationBackend) -> tuple[str, ...]:
    """What a request may call a backend: its config name, its model, or the bare model name."""
    return (backend.name, backend.model, getattr(backend, "model_name", backend.model))


class Backends:
    """The configured backends by name, with the defaults resolved and checked."""

    def __init__(self, settings: Settings) -> None:
        cfg: CognitiveSettings = settings.cognitive
        # Every kind is checked before any backend loads (a typo fails fast, listing kinds).
        for name, backend in cfg.embedding.backends.items():
            embedding_factory(name, backend.kind)
        for name, gen in cfg.generation.backends.items():
            generation_factory(name, gen.kind)
        if cfg.embedding.default not in cfg.embedding.backends:
            raise ConfigError(
                f"configuration key 'cognitive.embedding.default' names {cfg.embedding.default!r}"
                f", which is not in cognitive.embedding.backends ({sorted(cfg.embedding.backends)})"
            )
        self.embedding: dict[str, EmbeddingBackend] = {}
        self.fallback_reason = ""  # why the default is the hashing embedder, when it is
        default = cfg.embedding.default
        for name, backend in cfg.embedding.backends.items():
            try:
                self.embedding[name] = embedding_factory(name, backend.kind)(
                    name, backend, settings
                )
            except WeightsUnavailable as exc:
                if name != default or not cfg.embedding.fallback_to_builtin:
                    raise ConfigError(
                        f"configuration key 'cognitive.embedding.backends.{name}': {exc}"
                    ) from None
                self.fallback_reason = str(exc)
        if self.fallback_reason:
            default = FALLBACK_NAME
            if FALLBACK_NAME not in self.embedding:
                self.embedding[FALLBACK_NAME] = BuiltinBackend(
                    FALLBACK_NAME, cfg.embedding_dimension
                )
            # The one line `aiwfe up` shows about it (the service's stderr is passed through).
            log.warning(
                "embedding falls back to the built-in hashing embedder (%s, lower quality): %s",
                self.embedding[FALLBACK_NAME].model,
                self.fallback_reason,
            )
        self.default_embedding = self.embedding[default]
        self.generation: dict[str, GenerationBackend] = {
            name: generation_factory(name, backend.kind)(name, backend, settings)
            for name, backend in cfg.generation.backends.items()
        }
        gen_default = cfg.generation.default
        if gen_default is not None and gen_default not in self.generation:
            raise ConfigError(
                f"configuration key 'cognitive.generation.default' names {gen_default!r}, "
                f"which is not in cognitive.generation.backends ({sorted(self.generation)})"
            )
        if gen_default is None and len(self.generation) == 1:
            gen_default = next(iter(self.generation))
        self.default_generation = self.generation.get(gen_default) if gen_default else None

    def embedder(self, requested: str, field: str = "model") -> EmbeddingBackend:
        """The backend a request's `model` names (backend or model name), else the default."""
        if not requested:
            return self.default_embedding
        for backend in self.embedding.values():
            if requested in _names(backend):
                return backend
        available = ", ".join(sorted(self.embedding))
        raise InvalidArgument(
            [(field, f"unknown embedding model {requested!r}; configured: {available}")]
        )

    def generator(self, requested: str) -> GenerationBackend:
        """The generation backend a request names, else the default; explains how to add one."""
        if not self.generation:
            raise FailedPrecondition(
                "no LLM is configured for Generate: add one under cognitive.generation.backends "
                "in the config file, e.g. `local: {kind: ollama, url: http://127.0.0.1:11434, "
                "model: llama3.2}` (or kind: openai with url and model), or set "
                'AIWFE_COGNITIVE__GENERATION__BACKENDS=\'{"local": {"kind": "ollama", '
                '"url": "http://127.0.0.1:11434", "model": "llama3.2"}}\'',
                reason="NO_LLM_CONFIGURED",
            )
        if requested:
            for backend in self.generation.values():
                if requested in _names(backend):
                    return backend
            available = ", ".join(sorted(self.generation))
            raise InvalidArgument(
                [("model", f"unknown generation model {requested!r}; configured: {available}")]
            )
        if self.default_generation is None:
            raise FailedPrecondition(
                "several LLMs are configured and none is the default: set "
                "cognitive.generation.default or name one in the request's model field",
                reason="NO_DEFAULT_LLM",
            )
        return self.default_generation

    async def close(self) -> None:
        for backend in self.embedding.values():
            await backend.close()
        for generator in self.generation.values():
            await generator.close()
