"""
What a fleet shares in Redis behaves exactly as what one process keeps in
memory: one table of events goes through the Python breaker and through the
Lua script on a real redis-server, and another through the memory and the
Redis rate limiters, and every field (every decision) is compared after each
event.  Time is a Clock, so the events are exact; Redis itself runs on the
real reactor, driven by pytest-twisted.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import Clock, deferLater

from llmproxy.auth import Principal
from llmproxy.config import ApiKey, Cooldown, Redis, Target
from llmproxy.errors import APIError
from llmproxy.failures import Kind, UpstreamFailure
from llmproxy.limits import Limiter, MemoryLimiter, RedisLimiter
from llmproxy.redisclient import RedisUnavailable, SharedRedis
from llmproxy.routing.breaker import BreakerState, SharedState
from llmproxy.routing.health import Health, LocalHealth, RedisHealth
from llmproxy.testing.processes import RedisServer

COOLDOWN = Cooldown(failures=3, seconds=30, max_seconds=300)
TARGET = Target("a", "m")


async def connected(redis: SharedRedis, timeout: float = 10.0) -> None:
    """Wait (polling, with a deadline) until the lazy pool answers a PING."""
    deadline = reactor.seconds() + timeout
    while True:
        try:
            await redis.call("ping")
            return
        except RedisUnavailable:
            if reactor.seconds() > deadline:
                raise AssertionError("redis-server did not answer a PING in time") from None
            await deferLater(reactor, 0.6, lambda: None)  # past the client's back-off


@pytest_twisted.async_yield_fixture
async def redis(redis_server: RedisServer) -> AsyncIterator[SharedRedis]:
    shared = SharedRedis(reactor, Redis(url=redis_server.url, timeout=2.0))
    shared.startService()
    await connected(shared)
    yield shared
    await shared.stopService()


def http(status: int, retry_after: float | None = None) -> UpstreamFailure:
    return UpstreamFailure(Kind.HTTP, f"HTTP {status}", status=status, retry_after=retry_after)


def connect() -> UpstreamFailure:
    return UpstreamFailure(Kind.CONNECT, "connection refused")


# (time, what happens): each through Health over the memory store and over Redis.
BREAKER_EVENTS: list[tuple[float, str, Callable[[Health], Any]]] = [
    (100.0, "a failure", lambda h: h.failed(TARGET, connect(), probe=False)),
    (101.0, "a client error does not count", lambda h: h.failed(TARGET, http(400), False)),
    (102.0, "a second failure", lambda h: h.failed(TARGET, http(503), probe=False)),
    (103.0, "a success restarts the count", lambda h: h.succeeded(TARGET)),
    (104.0, "one", lambda h: h.failed(TARGET, connect(), probe=False)),
    (105.0, "two", lambda h: h.failed(TARGET, connect(), probe=False)),
    (106.5, "three: it trips for 30s", lambda h: h.failed(TARGET, http(500), probe=False)),
    (110.0, "older attempts fail: nothing new", lambda h: h.failed(TARGET, connect(), False)),
    (111.0, "a success before the probe ends nothing", lambda h: h.succeeded(TARGET)),
    (
        112.0,
        "a 429 Retry-After cools for that long",
        lambda h: h.failed(TARGET, http(429, 5), False),
    ),
    (117.0, "its probe fails: twice as long", lambda h: h.failed(TARGET, connect(), probe=True)),
    (120.0, "a passing check ends the cooldown", lambda h: h.checked([TARGET], ok=True)),
    (121.25, "the probe fails again: 120s", lambda h: h.failed(TARGET, connect(), probe=True)),
    (130.0, "a failing check while cooling", lambda h: h.checked([TARGET], ok=False)),
    (500.0, "the probe fails: 240s", lambda h: h.failed(TARGET, connect(), probe=True)),
    (800.0, "and again: capped at 300s", lambda h: h.failed(TARGET, connect(), probe=True)),
    (1100.0, "the probe passes", lambda h: h.probe_passed(TARGET)),
    (1101.0, "a 429 without Retry-After counts", lambda h: h.failed(TARGET, http(429), False)),
    (1102.0, "a huge Retry-After is capped", lambda h: h.failed(TARGET, http(429, 9e9), False)),
]


@pytest_twisted.ensureDeferred
async def test_the_breaker_and_its_lua_twin_agree_on_every_event(redis: SharedRedis) -> None:
    clock = Clock()
    local = Health(clock, COOLDOWN, LocalHealth())
    store = RedisHealth(redis, "parity", COOLDOWN)
    shared = Health(clock, COOLDOWN, store)
    for when, what, event in BREAKER_EVENTS:
        clock.advance(when - clock.seconds())
        await event(local)
        await event(shared)
        expected = local.breaker(TARGET).shared
        await shared.pull([TARGET])  # what Redis holds, adopted as a fleet member would
        assert shared.breaker(TARGET).shared == expected, (when, what)
        stored = (await store.pull([TARGET]))[TARGET.id] or SharedState()
        assert stored == expected, (when, what)
        assert shared.breaker(TARGET).state(when) is local.breaker(TARGET).state(when), what
    # The table went through every state it can be in between requests.
    assert local.breaker(TARGET).state(clock.seconds()) is BreakerState.COOLING_DOWN


KEY = Principal("team", ApiKey(name="team", key="k", rpm=3, tpm=100))

# (time, event): "check" admits one request or refuses it; "charge N" charges tokens.
LIMIT_EVENTS = [
    (0.0, "check"),
    (1.0, "check"),
    (2.0, "check"),
    (3.0, "check"),  # the fourth in a minute: refused
    (30.0, "check"),
    (60.0, "check"),  # the last minute still counts whole
    (80.0, "check"),  # a third of it has slid out
    (81.0, "check"),
    (90.0, "charge 150"),
    (91.0, "check"),  # over tpm now
    (150.0, "check"),
    (185.0, "check"),
    (185.5, "charge 40"),
    (186.0, "check"),
    (400.0, "check"),  # long idle: both windows are new
    (400.0, "charge 0"),
]


async def limit_outcome(limiter: Limiter, event: str) -> str:
    if event.startswith("charge"):
        await limiter.charge(KEY, int(event.split()[1]), None)
        return "charged"
    try:
        (await limiter.admit(KEY)).release()
    except APIError as refused:
        return f"{refused.status} retry-after={refused.headers['Retry-After']} {refused.message}"
    return "admitted"


@pytest_twisted.ensureDeferred
async def test_the_memory_and_redis_limiters_agree_on_every_event(redis: SharedRedis) -> None:
    clock = Clock()
    memory = MemoryLimiter(clock)
    shared = RedisLimiter(redis, "parity", MemoryLimiter(clock))
    outcomes = []
    for when, event in LIMIT_EVENTS:
        clock.advance(when - clock.seconds())
        expected = await limit_outcome(memory, event)
        assert await limit_outcome(shared, event) == expected, (when, event)
        outcomes.append(expected)
    # The table exercised both limits and both answers.
    assert "admitted" in outcomes
    assert any("requests per minute" in o for o in outcomes)
    assert any("tokens per minute" in o for o in outcomes)
