"""
Redis through Sentinel, without a server: a new connection is handed to the
pool only if ``ROLE`` says master (bytes replies included), ``SharedRedis``
builds, uses and closes the sentinel pool, and a master nobody can name is
"Redis away".
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import txredisapi
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from llmproxy import redisclient, redissentinel
from llmproxy.config import Redis, Sentinel
from llmproxy.redisclient import RedisUnavailable, SharedRedis
from llmproxy.redissentinel import MasterFactory, MasterProtocol, role_name

SENTINEL = Sentinel("cache", (("10.0.0.1", 26379), ("10.0.0.2", 26379)), db=3, password="pw")
CONFIG = Redis(url=None, timeout=0.5, sentinel=SENTINEL)


class Wire:
    """A MasterProtocol as llmproxy's pool makes it (bytes replies), just connected."""

    def __init__(self, password: str | None = None) -> None:
        self.clock = Clock()
        self.protocol = MasterProtocol(charset=None, convertNumbers=False, password=password)
        self.protocol.factory = SimpleNamespace(is_master=True)
        # txredisapi's parser resumes after each bulk string with callLater(0, ...).
        self.protocol.callLater = self.clock.callLater
        self.transport = StringTransport()
        self.protocol.makeConnection(self.transport)

    def receive(self, data: bytes) -> None:
        self.protocol.dataReceived(data)
        while self.clock.getDelayedCalls():
            self.clock.advance(0)


def bulk(*items: bytes) -> bytes:
    return f"*{len(items)}\r\n".encode() + b"".join(
        b"$%d\r\n%s\r\n" % (len(item), item) for item in items
    )


class RoleTests(SynchronousTestCase):
    def test_role_name_reads_bytes_and_text(self) -> None:
        assert role_name([b"master", 0, []]) == "master"
        assert role_name(["slave", "127.0.0.1", 6379, "connected", 0]) == "slave"
        assert role_name(b"sentinel") == "sentinel"

    def test_a_master_is_handed_to_the_pool(self) -> None:
        wire = Wire()
        assert wire.transport.value() == bulk(b"ROLE")
        ready = wire.protocol.whenConnected()
        self.assertNoResult(ready)
        wire.receive(b"*3\r\n$6\r\nmaster\r\n:0\r\n*0\r\n")
        assert self.successResultOf(ready) is wire.protocol
        assert not wire.transport.disconnecting

    def test_a_replica_is_dropped_so_the_pool_asks_the_sentinels_again(self) -> None:
        wire = Wire()
        ready = wire.protocol.whenConnected()
        wire.receive(b"*5\r\n$5\r\nslave\r\n$9\r\n127.0.0.1\r\n:6379\r\n$9\r\nconnected\r\n:0\r\n")
        assert wire.transport.disconnecting
        self.assertNoResult(ready)

    def test_a_failed_role_drops_the_connection(self) -> None:
        wire = Wire()
        wire.receive(b"-NOAUTH Authentication required.\r\n")
        assert wire.transport.disconnecting

    def test_the_password_goes_before_role(self) -> None:
        wire = Wire(password="pw")
        assert wire.transport.value() == bulk(b"AUTH", b"pw") + bulk(b"ROLE")

    def test_the_factory_uses_the_protocol(self) -> None:
        assert issubclass(MasterFactory, txredisapi.SentinelConnectionFactory)
        assert MasterFactory.protocol is MasterProtocol


class Recorder:
    """Stands for txredisapi's Sentinel manager and for the pool it hands out."""

    discovery_timeout = 10.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args, self.kwargs = args, kwargs
        self.master: dict[str, Any] = {}
        self.disconnected = 0
        self.commands: list[tuple[Any, ...]] = []

    def master_for(self, name: str, **kwargs: Any) -> Recorder:
        self.master = {"name": name, **kwargs}
        return self

    def get(self, key: str) -> Deferred[Any]:
        self.commands.append(("get", key))
        return succeed(b"value")

    def disconnect(self) -> Deferred[None]:
        self.disconnected += 1
        return fail(ConnectionError("already gone")) if self.disconnected > 1 else succeed(None)


class SharedRedisTests(SynchronousTestCase):
    def test_the_sentinel_pool_is_made_for_bytes_and_the_master(self) -> None:
        made: list[Recorder] = []

        def sentinel(*args: Any, **kwargs: Any) -> Recorder:
            made.append(Recorder(*args, **kwargs))
            return made[-1]

        self.patch(txredisapi, "Sentinel", sentinel)
        sentinels, pool = redisclient.connect_sentinel(SENTINEL, 0.5)
        assert sentinels is made[0] and pool is made[0]
        assert made[0].args == ([("10.0.0.1", 26379), ("10.0.0.2", 26379)],)
        assert made[0].kwargs == {"connectTimeout": 0.5, "replyTimeout": 0.5}
        master = made[0].master
        assert made[0].discovery_timeout == redissentinel.DISCOVERY_TIMEOUT
        assert master["name"] == "cache" and master["factory_class"] is MasterFactory
        assert (master["dbid"], master["password"]) == (3, "pw")
        assert master["charset"] is None and master["convertNumbers"] is False
        assert master["replyTimeout"] == 0.5 and master["isLazy"] is True

    def test_start_connects_through_the_sentinels_and_stop_closes_both(self) -> None:
        sentinels, pool = Recorder(), Recorder()
        asked: list[tuple[Sentinel, float]] = []

        def connect(config: Sentinel, timeout: float) -> tuple[Recorder, Recorder]:
            asked.append((config, timeout))
            return sentinels, pool

        self.patch(redisclient, "connect_sentinel", connect)
        redis = SharedRedis(Clock(), CONFIG)
        redis.startService()
        assert asked == [(SENTINEL, 0.5)]
        got = self.successResultOf(Deferred.fromCoroutine(redis.call("get", "k")))
        assert got == b"value" and pool.commands == [("get", "k")]
        pool.disconnected = 1  # the pool's disconnect fails: the sentinels still close
        self.successResultOf(redis.stopService())
        assert (pool.disconnected, sentinels.disconnected) == (2, 1)
        self.failureResultOf(Deferred.fromCoroutine(redis.call("get", "k")), RedisUnavailable)

    def test_no_master_to_be_found_is_redis_away(self) -> None:
        clock = Clock()

        class Nameless:
            calls = 0

            def get(self, key: str) -> Deferred[Any]:
                self.calls += 1
                return fail(txredisapi.MasterNotFoundError("No master found for cache"))

        connection = Nameless()
        redis = SharedRedis(clock, CONFIG, connection=connection)
        for _ in range(2):
            self.failureResultOf(Deferred.fromCoroutine(redis.call("get", "k")), RedisUnavailable)
        assert connection.calls == 1  # the second call failed fast: Redis is away
