"""Vector store interface shared by the embedded (edge) and server implementations."""

from __future__ import annotations

import abc
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "DISTANCES",
    "ID_PAYLOAD_KEY",
    "NAME_PATTERN",
    "CollectionExists",
    "CollectionNotFound",
    "CollectionSpec",
    "DimensionMismatch",
    "ScoredPoint",
    "UnindexedFilterField",
    "Vector",
    "VectorPoint",
    "VectorStore",
    "VectorStoreError",
    "check_filter",
    "engine_id",
    "validate_matrix",
    "validate_vector",
]

#: A vector as callers hold it: a float sequence or a NumPy array (validate_vector takes both).
Vector = Sequence[float] | np.ndarray

#: Distance names accepted in CollectionSpec (Qdrant's spelling).
DISTANCES = ("Cosine", "Dot", "Euclid", "Manhattan")

#: Payload key holding the caller's string id; engines only accept ints/UUIDs as ids.
ID_PAYLOAD_KEY = "_aiwfe_id"

# Fixed namespace so the string -> UUID mapping is stable across processes and releases.
_ID_NAMESPACE = uuid.UUID("6f1c2a4e-9b7d-5e3a-8c21-4d0f7a9b3e15")

# Collection names become directory names (edge) and URL path segments (server).
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


class VectorStoreError(Exception):
    """Base class for vector store errors."""


class CollectionNotFound(VectorStoreError, KeyError):
    """The named collection does not exist."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name

    def __str__(self) -> str:
        return f"collection not found: {self.name!r}"


class CollectionExists(VectorStoreError):
    """A collection with this name already exists."""

    def __init__(self, name: str) -> None:
        super().__init__(f"collection already exists: {name!r}")
        self.name = name

    def __reduce__(self) -> tuple[type, tuple[str]]:  # pickled by the engine's process
        return type(self), (self.name,)


class DimensionMismatch(VectorStoreError, ValueError):
    """A vector's length differs from the collection's dimension."""

    def __init__(self, expected: int, got: int) -> None:
        super().__init__(f"vector dimension mismatch: expected {expected}, got {got}")
        self.expected = expected
        self.got = got

    def __reduce__(self) -> tuple[type, tuple[int, int]]:
        return type(self), (self.expected, self.got)


class UnindexedFilterField(VectorStoreError, ValueError):
    """A filter names a payload field that is not in the collection's indexed_fields."""

    def __init__(self, field: str) -> None:
        super().__init__(f"filter field is not indexed: {field!r}")
        self.field = field

    def __reduce__(self) -> tuple[type, tuple[str]]:
        return type(self), (self.field,)


@dataclass(frozen=True)
class CollectionSpec:
    """Shape of a collection.

    Attributes:
        name: Collection name (letters, digits, ``_ . -``; at most 128 characters).
        dimension: Vector length.
        distance: One of ``Cosine``, ``Dot``, ``Euclid``, ``Manhattan``.
        indexed_fields: Payload keyword fields that get an index and may be filtered on.
    """

    name: str
    dimension: int = 768
    distance: str = "Cosine"
    indexed_fields: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not NAME_PATTERN.match(self.name):
            raise ValueError(f"invalid collection name: {self.name!r}")
        if self.dimension <= 0:
            raise ValueError(f"dimension must be positive, got {self.dimension}")
        if self.distance not in DISTANCES:
            raise ValueError(f"distance must be one of {DISTANCES}, got {self.distance!r}")
        # Accept any iterable of names but store a tuple so the spec stays hashable.
        fields = tuple(self.indexed_fields)
        if ID_PAYLOAD_KEY in fields or any(not f for f in fields):
            raise ValueError(f"invalid indexed field names: {fields!r}")
        object.__setattr__(self, "indexed_fields", fields)


@dataclass(frozen=True)
class VectorPoint:
    """A point to upsert: caller's string id, vector and keyword payload."""

    id: str
    vector: Vector
    payload: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ScoredPoint:
    """A search hit: the original string id, engine score and payload."""

    id: str
    score: float
    payload: dict[str, str]


def engine_id(point_id: str) -> str:
    """Map an API string id to the engine id (UUIDv5, deterministic).

    Args:
        point_id: Caller's id.

    Returns:
        The UUID in canonical string form.
    """
    if not isinstance(point_id, str) or not point_id:
        raise ValueError(f"point id must be a non-empty string, got {point_id!r}")
    return str(uuid.uuid5(_ID_NAMESPACE, point_id))


