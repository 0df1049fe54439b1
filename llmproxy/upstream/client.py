"""
How the proxy connects to its upstreams: one treq client and connection pool
per upstream, owned by the :class:`UpstreamPools` service (closed on stop).
A reload keeps the pool of an upstream whose settings did not change, makes
one for a new or changed upstream, and retires the others: a retired pool
closes its idle connections at once and each busy one as its answer ends.

The client keeps no cookies (a shared jar would leak them between tenants),
follows no redirects (the forwarder asks it not to), retries nothing on its own
(a retry is routing's decision), and connects directly to IP-literal upstreams.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from http.cookiejar import DefaultCookiePolicy
from typing import Any, Protocol

from treq.client import HTTPClient
from treq.cookies import IndexableCookieJar
from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    wrapClientTLS,
)
from twisted.internet.interfaces import IConsumer, IStreamClientEndpoint
from twisted.web.client import URI, Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool
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
        data: bytes | None = None,
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
    """

    def __init__(self, reactor: Any, connect_timeout: float) -> None:
        # Any: the endpoints need IReactorTCP and IReactorTime at once, which
        # zope interfaces cannot say; Twisted's own HostnameEndpoint takes Any.
        self.reactor = reactor
        self.timeout = connect_timeout
        self.tls = BrowserLikePolicyForHTTPS()

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
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


def upstream_client(agent: IAgent) -> HTTPClient:
    """treq over ``agent``, keeping no cookies (treq's default jar keeps all)."""
    return HTTPClient(agent, cookiejar=NoCookies(), data_to_body_producer=BytesProducer)


class UpstreamPool(HTTPConnectionPool):
    """A connection pool that can be retired: then it keeps no connection it is given back."""

    retired = False

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
            pool.retryAutomatically = False  # a retry is the router's decision
            endpoints = UpstreamEndpoints(self.reactor, upstream.timeouts.connect)
            agent = Agent.usingEndpointFactory(self.reactor, endpoints, pool=pool)
            self.upstreams[name] = upstream
            self.pools[name] = pool
            self.clients[name] = upstream_client(agent)
        return dict(self.clients)

    def stopService(self) -> Deferred[Any]:
        super().stopService()
        return DeferredList([p.closeCachedConnections() for p in self.pools.values()])
