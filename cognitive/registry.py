"""What every backend is (the protocols) and the registry of backend kinds.

Each backend module registers its kinds here when imported (`@embedding_kind("onnx")`), so
adding a kind touches only its own module and the import list in `cognitive/backends.py`.
A configured `kind` is looked up here at start-up; an unknown one stops the service with the
known kinds listed. This module imports no backend, so backends import it without a cycle.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

from aiwfe.runtime.config import (
    ConfigError,
    EmbeddingBackendSettings,
    GenerationBackendSettings,
    Settings,
)


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


EmbeddingFactory = Callable[[str, EmbeddingBackendSettings, Settings], EmbeddingBackend]
GenerationFactory = Callable[[str, GenerationBackendSettings, Settings], GenerationBackend]
_F = TypeVar("_F", bound=Callable[..., object])

_EMBEDDING: dict[str, EmbeddingFactory] = {}
_GENERATION: dict[str, GenerationFactory] = {}


def embedding_kind(kind: str) -> Callable[[_F], _F]:
    """Registers a factory `(name, cfg, settings) -> EmbeddingBackend` for `kind`."""

    def register(factory: _F) -> _F:
        _EMBEDDING[kind] = factory  # type: ignore[assignment]
        return factory

    return register


def generation_kind(kind: str) -> Callable[[_F], _F]:
    """Registers a factory `(name, cfg, settings) -> GenerationBackend` for `kind`."""

    def register(factory: _F) -> _F:
        _GENERATION[kind] = factory  # type: ignore[assignment]
        return factory

    return register


def embedding_kinds() -> list[str]:
    return sorted(_EMBEDDING)


def generation_kinds() -> list[str]:
    return sorted(_GENERATION)


def embedding_factory(name: str, kind: str) -> EmbeddingFactory:
    """The factory for a configured embedding backend's kind, or a ConfigError naming the
    key and the known kinds."""
    if kind not in _EMBEDDING:
        raise ConfigError(
            f"configuration key 'cognitive.embedding.backends.{name}.kind' is {kind!r}; "
            f"known embedding kinds: {', '.join(embedding_kinds())}"
        )
    return _EMBEDDING[kind]


def generation_factory(name: str, kind: str) -> GenerationFactory:
    """The factory for a configured generation backend's kind (ConfigError as above)."""
    if kind not in _GENERATION:
        raise ConfigError(
            f"configuration key 'cognitive.generation.backends.{name}.kind' is {kind!r}; "
            f"known generation kinds: {', '.join(generation_kinds())}"
        )
    return _GENERATION[kind]
