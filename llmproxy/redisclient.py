"""
The one Redis connection of a proxy process, with a deadline on every call.

Everything llmproxy keeps in Redis (cache entries, cooldowns, affinity) goes
through :meth:`SharedRedis.call`, which never waits longer than
``redis.timeout`` and turns every kind of trouble (refused, reset, paused,
timed out, bad reply) into :class:`RedisUnavailable`, so callers degrade to
local behaviour instead of failing a request.  After a failure, calls fail fast
for a short while instead of piling up behind a dead server; the pool keeps
reconnecting in the background, at most two seconds apart, whatever the
outage (txredisapi alone stops for good when a reconnection's ``SELECT`` or
``AUTH`` times out), so Redis coming back is picked up on its own.

:class:`SharedRedis` is the ``redis`` service of the tree: it connects when the
service starts and disconnects when it stops.  txredisapi imports the reactor
at import time: it is imported only when Redis is configured, never during
twistd plugin discovery.

With ``redis.sentinel``, the pool connects to whichever server the sentinels
name as the master, asking them again before every connection attempt.  A
failover drops the pool's connections: the sentinels announce it
(``+switch-master``, which the proxy follows at once), a dead master closes
them by dying, a demoted one answers ``READONLY`` (or Sentinel has it close
its clients).  The reconnection finds the new master, and a connection that
lands on a replica is closed and retried.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote, urlsplit

from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.defer import TimeoutError as DeferTimeoutError
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from llmproxy.config import Redis, Sentinel

#: Connections of the pool to the (master) server.
POOL_SIZE = 8


class RedisUnavailable(Exception):
    """Redis could not answer within its deadline; the caller degrades."""


def parse_url(url: str) -> dict[str, Any]:
    """The connection arguments of txredisapi in a ``redis://`` URL."""
    parts = urlsplit(url)
    path = parts.path.strip("/")
    return {
        "host": parts.hostname or "127.0.0.1",
        "port": parts.port or 6379,
        "dbid": int(path) if path.isdigit() else None,
        "password": unquote(parts.password) if parts.password else None,
        "username": unquote(parts.username) if parts.username else None,
    }


def connect_url(url: str, timeout: float, reactor: Any) -> Any:
    """
    A lazy txredisapi pool to the one server at ``url``, which keeps
    reconnecting whatever happens to a reconnection (see
    :class:`llmproxy.redissentinel.PoolFactory`).
    """
    import txredisapi
    from twisted.internet.endpoints import HostnameEndpoint

    from llmproxy import redissentinel

    args = parse_url(url)
    factory = redissentinel.PoolFactory(
        f"{args['host']}:{args['port']}",
        args["dbid"],
        POOL_SIZE,
        isLazy=True,
        handler=txredisapi.ConnectionHandler,
        charset=None,  # values are bytes (cache bodies); keys are encoded as UTF-8
        password=args["password"],
        replyTimeout=timeout,
        convertNumbers=False,
        username=args["username"],
    )
    factory.startConnecting(HostnameEndpoint(reactor, args["host"], args["port"], timeout=timeout))
    return factory.handler


def connect_sentinel(config: Sentinel, timeout: float, reactor: Any) -> tuple[Any, list[Any]]:
    """
    ``(pool, others)``: a lazy pool to the master that txredisapi's Sentinel
    manager over ``config.addresses`` names, and what else is to be
    disconnected with it: that manager, and one
    :class:`~llmproxy.redissentinel.SwitchWatcher` per sentinel.
    """
    import txredisapi
    from twisted.internet.endpoints import HostnameEndpoint

    from llmproxy import redissentinel

    sentinels = txredisapi.Sentinel(
        list(config.addresses), connectTimeout=timeout, replyTimeout=timeout
    )
    sentinels.discovery_timeout = redissentinel.DISCOVERY_TIMEOUT
    pool = sentinels.master_for(
        config.master,
        factory_class=redissentinel.MasterFactory,
        dbid=config.db,
        poolsize=POOL_SIZE,
        isLazy=True,
        password=config.password,
        charset=None,
        convertNumbers=False,
        replyTimeout=timeout,
    )
    others: list[Any] = [sentinels]
    for host, port in config.addresses:
        # The handler's factory is the pool itself (txredisapi has no public name for it).
        watcher = redissentinel.SwitchWatcher(config.master, pool._factory, reactor)
        watcher.startConnecting(HostnameEndpoint(reactor, host, port, timeout=timeout))
        others.append(watcher)
    return pool, others


