"""
Passive (and optional active) health of targets: a circuit breaker per target.

    healthy --(failures in a row >= cooldown.failures, or a 429 Retry-After)--> cooling
    cooling --(time passes)--> half-open: exactly one probe request is let through
    probe succeeds --> healthy;  probe fails --> cooling again, twice as long (capped)

Only failures that say something about the target count: connect errors,
timeouts, 429 and 5xx; a 4xx is the client's problem.

With Redis configured the breaker state lives there too (one hash per target,
updated by Lua scripts so concurrent processes never lose an update) and the
probe is claimed fleet-wide with ``SET NX``; every process reads the shared
state when it plans a request, so they agree that a target is down.  When Redis
is unavailable each process falls back to its own local state.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import attrs
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from llmproxy.config import Cooldown, Target
from llmproxy.redisclient import RedisUnavailable, SharedRedis


@attrs.define
class Breaker:
    failures: int = 0
    trips: int = 0
    open_until: float = 0.0
    probing: bool = False

    def state(self, now: float) -> str:
        if self.open_until == 0.0:
            return "healthy"
        if now < self.open_until:
            return "cooling_down"
        return "probing" if self.probing else "half_open"

    def available(self, now: float) -> bool:
        return self.state(now) in ("healthy", "half_open")

    def half_open(self, now: float) -> bool:
        return self.state(now) == "half_open"

    def succeed(self) -> None:
        self.failures = self.trips = 0
        self.open_until = 0.0
        self.probing = False

    def fail(
        self, now: float, cooldown: Cooldown, retry_after: float | None, probe: bool = False
    ) -> None:
        """A failure; ``probe`` when it was the half-open probe's own."""
        if probe:
            self.probing = False
        if now < self.open_until and retry_after is None:
            # Attempts that started before the trip and fail now say nothing new.
            return
        if retry_after is not None:
            self.open_until = now + min(retry_after, cooldown.max_seconds)
            self.failures = 0
            return
        self.failures += 1
        if probe or self.failures >= cooldown.failures:
            self.trips += 1
            seconds = min(cooldown.seconds * 2 ** (self.trips - 1), cooldown.max_seconds)
            self.open_until = now + seconds
            self.failures = 0


class HealthStore(Protocol):
    """Where breaker state is shared; the memory store shares nothing."""

    async def pull(self, targets: Sequence[Target], breakers: Mapping[str, Breaker]) -> None: ...

    async def failed(
        self, target: Target, breaker: Breaker, now: float, retry_after: float | None, probe: bool
    ) -> None: ...

    async def succeeded(self, target: Target) -> None: ...

    async def claim_probe(self, target: Target, ttl: float) -> bool: ...

    async def release_probe(self, target: Target) -> None: ...

    async def end_cooldown(self, target: Target, now: float) -> None: ...


class LocalHealth:
    async def pull(self, targets: Sequence[Target], breakers: Mapping[str, Breaker]) -> None:
        return None

    async def failed(
        self, target: Target, breaker: Breaker, now: float, retry_after: float | None, probe: bool
    ) -> None:
        return None

    async def succeeded(self, target: Target) -> None:
        return None

    async def claim_probe(self, target: Target, ttl: float) -> bool:
        return True

    async def release_probe(self, target: Target) -> None:
        return None

    async def end_cooldown(self, target: Target, now: float) -> None:
        return None


# KEYS[1] = health hash.  ARGV: now, failures threshold, base seconds, max
# seconds, retry-after (-1 when none), 1 if this failure was a probe, key ttl.
_FAIL = """
local failures = tonumber(redis.call('HGET', KEYS[1], 'failures') or '0') + 1
local trips = tonumber(redis.call('HGET', KEYS[1], 'trips') or '0')
local open_until = tonumber(redis.call('HGET', KEYS[1], 'open_until') or '0')
local now = tonumber(ARGV[1])
local retry_after = tonumber(ARGV[5])
local was_probe = ARGV[6] == '1'
if now < open_until and retry_after < 0 then
  -- already cooling: attempts from before the trip say nothing new
  return {tostring(failures - 1), tostring(trips), string.format('%.3f', open_until)}
end
if retry_after >= 0 then
  open_until = now + math.min(retry_after, tonumber(ARGV[4]))
  failures = 0
elseif was_probe or failures >= tonumber(ARGV[2]) then
  trips = trips + 1
  open_until = now + math.min(tonumber(ARGV[3]) * 2 ^ (trips - 1), tonumber(ARGV[4]))
  failures = 0
end
redis.call('HSET', KEYS[1], 'failures', failures, 'trips', trips,
           'open_until', string.format('%.3f', open_until))
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[7]))
return {tostring(failures), tostring(trips), string.format('%.3f', open_until)}
"""

