"""
One upstream exchange: build the request, send it, wait for the headers, then
read or relay the body, under the upstream's four timeouts.

* ``connect``: the TCP (and TLS) connection, enforced by the Agent;
* ``first_byte``: from sending until the response headers arrive;
* ``idle``: the longest silence between two body chunks while we are reading
  (a client that pauses us does not count against the upstream);
* ``total``: the whole exchange, headers and body.

A failure is raised as an :class:`~llmproxy.failures.UpstreamFailure`.
Streams are delivered chunk by chunk to a callback, with the upstream
transport wrapped as a push producer so that a slow client pauses the upstream
read (backpressure), and closed at once when the exchange is cancelled.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Mapping
from http.cookiejar import DefaultCookiePolicy
from typing import Any, Protocol

import attrs
from treq.client import HTTPClient
from treq.cookies import IndexableCookieJar
from twisted.internet import error as ierror
from twisted.internet.defer import CancelledError, Deferred, DeferredSemaphore, succeed
from twisted.internet.defer import TimeoutError as DeferTimeoutError
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    wrapClientTLS,
)
from twisted.internet.interfaces import (
    IConsumer,
    IDelayedCall,
    IPushProducer,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Protocol as TxProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import (
    URI,
    BrowserLikePolicyForHTTPS,
    PotentialDataLoss,
    RequestTransmissionFailed,
    ResponseDone,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IAgentEndpointFactory, IBodyProducer
from zope.interface import implementer

from llmproxy.config import Target, Upstream
from llmproxy.failures import Kind, UpstreamFailure

# Headers a client may send that are passed upstream; everything else (cookies,
# Host, hop-by-hop, the client's Authorization) stays here.
REQUEST_HEADERS = ("accept", "openai-beta", "user-agent")
# Upstream response headers a client gets; the rest (cookies, Content-Length and
# Content-Encoding after treq decoded the body, hop-by-hop, organisation ids) stay.
RESPONSE_HEADERS = ("content-type", "retry-after", "retry-after-ms", "openai-processing-ms")


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


class Redactor:
    """Replaces configured secrets that an upstream echoes back."""

    MASK = b"[REDACTED]"

    def __init__(self, secrets: tuple[str, ...]) -> None:
        self._secrets = tuple(sorted({s.encode() for s in secrets}, key=len, reverse=True))

    def __call__(self, data: bytes) -> bytes:
        for secret in self._secrets:
            if secret in data:
                data = data.replace(secret, self.MASK)
        return data


def parse_retry_after(headers: Headers) -> float | None:
    for name, scale in ((b"retry-after-ms", 0.001), (b"retry-after", 1.0)):
        value = headers.getRawHeaders(name)
        if value:
            try:
                return max(0.0, float(value[0]) * scale)
            except ValueError:
                continue
    return None


@implementer(IPushProducer)
class _BodyStream(TxProtocol):
    """
    Receives an upstream body.  Registered (as itself) as the producer of the
    client's response, so pausing it pauses the upstream socket and suspends the
    idle timer; stopping it closes the upstream connection.
    """

    def __init__(
        self,
        reactor: IReactorTime,
        on_data: Callable[[bytes], None],
        idle: float,
        remaining: float,
    ) -> None:
        self.reactor = reactor
        self.on_data = on_data
        self.idle = idle
        self.done: Deferred[None] = Deferred(self._cancel)
        self.paused = False
        self.started = reactor.seconds()
        self.paused_since = 0.0
        self.paused_for = 0.0
        self.failed: UpstreamFailure | None = None
        self._idle_call: IDelayedCall | None = None
        self._total_call = reactor.callLater(remaining, self._timeout, "total")

    def connectionMade(self) -> None:
        self._arm()

    def dataReceived(self, data: bytes) -> None:
        self._arm()
        self.on_data(data)

    def connectionLost(self, reason: Failure = ResponseDone) -> None:  # type: ignore[assignment]
        self._disarm()
        if self._total_call.active():
            self._total_call.cancel()
        if self.done.called:
            return
        if self.failed is not None:
            self.done.errback(self.failed)
        elif reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(None)
        else:
            self.done.errback(UpstreamFailure(Kind.CUT, "the upstream closed the stream early"))

    def _arm(self) -> None:
        if self.paused:
            return
        if self._idle_call is not None and self._idle_call.active():
            self._idle_call.reset(self.idle)
        else:
            self._idle_call = self.reactor.callLater(self.idle, self._timeout, "idle")

    def _disarm(self) -> None:
        if self._idle_call is not None and self._idle_call.active():
            self._idle_call.cancel()
        self._idle_call = None

    def _timeout(self, which: str) -> None:
        seconds = self.idle if which == "idle" else None
        detail = f"{which} timeout of {seconds:g}s" if seconds else f"{which} timeout"
        now = self.reactor.seconds()
        paused = self.paused_for + (now - self.paused_since if self.paused else 0.0)
        # Out of time mostly because the client held the stream paused.
        client_slow = which == "total" and paused > (now - self.started) / 2
        if client_slow:
            detail += " (the client was not reading)"
        self.failed = UpstreamFailure(Kind.TIMEOUT, detail, client_slow=client_slow)
        self.stopProducing()

    def _cancel(self, d: Deferred[None]) -> None:
        self.stopProducing()

    # IPushProducer, on behalf of the upstream transport
    def pauseProducing(self) -> None:
        if not self.paused:
            self.paused_since = self.reactor.seconds()
        self.paused = True
        self._disarm()
        if self.transport is not None:
            self.transport.pauseProducing()  # type: ignore[attr-defined]

    def resumeProducing(self) -> None:
        if self.paused:
            self.paused_for += self.reactor.seconds() - self.paused_since
        self.paused = False
        self._arm()
        if self.transport is not None:
            self.transport.resumeProducing()  # type: ignore[attr-defined]

    def stopProducing(self) -> None:
        self._disarm()
        if self.transport is not None:
            self.transport.stopProducing()  # type: ignore[attr-defined]
        elif not self.done.called:
            self.connectionLost(Failure(ResponseFailed([])))


@attrs.define
class Exchange:
    """An upstream response whose headers have arrived; the body is still to come."""

    forwarder: Forwarder
    target: Target
    upstream: Upstream
    status: int
    headers: Headers
    response: Any
    deadline: float
    release: Callable[[], None]
    body_stream: _BodyStream | None = None
    closed: bool = False

    def client_headers(self) -> dict[str, str]:
        found = {}
        for name in RESPONSE_HEADERS:
            value = self.headers.getRawHeaders(name)
            if value:
                found[name] = (
                    value[0].decode("latin-1") if isinstance(value[0], bytes) else value[0]
                )
        return found

    def _remaining(self) -> float:
        return max(0.001, self.deadline - self.forwarder.reactor.seconds())

    def relay(self, on_data: Callable[[bytes], None]) -> Deferred[None]:
        """Deliver the body chunk by chunk; fires when it ends cleanly."""
        timeouts = self.upstream.timeouts
        stream = self.body_stream = _BodyStream(
            self.forwarder.reactor, on_data, timeouts.idle, self._remaining()
        )
        # Hooked before delivery starts: whatever happens next, the end of
        # the body gives the connection slot back.
        stream.done.addBoth(self._released)
        try:
            self.response.deliverBody(stream)
        except BaseException:
            # The caller gets this error, never ``done``: nobody will wait for it.
            stream.done.addErrback(lambda _: None)
            raise
        return stream.done

    async def read(self) -> bytes:
        """The whole body (for non-streamed answers), under the same timeouts."""
        chunks: list[bytes] = []
        await self.relay(chunks.append)
        return self.forwarder.redact(b"".join(chunks))

    def close(self) -> None:
        """Abandon the exchange: close the upstream connection now (idempotent)."""
        if self.closed:
            return
        self.closed = True
        if self.body_stream is not None:
            if not self.body_stream.done.called:
                self.body_stream.stopProducing()
        else:
            self.response.deliverBody(_Discard())
            self.release()

    def _released(self, result: object) -> object:
        self.release()
        return result


class _Discard(TxProtocol):
    def connectionMade(self) -> None:
        self.transport.stopProducing()  # type: ignore[union-attr]


class Forwarder:
    """Sends requests to upstreams, one exchange at a time."""

    log = Logger()

    def __init__(
        self,
        reactor: IReactorTime,
        upstreams: Mapping[str, Upstream],
        clients: Mapping[str, UpstreamClient],
        redactor: Redactor,
    ) -> None:
        self.reactor = reactor
        self.upstreams = upstreams
        self.clients = clients
        self.redact = redactor
        # Twisted's pool caps idle connections, not concurrent ones: this does.
        self.slots = {name: DeferredSemaphore(u.max_connections) for name, u in upstreams.items()}

    def build_headers(
        self, upstream: Upstream, client: Mapping[str, str], request_id: str, has_body: bool
    ) -> dict[str, list[str]]:
        headers: dict[str, list[str]] = {}
        for name in REQUEST_HEADERS:
            if name in client:
                headers[name] = [client[name]]
        headers["x-request-id"] = [request_id]
        for name, value in upstream.headers.items():
            headers[name] = [value]
        if upstream.api_key:
            headers["authorization"] = [f"Bearer {upstream.api_key}"]
        if has_body:
            headers["content-type"] = ["application/json"]
        return headers

    async def open(
        self,
        target: Target,
        method: str,
        path: str,
        body: bytes | None,
        client_headers: Mapping[str, str],
        request_id: str,
        query: bytes = b"",
    ) -> Exchange:
        """
        Send the request and wait for the response headers.  Error statuses come
        back as an :class:`UpstreamFailure` of kind ``http`` with the (redacted)
        body read, so the caller can retry or pass it through.
        """
        upstream = self.upstreams[target.upstream]
        url = upstream.base_url + path + (("?" + query.decode("ascii")) if query else "")
        started = self.reactor.seconds()
        deadline = started + upstream.timeouts.total
        slot = self.slots[target.upstream]
        acquiring = slot.acquire()
        wait = min(upstream.timeouts.first_byte, upstream.timeouts.total)
        try:
            await acquiring.addTimeout(wait, self.reactor)
        except DeferTimeoutError:
            raise UpstreamFailure(
                Kind.TIMEOUT, f"no free connection to {upstream.name} within {wait:g}s"
            ) from None
        released = [False]

        def release() -> None:
            if not released[0]:
                released[0] = True
                slot.release()

        client = self.clients[target.upstream]
        timed_out = []
        try:
            request = client.request(
                method,
                url,
                headers=Headers(
                    self.build_headers(upstream, client_headers, request_id, body is not None)
                ),
                data=body,
                unbuffered=True,
                allow_redirects=False,
            )

            def first_byte_timeout() -> None:
                timed_out.append(True)
                request.cancel()

            remaining = max(0.001, deadline - self.reactor.seconds())
            timer = self.reactor.callLater(
                min(upstream.timeouts.first_byte, remaining), first_byte_timeout
            )
            try:
                response = await request
            finally:
                if timer.active():
                    timer.cancel()
        except Exception as e:
            release()
            # Cancelling an Agent request errbacks with ResponseNeverReceived
            # wrapping CancelledError: tell our own timeout from a client that left.
            if timed_out:
                raise UpstreamFailure(
                    Kind.TIMEOUT, f"no response headers within {upstream.timeouts.first_byte:g}s"
                ) from None
            if _cancelled(e):
                raise CancelledError() from None
            if isinstance(e, ierror.TimeoutError):
                raise UpstreamFailure(
                    Kind.TIMEOUT, f"connect timeout of {upstream.timeouts.connect:g}s"
                ) from None
            if isinstance(e, _CONNECTION_ERRORS):
                raise UpstreamFailure(Kind.CONNECT, _describe(e)) from None
            raise

        exchange = Exchange(
            forwarder=self,
            target=target,
            upstream=upstream,
            status=response.code,
            headers=response.headers,
            response=response,
            deadline=deadline,
            release=release,
        )
        if 200 <= response.code < 300:
            return exchange
        if 300 <= response.code < 400:
            exchange.close()
            raise UpstreamFailure(
                Kind.CONNECT, f"the upstream answered a redirect ({response.code}), not followed"
            )
        try:
            data = await exchange.read()
        except UpstreamFailure as e:
            data = e.body
        raise UpstreamFailure(
            Kind.HTTP,
            f"HTTP {response.code}",
            status=response.code,
            body=data,
            headers=response.headers,
            retry_after=parse_retry_after(response.headers),
        )

    async def probe(self, name: str, path: str, timeout: float) -> bool:
        """An active health check: does ``GET {base_url}{path}`` answer 2xx in time?"""
        upstream = self.upstreams[name]
        request = self.clients[name].request(
            "GET",
            upstream.base_url + path,
            headers=Headers(self.build_headers(upstream, {}, "health-check", False)),
            unbuffered=True,
            allow_redirects=False,
        )
        try:
            response = await request.addTimeout(timeout, self.reactor)
        except CancelledError:
            raise
        except Exception:  # noqa: BLE001 - any failure means "not healthy"
            return False
        response.deliverBody(_Discard())
        return bool(200 <= response.code < 300)


_CONNECTION_ERRORS = (
    ierror.ConnectError,
    ierror.DNSLookupError,
    ierror.ConnectionLost,
    ResponseNeverReceived,
    RequestTransmissionFailed,
    ResponseFailed,
)


def _cancelled(e: BaseException) -> bool:
    if isinstance(e, CancelledError):
        return True
    reasons = getattr(e, "reasons", None) or []
    return any(isinstance(r, Failure) and r.check(CancelledError) for r in reasons)


def _describe(e: Exception) -> str:
    if isinstance(e, ierror.ConnectionRefusedError):
        return "connection refused"
    if isinstance(e, ierror.DNSLookupError):
        return "DNS lookup failed"
    if isinstance(e, (ResponseNeverReceived, RequestTransmissionFailed, ResponseFailed)):
        return "connection lost before the response"
    return type(e).__name__
