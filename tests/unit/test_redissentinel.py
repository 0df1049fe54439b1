"""
Redis through Sentinel, without a server: a new connection is handed to the
pool only if ``ROLE`` says master (bytes replies included), a connection whose
server answers ``READONLY`` is dropped, a sentinel's ``+switch-master`` drops
the connections to the old master, ``SharedRedis`` builds, uses and closes the
sentinel pool and its watchers, and a master nobody can name is "Redis away".
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import txredisapi
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import capturedLogs
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from llmproxy import redisclient, redissentinel
from llmproxy.config import Redis, Sentinel
from llmproxy.redisclient import RedisUnavailable, SharedRedis
from llmproxy.redissentinel import (
    HEARTBEAT,
    SWITCH_CHANNEL,
    MasterFactory,
    MasterProtocol,
    SwitchProtocol,
    SwitchWatcher,
    role_name,
)

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

    def test_a_master_demoted_under_a_connection_drops_it(self) -> None:
        wire = Wire()
        wire.receive(b"*3\r\n$6\r\nmaster\r\n:0\r\n*0\r\n")
        written = wire.protocol.set(b"k", b"v")
        wire.receive(b"-READONLY You can't write against a read only replica.\r\n")
        assert "READONLY" in str(self.failureResultOf(written, txredisapi.ResponseError).value)
        assert wire.transport.disconnecting

    def test_other_errors_leave_the_connection_alone(self) -> None:
        wire = Wire()
        wire.receive(b"*3\r\n$6\r\nmaster\r\n:0\r\n*0\r\n")
        written = wire.protocol.set(b"k", b"v")
        wire.receive(b"-ERR invalid expire time in 'set' command\r\n")
        self.failureResultOf(written, txredisapi.ResponseError)
        assert not wire.transport.disconnecting


def connected_to(host: str, port: int) -> SimpleNamespace:
    """A pool connection, as far as :class:`SwitchWatcher` looks at one."""
    return SimpleNamespace(transport=StringTransport(peerAddress=IPv4Address("TCP", host, port)))


class Subscription:
    """A SwitchProtocol just connected to a sentinel, on a Clock."""

    def __init__(self) -> None:
        self.heard: list[Any] = []
        self.clock = Clock()
        self.protocol = SwitchProtocol()
        self.protocol.factory = SimpleNamespace(switched=self.heard.append, clock=self.clock)
        self.protocol.callLater = self.clock.callLater  # the parser resumes after each bulk string
        self.transport = StringTransport()
        self.protocol.makeConnection(self.transport)

    def receive(self, data: bytes) -> None:
        self.protocol.dataReceived(data)
        while any(call.getTime() <= self.clock.seconds() for call in self.clock.getDelayedCalls()):
            self.clock.advance(0)

    def confirm(self) -> None:
        self.receive(b"*3\r\n$9\r\nsubscribe\r\n$14\r\n+switch-master\r\n:1\r\n")


def pool_of(*connections: Any, handshaking: Any = None) -> SimpleNamespace:
    """
    A MasterFactory as the watcher sees it: ready connections, and slots,
    which hold theirs through another object (ClientService's proxy).
    """
    slots = [SimpleNamespace(protocol=SimpleNamespace(transport=c.transport)) for c in connections]
    slots.append(SimpleNamespace(protocol=handshaking))
    return SimpleNamespace(pool=list(connections), slots=slots)


class SwitchTests(SynchronousTestCase):
    def test_a_watcher_subscribes_and_hands_on_what_the_sentinel_announces(self) -> None:
        sub = Subscription()
        assert sub.transport.value() == bulk(b"SUBSCRIBE", SWITCH_CHANNEL.encode())
        sub.confirm()
        sub.receive(bulk(b"message", b"+switch-master", b"cache 10.0.0.5 6379 10.0.0.6 6380"))
        assert sub.heard == ["cache 10.0.0.5 6379 10.0.0.6 6380"]
        assert not sub.transport.disconnecting

    def test_a_sentinel_that_answers_ping_is_kept(self) -> None:
        sub = Subscription()
        sub.confirm()
        sub.transport.clear()
        for _ in range(3):
            sub.clock.advance(HEARTBEAT)
            assert sub.transport.value() == bulk(b"PING")
            sub.transport.clear()
            sub.receive(b"*2\r\n$4\r\npong\r\n$0\r\n\r\n")
        assert not sub.transport.disconnecting

    def test_a_silent_sentinel_is_dropped_so_the_watcher_reconnects(self) -> None:
        sub = Subscription()
        sub.confirm()
        sub.clock.advance(HEARTBEAT)  # PING
        assert not sub.transport.disconnecting
        sub.clock.advance(HEARTBEAT)  # no answer
        assert sub.transport.disconnecting
        sub.protocol.connectionLost(Failure(ConnectionDone()))
        assert sub.clock.getDelayedCalls() == []  # no heartbeat left behind

    def test_a_refused_subscription_reconnects(self) -> None:
        sub = Subscription()
        sub.receive(b"-NOPERM no permissions to run the 'subscribe' command\r\n")
        assert sub.transport.disconnecting

    def test_a_switch_drops_the_connections_to_the_old_master_only(self) -> None:
        old, new = connected_to("10.0.0.5", 6379), connected_to("10.0.0.6", 6380)
        shaking = connected_to("10.0.0.5", 6379)  # connected, ROLE not answered yet
        watcher = SwitchWatcher("cache", pool_of(old, new, handshaking=shaking), Clock())
        with capturedLogs() as events:
            watcher.switched("cache 10.0.0.5 6379 10.0.0.6 6380")
        assert old.transport.disconnecting and shaking.transport.disconnecting
        assert not new.transport.disconnecting
        assert [e["count"] for e in events if "count" in e] == [2]  # each connection once

    def test_other_masters_and_garbage_are_ignored(self) -> None:
        old = connected_to("10.0.0.5", 6379)
        watcher = SwitchWatcher("cache", pool_of(old), Clock())
        for message in (
            "sessions 10.0.0.5 6379 10.0.0.6 6380",
            "cache 10.0.0.5 6379",
            "cache 10.0.0.5 6379 10.0.0.6 port",
            "",
        ):
            watcher.switched(message)
        assert not old.transport.disconnecting
        watcher.switched(b"cache 10.0.0.5 6379 10.0.0.6 6380")  # bytes, as with charset=None
        assert old.transport.disconnecting

    def test_a_watcher_never_stops_trying(self) -> None:
        watcher = SwitchWatcher("cache", pool_of(), Clock())
        assert watcher.maxDelay == 10.0
        self.successResultOf(watcher.stopTrying())  # as after a failed handshake
        assert not watcher.stopped


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
        self._factory = SimpleNamespace(pool=[])
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
        endpoints: list[Any] = []
        self.patch(SwitchWatcher, "startConnecting", lambda watcher, e: endpoints.append(e))
        reactor = MemoryReactorClock()
        pool, others = redisclient.connect_sentinel(SENTINEL, 0.5, reactor)
        sentinels, *watchers = others
        assert sentinels is made[0] and pool is made[0]
        # One failover watcher per sentinel, for this master and this pool.
        assert [type(w) for w in watchers] == [SwitchWatcher, SwitchWatcher]
        assert all(w.name == "cache" and w.master_pool is pool._factory for w in watchers)
        assert all(w.clock is reactor for w in watchers)
        assert all(isinstance(e, HostnameEndpoint) for e in endpoints)
        assert [(e._hostText, e._port) for e in endpoints] == list(SENTINEL.addresses)
        assert made[0].args == ([("10.0.0.1", 26379), ("10.0.0.2", 26379)],)
        assert made[0].kwargs == {"connectTimeout": 0.5, "replyTimeout": 0.5}
        master = made[0].master
        assert made[0].discovery_timeout == redissentinel.DISCOVERY_TIMEOUT
        assert master["name"] == "cache" and master["factory_class"] is MasterFactory
        assert (master["dbid"], master["password"]) == (3, "pw")
        assert master["charset"] is None and master["convertNumbers"] is False
        assert master["replyTimeout"] == 0.5 and master["isLazy"] is True

    def test_start_connects_through_the_sentinels_and_stop_closes_both(self) -> None:
        sentinels, watcher, pool = Recorder(), Recorder(), Recorder()
        asked: list[tuple[Sentinel, float]] = []

        def connect(config: Sentinel, timeout: float, reactor: Any) -> tuple[Any, list[Any]]:
            asked.append((config, timeout))
            return pool, [sentinels, watcher]

        self.patch(redisclient, "connect_sentinel", connect)
        redis = SharedRedis(Clock(), CONFIG)
        redis.startService()
        assert asked == [(SENTINEL, 0.5)]
        got = self.successResultOf(Deferred.fromCoroutine(redis.call("get", "k")))
        assert got == b"value" and pool.commands == [("get", "k")]
        pool.disconnected = 1  # the pool's disconnect fails: the sentinels still close
        self.successResultOf(redis.stopService())
        assert (pool.disconnected, sentinels.disconnected, watcher.disconnected) == (2, 1, 1)
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
