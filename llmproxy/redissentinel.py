"""
txredisapi's Sentinel client, made to work with the pool llmproxy uses.

txredisapi's :class:`~txredisapi.SentinelRedisProtocol` asks each new
connection ``ROLE`` and drops it unless the answer is ``"master"``; with
``charset=None`` (llmproxy's values are bytes) the answer is ``b"master"``, so
it would drop every connection, forever.  :class:`MasterProtocol` compares the
decoded role, and closes (so retries) a connection whose ``ROLE`` fails instead
of leaving it half-open.

This module imports txredisapi, hence the reactor: only
:func:`llmproxy.redisclient.connect_sentinel` imports it, when a proxy with
``redis.sentinel`` starts.
"""

from __future__ import annotations

from typing import Any

import txredisapi
from twisted.logger import Logger

#: Seconds to wait for a sentinel to name a healthy master before trying again
#: (txredisapi waits 10): while a master is down, a reconnection attempt waits
#: this long for the failover, then backs off and asks again.
DISCOVERY_TIMEOUT = 2.0


def role_name(reply: Any) -> str:
    """The role in a ``ROLE`` reply (``b"master"`` or ``"master"``: ``"master"``)."""
    first = reply[0] if isinstance(reply, list | tuple) and reply else reply
    return first.decode("utf-8", "replace") if isinstance(first, bytes) else str(first)


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


class MasterFactory(txredisapi.SentinelConnectionFactory):
    """txredisapi's Sentinel pool factory, with :class:`MasterProtocol`."""

    protocol = MasterProtocol
    #: The longest pause between reconnection attempts, in seconds (txredisapi: 10).
    #: txredisapi also uses it as the connect timeout to the master it finds.
    maxDelay = 2.0  # noqa: N815 - txredisapi's name
