"""
The response cache as the pipeline sees it: for each call, one decision (is
it looked up, is it stored, under which key), the verdict the answer carries
in ``x-llmproxy-cache``, and the rules of what is stored: only complete 200
answers, a stream only after its terminal event, and only if its client was
still there.  A backend failure is a miss (or a skipped store), never a failed
request.  So is an entry that does not decode or validate: it is deleted, and
counted as ``cache_corrupt``.  The cache's counters are written here (and the coalesced requests
by :class:`~llmproxy.cache.flight.Flights`), and nowhere else.
"""

from __future__ import annotations

import enum
from collections.abc import Awaitable
from typing import Protocol

import attrs
from twisted.internet.defer import CancelledError
from twisted.logger import Logger

from llmproxy import config, errors
from llmproxy.cache.entry import Entry, Uncacheable
from llmproxy.cache.flight import Flights
from llmproxy.cache.keys import cache_key
from llmproxy.calls import ModelCall
from llmproxy.redisclient import RedisUnavailable
from llmproxy.sink import ClientSink

#: POST endpoints whose answers may be cached.
CACHEABLE = frozenset(
    {"chat/completions", "completions", "embeddings", "responses", "messages", "moderations"}
)
#: Request headers that change an answer, and so are part of its key.
KEYED_HEADERS = ("anthropic-version", "anthropic-beta")
#: Answers larger than this are never recorded: neither stored nor replayed to
#: late single-flight joiners (the memory backend also bounds it by max_bytes).
MAX_RECORD = 16 * 1024 * 1024


class Verdict(enum.Enum):
    """What the cache did for an answer."""

    HIT = "hit"
    MISS = "miss"
    #: Not looked up (no-cache, no-store, or an endpoint that is never cached).
    BYPASS = "bypass"
    #: There is no cache.
    OFF = "off"
    #: Shared the upstream call of an identical request in flight.
    JOINED = "joined"

    def headers(self) -> dict[str, str]:
        """The response headers that say so."""
        if self is Verdict.JOINED:
            return {"x-llmproxy-cache": "hit", "x-llmproxy-coalesced": "1"}
        return {"x-llmproxy-cache": self.value}


def announce(sink: ClientSink, verdict: Verdict) -> None:
    """Tell the client what the cache did."""
    for name, value in verdict.headers().items():
        sink.header(name, value)


@attrs.frozen
class CacheDecision:
    """What the cache does for one call."""

    #: The entry's key; None when the cache is neither read nor written.
    key: str | None
    lookup: bool
    store: bool
    ttl: float | None
    #: The verdict when it is not looked up (bypass or off).
    verdict: Verdict


class CacheBackend(Protocol):
    """Opaque bytes under a key with a TTL.  Methods return Deferreds or coroutines."""

    def get(self, key: str) -> Awaitable[bytes | None]: ...

    def set(self, key: str, value: bytes, ttl: float) -> Awaitable[None]: ...

    def delete(self, key: str) -> Awaitable[None]: ...

    def purge(self) -> Awaitable[int]: ...

    def stats(self) -> dict[str, int | None]: ...


