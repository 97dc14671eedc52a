"""Vector store: one async interface, embedded (qdrant-edge) or Qdrant server by config."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from .base import (
    CollectionExists,
    CollectionNotFound,
    CollectionSpec,
    DimensionMismatch,
    ScoredPoint,
    UnindexedFilterField,
    VectorPoint,
    VectorStore,
    VectorStoreError,
)
from .edge import EdgeVectorStore

if TYPE_CHECKING:
    from .server import QdrantServerStore

__all__ = [
    "CollectionExists",
    "CollectionNotFound",
    "CollectionSpec",
    "DimensionMismatch",
    "EdgeVectorStore",
    "QdrantServerStore",
    "ScoredPoint",
    "UnindexedFilterField",
    "VectorPoint",
    "VectorStore",
    "VectorStoreError",
    "open_vector_store",
]


def open_vector_store(url: str | None, path: Path, **kw: Any) -> VectorStore:
    """Open the configured vector store.

    Args:
        url: Qdrant server URL; when set (non-empty) the server store is used.
        path: Data directory for the embedded store (ignored for the server).
        **kw: Passed to the chosen implementation's constructor.

    Returns:
        A QdrantServerStore when ``url`` is set, else an EdgeVectorStore at ``path``.
    """
    if url:
        from .server import QdrantServerStore

        return QdrantServerStore(url, **kw)
    return EdgeVectorStore(Path(path), **kw)


def __getattr__(name: str) -> Any:
    # The server store pulls in qdrant-client (~70 MB RSS): loaded only when used.
    if name == "QdrantServerStore":
        from .server import QdrantServerStore

        return QdrantServerStore
    raise AttributeError(name)
