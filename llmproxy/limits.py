"""
Per-key limits: requests per minute and tokens per minute.

A sliding window of two fixed one-minute buckets (the estimate nginx and
Cloudflare use): cheap, smooth at the minute boundary, and exact enough for
quotas.  Time comes from the injected reactor, so a Clock drives the tests.
Tokens are charged after an answer, from its ``usage``; a key over its tpm is
refused until the window slides.

In memory by default; with Redis configured the buckets live there (updated by
a Lua script, so concurrent processes never both take the last request), and
every process of a fleet enforces one shared limit.  When Redis is unavailable
each process falls back to its own memory.
"""

from __future__ import annotations

from typing import Protocol

from twisted.internet.interfaces import IReactorTime

from llmproxy import errors
from llmproxy.auth import Principal
from llmproxy.redisclient import RedisUnavailable, SharedRedis

WINDOW = 60.0


class Limiter(Protocol):
    async def check(self, principal: Principal) -> None:
        """Raise a 429 APIError when the principal is over a limit; else count one request."""

    async def charge_tokens(self, principal: Principal, tokens: int) -> None: ...


def window_start(now: float) -> float:
    return now - now % WINDOW


def estimate(previous: float, current: float, now: float) -> float:
    """Requests (or tokens) in the minute before ``now``."""
    weight = 1.0 - (now - window_start(now)) / WINDOW
    return previous * weight + current


def retry_after(previous: float, current: float, limit: float, now: float) -> float:
    """
    Seconds until the estimate is at most ``limit`` again, if nothing else is
    admitted meanwhile (always at least one second).
    """
    start = window_start(now)
    elapsed = now - start
    if current <= limit and previous > 0:
        # Later in this minute: previous * (1 - x/W) + current <= limit.
        x = WINDOW * (1 - (limit - current) / previous)
        if x <= WINDOW:
            return max(1.0, x - elapsed)
    # Next minute, where this minute's count becomes the decaying one:
    # current * (1 - y/W) <= limit.
    y = WINDOW * (1 - limit / current) if current > limit else 0.0
    return max(1.0, WINDOW - elapsed + y)


def _refuse(
    name: str, limit: int, unit: str, previous: float, current: float, now: float, admitted: float
) -> errors.APIError:
    return errors.rate_limited(
        f"Rate limit reached for key '{name}': {limit} {unit} per minute.",
        retry_after(previous, current, limit - admitted, now),
    )


class MemoryLimiter:
    def __init__(self, reactor: IReactorTime) -> None:
        self.reactor = reactor
        # (kind, key name) -> [window start, previous bucket, current bucket]
        self._buckets: dict[tuple[str, str], list[float]] = {}

    def _counts(self, kind: str, name: str, now: float) -> list[float]:
        start = window_start(now)
        bucket = self._buckets.get((kind, name))
        if bucket is None:
            bucket = self._buckets[(kind, name)] = [start, 0.0, 0.0]
        elif bucket[0] != start:
            previous = bucket[2] if start - bucket[0] == WINDOW else 0.0
            bucket[:] = [start, previous, 0.0]
        return bucket

    async def check(self, principal: Principal) -> None:
        key = principal.key
        if key is None:
            return
        now = self.reactor.seconds()
        if key.tpm is not None:
            _, previous, current = self._counts("tokens", key.name, now)
            if estimate(previous, current, now) >= key.tpm:
                raise _refuse(key.name, key.tpm, "tokens", previous, current, now, 1)
        if key.rpm is not None:
            bucket = self._counts("requests", key.name, now)
            if estimate(bucket[1], bucket[2], now) + 1 > key.rpm:
                raise _refuse(key.name, key.rpm, "requests", bucket[1], bucket[2], now, 1)
            bucket[2] += 1

    async def charge_tokens(self, principal: Principal, tokens: int) -> None:
        key = principal.key
        if key is not None and key.tpm is not None and tokens > 0:
            self._counts("tokens", key.name, self.reactor.seconds())[2] += tokens


# KEYS: current bucket, previous bucket.  ARGV: limit, weight of the previous
# bucket, amount to admit (0 = only look), key ttl.  Returns {admitted, current,
# previous} as strings.
_TAKE = """
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
local previous = tonumber(redis.call('GET', KEYS[2]) or '0')
local amount = tonumber(ARGV[3])
if previous * tonumber(ARGV[2]) + current + amount > tonumber(ARGV[1]) then
  return {'0', tostring(current), tostring(previous)}
end
if amount > 0 then
  redis.call('INCRBY', KEYS[1], amount)
  redis.call('EXPIRE', KEYS[1], tonumber(ARGV[4]))
end
return {'1', tostring(current), tostring(previous)}
"""


class RedisLimiter:
    def __init__(self, redis: SharedRedis, namespace: str, local: MemoryLimiter) -> None:
        self.redis = redis
        self.namespace = namespace
        self.local = local

    def _keys(self, kind: str, name: str, now: float) -> list[str]:
        start = int(window_start(now))
        base = f"{self.namespace}:limit:{kind}:{name}"
        return [f"{base}:{start}", f"{base}:{start - int(WINDOW)}"]

    async def _take(
        self, kind: str, name: str, limit: int, amount: int, now: float
    ) -> tuple[bool, float, float]:
        weight = 1.0 - (now - window_start(now)) / WINDOW
        # repr() is the shortest text that reads back as the same double in Lua,
        # so the script does the memory limiter's arithmetic to the last bit.
        row = await self.redis.call(
            "eval",
            _TAKE,
            self._keys(kind, name, now),
            [limit, repr(weight), amount, int(WINDOW * 2 + 5)],
        )
        admitted, current, previous = (float(v) for v in row)
        return bool(admitted), previous, current

    async def check(self, principal: Principal) -> None:
        key = principal.key
        if key is None or (key.rpm is None and key.tpm is None):
            return
        now = self.local.reactor.seconds()
        try:
            if key.tpm is not None:
                # "Over" means the estimate already reached the limit (>=), as in memory.
                ok, previous, current = await self._take("tokens", key.name, key.tpm, 0, now)
                if not ok or estimate(previous, current, now) >= key.tpm:
                    raise _refuse(key.name, key.tpm, "tokens", previous, current, now, 1)
            if key.rpm is not None:
                ok, previous, current = await self._take("requests", key.name, key.rpm, 1, now)
                if not ok:
                    raise _refuse(key.name, key.rpm, "requests", previous, current, now, 1)
        except RedisUnavailable:
            await self.local.check(principal)

    async def charge_tokens(self, principal: Principal, tokens: int) -> None:
        key = principal.key
        if key is None or key.tpm is None or tokens <= 0:
            return
        now = self.local.reactor.seconds()
        current = self._keys("tokens", key.name, now)[0]
        try:
            await self.redis.call("incrby", current, tokens)
            await self.redis.call("expire", current, int(WINDOW * 2 + 5))
        except RedisUnavailable:
            await self.local.charge_tokens(principal, tokens)
