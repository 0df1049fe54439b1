"""
Passive health: every target's :class:`~llmproxy.routing.breaker.Breaker`, and
the store a fleet shares them through.

Only failures that say something about the target count: connect errors,
timeouts, 429 and 5xx (:meth:`~llmproxy.failures.UpstreamFailure.counts_against`).

With Redis configured the breaker state lives there too (one hash per target,
updated by a Lua script that runs the breaker's own machine, so concurrent
processes never lose an update) and the probe is claimed fleet-wide with
``SET NX``; every process reads the shared state when it plans a request, so
they agree that a target is down.  When Redis is unavailable each process
falls back to its own breakers.  :class:`Health` is the one place that tells
the breakers what happened and keeps the store in step.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from llmproxy.config import Cooldown, Target
from llmproxy.failures import Kind, UpstreamFailure
from llmproxy.redisclient import RedisUnavailable, SharedRedis
from llmproxy.routing.breaker import Breaker, SharedState


class HealthStore(Protocol):
    """Where breaker state is shared; the memory store shares nothing."""

    async def pull(self, targets: Sequence[Target]) -> dict[str, SharedState | None]:
        """What the fleet knows of each target (``None``: nothing, it is healthy)."""

    async def failed(
        self, target: Target, now: float, retry_after: float | None, probe: bool
    ) -> SharedState | None:
        """Count a failure fleet-wide; the state after it, if the store keeps one."""

    async def succeeded(self, target: Target) -> None: ...

    async def claim_probe(self, target: Target, ttl: float) -> bool: ...

    async def release_probe(self, target: Target) -> None: ...

    async def end_cooldown(self, target: Target, now: float) -> None: ...


class LocalHealth:
    """One process alone: nothing is shared, every probe claim succeeds."""

    async def pull(self, targets: Sequence[Target]) -> dict[str, SharedState | None]:
        return {}

    async def failed(
        self, target: Target, now: float, retry_after: float | None, probe: bool
    ) -> SharedState | None:
        return None

    async def succeeded(self, target: Target) -> None:
        return None

    async def claim_probe(self, target: Target, ttl: float) -> bool:
        return True

    async def release_probe(self, target: Target) -> None:
        return None

    async def end_cooldown(self, target: Target, now: float) -> None:
        return None


# The breaker's fail() in Lua (keep the two in step: tests/system/test_shared_state.py).
# KEYS[1] = health hash.  ARGV: now, failures threshold, base seconds, max
# seconds, retry-after (-1 when none), 1 if this failure was a probe, key ttl.
_FAIL = """
local failures = tonumber(redis.call('HGET', KEYS[1], 'failures') or '0') + 1
local trips = tonumber(redis.call('HGET', KEYS[1], 'trips') or '0')
local open_until = tonumber(redis.call('HGET', KEYS[1], 'open_until') or '0')
local tripped_by = tonumber(redis.call('HGET', KEYS[1], 'tripped_by') or '0')
local now = tonumber(ARGV[1])
local retry_after = tonumber(ARGV[5])
local was_probe = ARGV[6] == '1'
if now < open_until and retry_after < 0 then
  -- already cooling: attempts from before the trip say nothing new
  return {tostring(failures - 1), tostring(trips), string.format('%.3f', open_until),
          tostring(tripped_by)}
end
if retry_after >= 0 then
  open_until = now + math.min(retry_after, tonumber(ARGV[4]))
  tripped_by = failures
  failures = 0
elseif was_probe or failures >= tonumber(ARGV[2]) then
  trips = trips + 1
  open_until = now + math.min(tonumber(ARGV[3]) * 2 ^ (trips - 1), tonumber(ARGV[4]))
  tripped_by = failures
  failures = 0
end
redis.call('HSET', KEYS[1], 'failures', failures, 'trips', trips,
           'open_until', string.format('%.3f', open_until), 'tripped_by', tripped_by)
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[7]))
return {tostring(failures), tostring(trips), string.format('%.3f', open_until),
        tostring(tripped_by)}
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
  out[i] = redis.call('HMGET', key, 'failures', 'trips', 'open_until', 'tripped_by')
