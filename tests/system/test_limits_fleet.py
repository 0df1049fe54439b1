"""
Per-key limits shared by a fleet through a real redis-server: one budget and
one max_parallel count for two processes, leases that lapse when their process
dies and live while it renews them, and each process counting on its own while
Redis is away (then handing Redis what it counted).

Each "process" is a RedisLimiter with its own connection and its own Clock (the
limiter's time, so periods and leases are exact); Redis itself runs on the real
reactor, driven by pytest-twisted.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import Clock, deferLater
from twisted.logger import LogLevel, capturedLogs, formatEvent

from llmproxy.auth import Principal
from llmproxy.config import ApiKey, Budget, Redis
from llmproxy.errors import APIError
from llmproxy.limits import LEASE_TTL, Admission, Limiter, MemoryLimiter, RedisLimiter
from llmproxy.redisclient import RedisUnavailable, SharedRedis
from llmproxy.testing.processes import RedisServer, closed_port

NS = "fleet"
NOW = datetime(2024, 3, 13, 15, 30, tzinfo=UTC).timestamp()  # a Wednesday afternoon
MIDNIGHT = datetime(2024, 3, 14, tzinfo=UTC).timestamp()


class Flaky(SharedRedis):
    """A connection to a real Redis that can be made to fail, as during an outage."""

    down = False

    async def call(self, command: str, *args: Any, **kwargs: Any) -> Any:
        if self.down:
            raise RedisUnavailable("outage")
        return await super().call(command, *args, **kwargs)


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:
    """Poll ``check`` on the real reactor until it holds, or fail after ``timeout``."""
    deadline = reactor.seconds() + timeout
    while not await check():
        if reactor.seconds() > deadline:
            raise AssertionError("the condition did not hold in time")
        await deferLater(reactor, 0.02, lambda: None)


async def connect(url: str) -> Flaky:
    redis = Flaky(reactor, Redis(url=url, timeout=2.0))
    redis.startService()

    async def answers() -> bool:
        try:
            await redis.call("ping")
        except RedisUnavailable:
            return False
        return True

    await eventually(answers)
    return redis


@pytest_twisted.async_yield_fixture
async def pair(redis_server: RedisServer) -> AsyncIterator[tuple[Flaky, Flaky]]:
    """Two processes' connections to one redis-server."""
    one, two = await connect(redis_server.url), await connect(redis_server.url)
    yield one, two
    await one.stopService()
    await two.stopService()


def process(redis: SharedRedis, when: float = NOW) -> tuple[RedisLimiter, Clock]:
    clock = Clock()
    clock.advance(when)
    return RedisLimiter(redis, NS, MemoryLimiter(clock)), clock


async def refused(limiter: Limiter, who: Principal) -> APIError:
    with pytest.raises(APIError) as raised:
        await limiter.admit(who)
    return raised.value


async def leases(redis: SharedRedis, name: str) -> int:
    return int(await redis.call("zcard", f"{NS}:parallel:{name}"))


def warnings(events: Sequence[dict[str, Any]]) -> list[str]:
    return [formatEvent(e) for e in events if "Redis" in formatEvent(e)]


@pytest_twisted.ensureDeferred
async def test_two_processes_share_one_budget(
    pair: tuple[Flaky, Flaky], redis_server: RedisServer
) -> None:
    who = Principal("team", ApiKey(name="team", key="k", budget=Budget(1.0, "day")))
    (a, _), (b, _) = process(pair[0]), process(pair[1])
    await a.admit(who)
    await a.charge(who, 0, 0.75)
    await b.admit(who)  # 0.75 of 1: still admitted, by the other process
    await b.charge(who, 0, 0.25)
    for limiter in (a, b):
        over = await refused(limiter, who)
        assert over.code == "insufficient_quota"
        assert over.headers["Retry-After"] == str(int(MIDNIGHT - NOW))
    spend = f"{NS}:budget:team:day:{int(MIDNIGHT - 86400)}"
    assert redis_server.cli_call("GET", spend) == "1"
    # It expires a day after its period ends.
    assert 0 <= MIDNIGHT - NOW + 86400 - int(redis_server.cli_call("TTL", spend)) < 10
    assert who.key is not None
    assert await a.budget_state(who.key) == {
        "usd": 1.0,
        "period": "day",
        "spent_usd": 1.0,
        "resets_at": "2024-03-14T00:00:00Z",
    }
    forever = Principal("f", ApiKey(name="f", key="f", budget=Budget(5.0, "total")))
    await b.charge(forever, 0, 0.5)
    assert redis_server.cli_call("GET", f"{NS}:budget:f:total") == "0.5"
    assert redis_server.cli_call("TTL", f"{NS}:budget:f:total") == "-1"  # never expires


