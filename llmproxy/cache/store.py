"""The cache facade the pipeline talks to, and the backend interface."""

from __future__ import annotations

import enum
from collections.abc import Awaitable
from typing import Protocol

from twisted.internet.defer import CancelledError
from twisted.logger import Logger

from llmproxy import errors
from llmproxy.cache.entry import Entry
from llmproxy.redisclient import RedisUnavailable


class Uncacheable(enum.Enum):
    """Why an answer was not stored.  The values are the keys of ``/stats`` cache.skipped."""

    #: An error status, or an answer that did not complete (no terminal event).
    INCOMPLETE = "incomplete_or_error"
    #: A stream that carried an error event.
    ERROR_EVENT = "error_event"
    #: Cut short by the token limit (``finish_reason: length``).
    TRUNCATED = "truncated"
    #: Larger than what is recorded for the cache.
    TOO_LARGE = "too_large"
    #: Nobody was there to receive the end of it.
    CLIENT_GONE = "client_gone"


class CacheBackend(Protocol):
    """Opaque bytes under a key with a TTL.  Methods return Deferreds or coroutines."""

    def get(self, key: str) -> Awaitable[bytes | None]: ...

    def set(self, key: str, value: bytes, ttl: float) -> Awaitable[None]: ...

    def purge(self) -> Awaitable[int]: ...

    def stats(self) -> dict[str, int | None]: ...


class ResponseCache:
    """
    Lookups and stores with the rules of DESIGN.md; a backend failure is a miss
    (or a skipped store), never a failed request.
    """

    log = Logger()

    def __init__(self, backend: CacheBackend | None, ttl: float, scope: str) -> None:
        self.backend = backend
        self.ttl = ttl
        self.scope = scope
        self.counters = dict.fromkeys(
            ("hits", "misses", "stores", "errors", "bypass", "coalesced", "stored_bytes"), 0
        )
        self.skipped: dict[str, int] = {}

    @property
    def enabled(self) -> bool:
        return self.backend is not None

    def skip(self, reason: Uncacheable) -> None:
        self.skipped[reason.value] = self.skipped.get(reason.value, 0) + 1

    async def lookup(self, key: str) -> Entry | None:
        assert self.backend is not None
        try:
            raw = await self.backend.get(key)
        except CancelledError:
            raise
        except RedisUnavailable:
            self.counters["errors"] += 1  # logged once per outage by SharedRedis
            raw = None
        except Exception:  # noqa: BLE001 - the cache must never fail a request
            self.counters["errors"] += 1
            self.log.failure("cache lookup failed; treating as a miss")
            raw = None
        entry = Entry.decode(raw) if raw is not None else None
        self.counters["hits" if entry is not None else "misses"] += 1
        return entry

    async def store(self, key: str, entry: Entry, ttl: float | None) -> None:
        assert self.backend is not None
        try:
            await self.backend.set(key, entry.encode(), ttl or self.ttl)
        except CancelledError:
            raise
        except RedisUnavailable:
            self.counters["errors"] += 1
            return
        except Exception:  # noqa: BLE001 - the cache must never fail a request
            self.counters["errors"] += 1
            self.log.failure("cache store failed; answer not cached")
            return
        self.counters["stores"] += 1
        self.counters["stored_bytes"] += len(entry.body)

    async def purge(self) -> int:
        if self.backend is None:
            return 0
        try:
            return await self.backend.purge()
        except CancelledError:
            raise
        except Exception:  # noqa: BLE001 - the cache must never fail a request
            self.counters["errors"] += 1
            self.log.failure("cache purge failed")
            raise errors.APIError(
                503,
                "The cache backend is unavailable; nothing was purged.",
                type="server_error",
                code="cache_unavailable",
            ) from None

    def snapshot(self) -> dict[str, object]:
        found: dict[str, object] = dict(self.counters, skipped=dict(self.skipped))
        if self.backend is not None:
            found.update(self.backend.stats())
        return found
