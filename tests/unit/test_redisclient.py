"""The shared Redis connection: a deadline on every call, and back-off only when Redis is away."""

from __future__ import annotations

from typing import Any

import txredisapi
from twisted.internet.defer import Deferred, fail
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from llmproxy.config import Redis
from llmproxy.redisclient import RedisUnavailable, SharedRedis

URL = Redis(url="redis://x", timeout=0.25)


class Connection:
    """A txredisapi connection whose ``get`` fails with ``error``, or never answers."""

    def __init__(self) -> None:
        self.error: Exception | None = None
        self.calls = 0

    def get(self, key: str) -> Deferred[Any]:
        self.calls += 1
        return fail(self.error) if self.error is not None else Deferred()


def get(redis: SharedRedis) -> Deferred[Any]:
    return Deferred.fromCoroutine(redis.call("get", "k"))


class BackoffTests(SynchronousTestCase):
    def test_a_refused_command_is_that_calls_problem_alone(self) -> None:
        connection = Connection()
        redis = SharedRedis(Clock(), URL, connection=connection)
        for error in (
            txredisapi.InvalidData("cannot encode"),
            txredisapi.ResponseError("ERR invalid expire time"),
        ):
            connection.error = error
            self.failureResultOf(get(redis), RedisUnavailable)
        connection.error = None
        self.assertNoResult(get(redis))  # the next call still went to Redis
        assert connection.calls == 3

    def test_connection_trouble_makes_later_calls_fail_fast(self) -> None:
        clock = Clock()
        connection = Connection()
        redis = SharedRedis(clock, URL, connection=connection)
        connection.error = txredisapi.ConnectionError("Not connected")
        self.failureResultOf(get(redis), RedisUnavailable)
        self.failureResultOf(get(redis), RedisUnavailable)  # Redis is away: not asked again
        assert connection.calls == 1
        clock.advance(0.5)
        connection.error = None
        self.assertNoResult(get(redis))  # tried again after the back-off
        assert connection.calls == 2

    def test_a_call_that_never_answers_times_out_then_fails_fast(self) -> None:
        clock = Clock()
        connection = Connection()
        redis = SharedRedis(clock, URL, connection=connection)
        pending = get(redis)
        self.assertNoResult(pending)
        clock.advance(0.25)
        self.failureResultOf(pending, RedisUnavailable)
        # Right after, calls fail at once instead of waiting their deadline.
        self.failureResultOf(get(redis), RedisUnavailable)
        assert connection.calls == 1
        clock.advance(0.5)
        self.assertNoResult(get(redis))  # tried again: waiting for Redis
        assert connection.calls == 2