@pytest_twisted.ensureDeferred
async def test_two_processes_share_one_max_parallel(pair: tuple[Flaky, Flaky]) -> None:
    who = Principal("team", ApiKey(name="team", key="k", max_parallel=2))
    (a, _), (b, _) = process(pair[0]), process(pair[1])
    first, second = await a.admit(who), await b.admit(who)
    for limiter in (a, b):
        assert (await refused(limiter, who)).code == "concurrency_limit_exceeded"
    assert await leases(pair[0], "team") == 2
    first.release()
    first.release()  # idempotent: frees that one slot only

    async def one_left() -> bool:
        return await leases(pair[0], "team") == 1

    await eventually(one_left)
    third = await b.admit(who)  # the slot the other process freed
    assert (await refused(a, who)).code == "concurrency_limit_exceeded"
    second.release()
    third.release()

    async def none_left() -> bool:
        return await leases(pair[0], "team") == 0

    await eventually(none_left)


@pytest_twisted.ensureDeferred
async def test_a_crashed_process_lease_lapses(pair: tuple[Flaky, Flaky]) -> None:
    who = Principal("team", ApiKey(name="team", key="k", max_parallel=1))
    crashed, _ = process(pair[0])
    await crashed.admit(who)  # never released; its clock stops, so it is never renewed
    survivor, clock = process(pair[1])
    clock.advance(LEASE_TTL - 1)
    assert (await refused(survivor, who)).code == "concurrency_limit_exceeded"
    clock.advance(1)
    held = await survivor.admit(who)  # the dead one's lease lapsed
    assert await leases(pair[1], "team") == 1
    held.release()


@pytest_twisted.ensureDeferred
async def test_a_living_request_renews_its_lease(pair: tuple[Flaky, Flaky]) -> None:
    who = Principal("team", ApiKey(name="team", key="k", max_parallel=1))
    (living, its_clock), (other, other_clock) = process(pair[0]), process(pair[1])
    held = await living.admit(who)
    [lease] = await pair[0].call("zrange", f"{NS}:parallel:team", 0, -1)
    for step in range(1, 7):  # a minute: twice the TTL
        its_clock.advance(LEASE_TTL / 3)
        other_clock.advance(LEASE_TTL / 3)
        expiry = its_clock.seconds() + LEASE_TTL

        async def renewed() -> bool:
            score = await pair[1].call("zscore", f"{NS}:parallel:team", lease)
            return float(score) == expiry  # noqa: B023 - awaited within this step

        await eventually(renewed)
        assert (await refused(other, who)).code == "concurrency_limit_exceeded", step
    held.release()

    async def freed() -> bool:
        return await leases(pair[1], "team") == 0

    await eventually(freed)
    (await other.admit(who)).release()
    its_clock.advance(LEASE_TTL)  # released: no more renewals
    assert await leases(pair[1], "team") in (0, 1)


@pytest_twisted.ensureDeferred
async def test_an_unreachable_redis_counts_in_this_process() -> None:
    closed = closed_port()
    redis = SharedRedis(reactor, Redis(url=f"redis://127.0.0.1:{closed}/0", timeout=0.2))
    redis.startService()
    try:
        limiter, _ = process(redis)
        key = ApiKey(name="team", key="k", rpm=2, budget=Budget(1.0, "day"), max_parallel=1)
        who = Principal("team", key)
        with capturedLogs() as events:
            first = await limiter.admit(who)
            assert first.headers["x-ratelimit-remaining-requests"] == "1"
            over = await refused(limiter, who)
            assert over.code == "concurrency_limit_exceeded"
            assert over.headers["x-ratelimit-remaining-requests"] == "1"
            first.release()  # into the local count it was taken from
            second = await limiter.admit(who)
            second.release()
            await limiter.charge(who, 0, 1.0)
            assert (await refused(limiter, who)).code == "insufficient_quota"
            state = await limiter.budget_state(key)
        assert state is not None and state["spent_usd"] == 1.0
        said = [e for e in events if "counted locally" in formatEvent(e)]
        assert len(said) == 1 and said[0]["log_level"] is LogLevel.warn  # once, not per request
    finally:
        await redis.stopService()


