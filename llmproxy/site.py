"""
The twisted.web Site and Request the gateway is served with.

twisted.web reads a whole request body before any resource sees it and has no
limit of its own, so ``server.max_body_bytes`` is enforced here: a declared
Content-Length over the limit is refused with 413 before a byte of the body is
read, and a chunked body is counted as it arrives and refused the moment it
crosses the limit.  Either way the connection is closed after the answer.

``X-Forwarded-For`` is honoured only when the peer is a trusted proxy.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from typing import Any

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, DeferredList
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel
from twisted.web.resource import IResource
from twisted.web.server import Request, Site

from llmproxy import errors


class GatewayRequest(Request):
    _rejected = False
    _received = 0

    @property
    def _limit(self) -> int:
        return self._site.max_body_bytes

    @property
    def _site(self) -> GatewaySite:
        return self.channel.site  # type: ignore[attr-defined]

    def gotLength(self, length: int | None) -> None:
        if length is not None and length > self._limit:
            super().gotLength(0)
            # The channel answers "Expect: 100-continue" after this method; the
            # 413 is the answer, so no "100 Continue" may follow it.
            self.requestHeaders.removeHeader(b"expect")
            self._reject()
            return
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self._rejected:
            return
        self._received += len(data)
        if self._received > self._limit:
            self._reject()
            return
        super().handleContentChunk(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if self._rejected:
            return  # answered already; the connection is closing
        super().requestReceived(command, path, version)

    def _reject(self) -> None:
        """Answer 413 straight onto the wire and close: the body is never read."""
        self._rejected = True
        body = errors.too_large(self._limit).body()
        head = (
            b"HTTP/1.1 413 Request Entity Too Large\r\n"
            b"Content-Type: application/json\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n"
            b"Connection: close\r\n\r\n"
        )
        transport = self.channel.transport
        assert transport is not None
        transport.write(head + body)
        self.channel.loseConnection()
        self._site.rejected(413)

    def getClientAddress(self) -> Any:
        peer = super().getClientAddress()
        trusted = self._site.trusted_proxies
        host = getattr(peer, "host", None)
        forwarded = self.getHeader("x-forwarded-for")
        if not forwarded or host not in trusted:
            return peer
        # Walk from the right: the first hop that is not one of ours is the client.
        for hop in reversed([h.strip() for h in forwarded.split(",") if h.strip()]):
            if hop in trusted:
                continue
            try:
                ip = ipaddress.ip_address(hop)
            except ValueError:
                return peer
            cls = IPv6Address if ip.version == 6 else IPv4Address
            return cls("TCP", str(ip), 0)
        return peer


class GatewayChannel(HTTPChannel):
    """HTTP/1.1 channel that tells its site when it opens and closes (for draining)."""

    def connectionMade(self) -> None:
        super().connectionMade()
        self.closed: Deferred[None] = Deferred()
        self.site.channels.add(self)  # type: ignore[attr-defined]

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        super().connectionLost(reason)
        self.site.channels.discard(self)  # type: ignore[attr-defined]
        self.closed.callback(None)


class GatewaySite(Site):
    protocol = GatewayChannel  # type: ignore[assignment]
    requestFactory = GatewayRequest
    displayTracebacks = False

    def __init__(
        self,
        resource: IResource,
        max_body_bytes: int,
        trusted_proxies: tuple[str, ...],
        **kwargs: Any,
    ) -> None:
        super().__init__(resource, **kwargs)
        self.max_body_bytes = max_body_bytes
        self.trusted_proxies = frozenset(trusted_proxies)
        self.channels: set[GatewayChannel] = set()
        #: Told of requests refused before they reach the application (413).
        self.rejected: Callable[[int], None] = lambda status: None

    def close_connections(self) -> Deferred[Any]:
        """
        Close every client connection once its buffered output is written
        (loseConnection flushes first); fires when all are closed.
        """
        waiting = [channel.closed for channel in self.channels]
        for channel in list(self.channels):
            channel.loseConnection()
        return DeferredList(waiting)
