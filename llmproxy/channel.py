"""
The HTTP/1.1 connection of the gateway's port: strict where twisted.web is
lenient, with an absolute deadline on every request head, and known to its
site (which closes every connection at the end of a drain).

* an obs-fold line, a bare CR or LF line ending, and an ambiguous body
  framing (a ``Transfer-Encoding`` other than exactly ``chunked``, one with
  ``Content-Length``, one on HTTP/1.0) are a 400: a proxy in front could read
  them differently (request smuggling);
* a request line and headers over 16 KiB are a 431;
* ``server.header_timeout`` bounds how long a request head may take: 408.

Each refusal is written straight onto the wire in the API's error shape,
with ``Connection: close``, and nothing more is read.
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Any, Protocol

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.http import HTTPChannel
from twisted.web.http_headers import Headers

from llmproxy import errors


class Refusals(Protocol):
    """Told of every request refused before it reached a route."""

    def refused(self, endpoint: str, status: int) -> None: ...


class ChannelSite(Protocol):
    """What a channel needs of its site (:class:`llmproxy.site.GatewaySite`)."""

    header_timeout: float
    reactor: IReactorTime
    channels: set[Any]

    @property
    def observer(self) -> Refusals: ...


def _framing_problem(headers: Headers, version: bytes) -> str | None:
    """
    Why the body's framing is ambiguous (RFC 9112 section 6), or ``None``: a
    Transfer-Encoding other than exactly ``chunked``, one beside a
    Content-Length, or one on a request older than HTTP/1.1.  Twisted reads
    ``identity`` (and chunked on HTTP/1.0) where a proxy in front may frame
    the body otherwise: a smuggled request.
    """
    codings = headers.getRawHeaders(b"transfer-encoding")
    if codings is None:
        return None
    if version != b"HTTP/1.1":
        return "Transfer-Encoding is only accepted on HTTP/1.1 requests."
    if headers.hasHeader(b"content-length"):
        return "A request may not have both Transfer-Encoding and Content-Length."
    if len(codings) != 1 or codings[0].lower() != b"chunked":
        return "The only Transfer-Encoding accepted is chunked."
    return None


def raw_answer(error: errors.APIError) -> bytes:
    """``error`` as a whole HTTP/1.1 answer that ends the connection, for the wire."""
    body = error.body()
    return (
        b"HTTP/1.1 %d %s\r\n"
        b"Content-Type: application/json\r\n"
        b"Content-Length: %d\r\n"
        b"Connection: close\r\n\r\n"
        % (error.status, HTTPStatus(error.status).phrase.encode("ascii"), len(body))
    ) + body


class GatewayChannel(HTTPChannel):
    """
    HTTP/1.1 channel that tells its site when it opens and closes (for
    draining), and is strict about what it reads where twisted.web is lenient:

    * an obs-fold line, a bare CR or LF line ending, and an ambiguous body
      framing (see :func:`_framing_problem`) are a 400;
    * a request line and headers over :attr:`totalHeadersSize` are a 431
      (twisted.web closes without a word on a line over ``MAX_LENGTH``);
    * twisted.web's own bad-request answer gets the API's error shape;
    * the request head has an absolute deadline, the site's ``header_timeout``
      from the connection (or, on a keep-alive connection, from the first
      byte of the next request, so an idle pooled connection is not cut under
      a client or nginx about to reuse it), against a client that sends its
      headers a byte at a time: 408, then closed.

    Each refusal is written straight onto the transport with
    ``Connection: close``, and nothing more is read.
    """

    _refused = False
    _deadline: IDelayedCall | None = None
    #: Whether a byte of the request being waited for has arrived.
    _head_started = False
    #: Requests answered on this connection.
    _answered = 0
    #: A keep-alive connection waiting for its next request (no deadline yet).
    _awaiting_next = False

    @property
    def _gateway(self) -> ChannelSite:
        site: ChannelSite = self.site  # type: ignore[attr-defined]
        return site

    def connectionMade(self) -> None:
        super().connectionMade()
        self.closed: Deferred[None] = Deferred()
        self._gateway.channels.add(self)
        self._arm_deadline()

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        self._disarm_deadline()
        super().connectionLost(reason)
        self._gateway.channels.discard(self)
        self.closed.callback(None)

    def refuse(self, error: errors.APIError) -> None:
        """Answer ``error`` straight onto the wire, read nothing more, and close."""
        transport = self.transport
        if self._refused or transport is None or getattr(transport, "disconnecting", False):
            return
        self._refused = True
        self._disarm_deadline()
        transport.write(raw_answer(error))
        self.loseConnection()
        self._gateway.observer.refused("rejected", error.status)

    def _respondToBadRequestAndDisconnect(self) -> None:  # noqa: N802
        """twisted.web's own 400 (a malformed request line or header), in the API's shape."""
        self.refuse(errors.malformed_http("The request is not valid HTTP/1.1."))

    def dataReceived(self, data: bytes) -> None:
        if self._refused:
            return
        if data and self._awaiting_next:
            self._awaiting_next = False
            self._arm_deadline()
        if data and self._deadline is not None:
            self._head_started = True
        super().dataReceived(data)
        # What is left unsplit in line mode holds no CRLF: any LF in it is bare.
        if self.line_mode and not self._busyReceiving and not self.paused and b"\n" in self._buffer:
            self.refuse(errors.malformed_http("Lines must end with CRLF, not a bare LF."))

    def lineReceived(self, line: bytes) -> None:  # noqa: N802
        if self._refused:
            return
        if self._receivedHeaderSize + len(line) > self.totalHeadersSize:
            self.refuse(errors.headers_too_large(self.totalHeadersSize))
        elif line[:1] in (b" ", b"\t"):
            self.refuse(errors.malformed_http("Header continuation lines (obs-fold) are refused."))
        elif b"\r" in line or b"\n" in line:
            self.refuse(errors.malformed_http("Lines must end with CRLF, not a bare CR or LF."))
        else:
            super().lineReceived(line)

    def lineLengthExceeded(self, line: bytes) -> None:  # noqa: N802
        self.refuse(errors.headers_too_large(self.totalHeadersSize))

    def allHeadersReceived(self) -> None:
        self._disarm_deadline()
        problem = _framing_problem(self.requests[-1].requestHeaders, self._version)
        if problem is not None:
            self.refuse(errors.malformed_http(problem))
            return
        super().allHeadersReceived()

    def rawDataReceived(self, data: bytes) -> None:  # noqa: N802
        if not self._refused:
            super().rawDataReceived(data)

    def allContentReceived(self) -> None:  # noqa: N802
        if not self._refused:
            super().allContentReceived()

    def requestDone(self, request: http.Request) -> None:  # noqa: N802
        self._answered += 1
        if self.persistent and not self._refused:
            # The next head's clock starts with its first byte (see dataReceived).
            self._disarm_deadline()
            self._awaiting_next = True
        super().requestDone(request)

    def _arm_deadline(self) -> None:
        """Start the clock on the next request head (the site's ``header_timeout``)."""
        self._disarm_deadline()
        self._head_started = False
        timeout = self._gateway.header_timeout
        if timeout:
            self._deadline = self._gateway.reactor.callLater(timeout, self._head_too_slow)

    def _disarm_deadline(self) -> None:
        if self._deadline is not None:
            if self._deadline.active():
                self._deadline.cancel()
            self._deadline = None

    def _head_too_slow(self) -> None:
        """
        The deadline passed before the request head was in: a 408 if part of a
        request came or none was answered yet, else (an idle keep-alive) just
        the close, so that a client reusing the connection as it closes does
        not read a 408 as the answer to its next request.
        """
        self._deadline = None
        transport = self.transport
        if transport is None or self._refused:
            return
        if self._head_started or not self._answered:
            transport.write(raw_answer(errors.header_timeout(self._gateway.header_timeout)))
            self._gateway.observer.refused("rejected", 408)
        self._refused = True
        self.timeoutConnection()
