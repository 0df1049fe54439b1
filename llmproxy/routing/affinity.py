"""
Responses API affinity: which target made a response id, and for which client
key, so that follow-ups (``previous_response_id``, ``/v1/responses/{id}``...)
reach the one backend that knows it, and only its owner can reach it (every
tenant shares the upstream key, so the upstream cannot tell them apart).

Remembered with a TTL, in memory or (for a fleet) in Redis; a Redis failure
falls back to the local memory, which every process keeps as well.
"""

from __future__ import annotations

import json
import re
from collections import OrderedDict
from typing import Protocol

import attrs
from twisted.internet.interfaces import IReactorTime

from llmproxy.config import Target
from llmproxy.redisclient import RedisUnavailable, SharedRedis

#: What a response id may look like before it goes into an upstream URL or a
#: Redis key (OpenAI's are ``resp_`` + hex).
_RESPONSE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,255}$")


def valid_response_id(value: str) -> bool:
    return bool(_RESPONSE_ID.match(value))


@attrs.frozen
class Pin:
    """A response id's target and the client key that created it."""

    target: Target
    owner: str


class AffinityStore(Protocol):
    async def remember(self, response_id: str, pin: Pin) -> None: ...

    async def recall(self, response_id: str) -> Pin | None: ...


class MemoryAffinity:
    def __init__(self, reactor: IReactorTime, ttl: float, max_entries: int = 100_000) -> None:
        self.reactor = reactor
        self.ttl = ttl
        self.max_entries = max_entries
        self._items: OrderedDict[str, tuple[Pin, float]] = OrderedDict()

    async def remember(self, response_id: str, pin: Pin) -> None:
        self._items[response_id] = (pin, self.reactor.seconds() + self.ttl)
        self._items.move_to_end(response_id)
        while len(self._items) > self.max_entries:
            self._items.popitem(last=False)

    async def recall(self, response_id: str) -> Pin | None:
        found = self._items.get(response_id)
        if found is None:
            return None
        pin, expires = found
        if expires <= self.reactor.seconds():
            del self._items[response_id]
            return None
        return pin


class RedisAffinity:
    def __init__(self, redis: SharedRedis, namespace: str, local: MemoryAffinity) -> None:
        self.redis = redis
        self.namespace = namespace
        self.local = local

    def key(self, response_id: str) -> str:
        return f"{self.namespace}:affinity:{response_id}"

    async def remember(self, response_id: str, pin: Pin) -> None:
        await self.local.remember(response_id, pin)
        target = pin.target
        value = json.dumps(
            {
                "upstream": target.upstream,
                "model": target.model,
                "weight": target.weight,
                "owner": pin.owner,
            }
        )
        try:
            await self.redis.call("set", self.key(response_id), value, expire=int(self.local.ttl))
        except RedisUnavailable:
            return

    async def recall(self, response_id: str) -> Pin | None:
        try:
            raw = await self.redis.call("get", self.key(response_id))
        except RedisUnavailable:
            return await self.local.recall(response_id)
        if raw is None:
            return await self.local.recall(response_id)
        data = json.loads(raw)
        target = Target(upstream=data["upstream"], model=data["model"], weight=data["weight"])
        return Pin(target, data["owner"])
