"""
txredisapi's pool and Sentinel client, made to work with the pool llmproxy uses.

txredisapi gives a pool up for good when a new connection's ``AUTH`` or
``SELECT`` fails, a timeout included: a Redis stalled past ``redis.timeout``
(SIGSTOP, ``CLIENT PAUSE``, ``DEBUG SLEEP``, a slow restart) while the pool
reconnected left the proxy without Redis until it restarted.  The factories
here (:class:`PoolFactory` for ``redis.url``, :class:`MasterFactory` for
``redis.sentinel``) keep trying instead, never more than two seconds apart.

txredisapi's :class:`~txredisapi.SentinelRedisProtocol` asks each new
connection ``ROLE`` and drops it unless the answer is ``"master"``; with
``charset=None`` (llmproxy's values are bytes) the answer is ``b"master"``, so
it would drop every connection, forever.  :class:`MasterProtocol` compares the
decoded role, and closes (so retries) a connection whose ``ROLE`` fails instead
of leaving it half-open.

txredisapi finds a new master only when a connection drops, and Sentinel drops
them only when it gets to demote the old master: seconds after the failover,
on its own clock, and never if it cannot reach that server while the proxy
still can.  Until then every write lands in a server whose data the
resynchronisation throws away.  So, as Jedis and redis-py do, llmproxy follows
the failover as the sentinels announce it (:class:`SwitchWatcher`, subscribed
to ``+switch-master`` on every sentinel), and a connection whose server
answers ``READONLY`` (demoted under it) is closed, so it reconnects to the
master the sentinels name.

This module imports txredisapi, hence the reactor: only
:mod:`llmproxy.redisclient` imports it, when a proxy with ``redis`` starts.
"""

from __future__ import annotations

from typing import Any

import txredisapi
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

#: The channel on which a sentinel announces a failover's end, with the message
#: ``"<master name> <old ip> <old port> <new ip> <new port>"``.
SWITCH_CHANNEL = "+switch-master"

#: Seconds between the PINGs on a sentinel subscription, and how long each may
#: go unanswered before the connection is dropped and made again.
HEARTBEAT = 5.0

#: Seconds to wait for a sentinel to name a healthy master before trying again
#: (txredisapi waits 10): while a master is down, a reconnection attempt waits
#: this long for the failover, then backs off and asks again.
DISCOVERY_TIMEOUT = 2.0


def role_name(reply: Any) -> str:
    """The role in a ``ROLE`` reply (``b"master"`` or ``"master"``: ``"master"``)."""
    first = reply[0] if isinstance(reply, list | tuple) and reply else reply
    return first.decode("utf-8", "replace") if isinstance(first, bytes) else str(first)


class KeepTrying:
    """
    What llmproxy's txredisapi pool factories share: the pool never gives up.

    txredisapi calls :meth:`stopTrying` when a new connection's ``AUTH`` or
    ``SELECT`` fails or times out, and then closes it; its slot, and every
    other slot once its connection is gone, would never connect again.  Here
    the slot tries again after its back-off (at most :attr:`maxDelay`) until
    Redis answers.  Only ``disconnect()``, when the service stops, stops the
    pool (llmproxy never sends ``QUIT`` or ``SHUTDOWN``, the other callers).
    """

    log = Logger()
    #: The longest pause between reconnection attempts, in seconds (txredisapi: 10),
    #: so Redis is back within about this long of answering again.
    maxDelay = 2.0  # noqa: N815 - txredisapi's name
    deferred: Deferred[Any] | None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # "The whole pool is connected": nobody waits on it for a lazy pool, and
        # a failed handshake fails it; not an unhandled error in the log.
        assert self.deferred is not None
        self.deferred.addErrback(lambda _: None)

    def stopTrying(self) -> Deferred[None]:  # noqa: N802 - txredisapi's name
        """Do not stop: the failed connection is closed, and its slot tries again."""
        self.log.info("redis: a new connection failed its handshake; reconnecting")
        return succeed(None)


class PoolFactory(KeepTrying, txredisapi.RedisFactory):
    """txredisapi's pool factory for the one server at ``redis.url``, reconnecting for good."""


class MasterProtocol(txredisapi.SentinelRedisProtocol):
    """A connection that is handed to the pool only if the server is a master."""

    log = Logger()

    def connectionMade(self) -> Any:
        if self.password is not None:
            # ROLE needs it; a wrong password makes ROLE fail below.
            self.auth(self.password, self.username).addErrback(lambda _: None)
        return self.role().addCallbacks(self._check_role, self._role_failed)

    def _check_role(self, reply: Any) -> Any:
        role = role_name(reply)
        if self.factory.is_master and role != "master":
            self.log.info("redis: {role} is not the master (yet); reconnecting", role=role)
            self.transport.loseConnection()
            return None
        return txredisapi.RedisProtocol.connectionMade(self)

    def _role_failed(self, failure: Any) -> None:
        self.log.warn("redis: ROLE failed ({error}); reconnecting", error=failure.getErrorMessage())
        self.transport.loseConnection()

    def replyReceived(self, reply: Any) -> None:  # noqa: N802 - txredisapi's name
        # The caller still gets the error (and degrades); the connection goes,
        # so that its slot asks the sentinels for the master again.
        if isinstance(reply, txredisapi.ResponseError) and str(reply).startswith("READONLY"):
            if not self.transport.disconnecting:
                self.log.warn("redis: the master was demoted (READONLY); reconnecting")
                self.transport.loseConnection()
        super().replyReceived(reply)


