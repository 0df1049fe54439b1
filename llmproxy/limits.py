"""
Per-key limits: requests and tokens per minute, a spending budget, and
requests in flight at once.

Requests and tokens per minute use a sliding window of two fixed one-minute
buckets (the estimate nginx and Cloudflare use): cheap, smooth at the minute
boundary, and exact enough for quotas.  Tokens are charged after an answer,
from its ``usage``; a key over its tpm is refused until the window slides.
Keys with an ``rpm`` or ``tpm`` get OpenAI's ``x-ratelimit-*`` headers on
every admission and on every refusal.

A budget is spend in USD from the start of the UTC period (day, week from
Monday, month, or total), charged after an answer that has a price; a key at
or over it is refused until the next period.  ``max_parallel`` caps a key's
requests in flight: :meth:`Limiter.admit` takes a slot and
:meth:`Admission.release` frees it.

Time comes from the injected reactor, so a Clock drives the tests.

In memory by default.  With Redis configured, one Lua script judges and takes
each admission atomically, so every process of a fleet enforces one shared
limit: the minute buckets, the period's spend (one ``INCRBYFLOAT`` per
charged answer) and the slots, which are leases with a TTL renewed while their
request lives, so a crashed process never leaks one.  When Redis is
unavailable each process falls back to its own memory; its budget check then
uses the last spend Redis told it plus what it charged since, and what it
charged meanwhile is added to Redis with its next charge.
"""

from __future__ import annotations

import functools
import math
import uuid
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Protocol

import attrs
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from llmproxy import errors
from llmproxy.auth import Principal
from llmproxy.config import ApiKey, Budget
from llmproxy.redisclient import RedisUnavailable, SharedRedis

WINDOW = 60.0
DAY = 86400.0
#: Seconds a Redis slot lives without renewal (it is renewed every third of it).
LEASE_TTL = 30.0
#: How long a period's spend stays in Redis after the period ended.
GRACE = DAY
#: What a key over its ``max_parallel`` is told to wait.
PARALLEL_RETRY = 1.0


class Admission:
    """What admitting one request took: its x-ratelimit-* headers, and its max_parallel slot."""

    def __init__(
        self, headers: Mapping[str, str] | None = None, free: Callable[[], None] | None = None
    ) -> None:
        #: OpenAI's ``x-ratelimit-*`` headers (empty when the key has no rpm/tpm).
        self.headers: Mapping[str, str] = headers if headers is not None else {}
        self._free = free

    def release(self) -> None:
        """Free the max_parallel slot (idempotent; nothing to do without one)."""
        free, self._free = self._free, None
        if free is not None:
            free()


class Limiter(Protocol):
    async def admit(self, principal: Principal) -> Admission:
        """Raise a 429 APIError when the principal is over a limit; else take its admission."""

    async def charge(self, principal: Principal, tokens: int, usd: float | None) -> None:
        """After an answer: tokens count against tpm, usd (when priced) against the budget."""

    async def budget_state(self, key: ApiKey) -> dict[str, object] | None:
        """For /stats: the budget, its period, the spend in it and when it resets; None without."""


# The sliding window.


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


def reset_after(previous: float, current: float, now: float) -> float:
    """
    Seconds until the window is empty again (the whole limit remaining), if
    nothing else arrives: this minute's count decays through all of the next
    minute, the previous minute's through the rest of this one.
    """
    elapsed = now - window_start(now)
    if current > 0:
        return 2 * WINDOW - elapsed
    if previous > 0:
        return WINDOW - elapsed
    return 0.0