end
return out
"""


class RedisHealth:
    """Breaker state shared by a fleet in Redis; on Redis trouble it knows nothing."""

    def __init__(self, redis: SharedRedis, namespace: str, cooldown: Cooldown) -> None:
        self.redis = redis
        self.namespace = namespace
        self.cooldown = cooldown
        self.ttl = int(cooldown.max_seconds * 4 + 3600)

    def key(self, target: Target) -> str:
        return f"{self.namespace}:health:{target.id}"

    def probe_key(self, target: Target) -> str:
        return f"{self.namespace}:probe:{target.id}"

    async def pull(self, targets: Sequence[Target]) -> dict[str, SharedState | None]:
        try:
            rows = await self.redis.call("eval", _PULL, [self.key(t) for t in targets], [])
        except RedisUnavailable:
            return {}
        return {t.id: _state(row) for t, row in zip(targets, rows or [], strict=False)}

    async def failed(
        self, target: Target, now: float, retry_after: float | None, probe: bool
    ) -> SharedState | None:
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
            return None
        return _state(row)

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


def _state(row: Sequence[Any] | None) -> SharedState | None:
    """A health hash's (failures, trips, open_until, tripped_by); None when there is none."""
    values = [_float(v) for v in (row or ())] + [None] * 4
    failures, trips, open_until, tripped_by = values[:4]
    if open_until is None:
        return None
    return SharedState(int(failures or 0), int(trips or 0), open_until, int(tripped_by or 0))


def _float(value: Any) -> float | None:
    if isinstance(value, bytes):
        value = value.decode()
    try:
        return float(value) if value is not None else None
    except (TypeError, ValueError):
        return None


class Health:
    """Every target's breaker, told what happened, and kept in step with the store."""

    log = Logger()

    def __init__(self, reactor: IReactorTime, cooldown: Cooldown, store: HealthStore) -> None:
        self.reactor = reactor
        self.cooldown = cooldown
        self.store = store
        self._breakers: dict[str, Breaker] = {}

    def breaker(self, target: Target) -> Breaker:
        """The breaker of ``target`` (read it; tell it things through this class)."""
        return self._breakers.setdefault(target.id, Breaker())

    def inherit(self, previous: Health, target: Target) -> None:
        """Share ``target``'s breaker with ``previous`` (the config before a reload)."""
        found = previous._breakers.get(target.id)
        if found is not None:
            self._breakers[target.id] = found

    async def pull(self, targets: Sequence[Target]) -> None:
        """Adopt what the fleet knows of these targets."""
        for target in targets:
            self.breaker(target)
        for target_id, shared in (await self.store.pull(targets)).items():
            self._breakers[target_id].adopt(shared)

    async def claim_probe(self, target: Target, ttl: float) -> bool:
        """Exactly one probe, claimed fleet-wide when shared; False if another has it."""
        breaker = self.breaker(target)
        breaker.claim_probe()
        try:
            claimed = await self.store.claim_probe(target, ttl)
        except BaseException:
            breaker.release_probe()  # e.g. the client left: the probe is free again
            raise
        if not claimed:
            breaker.release_probe()
        return claimed

    def release_probe(self, target: Target) -> None:
        """The probe ended without a verdict: let another request try."""
        self.breaker(target).release_probe()
        Deferred.fromCoroutine(self.store.release_probe(target))

    async def probe_passed(self, target: Target) -> None:
        self.log.info("{target} is healthy again", target=target.id)
        self.breaker(target).recovered()
        await self.store.succeeded(target)

    async def succeeded(self, target: Target) -> None:
        if self.breaker(target).succeeded():
            await self.store.succeeded(target)

    async def failed(self, target: Target, failure: UpstreamFailure, probe: bool) -> None:
        """A failed attempt (``probe``: the one that held the target's probe)."""
        if not failure.counts_against():
            if probe:
                self.release_probe(target)
            return
        breaker = self.breaker(target)
        now = self.reactor.seconds()
        retry_after = failure.retry_after if failure.status in (429, 529) else None
        breaker.fail(now, self.cooldown, retry_after, probe)
        shared = await self.store.failed(target, now, retry_after, probe)
        if shared is not None:
            breaker.adopt(shared)
        if probe:
            await self.store.release_probe(target)
        if breaker.open_until > now:
            self.log.warn(
                "{target} cooling down for {seconds:.1f}s after {failure}",
                target=target.id,
                seconds=breaker.open_until - now,
                failure=str(failure),
            )

    async def checked(self, targets: Sequence[Target], ok: bool) -> None:
        """The verdict of an active health check on the upstream of ``targets``."""
        now = self.reactor.seconds()
        for target in targets:
            if not ok:
                await self.failed(
                    target, UpstreamFailure(Kind.CONNECT, "active health check"), False
                )
            elif self.breaker(target).end_cooldown(now):
                await self.store.end_cooldown(target, now)  # probe it now rather than later
