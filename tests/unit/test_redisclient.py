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

    error: Exception | None = None

    def get(self, key: str) -> Deferred[Any]:
        return fail(self.error) if self.error is not None else Deferred()


def outcome(redis: SharedRedis) -> Any:
    results: list[Any] = []
    Deferred.fromCoroutine(redis.call("get", "k")).addBoth(results.append)
    return results[0] if results else None


class BackoffTests(SynchronousTestCase):
    def test_only_connection_trouble_makes_redis_back_off(self) -> None:
        connection = Connection()
        redis = SharedRedis(Clock(), "redis://x", 0.25, connection=connection)
        connection.error = txredisapi.InvalidData("cannot encode")
        assert outcome(redis).check(RedisUnavailable) and redis.available  # one call's problem
        connection.error = txredisapi.ResponseError("ERR invalid expire time")
        assert outcome(redis).check(RedisUnavailable) and redis.available
        connection.error = txredisapi.ConnectionError("Not connected")
        assert outcome(redis).check(RedisUnavailable) and not redis.available  # Redis is away

    def test_a_call_that_never_answers_times_out_then_fails_fast(self) -> None:
        clock = Clock()
        redis = SharedRedis(clock, "redis://x", 0.25, connection=Connection())
        pending: list[Any] = []
        Deferred.fromCoroutine(redis.call("get", "k")).addBoth(pending.append)
        assert pending == []
        clock.advance(0.25)
        assert isinstance(pending[0], Failure) and pending[0].check(RedisUnavailable)
        # Right after, calls fail at once instead of waiting their deadline.
        assert outcome(redis).check(RedisUnavailable)
        clock.advance(0.5)
        assert outcome(redis) is None  # tried again: waiting for Redis
