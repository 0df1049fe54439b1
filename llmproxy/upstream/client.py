"""
How the proxy connects to its upstreams: one treq client and connection pool
per upstream, owned by the :class:`UpstreamPools` service (closed on stop).
A reload keeps the pool of an upstream whose settings did not change, makes
one for a new or changed upstream, and retires the others: a retired pool
closes its idle connections at once and each busy one as its answer ends.

The client keeps no cookies (a shared jar would leak them between tenants),
follows no redirects (the forwarder asks it not to), and connects directly to
IP-literal upstreams.  It retries one thing on its own, on the same target and
unseen by routing: a request sent on a reused idle connection that the peer
had already closed (its keep-alive timeout racing our request), as browsers
and nginx do.  Idle connections are kept ``keepalive_timeout`` seconds.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Hashable, Mapping
from http.cookiejar import DefaultCookiePolicy
from typing import Any, Protocol

from treq.client import HTTPClient
from treq.cookies import IndexableCookieJar
from twisted.application.service import Service
from twisted.internet import error as ierror
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    wrapClientTLS,
)
from twisted.internet.interfaces import IConsumer, IStreamClientEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import (
    URI,
    Agent,
    BrowserLikePolicyForHTTPS,
    ContentDecoderAgent,
    GzipDecoder,
    HTTPConnectionPool,
    RequestNotSent,
    RequestTransmissionFailed,
    ResponseNeverReceived,
)
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IAgentEndpointFactory, IBodyProducer
from zope.interface import implementer

from llmproxy.config import Upstream


class UpstreamClient(Protocol):
    """What the forwarder needs of treq's ``HTTPClient``."""

    def request(
        self,
        method: str,
        url: str,
        *,
        headers: Headers,
        data: bytes | IBodyProducer | None = None,
        unbuffered: bool = False,
        allow_redirects: bool = True,
    ) -> Deferred[Any]: ...


class NoCookies(IndexableCookieJar):
    """A cookie jar that keeps nothing: a shared jar would leak between tenants."""

    def __init__(self) -> None:
        super().__init__(policy=DefaultCookiePolicy(allowed_domains=[]))


@implementer(IAgentEndpointFactory)
class UpstreamEndpoints:
    """
    How the Agent connects to an upstream.  An IP literal over plain HTTP (a
    local vLLM, a sidecar) gets a direct TCP endpoint: HostnameEndpoint waits
    its 0.3s attempt delay before it reports a refused connection, which would
    make every failover from a dead local backend 300 ms slower.  Names and
    HTTPS go through HostnameEndpoint and TLS with certificate checks, as
    Twisted's Agent does by default.

    The Agent asks for an endpoint on every request; an upstream has one
    scheme, host and port, so each endpoint is made once and kept (an
    endpoint makes a new connection on each ``connect``).
    """

    def __init__(self, reactor: Any, connect_timeout: float) -> None:
        # Any: the endpoints need IReactorTCP and IReactorTime at once, which
        # zope interfaces cannot say; Twisted's own HostnameEndpoint takes Any.
        self.reactor = reactor
        self.timeout = connect_timeout
        self.tls = BrowserLikePolicyForHTTPS()
        self._made: dict[tuple[bytes, bytes, int], IStreamClientEndpoint] = {}

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        where = (uri.scheme, uri.host, uri.port)
        endpoint = self._made.get(where)
        if endpoint is None:
            endpoint = self._made[where] = self._endpoint(uri)
        return endpoint

    def _endpoint(self, uri: URI) -> IStreamClientEndpoint:
        host = uri.host.decode("ascii")
        if uri.scheme == b"http":
            try:
                ip = ipaddress.ip_address(host.strip("[]"))
            except ValueError:
                pass
            else:
                cls = TCP6ClientEndpoint if ip.version == 6 else TCP4ClientEndpoint
                return cls(self.reactor, str(ip), uri.port, timeout=self.timeout)
        endpoint: IStreamClientEndpoint = HostnameEndpoint(
            self.reactor, uri.host, uri.port, timeout=self.timeout
        )
        if uri.scheme == b"https":
            creator = self.tls.creatorForNetloc(uri.host, uri.port)
            endpoint = wrapClientTLS(creator, endpoint)
        return endpoint


@implementer(IBodyProducer)
class BytesProducer:
    """
    A request body already in memory, written in one go.  (treq's default wraps
    bytes in a FileBodyProducer driven by the global cooperator, which neither
    helps for a body we hold anyway nor runs on an injected reactor.)
    """

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.length = len(body)

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        consumer.write(self.body)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


def body_producer(data: Any) -> IBodyProducer:
    """A request body as treq sends it: a producer as it is (a spooled form), bytes at once."""
    if IBodyProducer.providedBy(data):
        return data
    return BytesProducer(data)


def upstream_client(agent: IAgent) -> HTTPClient:
    """treq over ``agent``, keeping no cookies (treq's default jar keeps all): for tests."""
    return HTTPClient(agent, cookiejar=NoCookies(), data_to_body_producer=body_producer)


class AgentClient:
    """
    The proxy's client of one upstream: its Agent, decoding gzip bodies, and
    nothing else.  treq's ``HTTPClient`` wraps every request in a cookie
    agent (``http.cookiejar`` and ``email.message`` machinery, for a jar that
    must keep nothing) and parses and re-serialises its URL with hyperlink;
    together ~7% of a proxied request's CPU in a profile, for nothing the
    proxy wants.  Redirects are never followed, whatever ``allow_redirects``.
    """

    def __init__(self, agent: IAgent) -> None:
        self.agent = ContentDecoderAgent(agent, [(b"gzip", GzipDecoder)])

    def request(
        self,
        method: str,
        url: str,
        *,
        headers: Headers,
        data: bytes | IBodyProducer | None = None,
        unbuffered: bool = True,
        allow_redirects: bool = False,
    ) -> Deferred[Any]:
        body = None if data is None else body_producer(data)
        return self.agent.request(method.encode("ascii"), url.encode("ascii"), headers, body)