class SharedRedis(Service):
    """The ``redis`` service: one lazy pool, and :meth:`call` with its deadline."""

    log = Logger()
    #: After a failure, fail fast this long before trying Redis again.
    BACKOFF = 0.5

    def __init__(self, reactor: IReactorTime, config: Redis, connection: Any = None) -> None:
        self.reactor = reactor
        self.config = config
        self.timeout = config.timeout
        self._connection = connection
        #: What is disconnected with the pool (the Sentinel manager, its watchers).
        self._others: list[Any] = []
        self._down_until = 0.0

    def startService(self) -> None:
        super().startService()
        if self._connection is not None:
            return
        if self.config.sentinel is not None:
            self._connection, self._others = connect_sentinel(
                self.config.sentinel, self.timeout, self.reactor
            )
        else:
            assert self.config.url is not None
            self._connection = connect_url(self.config.url, self.timeout, self.reactor)

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return Deferred.fromCoroutine(self._disconnect())

    async def _disconnect(self) -> None:
        connection, self._connection = self._connection, None
        others, self._others = self._others, []
        for each in [connection, *others]:
            if each is not None:
                try:
                    await each.disconnect()
                except Exception:  # noqa: BLE001 - shutting down: nothing left to protect
                    pass

    async def call(self, command: str, *args: Any, **kwargs: Any) -> Any:
        """Run one txredisapi command under the deadline."""
        if self._connection is None:
            raise RedisUnavailable("not connected")
        if self.reactor.seconds() < self._down_until:
            raise RedisUnavailable("recently unavailable")
        try:
            d: Deferred[Any] = getattr(self._connection, command)(*args, **kwargs)
            return await d.addTimeout(self.timeout, self.reactor)
        except CancelledError:
            raise
        except (DeferTimeoutError, ConnectionError, TimeoutError, OSError) as e:
            raise self._away(command, e) from None
        except Exception as e:  # noqa: BLE001 - Redis trouble must never fail a request
            # txredisapi's ConnectionError (and its TimeoutError and
            # MasterNotFoundError) derive from its own RedisError, not from the
            # builtins: those mean Redis is away.
            if any(c.__name__ == "ConnectionError" for c in type(e).__mro__):
                raise self._away(command, e) from None
            # A master demoted under the connection refuses every write: Redis
            # is away until the pool reconnects to the one the sentinels name.
            # (A replica named by redis.url refuses writes and stays: those
            # calls alone fail, below.)
            readonly = str(e).startswith("READONLY")
            if readonly and self.config.sentinel is not None:
                raise self._away(command, e, "READONLY") from None
            # Anything else (a refused command, a value it cannot encode) is
            # about this one call: Redis is fine for everybody else.
            name = "READONLY" if readonly else type(e).__name__
            self.log.warn("redis {command} refused: {error}", command=command, error=name)
            raise RedisUnavailable(name) from None

    def _away(self, command: str, error: Exception, name: str = "") -> RedisUnavailable:
        """Redis is away: fail fast for a moment, and say so once per outage."""
        name = name or type(error).__name__
        self._down_until = self.reactor.seconds() + min(self.BACKOFF, self.timeout * 2)
        self.log.warn("redis {command} failed ({error}); degrading", command=command, error=name)
        return RedisUnavailable(name)
