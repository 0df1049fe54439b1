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

This module imports txredisapi, hence the reactor: only
:mod:`llmproxy.redisclient` imports it, when a proxy with ``redis`` starts.
"""

from __future__ import annotations

from typing import Any

import txredisapi
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger

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


class MasterFactory(KeepTrying, txredisapi.SentinelConnectionFactory):
    """
    txredisapi's Sentinel pool factory, with :class:`MasterProtocol`, reconnecting
    for good.  txredisapi also uses :attr:`maxDelay` as the connect timeout to
    the master it finds.
    """

    protocol = MasterProtocol
