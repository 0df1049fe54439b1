"""The shared Redis connection: a deadline on every call, and back-off only when Redis is away."""

from __future__ import annotations

from typing import Any

import txredisapi
from twisted.internet.defer import Deferred, fail
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from llmproxy.redisclient import RedisUnavailable, SharedRedis


class Connection:
    """A txredisapi connection whose ``get`` fails with ``error``, or never answers."""

    def __init__(self) -> None:
        self.error: Exception | None = None
        self.calls = 0

    def get(self, key: str) -> Deferred[Any]:
        self.calls += 1
        return fail(self.error) if self.error is not None else Deferred()


def outcome(redis: SharedRedis) -> Any:
    """What one ``GET`` comes to right now (None: still waiting)."""
    results: list[Any] = []
    Deferred.fromCoroutine(redis.call("get", "k")).addBoth(results.append)
    return results[0] if results else None


class BackoffTests(SynchronousTestCase):
    def test_a_refused_command_is_that_calls_problem_alone(self) -> None:
        connection = Connection()
        redis = SharedRedis(Clock(), "redis://x", 0.25, connection=connection)
        for error in (
            txredisapi.InvalidData("cannot encode"),
            txredisapi.ResponseError("ERR invalid expire time"),
        ):
            connection.error = error
            assert outcome(redis).check(RedisUnavailable)
        connection.error = None
        assert outcome(redis) is None  # the next call still went to Redis
        assert connection.calls == 3

    def test_connection_trouble_makes_later_calls_fail_fast(self) -> None:
        clock = Clock()
        connection = Connection()
        redis = SharedRedis(clock, "redis://x", 0.25, connection=connection)
        connection.error = txredisapi.ConnectionError("Not connected")
        assert outcome(redis).check(RedisUnavailable)
        assert outcome(redis).check(RedisUnavailable)  # Redis is away: not asked again
        assert connection.calls == 1
        clock.advance(0.5)
        connection.error = None
        assert outcome(redis) is None  # tried again after the back-off
        assert connection.calls == 2

    def test_a_call_that_never_answers_times_out_then_fails_fast(self) -> None:
        clock = Clock()
        connection = Connection()
        redis = SharedRedis(clock, "redis://x", 0.25, connection=connection)
        pending: list[Any] = []
        Deferred.fromCoroutine(redis.call("get", "k")).addBoth(pending.append)
        assert pending == []
        clock.advance(0.25)
        assert isinstance(pending[0], Failure) and pending[0].check(RedisUnavailable)
        # Right after, calls fail at once instead of waiting their deadline.
        assert outcome(redis).check(RedisUnavailable) and connection.calls == 1
        clock.advance(0.5)
        assert outcome(redis) is None  # tried again: waiting for Redis
        assert connection.calls == 2