# KEYS[1] = health hash.  ARGV[1] = now.  A cooling target may be probed now.
_END_COOLDOWN = """
local open_until = tonumber(redis.call('HGET', KEYS[1], 'open_until') or '0')
if open_until > tonumber(ARGV[1]) then
  redis.call('HSET', KEYS[1], 'open_until', ARGV[1])
end
return 1
"""

_PULL = """
local out = {}
for i, key in ipairs(KEYS) do
  out[i] = redis.call('HMGET', key, 'failures', 'trips', 'open_until')
end
return out
"""


class RedisHealth:
    log = Logger()

    def __init__(self, redis: SharedRedis, namespace: str, cooldown: Cooldown) -> None:
        self.redis = redis
        self.namespace = namespace
        self.cooldown = cooldown
        self.ttl = int(cooldown.max_seconds * 4 + 3600)

    def key(self, target: Target) -> str:
        return f"{self.namespace}:health:{target.id}"

    def probe_key(self, target: Target) -> str:
        return f"{self.namespace}:probe:{target.id}"

    async def pull(self, targets: Sequence[Target], breakers: Mapping[str, Breaker]) -> None:
        try:
            rows = await self.redis.call("eval", _PULL, [self.key(t) for t in targets], [])
        except RedisUnavailable:
            return
        for target, row in zip(targets, rows or [], strict=False):
            breaker = breakers[target.id]
            failures, trips, open_until = (_number(v) for v in row)
            if open_until is None:
                if breaker.open_until and not breaker.probing:
                    breaker.succeed()  # another process closed it
                continue
            breaker.failures = int(failures or 0)
            breaker.trips = int(trips or 0)
            breaker.open_until = open_until

    async def failed(
        self, target: Target, breaker: Breaker, now: float, retry_after: float | None, probe: bool
    ) -> None:
        c = self.cooldown
        args = [
            f"{now:.3f}",
            c.failures,
            c.seconds,
            c.max_seconds,
            -1 if retry_after is None else retry_after,
            1 if probe else 0,
            self.ttl,
        ]
        try:
            row = await self.redis.call("eval", _FAIL, [self.key(target)], args)
        except RedisUnavailable:
            return
        failures, trips, open_until = (_number(v) for v in row)
        breaker.failures = int(failures or 0)
        breaker.trips = int(trips or 0)
        breaker.open_until = open_until or 0.0

    async def succeeded(self, target: Target) -> None:
        try:
            await self.redis.call("delete", [self.key(target), self.probe_key(target)])
        except RedisUnavailable:
            return

    async def claim_probe(self, target: Target, ttl: float) -> bool:
        try:
            got = await self.redis.call(
                "set",
                self.probe_key(target),
                b"1",
                pexpire=int(ttl * 1000),
                only_if_not_exists=True,
            )
        except RedisUnavailable:
            return True  # no shared view: probe locally
        return got is not None

    async def release_probe(self, target: Target) -> None:
        try:
            await self.redis.call("delete", [self.probe_key(target)])
        except RedisUnavailable:
            return

    async def end_cooldown(self, target: Target, now: float) -> None:
        try:
            await self.redis.call("eval", _END_COOLDOWN, [self.key(target)], [f"{now:.3f}"])
        except RedisUnavailable:
            return


def _number(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        value = value.decode()
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


class ActiveChecker:
    """
    ``GET {base_url}/models`` on every upstream each ``interval`` seconds: a
    failure counts against all of the upstream's targets; a success lets a
    cooling target be probed at once instead of waiting out its cooldown.
    """

    log = Logger()

    def __init__(
        self, reactor: IReactorTime, router: Any, forwarder: Any, interval: float, timeout: float
    ) -> None:
        self.reactor = reactor
        self.router = router
        self.forwarder = forwarder
        self.interval = interval
        self.timeout = timeout
        self.loop = LoopingCall(lambda: Deferred.fromCoroutine(self.check_all()))
        self.loop.clock = reactor

    def start(self) -> None:
        self.loop.start(self.interval, now=False).addErrback(
            lambda f: self.log.failure("health checks stopped", f)
        )

    def stop(self) -> None:
        if self.loop.running:
            self.loop.stop()

    async def check_all(self) -> None:
        for name in self.forwarder.upstreams:
            try:
                ok = await self.forwarder.probe(name, "/models", self.timeout)
            except CancelledError:
                raise
            except Exception:  # noqa: BLE001 - a check must never stop the loop
                self.log.failure("health check of {upstream} failed", upstream=name)
                ok = False
            await self.router.checked(name, ok)
