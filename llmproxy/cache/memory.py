"""In-process cache backend: LRU bounded by bytes, TTL on the injected clock."""

from __future__ import annotations

from collections import OrderedDict

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime


class MemoryBackend:
    def __init__(self, reactor: IReactorTime, max_bytes: int) -> None:
        self.reactor = reactor
        self.max_bytes = max_bytes
        self.bytes = 0
        self._items: OrderedDict[str, tuple[bytes, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: str) -> Deferred[bytes | None]:
        found = self._items.get(key)
        if found is None:
            return succeed(None)
        value, expires = found
        if expires <= self.reactor.seconds():
            self._drop(key)
            return succeed(None)
        self._items.move_to_end(key)
        return succeed(value)

    def set(self, key: str, value: bytes, ttl: float) -> Deferred[None]:
        size = len(key) + len(value)
        if size > self.max_bytes:
            return succeed(None)  # would evict everything and still not fit
        if key in self._items:
            self._drop(key)
        self._items[key] = (value, self.reactor.seconds() + ttl)
        self.bytes += size
        while self.bytes > self.max_bytes:
            oldest = next(iter(self._items))
            self._drop(oldest)
        return succeed(None)

    def delete(self, key: str) -> Deferred[None]:
        if key in self._items:
            self._drop(key)
        return succeed(None)

    def purge(self) -> Deferred[int]:
        count = len(self._items)
        self._items.clear()
        self.bytes = 0
        return succeed(count)

    def _drop(self, key: str) -> None:
        value, _ = self._items.pop(key)
        self.bytes -= len(key) + len(value)

    def stats(self) -> dict[str, int | None]:
        return {"entries": len(self._items), "bytes": self.bytes}