def peer_closed(reason: BaseException) -> bool:
    """
    Does this failure of a request show that the peer had closed the
    connection before any byte of a response: the connection was gone before
    the request was written, or it closed (FIN or RST) with nothing received?
    A cancel (our own timeout, a client that left) is not a close.
    """
    if isinstance(reason, RequestNotSent):
        return True
    if not isinstance(reason, (ResponseNeverReceived, RequestTransmissionFailed)):
        return False  # ResponseFailed: some of the response had arrived
    causes = [r for r in reason.reasons if isinstance(r, Failure)]
    return bool(causes) and all(
        r.check(ierror.ConnectionDone, ierror.ConnectionLost)
        and not r.check(ierror.ConnectionAborted)
        for r in causes
    )


def closed_while_idle(transport: Any) -> bool:
    """
    Is the peer's FIN (or RST) of an idle connection already waiting in the
    socket, not yet seen by the reactor?  One non-blocking peek, before a
    request is written on it.  Transports without a socket are taken as open.
    """
    sock = getattr(transport, "socket", None) or getattr(
        getattr(transport, "transport", None), "socket", None
    )
    if not isinstance(sock, socket.socket):
        return False
    try:
        return sock.recv(1, socket.MSG_PEEK) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


class ReusedConnection:
    """
    A pooled connection handed out again.  When its request fails because the
    peer had closed it, before any byte of the response, the request is sent
    once more on a new connection (only a body we hold can be sent again).
    """

    log = Logger()

    def __init__(self, connection: Any, reconnect: Callable[[], Deferred[Any]], pool: Any) -> None:
        self.connection = connection
        self.reconnect = reconnect
        self.pool = pool

    def request(self, request: Any) -> Deferred[Any]:
        """Send ``request``; resend it on a new connection if this one was found closed."""
        replayable = request.bodyProducer is None or isinstance(request.bodyProducer, BytesProducer)

        def failed(reason: Failure) -> Any:
            if not replayable or not peer_closed(reason.value):
                return reason
            self.pool.resent += 1
            self.log.info(
                "a reused connection to {upstream} had been closed by it; sending again",
                upstream=self.pool.name,
            )
            return self.reconnect().addCallback(lambda fresh: fresh.request(request))

        d: Deferred[Any] = self.connection.request(request)
        return d.addErrback(failed)


class UpstreamPool(HTTPConnectionPool):
    """
    A connection pool that knows which connections it hands out again
    (:class:`ReusedConnection`), and that can be retired: then it keeps no
    connection it is given back.
    """

    retired = False
    #: The upstream's name, for logs.
    name = ""
    #: Requests sent again after a reused connection was found closed.
    resent = 0

    def getConnection(  # noqa: N802 - an override
        self, key: Hashable, endpoint: IStreamClientEndpoint
    ) -> Deferred[Any]:
        """A cached connection still open (wrapped, to be retried once), else a new one."""
        connections = self._connections.get(key)
        while connections:
            connection = connections.pop(0)
            self._timeouts.pop(connection).cancel()
            if connection.state != "QUIESCENT":
                continue
            if closed_while_idle(connection.transport):
                connection.transport.loseConnection()
                continue
            return succeed(
                ReusedConnection(connection, lambda: self._newConnection(key, endpoint), self)
            )
        return self._newConnection(key, endpoint)

    def retire(self) -> Deferred[Any]:
        """Close the idle connections now, and each busy one when its answer is over."""
        self.retired = True
        return self.closeCachedConnections()

    def _putConnection(self, key: Any, connection: Any) -> None:  # noqa: N802 - an override
        # The one hook twisted.web's pool has for a connection coming back idle.
        if self.retired:
            connection.transport.loseConnection()
            return
        super()._putConnection(key, connection)


class UpstreamPools(Service):
    """One connection pool and client per upstream; the pools close when the service stops."""

    def __init__(self, reactor: Any, upstreams: Mapping[str, Upstream]) -> None:
        self.reactor = reactor
        self.upstreams: dict[str, Upstream] = {}
        self.pools: dict[str, UpstreamPool] = {}
        self.clients: dict[str, UpstreamClient] = {}
        self.update(upstreams)

    def update(self, upstreams: Mapping[str, Upstream]) -> Mapping[str, UpstreamClient]:
        """The clients for ``upstreams``, keeping the pools of those that did not change."""
        for name in list(self.pools):
            if upstreams.get(name) != self.upstreams[name]:
                self.pools.pop(name).retire()
                del self.clients[name], self.upstreams[name]
        for name, upstream in upstreams.items():
            if name in self.pools:
                continue
            pool = UpstreamPool(self.reactor, persistent=True)
            pool.maxPersistentPerHost = upstream.max_connections
            pool.retryAutomatically = False  # only ReusedConnection's resend, never Twisted's
            # Twisted types it an int; it goes to callLater, which takes seconds as a float.
            pool.cachedConnectionTimeout = upstream.keepalive_timeout  # type: ignore[assignment]
            pool.name = name
            endpoints = UpstreamEndpoints(self.reactor, upstream.timeouts.connect)
            agent = Agent.usingEndpointFactory(self.reactor, endpoints, pool=pool)
            self.upstreams[name] = upstream
            self.pools[name] = pool
            self.clients[name] = AgentClient(agent)
        return dict(self.clients)

    def stopService(self) -> Deferred[Any]:
        super().stopService()
        return DeferredList([p.closeCachedConnections() for p in self.pools.values()])