class MasterFactory(KeepTrying, txredisapi.SentinelConnectionFactory):
    """
    txredisapi's Sentinel pool factory, with :class:`MasterProtocol`, reconnecting
    for good.  txredisapi also uses :attr:`maxDelay` as the connect timeout to
    the master it finds.
    """

    protocol = MasterProtocol


def peer_of(connection: Any) -> tuple[str, int]:
    """The ``(host, port)`` a pool connection is connected to."""
    peer = connection.transport.getPeer()
    return (peer.host, peer.port)


class SwitchProtocol(txredisapi.SubscriberProtocol):
    """
    A connection to one sentinel, subscribed to its failover announcements,
    and PINGed every :data:`HEARTBEAT` seconds: a sentinel that stops answering
    (a half-open connection, a host gone without a reset) is dropped, and the
    watcher reconnects, instead of waiting for announcements that never come.
    """

    log = Logger()
    _beat: LoopingCall | None = None

    def connectionMade(self) -> Any:
        self.subscribe(SWITCH_CHANNEL).addCallbacks(self._subscribed, self._refused)
        return super().connectionMade()

    def _subscribed(self, _: Any) -> None:
        self._beat = LoopingCall(self._ping)
        self._beat.clock = self.factory.clock
        self._beat.start(HEARTBEAT, now=False)

    def _ping(self) -> None:
        self.ping().addTimeout(HEARTBEAT, self.factory.clock).addErrback(self._silent)

    def _silent(self, failure: Any) -> None:
        if self.connected:
            self.log.warn(
                "redis: a sentinel did not answer PING ({error}); reconnecting",
                error=failure.getErrorMessage(),
            )
            self.transport.abortConnection()

    def _refused(self, failure: Any) -> None:
        if not failure.check(txredisapi.ConnectionError):  # not merely a lost connection
            self.log.warn(
                "redis: a sentinel refused SUBSCRIBE ({error}); reconnecting",
                error=failure.getErrorMessage(),
            )
        self.transport.loseConnection()

    def connectionLost(self, why: Any) -> None:
        if self._beat is not None and self._beat.running:
            self._beat.stop()
        self._beat = None
        super().connectionLost(why)

    def messageReceived(self, pattern: Any, channel: Any, message: Any) -> None:  # noqa: N802
        self.factory.switched(message)


class SwitchWatcher(KeepTrying, txredisapi.SubscriberFactory):
    """
    One sentinel's ``+switch-master`` subscription, reconnecting for good: when
    it names ``name``'s new master, the connections of ``pool`` (a
    :class:`MasterFactory`) to any other server, in the pool or still in their
    handshake, are closed, and reconnect through the sentinels to the new
    one.  Every sentinel announces the same failover: the later announcements
    close nothing new.

    An announcement made while every watcher was disconnected is not heard
    again; the pool then moves when the old master drops its connections
    (Sentinel demoting it) or answers ``READONLY``.
    """

    protocol = SwitchProtocol
    #: A sentinel that is down is asked again every 10 s, as txredisapi's
    #: manager does (each attempt is a log line); the others announce meanwhile.
    maxDelay = 10.0  # noqa: N815 - txredisapi's name

    def __init__(self, name: str, pool: Any, clock: IReactorTime) -> None:
        super().__init__(isLazy=True)
        self.name = name
        self.master_pool = pool
        self.clock = clock

    def switched(self, message: Any) -> None:
        text = message.decode("utf-8", "replace") if isinstance(message, bytes) else str(message)
        parts = text.split()
        if len(parts) != 5 or parts[0] != self.name or not parts[4].isdigit():
            return
        new = (parts[3], int(parts[4]))
        # A slot's connection is there from TCP's connect on; the pool's list
        # has it only once ROLE said master.  (A slot holds it through
        # ClientService's proxy object: the transport is what they share.)
        live = {id(c.transport): c for c in self.master_pool.pool}
        for slot in self.master_pool.slots:
            if slot.protocol is not None and slot.protocol.transport is not None:
                live.setdefault(id(slot.protocol.transport), slot.protocol)
        stale = [c for c in live.values() if peer_of(c) != new]
        if stale:
            self.log.info(
                "redis: the sentinels moved {name} to {host}:{port}; reconnecting {count}",
                name=self.name,
                host=new[0],
                port=new[1],
                count=len(stale),
            )
        for connection in stale:
            connection.transport.loseConnection()