def validate_matrix(spec: CollectionSpec, points: Sequence[VectorPoint]) -> np.ndarray:
    """Check ids, payloads and vectors of a batch; return vectors as float32 (n, dim).

    Raises:
        DimensionMismatch: A vector has the wrong length.
        ValueError: Non-finite values, zero vector under Cosine, or a bad id/payload.
    """
    out = np.empty((len(points), spec.dimension), dtype=np.float32)
    for i, p in enumerate(points):
        engine_id(p.id)  # validates the id
        if ID_PAYLOAD_KEY in p.payload:
            raise ValueError(f"payload key {ID_PAYLOAD_KEY!r} is reserved")
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in p.payload.items()):
            raise ValueError(f"payload of {p.id!r} must map str to str")
        out[i] = validate_vector(spec, p.vector)
    return out


def validate_vector(spec: CollectionSpec, vector: Vector) -> np.ndarray:
    """Check one vector's length and values; return it as float32.

    Raises:
        DimensionMismatch: Wrong length.
        ValueError: Non-finite values, or a zero vector for Cosine distance.
    """
    arr = np.asarray(vector, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"vector must be one-dimensional, got shape {arr.shape}")
    if arr.shape[0] != spec.dimension:
        raise DimensionMismatch(spec.dimension, arr.shape[0])
    if not np.isfinite(arr).all():
        raise ValueError("vector contains NaN or infinite values")
    # float32 overflow would turn large finite float64 values into inf inside the engine.
    f32 = arr.astype(np.float32)
    if not np.isfinite(f32).all():
        raise ValueError("vector values overflow float32")
    # Cosine normalises by the norm: a zero vector would become NaN in the engine.
    if spec.distance == "Cosine" and not np.any(f32):
        raise ValueError("zero vector cannot be used with Cosine distance")
    return f32


def check_filter(spec: CollectionSpec, filter: Mapping[str, str] | None) -> dict[str, str]:
    """Validate an exact-match filter against the spec's indexed fields.

    Raises:
        UnindexedFilterField: A key is not in ``spec.indexed_fields``.
        ValueError: A value is not a string.
    """
    if not filter:
        return {}
    for key, value in filter.items():
        if key not in spec.indexed_fields:
            raise UnindexedFilterField(key)
        if not isinstance(value, str):
            raise ValueError(f"filter value for {key!r} must be a string")
    return dict(filter)


class VectorStore(abc.ABC):
    """Async vector store; implementations choose the engine (embedded or server)."""

    @abc.abstractmethod
    async def create_collection(self, spec: CollectionSpec) -> None:
        """Create a collection.

        Raises:
            CollectionExists: The name is taken.
        """

    @abc.abstractmethod
    async def get_collection(self, name: str) -> CollectionSpec:
        """Return a collection's spec.

        Raises:
            CollectionNotFound: No such collection.
        """

    @abc.abstractmethod
    async def list_collections(self) -> list[CollectionSpec]:
        """Return all collections' specs, sorted by name."""

    @abc.abstractmethod
    async def delete_collection(self, name: str) -> None:
        """Delete a collection and its data.

        Raises:
            CollectionNotFound: No such collection.
        """

    @abc.abstractmethod
    async def upsert(self, name: str, points: Sequence[VectorPoint]) -> int:
        """Insert or replace points (same id replaces); batched internally.

        Returns:
            Number of points written.

        Raises:
            CollectionNotFound: No such collection.
            DimensionMismatch: A vector has the wrong length (nothing is written).
            ValueError: NaN/inf values or bad ids/payloads (nothing is written).
        """

    @abc.abstractmethod
    async def delete(self, name: str, ids: Sequence[str]) -> int:
        """Delete points by string id.

        Returns:
            Number of points that existed and were deleted.
        """

    @abc.abstractmethod
    async def search(
        self,
        name: str,
        vector: Vector,
        top_k: int,
        filter: Mapping[str, str] | None = None,
        score_threshold: float | None = None,
    ) -> list[ScoredPoint]:
        """Nearest neighbours, best first.

        Args:
            name: Collection name.
            vector: Query vector.
            top_k: Maximum number of hits (>= 1).
            filter: Exact match on indexed payload fields; all must match.
            score_threshold: Drop hits scoring below this (for Cosine/Dot).

        Raises:
            UnindexedFilterField: The filter names a field not in indexed_fields.
        """

    @abc.abstractmethod
    async def count(self, name: str, filter: Mapping[str, str] | None = None) -> int:
        """Exact number of points, optionally matching an indexed-field filter."""

    @abc.abstractmethod
    async def optimize(self, name: str) -> None:
        """Build or refresh the vector index where the engine needs it."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release resources; the store cannot be used afterwards."""

    async def __aenter__(self) -> VectorStore:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
