"""
The one Redis connection of a proxy process, with a deadline on every call.

Everything llmproxy keeps in Redis (cache entries, cooldowns, affinity) goes
through :meth:`SharedRedis.call`, which never waits longer than
``redis.timeout`` and turns every kind of trouble (refused, reset, paused,
timed out, bad reply) into :class:`RedisUnavailable`, so callers degrade to
local behaviour instead of failing a request.  After a failure, calls fail fast
for a short while instead of piling up behind a dead server; txredisapi keeps
reconnecting in the background, so Redis coming back is picked up on its own.

:class:`SharedRedis` is the ``redis`` service of the tree: it connects when the
service starts and disconnects when it stops.  txredisapi imports the reactor
at import time: it is imported only when Redis is configured, never during
twistd plugin discovery.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote, urlsplit

from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.defer import TimeoutError as DeferTimeoutError
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger


class RedisUnavailable(Exception):
    """Redis could not answer within its deadline; the caller degrades."""


def parse_url(url: str) -> dict[str, Any]:
    parts = urlsplit(url)
    path = parts.path.strip("/")
    return {
        "host": parts.hostname or "127.0.0.1",
        "port": parts.port or 6379,
        "dbid": int(path) if path.isdigit() else None,
        "password": unquote(parts.password) if parts.password else None,
        "username": unquote(parts.username) if parts.username else None,
    }


class SharedRedis(Service):
    log = Logger()
    #: After a failure, fail fast this long before trying Redis again.
    BACKOFF = 0.5

    def __init__(
        self, reactor: IReactorTime, url: str, timeout: float, connection: Any = None
    ) -> None:
        self.reactor = reactor
        self.url = url
        self.timeout = timeout
        self._connection = connection
        self._down_until = 0.0

    def startService(self) -> None:
        super().startService()
        if self._connection is not None:
            return
        import txredisapi

        options = parse_url(self.url)
        self._connection = txredisapi.lazyConnectionPool(
            host=options["host"],
            port=options["port"],
            dbid=options["dbid"],
            password=options["password"],
            username=options["username"],
            poolsize=8,
            reconnect=True,
            charset=None,  # values are bytes (cache bodies); keys are encoded as UTF-8
            convertNumbers=False,
            connectTimeout=self.timeout,
            replyTimeout=self.timeout,
        )

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return Deferred.fromCoroutine(self._disconnect())

    async def _disconnect(self) -> None:
        if self._connection is not None:
            connection, self._connection = self._connection, None
            try:
                await connection.disconnect()
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
            # txredisapi's ConnectionError and TimeoutError derive from its own
            # RedisError, not from the builtins: those mean Redis is away.
            if type(e).__name__ in ("ConnectionError", "TimeoutError"):
                raise self._away(command, e) from None
            # Anything else (a refused command, a value it cannot encode) is
            # about this one call: Redis is fine for everybody else.
            self.log.warn(
                "redis {command} refused: {error}", command=command, error=type(e).__name__
            )
            raise RedisUnavailable(type(e).__name__) from None

    def _away(self, command: str, error: Exception) -> RedisUnavailable:
        """Redis is away: fail fast for a moment, and say so once per outage."""
        self._down_until = self.reactor.seconds() + min(self.BACKOFF, self.timeout * 2)
        self.log.warn(
            "redis {command} failed ({error}); degrading",
            command=command,
            error=type(error).__name__,
        )
        return RedisUnavailable(type(error).__name__)