@pytest_twisted.ensureDeferred
async def test_spend_counted_during_an_outage_reaches_redis(
    pair: tuple[Flaky, Flaky], redis_server: RedisServer
) -> None:
    who = Principal("team", ApiKey(name="team", key="k", budget=Budget(1.0, "day")))
    (a, _), (b, _) = process(pair[0]), process(pair[1])
    spend = f"{NS}:budget:team:day:{int(MIDNIGHT - 86400)}"
    await b.charge(who, 0, 0.5)
    await a.admit(who)  # a learns the fleet's 0.5
    pair[0].down = True
    with capturedLogs() as events:
        await a.charge(who, 0, 0.25)
        await a.admit(who)  # 0.5 known + 0.25 local
        await a.charge(who, 0, 0.25)
        assert (await refused(a, who)).code == "insufficient_quota"  # 0.5 + 0.5
        assert redis_server.cli_call("GET", spend) == "0.5"
        await b.admit(who)  # b knows only Redis's 0.5: the overshoot of an outage
        pair[0].down = False
        await a.charge(who, 0, 0.125)  # what a counted meanwhile goes along
        assert redis_server.cli_call("GET", spend) == "1.125"
        assert (await refused(b, who)).code == "insufficient_quota"
        assert (await refused(a, who)).code == "insufficient_quota"
        assert who.key is not None
        state = await a.budget_state(who.key)
        assert state is not None and state["spent_usd"] == 1.125
    said = warnings(events)
    assert len(said) == 2, said  # once away, once back
    assert "counted locally" in said[0] and "back" in said[1]


@pytest_twisted.ensureDeferred
async def test_memory_and_redis_admissions_agree(pair: tuple[Flaky, Flaky]) -> None:
    """Headers, refusals and messages are the same from the Lua script as from memory."""
    key = ApiKey(name="team", key="k", rpm=3, tpm=100, budget=Budget(2.0, "day"), max_parallel=2)
    who = Principal("team", key)
    clock = Clock()
    clock.advance(NOW)
    memory = MemoryLimiter(clock)
    shared = RedisLimiter(pair[0], NS, MemoryLimiter(clock))
    held: dict[Limiter, list[Admission]] = {memory: [], shared: []}

    async def outcome(limiter: Limiter, event: str) -> object:
        if event == "admit":
            try:
                admission = await limiter.admit(who)
            except APIError as e:
                return (e.status, e.code, e.message, dict(e.headers))
            held[limiter].append(admission)
            return dict(admission.headers)
        if event == "release":
            held[limiter].pop(0).release()
            return None
        _, tokens, usd = event.split()
        await limiter.charge(who, int(tokens), float(usd))
        return None

    events = [
        (0.0, "admit"),
        (1.0, "admit"),
        (2.0, "admit"),  # a third in flight
        (2.5, "release"),
        (3.0, "admit"),
        (4.0, "admit"),  # the fourth in a minute
        (20.0, "charge 120 0.5"),
        (21.0, "admit"),  # over tpm
        (70.0, "release"),
        (80.25, "admit"),
        (150.0, "charge 10 1.5"),
        (151.0, "admit"),  # over budget
    ]
    outcomes = []
    for when, event in events:
        clock.advance(NOW + when - clock.seconds())
        expected = await outcome(memory, event)
        if event == "release":

            async def settled() -> bool:
                return await leases(pair[0], "team") == len(held[memory])

            await outcome(shared, event)
            await eventually(settled)
            continue
        assert await outcome(shared, event) == expected, (when, event)
        outcomes.append(expected)
    codes = {o[1] for o in outcomes if isinstance(o, tuple)}
    assert codes == {"concurrency_limit_exceeded", "rate_limit_exceeded", "insufficient_quota"}
    for each in held.values():
        for admission in each:
            admission.release()


@pytest_twisted.ensureDeferred
async def test_spend_of_an_outage_goes_to_its_own_period(
    pair: tuple[Flaky, Flaky], redis_server: RedisServer
) -> None:
    who = Principal("team", ApiKey(name="team", key="k", budget=Budget(1.0, "day")))
    a, clock = process(pair[0], MIDNIGHT - 10)
    pair[0].down = True
    await a.charge(who, 0, 0.25)  # before midnight, while Redis is away
    clock.advance(20)
    pair[0].down = False
    await a.charge(who, 0, 0.125)  # after midnight, Redis back
    day = 86400
    assert redis_server.cli_call("GET", f"{NS}:budget:team:day:{int(MIDNIGHT - day)}") == "0.25"
    assert redis_server.cli_call("GET", f"{NS}:budget:team:day:{int(MIDNIGHT)}") == "0.125"
    assert who.key is not None
    state = await a.budget_state(who.key)
    assert state is not None and state["spent_usd"] == 0.125
