"""A bounded in-process TTL cache: the L1 of every multi-layer cache in the suite."""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class TTLCache(Generic[K, V]):
    """Bounded mapping (oldest write evicted first) whose entries expire; one event loop owns it."""

    __slots__ = ("_data", "_max")

    def __init__(self, max_entries: int) -> None:
        self._max = max_entries
        self._data: OrderedDict[K, tuple[float, V]] = OrderedDict()

    def get(self, key: K) -> V | None:
        item = self._data.get(key)
        if item is None:
            return None
        expires, value = item
        if expires <= time.monotonic():
            del self._data[key]
            return None
        return value

    def set(self, key: K, value: V, ttl: float) -> None:
        if self._max <= 0 or ttl <= 0:
            return
        data = self._data
        if key in data:
            data.move_to_end(key)
        data[key] = (time.monotonic() + ttl, value)
        if len(data) > self._max:
            data.popitem(last=False)

    def pop(self, key: K) -> None:
        self._data.pop(key, None)

    def clear(self) -> None:
        self._data.clear()

    def __len__(self) -> int:
        return len(self._data)
