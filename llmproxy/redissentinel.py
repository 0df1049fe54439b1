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
from twisted.logger import Logger

#: The channel on which a sentinel announces a failover's end, with the message
#: ``"<master name> <old ip> <old port> <new ip> <new port>"``.
SWITCH_CHANNEL = "+switch-master"

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
    """A connection to one sentinel, subscribed to its failover announcements."""

    log = Logger()

    def connectionMade(self) -> Any:
        self.subscribe(SWITCH_CHANNEL).addErrback(self._refused)
        return super().connectionMade()

    def _refused(self, failure: Any) -> None:
        self.log.warn(
            "redis: a sentinel refused SUBSCRIBE ({error}); reconnecting",
            error=failure.getErrorMessage(),
        )
        self.transport.loseConnection()

    def messageReceived(self, pattern: Any, channel: Any, message: Any) -> None:  # noqa: N802
        self.factory.switched(message)


class SwitchWatcher(KeepTrying, txredisapi.SubscriberFactory):
    """
    One sentinel's ``+switch-master`` subscription, reconnecting for good: when
    it names ``name``'s new master, the connections of ``pool`` (a
    :class:`MasterFactory`) to any other server are closed, and reconnect
    through the sentinels to the new one.  Every sentinel announces the same
    failover: the later announcements close nothing new.
    """

    protocol = SwitchProtocol
    #: A sentinel that is down is asked again every 10 s, as txredisapi's
    #: manager does (each attempt is a log line); the others announce meanwhile.
    maxDelay = 10.0  # noqa: N815 - txredisapi's name

    def __init__(self, name: str, pool: Any) -> None:
        super().__init__(isLazy=True)
        self.name = name
        self.master_pool = pool

    def switched(self, message: Any) -> None:
        text = message.decode("utf-8", "replace") if isinstance(message, bytes) else str(message)
        parts = text.split()
        if len(parts) != 5 or parts[0] != self.name or not parts[4].isdigit():
            return
        new = (parts[3], int(parts[4]))
        stale = [c for c in list(self.master_pool.pool) if peer_of(c) != new]
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