def duration(seconds: float) -> str:
    """
    ``seconds`` as OpenAI writes its resets (Go's durations), rounded up to the
    millisecond: ``"0s"``, ``"20ms"``, ``"1s"``, ``"1.5s"``, ``"1m30s"``, ``"6m0s"``.
    """
    ms = max(0, math.ceil(round(seconds * 1000, 6)))
    if ms == 0:
        return "0s"
    if ms < 1000:
        return f"{ms}ms"
    hours, rest = divmod(ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    whole, fraction = divmod(rest, 1000)
    text = f"{whole}" + (f".{fraction:03d}".rstrip("0") if fraction else "") + "s"
    if hours:
        return f"{hours}h{minutes}m{text}"
    if minutes:
        return f"{minutes}m{text}"
    return text


# Budget periods.


def period_bounds(period: str, now: float) -> tuple[float, float | None]:
    """The start of the UTC ``period`` holding ``now``, and the start of the next (None: total)."""
    if period == "total":
        return 0.0, None
    day = now - now % DAY
    if period == "day":
        return day, day + DAY
    if period == "week":
        # The epoch was a Thursday: day number + 3 is days since Monday, mod 7.
        monday = day - ((day // DAY + 3) % 7) * DAY
        return monday, monday + 7 * DAY
    t = datetime.fromtimestamp(now, UTC)
    start = datetime(t.year, t.month, 1, tzinfo=UTC)
    following = datetime(t.year + t.month // 12, t.month % 12 + 1, 1, tzinfo=UTC)
    return start.timestamp(), following.timestamp()


def _money(usd: float) -> str:
    return f"{usd:.6f}".rstrip("0").rstrip(".")


def _iso(when: float | None) -> str | None:
    if when is None:
        return None
    return datetime.fromtimestamp(when, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _budget_state(budget: Budget, spent: float, now: float) -> dict[str, object]:
    return {
        "usd": budget.usd,
        "period": budget.period,
        "spent_usd": spent,
        "resets_at": _iso(period_bounds(budget.period, now)[1]),
    }


# Judging one admission, the same way in memory and in Redis.


@attrs.frozen
class Counts:
    """What a key had used when one of its requests arrived (before that request)."""

    spent: float = 0.0
    tokens: tuple[float, float] = (0.0, 0.0)  # previous bucket, current bucket
    requests: tuple[float, float] = (0.0, 0.0)
    inflight: int = 0


def judge(key: ApiKey, counts: Counts, now: float) -> str | None:
    """
    Which limit refuses the request (``budget``, ``tokens``, ``parallel`` or
    ``requests``), or None.  Mirrored by the Redis script, to the last bit.
    """
    if key.budget is not None and counts.spent >= key.budget.usd:
        return "budget"
    # "Over" tokens means the estimate already reached the limit (>=).
    if key.tpm is not None and estimate(*counts.tokens, now) >= key.tpm:
        return "tokens"
    if key.max_parallel is not None and counts.inflight >= key.max_parallel:
        return "parallel"
    if key.rpm is not None and estimate(*counts.requests, now) + 1 > key.rpm:
        return "requests"
    return None


def rate_headers(key: ApiKey, counts: Counts, now: float, admitted: bool) -> dict[str, str]:
    """OpenAI's ``x-ratelimit-*`` headers, once this request is counted (or refused)."""
    headers: dict[str, str] = {}
    for unit, limit, (previous, current) in (
        ("requests", key.rpm, counts.requests),
        ("tokens", key.tpm, counts.tokens),
    ):
        if limit is None:
            continue
        if admitted and unit == "requests":
            current += 1
        remaining = max(0, math.floor(limit - estimate(previous, current, now)))
        headers[f"x-ratelimit-limit-{unit}"] = str(limit)
        headers[f"x-ratelimit-remaining-{unit}"] = str(remaining)
        headers[f"x-ratelimit-reset-{unit}"] = duration(reset_after(previous, current, now))
    return headers


def refusal(key: ApiKey, verdict: str, counts: Counts, now: float) -> errors.APIError:
    """The 429 for ``verdict``, with the key's rate-limit headers beside its Retry-After."""
    if verdict == "budget":
        assert key.budget is not None
        budget = key.budget
        per = "in total" if budget.period == "total" else f"per {budget.period}"
        following = period_bounds(budget.period, now)[1]
        refused = errors.insufficient_quota(
            f"Key '{key.name}' has used its budget of {_money(budget.usd)} USD {per}.",
            None if following is None else following - now,
        )
    elif verdict == "parallel":
        refused = errors.concurrency_limited(
            f"Too many requests in flight for key '{key.name}':"
            f" at most {key.max_parallel} at once.",
            PARALLEL_RETRY,
        )
    else:
        # Tokens are refused while the estimate is at the limit (one short of it
        # admits), requests when one more would pass it.
        limit = key.tpm if verdict == "tokens" else key.rpm
        assert limit is not None
        previous, current = counts.tokens if verdict == "tokens" else counts.requests
        refused = errors.rate_limited(
            f"Rate limit reached for key '{key.name}': {limit} {verdict} per minute.",
            retry_after(previous, current, limit - 1, now),
        )
    headers = rate_headers(key, counts, now, admitted=False)
    if headers:
        refused = attrs.evolve(refused, headers={**refused.headers, **headers})
    return refused


def _limited(key: ApiKey) -> bool:
    return key.rate_limited or key.budget is not None or key.max_parallel is not None


class MemoryLimiter:
    """One process's limits, in its memory."""

    def __init__(self, reactor: IReactorTime) -> None:
        self.reactor = reactor
        # (kind, key name) -> [window start, previous bucket, current bucket]
        self._buckets: dict[tuple[str, str], list[float]] = {}
        # (key name, period) -> [period start, spend]
        self._spend: dict[tuple[str, str], list[float]] = {}
        # key name -> requests in flight
        self._inflight: dict[str, int] = {}

    def _counts(self, kind: str, name: str, now: float) -> list[float]:
        start = window_start(now)
        bucket = self._buckets.get((kind, name))
        if bucket is None:
            bucket = self._buckets[(kind, name)] = [start, 0.0, 0.0]
        elif bucket[0] != start:
            previous = bucket[2] if start - bucket[0] == WINDOW else 0.0
            bucket[:] = [start, previous, 0.0]
        return bucket

    def _spent(self, name: str, budget: Budget, now: float) -> list[float]:
        start = period_bounds(budget.period, now)[0]
        spend = self._spend.get((name, budget.period))
        if spend is None or spend[0] != start:
            spend = self._spend[(name, budget.period)] = [start, 0.0]
        return spend

    def spent(self, key: ApiKey, now: float) -> float:
        return 0.0 if key.budget is None else self._spent(key.name, key.budget, now)[1]

    async def admit(self, principal: Principal) -> Admission:
        key = principal.key
        if key is None or not _limited(key):
            return Admission()
        now = self.reactor.seconds()
        return self.admit_now(key, now, self.spent(key, now))

    def admit_now(self, key: ApiKey, now: float, spent: float) -> Admission:
        """Judge and take one admission of ``key`` at ``now``, its spend being ``spent``."""
        tokens = self._counts("tokens", key.name, now)
        requests = self._counts("requests", key.name, now)
        counts = Counts(
            spent,
            (tokens[1], tokens[2]),
            (requests[1], requests[2]),
            self._inflight.get(key.name, 0),
        )
        verdict = judge(key, counts, now)
        if verdict is not None:
            raise refusal(key, verdict, counts, now)
        if key.rpm is not None:
            requests[2] += 1
        free = None
        if key.max_parallel is not None:
            self._inflight[key.name] = counts.inflight + 1
            free = functools.partial(self._free, key.name)
        return Admission(rate_headers(key, counts, now, admitted=True), free)

    def _free(self, name: str) -> None:
        left = self._inflight.get(name, 0) - 1
        if left > 0:
            self._inflight[name] = left
        else:
            self._inflight.pop(name, None)

    async def charge(self, principal: Principal, tokens: int, usd: float | None) -> None:
        key = principal.key
        if key is None:
            return
        now = self.reactor.seconds()
        if key.tpm is not None and tokens > 0:
            self._counts("tokens", key.name, now)[2] += tokens
        if key.budget is not None and usd is not None and usd > 0:
            self._spent(key.name, key.budget, now)[1] += usd

    async def budget_state(self, key: ApiKey) -> dict[str, object] | None:
        if key.budget is None:
            return None
        now = self.reactor.seconds()
        return _budget_state(key.budget, self.spent(key, now), now)


# KEYS: budget spend, tokens current bucket, tokens previous bucket, requests
# current bucket, requests previous bucket, leases (a sorted set of lease ids
# scored by their expiry).  ARGV: [1] weight of the previous buckets, [2] now,
# [3] budget USD ('' = none), [4] spend not in Redis yet, [5] tpm (''), [6]
# max_parallel (''), [7] lease id, [8] its expiry, [9] ttl of the leases key,
# [10] rpm (''), [11] ttl of a bucket.  Judges as ``judge`` does; when it
# admits, counts the request and adds the lease.  Returns {verdict ('' =
# admitted), spend, tokens current, tokens previous, requests current,
# requests previous, leases alive} as strings.
_ADMIT = """
local weight = tonumber(ARGV[1])
local spent = '0'
if ARGV[3] ~= '' then spent = redis.call('GET', KEYS[1]) or '0' end
local tokens_current, tokens_previous = 0, 0
if ARGV[5] ~= '' then
  tokens_current = tonumber(redis.call('GET', KEYS[2]) or '0')
  tokens_previous = tonumber(redis.call('GET', KEYS[3]) or '0')
end
local inflight = 0
if ARGV[6] ~= '' then
  redis.call('ZREMRANGEBYSCORE', KEYS[6], '-inf', ARGV[2])
  inflight = redis.call('ZCARD', KEYS[6])
end
local requests_current, requests_previous = 0, 0
if ARGV[10] ~= '' then
  requests_current = tonumber(redis.call('GET', KEYS[4]) or '0')
  requests_previous = tonumber(redis.call('GET', KEYS[5]) or '0')
end
local verdict = ''
if ARGV[3] ~= '' and tonumber(spent) + tonumber(ARGV[4]) >= tonumber(ARGV[3]) then
  verdict = 'budget'
elseif ARGV[5] ~= '' and tokens_previous * weight + tokens_current >= tonumber(ARGV[5]) then
  verdict = 'tokens'
elseif ARGV[6] ~= '' and inflight >= tonumber(ARGV[6]) then
  verdict = 'parallel'
elseif ARGV[10] ~= ''
    and requests_previous * weight + requests_current + 1 > tonumber(ARGV[10]) then
  verdict = 'requests'
end
if verdict == '' then
  if ARGV[10] ~= '' then
    redis.call('INCRBY', KEYS[4], 1)
    redis.call('EXPIRE', KEYS[4], tonumber(ARGV[11]))
  end
  if ARGV[6] ~= '' then
    redis.call('ZADD', KEYS[6], ARGV[8], ARGV[7])
    redis.call('EXPIRE', KEYS[6], tonumber(ARGV[9]))
  end
end
return {verdict, spent, tostring(tokens_current), tostring(tokens_previous),
        tostring(requests_current), tostring(requests_previous), tostring(inflight)}
"""

# KEYS[1]: the tokens current bucket, then budget spend keys.  ARGV: [1]
# tokens (0 = none), [2] ttl of the bucket, then per spend key its amount and
# its ttl (0 = never expires).  Returns the first spend key's new value ('' =
# none).
_CHARGE = """
if tonumber(ARGV[1]) > 0 then
  redis.call('INCRBY', KEYS[1], ARGV[1])
  redis.call('EXPIRE', KEYS[1], tonumber(ARGV[2]))
end
local first = ''
for i = 2, #KEYS do
  local value = redis.call('INCRBYFLOAT', KEYS[i], ARGV[2 * i - 1])
  local ttl = tonumber(ARGV[2 * i])
  if ttl > 0 then redis.call('EXPIRE', KEYS[i], ttl) end
  if i == 2 then first = value end
end
return first
"""

# KEYS[1]: the leases.  ARGV: lease id, its new expiry, ttl of the leases key.
# Renews only a lease still there (one dropped as expired stays dropped).
_RENEW = """
redis.call('ZADD', KEYS[1], 'XX', ARGV[2], ARGV[1])
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[3]))
return 1
"""

BUCKET_TTL = int(WINDOW * 2 + 5)
LEASES_TTL = int(LEASE_TTL * 2)


@attrs.define
class _Pending:
    """Spend charged while Redis was away, for one spend key."""

    ends: float | None  # the start of the next period (None: total)
    usd: float = 0.0
    #: Of ``usd``, what a charge is adding to Redis right now.
    sending: float = 0.0


class RedisLimiter:
    """The limits of a fleet, in Redis; ``local`` while Redis is away."""

    log = Logger()

    def __init__(self, redis: SharedRedis, namespace: str, local: MemoryLimiter) -> None:
        self.redis = redis
        self.namespace = namespace
        self.local = local
        # (key name, period) -> (period start, the spend Redis last told us)
        self._known: dict[tuple[str, str], tuple[float, float]] = {}
        # key name -> spend key -> what was charged while Redis was away
        self._pending: dict[str, dict[str, _Pending]] = {}
        self._away = False

    @property
    def reactor(self) -> IReactorTime:
        return self.local.reactor

    def _buckets(self, kind: str, name: str, now: float) -> list[str]:
        start = int(window_start(now))
        base = f"{self.namespace}:limit:{kind}:{name}"
        return [f"{base}:{start}", f"{base}:{start - int(WINDOW)}"]

    def _spend_key(self, name: str, budget: Budget | None, now: float) -> str:
        base = f"{self.namespace}:budget:{name}"
        if budget is None or budget.period == "total":
            return f"{base}:total"
        return f"{base}:{budget.period}:{int(period_bounds(budget.period, now)[0])}"

    def _leases(self, name: str) -> str:
        return f"{self.namespace}:parallel:{name}"

    def _unavailable(self) -> None:
        if not self._away:
            self._away = True
            self.log.warn(
                "budget spend and per-key limits are counted locally while Redis is unavailable"
            )

    def _available(self) -> None:
        if self._away:
            self._away = False
            self.log.info("Redis is back: budget spend and per-key limits are shared again")

    def _unsent(self, key: ApiKey, now: float) -> float:
        """This period's spend charged while Redis was away, not in Redis yet."""
        if key.budget is None:
            return 0.0
        spend_key = self._spend_key(key.name, key.budget, now)
        pending = self._pending.get(key.name, {}).get(spend_key)
        return pending.usd if pending is not None else 0.0

    def _spent_locally(self, key: ApiKey, now: float) -> float:
        """The last spend known from Redis for this period, plus what was charged since."""
        if key.budget is None:
            return 0.0
        known = self._known.get((key.name, key.budget.period))
        start = period_bounds(key.budget.period, now)[0]
        return (known[1] if known is not None and known[0] == start else 0.0) + self._unsent(
            key, now
        )

    def _learn(self, key: ApiKey, now: float, spent: float) -> None:
        if key.budget is not None:
            start = period_bounds(key.budget.period, now)[0]
            self._known[(key.name, key.budget.period)] = (start, spent)

    async def admit(self, principal: Principal) -> Admission:
        key = principal.key
        if key is None or not _limited(key):
            return Admission()
        now = self.reactor.seconds()
        unsent = self._unsent(key, now)
        lease = uuid.uuid4().hex
        weight = 1.0 - (now - window_start(now)) / WINDOW
        # repr() is the shortest text that reads back as the same double in Lua,
        # so the script does the memory limiter's arithmetic to the last bit.
        args = [
            repr(weight),
            repr(now),
            "" if key.budget is None else repr(key.budget.usd),
            repr(unsent),
            "" if key.tpm is None else key.tpm,
            "" if key.max_parallel is None else key.max_parallel,
            lease,
            repr(now + LEASE_TTL),
            LEASES_TTL,
            "" if key.rpm is None else key.rpm,
            BUCKET_TTL,
        ]
        keys = [
            self._spend_key(key.name, key.budget, now),
            *self._buckets("tokens", key.name, now),
            *self._buckets("requests", key.name, now),
            self._leases(key.name),
        ]
        try:
            row = await self.redis.call("eval", _ADMIT, keys, args)
        except RedisUnavailable:
            self._unavailable()
            return self.local.admit_now(key, now, self._spent_locally(key, now))
        self._available()
        verdict = _text(row[0])
        spent, tok_cur, tok_prev, req_cur, req_prev, inflight = (float(v) for v in row[1:])
        self._learn(key, now, spent)
        counts = Counts(
            spent + unsent,
            (tok_prev, tok_cur),
            (req_prev, req_cur),
            int(inflight),
        )
        if verdict:
            raise refusal(key, verdict, counts, now)
        free = None
        if key.max_parallel is not None:
            free = _Lease(self, self._leases(key.name), lease).release
        return Admission(rate_headers(key, counts, now, admitted=True), free)

    async def charge(self, principal: Principal, tokens: int, usd: float | None) -> None:
        key = principal.key
        if key is None:
            return
        now = self.reactor.seconds()
        tokens = tokens if key.tpm is not None and tokens > 0 else 0
        usd = usd if key.budget is not None and usd is not None and usd > 0 else 0.0
        # This answer's spend, and whatever spend of this key Redis has not seen yet
        # (each to the key of its own period), in one atomic script.
        waiting = self._pending.get(key.name, {})
        flushing = {k: p.usd - p.sending for k, p in waiting.items() if p.usd > p.sending}
        spends = {k: (amount, waiting[k].ends) for k, amount in flushing.items()}
        spend_key = self._spend_key(key.name, key.budget, now)
        if usd and key.budget is not None:
            ends = period_bounds(key.budget.period, now)[1]
            # This period's key first: the script answers its new value.
            spends.pop(spend_key, None)
            spends = {spend_key: (usd + flushing.get(spend_key, 0.0), ends), **spends}
        if not tokens and not spends:
            return
        args: list[object] = [tokens, BUCKET_TTL]
        for amount, end in spends.values():
            args += [repr(amount), 0 if end is None else max(1, math.ceil(end - now + GRACE))]
        keys = [self._buckets("tokens", key.name, now)[0], *spends]
        for k, amount in flushing.items():
            waiting[k].sending += amount  # so that charges at once do not both send it
        try:
            value = await self.redis.call("eval", _CHARGE, keys, args)
        except CancelledError:
            _unsend(waiting, flushing)
            raise
        except RedisUnavailable:
            _unsend(waiting, flushing)
            self._unavailable()
            await self.local.charge(principal, tokens, None)
            if usd and key.budget is not None:
                ends = period_bounds(key.budget.period, now)[1]
                pending = self._pending.setdefault(key.name, {})
                pending.setdefault(spend_key, _Pending(ends)).usd += usd
            return
        self._available()
        for k, amount in flushing.items():
            left = waiting[k]
            left.sending -= amount
            left.usd -= amount
            if left.usd <= 1e-12 and left.sending <= 0:
                del waiting[k]
        if not waiting:
            self._pending.pop(key.name, None)
        if usd:
            self._learn(key, now, float(value))

    async def budget_state(self, key: ApiKey) -> dict[str, object] | None:
        if key.budget is None:
            return None
        now = self.reactor.seconds()
        spend_key = self._spend_key(key.name, key.budget, now)
        try:
            value = await self.redis.call("get", spend_key)
        except RedisUnavailable:
            self._unavailable()
        else:
            self._available()
            self._learn(key, now, float(value) if value is not None else 0.0)
        return _budget_state(key.budget, self._spent_locally(key, now), now)


def _unsend(waiting: Mapping[str, _Pending], flushing: Mapping[str, float]) -> None:
    """What a failed charge was adding to Redis is still to be added."""
    for k, amount in flushing.items():
        waiting[k].sending -= amount


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class _Lease:
    """A max_parallel slot in Redis, renewed every third of its TTL until released."""

    log = Logger()

    def __init__(self, limiter: RedisLimiter, leases: str, lease: str) -> None:
        self.limiter = limiter
        self.leases = leases
        self.lease = lease
        self.loop = LoopingCall(lambda: Deferred.fromCoroutine(self._renew()))
        self.loop.clock = limiter.reactor
        self.loop.start(LEASE_TTL / 3, now=False).addErrback(
            lambda f: self.log.failure("renewing a max_parallel lease failed", f)
        )

    async def _renew(self) -> None:
        expiry = self.limiter.reactor.seconds() + LEASE_TTL
        try:
            await self.limiter.redis.call(
                "eval", _RENEW, [self.leases], [self.lease, repr(expiry), LEASES_TTL]
            )
        except RedisUnavailable:
            pass  # tried again in a third of the TTL; past it, the lease lapses

    def release(self) -> None:
        if self.loop.running:
            self.loop.stop()
        d = Deferred.fromCoroutine(self._remove())
        d.addErrback(lambda f: self.log.failure("releasing a max_parallel lease failed", f))

    async def _remove(self) -> None:
        try:
            await self.limiter.redis.call("zrem", self.leases, self.lease)
        except RedisUnavailable:
            pass  # it lapses within its TTL
