"""A bounded, short-lived memory of values read from the store (realms, signing keys, verified
tokens): each is kept for a set number of seconds, so a change made on another node is seen
here within that time."""

from __future__ import annotations

import time
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class Recent(Generic[K, V]):
    """Values for ``seconds`` each; past ``max_size`` entries the oldest goes."""

    __slots__ = ("_entries", "_seconds", "_max_size")

    def __init__(self, seconds: float, max_size: int = 10_000) -> None:
        self._entries: dict[K, tuple[float, V]] = {}
        self._seconds = seconds
        self._max_size = max_size

    def get(self, key: K) -> V | None:
        """The value kept for ``key``, or None when there is none or its time is up."""
        entry = self._entries.get(key)
        return entry[1] if entry is not None and entry[0] > time.monotonic() else None

    def put(self, key: K, value: V) -> V:
        if len(self._entries) >= self._max_size and key not in self._entries:
            self._entries.pop(next(iter(self._entries)))
        self._entries[key] = (time.monotonic() + self._seconds, value)
        return value

    def pop(self, key: K) -> None:
        self._entries.pop(key, None)

    def clear(self) -> None:
        self._entries.clear()