class ResponseCache:
    log = Logger()

    def __init__(self, backend: CacheBackend | None, settings: config.Cache) -> None:
        self.flights = Flights(MAX_RECORD)
        self.configure(backend, settings)
        self._counts = dict.fromkeys(
            ("hits", "misses", "stores", "errors", "bypass", "stored_bytes", "cache_corrupt"), 0
        )
        self._skipped: dict[str, int] = {}

    def configure(self, backend: CacheBackend | None, settings: config.Cache) -> None:
        """
        Use these settings from the next request on (a reload).  The counters
        and the flights in progress are the process's and stay.
        """
        self.backend = backend
        self.ttl = settings.ttl
        self.scope = settings.scope
        self.namespace = settings.namespace
        #: The largest answer recorded: an entry the memory backend could not hold is not made.
        self.max_record = (
            min(MAX_RECORD, settings.max_bytes) if settings.backend == "memory" else MAX_RECORD
        )
        self.flights.max_record = self.max_record

    @property
    def default_verdict(self) -> Verdict:
        """What an answer says when it is no model call: bypass, or off without a cache."""
        return Verdict.BYPASS if self.backend is not None else Verdict.OFF

    def decide(self, call: ModelCall) -> CacheDecision:
        """Whether ``call`` is looked up and stored, under which key."""
        if self.backend is None:
            return CacheDecision(None, False, False, None, Verdict.OFF)
        controls = call.controls
        if call.endpoint not in CACHEABLE or not (controls.lookup or controls.store):
            self._counts["bypass"] += 1
            return CacheDecision(None, False, False, None, Verdict.BYPASS)
        scope = call.principal.name if self.scope == "key" else None
        given = call.request.headers
        headers = {name: given[name] for name in KEYED_HEADERS if name in given}
        key = cache_key(
            self.namespace, call.endpoint, call.model.name, call.payload, scope, headers
        )
        if not controls.lookup:
            # no-cache: not read, but the fresh answer is still stored.
            self._counts["bypass"] += 1
        verdict = Verdict.MISS if controls.lookup else Verdict.BYPASS
        return CacheDecision(key, controls.lookup, controls.store, controls.ttl, verdict)

    async def lookup(self, key: str) -> Entry | None:
        """The entry under ``key``; None for a miss (a corrupt entry is one, and is deleted)."""
        assert self.backend is not None
        try:
            raw = await self.backend.get(key)
        except CancelledError:
            raise
        except RedisUnavailable:
            self._counts["errors"] += 1  # logged once per outage by SharedRedis
            raw = None
        except Exception:  # noqa: BLE001 - the cache must never fail a request
            self._counts["errors"] += 1
            self.log.failure("cache lookup failed; treating as a miss")
            raw = None
        entry = Entry.decode(raw) if raw is not None else None
        self._counts["hits" if entry is not None else "misses"] += 1
        if raw is not None and entry is None:
            await self._drop_corrupt(key, len(raw))
        return entry

    async def _drop_corrupt(self, key: str, size: int) -> None:
        """Delete an entry that is no answer, so that the next request stores a good one."""
        self._counts["cache_corrupt"] += 1
        self.log.warn("corrupt cache entry {key} ({size} bytes): deleted", key=key, size=size)
        assert self.backend is not None
        try:
            await self.backend.delete(key)
        except CancelledError:
            raise
        except RedisUnavailable:
            self._counts["errors"] += 1
        except Exception:  # noqa: BLE001 - the cache must never fail a request
            self._counts["errors"] += 1
            self.log.failure("deleting a corrupt cache entry failed")

    async def keep(
        self,
        decision: CacheDecision,
        entry: Entry | None,
        skipped: Uncacheable | None,
        client_gone: bool,
    ) -> None:
        """Store an answer that ended as ``entry`` (None: ``skipped`` says why not)."""
        if decision.key is None or not decision.store:
            return
        if entry is None:
            self._skip(skipped or Uncacheable.INCOMPLETE)
        elif client_gone:
            self._skip(Uncacheable.CLIENT_GONE)
        else:
            await self._store(decision.key, entry, decision.ttl or self.ttl)

    def _skip(self, reason: Uncacheable) -> None:
        self._skipped[reason.value] = self._skipped.get(reason.value, 0) + 1

    async def _store(self, key: str, entry: Entry, ttl: float) -> None:
        assert self.backend is not None
        try:
            await self.backend.set(key, entry.encode(), ttl)
        except CancelledError:
            raise
        except RedisUnavailable:
            self._counts["errors"] += 1
            return
        except Exception:  # noqa: BLE001 - the cache must never fail a request
            self._counts["errors"] += 1
            self.log.failure("cache store failed; answer not cached")
            return
        self._counts["stores"] += 1
        self._counts["stored_bytes"] += len(entry.body)

    async def purge(self) -> int:
        if self.backend is None:
            return 0
        try:
            return await self.backend.purge()
        except CancelledError:
            raise
        except Exception:  # noqa: BLE001 - the cache must never fail a request
            self._counts["errors"] += 1
            self.log.failure("cache purge failed")
            raise errors.APIError(
                503,
                "The cache backend is unavailable; nothing was purged.",
                type="server_error",
                code="cache_unavailable",
            ) from None

    def counts(self) -> dict[str, int]:
        """Lookups, stores and their outcomes, and requests coalesced."""
        return dict(self._counts, coalesced=self.flights.coalesced)

    def snapshot(self) -> dict[str, object]:
        """The cache's part of /stats."""
        found: dict[str, object] = dict(self.counts(), skipped=dict(self._skipped))
        if self.backend is not None:
            found.update(self.backend.stats())
        return found
