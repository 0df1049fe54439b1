"""
The shared Redis connection: a deadline on every call, back-off only when
Redis is away, and a pool that never gives up reconnecting (a reconnection's
``SELECT`` that times out used to stop it for good).
"""

from __future__ import annotations

from typing import Any

import txredisapi
from twisted.internet.defer import Deferred, fail
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial.unittest import SynchronousTestCase

from llmproxy import redisclient
from llmproxy.config import Redis, Sentinel
from llmproxy.redisclient import RedisUnavailable, SharedRedis
from llmproxy.redissentinel import KeepTrying, MasterFactory, PoolFactory

URL = Redis(url="redis://x", timeout=0.25)
READONLY = txredisapi.ResponseError("READONLY You can't write against a read only replica.")


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

    def test_a_demoted_sentinel_master_is_redis_away(self) -> None:
        connection = Connection()
        sentinel = Redis(url=None, timeout=0.25, sentinel=Sentinel("cache", (("h", 26379),)))
        redis = SharedRedis(Clock(), sentinel, connection=connection)
        connection.error = READONLY
        failure = self.failureResultOf(get(redis), RedisUnavailable)
        assert str(failure.value) == "READONLY"
        self.failureResultOf(get(redis), RedisUnavailable)  # not asked again for now
        assert connection.calls == 1

    def test_a_replica_named_by_the_url_fails_only_the_writes(self) -> None:
        connection = Connection()
        redis = SharedRedis(Clock(), URL, connection=connection)
        connection.error = READONLY
        assert str(self.failureResultOf(get(redis), RedisUnavailable).value) == "READONLY"
        connection.error = None
        self.assertNoResult(get(redis))  # the next call still went to Redis
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


def bulk(*items: bytes) -> bytes:
    return f"*{len(items)}\r\n".encode() + b"".join(
        b"$%d\r\n%s\r\n" % (len(item), item) for item in items
    )


class Slot:
    """Stands for a slot of txredisapi's pool: records being told to stop."""

    stopped = 0

    def stopTrying(self) -> Deferred[None]:  # noqa: N802 - txredisapi's name
        self.stopped += 1
        return Deferred()


class ReconnectionTests(SynchronousTestCase):
    """A new connection whose ``SELECT`` times out (Redis stalled): the pool keeps trying."""

    def setUp(self) -> None:
        self.clock = Clock()
        # txredisapi's reply timeouts and its hand-over to the pool run on these.
        self.patch(txredisapi.BaseRedisProtocol, "callLater", self.clock.callLater)
        self.patch(txredisapi, "reactor", self.clock)

    def handshake(self, factory: Any, first: bytes = b"") -> tuple[Any, StringTransport]:
        """A connection of ``factory`` just made; ``first`` answers its first command."""
        factory.slots.append(Slot())
        protocol = factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        if first:
            protocol.dataReceived(first)
            self.clock.advance(0)
        return protocol, transport

    def select_times_out(self, factory: Any, first: bytes = b"") -> Deferred[Any]:
        """A reconnection meets a stalled Redis; then what asks the pool for a connection."""
        _, transport = self.handshake(factory, first)
        assert transport.value().endswith(bulk(b"SELECT", b"0"))
        self.clock.advance(0.25)  # no reply: txredisapi closes the connection
        assert transport.disconnecting
        return factory.getConnection(peek=True)

    def test_txredisapi_alone_gives_up_for_good(self) -> None:
        # Why PoolFactory exists: with txredisapi's factory the pool is stopped.
        factory = txredisapi.RedisFactory("x:1", 0, 1, isLazy=True, replyTimeout=0.25)
        factory.deferred.addErrback(lambda _: None)
        self.failureResultOf(self.select_times_out(factory), txredisapi.ConnectionError)
        assert factory.stopped and factory.slots[0].stopped == 1

    def test_a_timed_out_select_leaves_the_pool_reconnecting(self) -> None:
        factory = PoolFactory("x:1", 0, 1, isLazy=True, charset=None, replyTimeout=0.25)
        waiting = self.select_times_out(factory)
        self.assertNoResult(waiting)  # waits for a connection instead of "Not connected"
        assert not factory.stopped and factory.slots[0].stopped == 0
        # The slot's next attempt meets a Redis that answers: the pool has it.
        protocol, _ = self.handshake(factory, b"+OK\r\n")
        assert self.successResultOf(waiting) is protocol
        assert factory.pool == [protocol]

    def test_a_timed_out_select_on_the_sentinel_master_leaves_the_pool_reconnecting(self) -> None:
        factory = MasterFactory(None, "cache", True, "x:1", 0, 1, isLazy=True, charset=None)
        factory.replyTimeout = 0.25
        role = b"*3\r\n$6\r\nmaster\r\n:0\r\n*0\r\n"
        self.assertNoResult(self.select_times_out(factory, role))
        assert not factory.stopped and factory.slots[0].stopped == 0

    def test_reconnections_are_never_more_than_two_seconds_apart(self) -> None:
        for factory_class in (PoolFactory, MasterFactory):
            assert issubclass(factory_class, KeepTrying)
            assert factory_class.maxDelay == 2.0
        factory = PoolFactory("x:1", 0, 1, isLazy=True)
        factory.jitter = 0
        assert [factory.retryDelay(n) for n in (1, 2, 50)] == [1.0, 2.0, 2.0]

    def test_the_url_pool_is_made_for_bytes_with_its_own_factory(self) -> None:
        endpoints: list[Any] = []
        self.patch(PoolFactory, "startConnecting", lambda factory, e: endpoints.append(e))
        reactor = MemoryReactorClock()
        handler = redisclient.connect_url("redis://u:p%40ss@10.0.0.1:6380/2", 0.5, reactor)
        factory = handler._factory
        assert isinstance(factory, PoolFactory) and isinstance(
            handler, txredisapi.ConnectionHandler
        )
        assert (factory.dbid, factory.poolsize, factory.isLazy) == (2, redisclient.POOL_SIZE, True)
        assert (factory.username, factory.password) == ("u", "p@ss")
        assert factory.charset is None and factory.convertNumbers is False
        assert factory.replyTimeout == 0.5
        assert len(endpoints) == 1 and isinstance(endpoints[0], HostnameEndpoint)
