"""
The twisted.web Site and Request the gateway is served with: what applies to
every request, whatever route it takes.

* A request id: the client's ``X-Request-Id`` when it is sane, else a new one,
  on the request (``request.request_id``) and on its answer.
* The default response headers (what the cache did, when no model call says
  otherwise).
* The requests in progress (:class:`InFlight`, which a graceful drain waits
  on), and, when each is over, its :class:`~llmproxy.trace.Trace` and what
  went over the wire, handed to the site's observer (metrics, access log).
* ``draining``: set once the process has begun its graceful stop
  (``/health/ready`` answers 503 from then on).
* ``server.max_body_bytes``: twisted.web reads a whole request body before any
  resource sees it and has no limit of its own, so a declared Content-Length
  over the limit is refused with 413 before a byte of the body is read, and a
  chunked body is counted as it arrives and refused the moment it crosses the
  limit.  Either way the connection is closed after the answer.
* HTTP/1.1 strictness where twisted.web is lenient, and the header deadline:
  the connection's business (:mod:`llmproxy.channel`).
* ``X-Forwarded-For``, honoured only when the peer is a trusted proxy.
* ``server.max_inflight``: past that many requests in progress, the next is
  answered 503 ``overloaded`` with ``Retry-After: 1`` at once, before any
  route (counted as endpoint ``overloaded``); health, metrics and stats
  requests, and reloads, are never refused, nor counted.
* ``server.send_timeout``: a client whose connection stays backed up (its
  answer's producer paused, :class:`SendTimer`) that long is dropped; dropping
  it cancels its handler, which closes the upstream and frees its slot.
* Twisted's combined access line, with the query string cleaned of keys
  (``key``, ``api_key``, ``api-key`` and any value holding a configured
  secret) -- or nothing, once the structured access log replaces it.

:class:`RequestSink` is what answers are written to: a request as a
:class:`~llmproxy.sink.ClientSink`.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Callable, Mapping, Sequence
from http import HTTPStatus
from typing import Any, Protocol
from urllib.parse import unquote_to_bytes

from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.resource import IResource
from twisted.web.server import Request, Site
from zope.interface import implementer

from llmproxy import errors
from llmproxy.channel import GatewayChannel
from llmproxy.forms import FormReader, reader_for
from llmproxy.trace import Trace

_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:-]{1,128}")


def _request_id(given: Sequence[bytes] | None) -> str:
    """
    The client's X-Request-Id (the last one, as ``getHeader`` reads) when it is
    printable ASCII of sane length, else a new id.  Read as bytes: twisted.web
    decodes a ``str`` header name's values as strict UTF-8, and a client may
    send any byte.
    """
    if given and _REQUEST_ID.fullmatch(given[-1]):
        return given[-1].decode("ascii")
    return os.urandom(16).hex()  # uuid4's 122 random bits and its length, for less


def _url_is_text(request: http.Request) -> bool:
    """
    Whether the path (percent-decoded) is UTF-8 and the host name is UTF-8 and
    IDNA, as Klein and werkzeug need them to be (else Klein logs a traceback
    and answers plain text, or werkzeug's ``BadHost`` escapes as a 500).
    """
    try:
        unquote_to_bytes(request.path).decode("utf-8")
        host = request.getRequestHostname().decode("utf-8")
        host.partition(":")[0].encode("idna")
    except UnicodeError:
        return False
    return True


#: Query parameters that carry a key, never logged.
KEY_PARAMETERS = frozenset({b"key", b"api_key", b"api-key"})


def safe_uri(uri: bytes, secrets: tuple[str, ...]) -> bytes:
    """``uri`` with the query parameters that carry a key (by name or by value) dropped."""
    path, sep, query = uri.partition(b"?")
    if not sep:
        return uri
    encoded = [s.encode() for s in secrets]
    kept = []
    for pair in query.split(b"&"):
        name, _, value = pair.partition(b"=")
        plain = unquote_to_bytes(value.replace(b"+", b" "))
        if unquote_to_bytes(name).lower() in KEY_PARAMETERS:
            continue
        if any(secret in plain or secret in value for secret in encoded):
            continue
        kept.append(pair)
    return path + (b"?" + b"&".join(kept) if kept else b"")


class _LoggedRequest:
    """A request as the combined log line sees it: its URI cleaned of keys."""

    def __init__(self, request: http.Request, secrets: tuple[str, ...]) -> None:
        self._request = request
        self.uri = safe_uri(request.uri, secrets)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._request, name)


class RequestObserver(Protocol):
    """Told of every request once it is over (``lost``: the client left before the end)."""

    def finished(self, request: GatewayRequest, lost: bool) -> None: ...

    def refused(self, endpoint: str, status: int) -> None:
        """A request answered before it reached a route (e.g. a body over the limit)."""


class _NoObserver:
    def finished(self, request: GatewayRequest, lost: bool) -> None:
        pass

    def refused(self, endpoint: str, status: int) -> None:
        pass


class InFlight:
    """The requests in progress, and who is waiting for there to be none."""

    def __init__(self) -> None:
        self.count = 0
        self._idle: list[Deferred[None]] = []

    def begin(self) -> None:
        self.count += 1

    def end(self) -> None:
        self.count -= 1
        if self.count == 0:
            waiting, self._idle = self._idle, []
            for d in waiting:
                d.callback(None)

    def idle(self) -> Deferred[None]:
        """Fires when no request is in progress (for a graceful drain)."""
        if self.count == 0:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._idle.append(d)
        return d


#: What an operator must always be able to reach, however busy the proxy is.
UNREFUSED_PATHS = frozenset(
    {
        b"/health",
        b"/health/live",
        b"/health/ready",
        b"/metrics",
        b"/stats",
        b"/status",
        b"/status/events",
        b"/admin/reload",
    }
)


@implementer(IPushProducer)
class SendTimer:
    """
    Stands in for an answer's producer on its client connection: while the
    connection is backed up (the producer paused) for ``timeout`` seconds,
    ``expire`` is called, once.  Every call is passed on to the producer.
    """

    def __init__(
        self,
        reactor: IReactorTime,
        timeout: float,
        producer: IPushProducer,
        expire: Callable[[], object],
    ) -> None:
        self.reactor = reactor
        self.timeout = timeout
        self.producer = producer
        self.expire = expire
        self._call: IDelayedCall | None = None

    def pauseProducing(self) -> None:
        if self._call is None:
            self._call = self.reactor.callLater(self.timeout, self._expired)
        self.producer.pauseProducing()

    def resumeProducing(self) -> None:
        self.cancel()
        self.producer.resumeProducing()

    def stopProducing(self) -> None:
        self.cancel()
        self.producer.stopProducing()

    def cancel(self) -> None:
        """No more timing (the client read, or the producer is done)."""
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    def _expired(self) -> None:
        self._call = None
        self.expire()


def answer_now(request: GatewayRequest, error: errors.APIError) -> None:
    """Answer ``error`` in the API's shape (with its headers) before any route."""
    request.trace.error_code = error.code or error.type
    set_status(request, error.status)
    for name, value in error.headers.items():
        request.setHeader(name, value)
    body = error.body(request.api)
    request.setHeader("content-type", "application/json")
    request.setHeader("content-length", str(len(body)))
    request.write(body)
    request.finish()


#: Paths of Anthropic's Messages API (with and without ``/v1``).
_ANTHROPIC_PATH = re.compile(rb"^(/v1)?/messages(/|$)")
_MODELS_PATH = re.compile(rb"^(/v1)?/models(/|$)")


def _api(request: GatewayRequest) -> str:
    # Before requestReceived (a body refused as it is announced) only the
    # channel has the path.
    path = getattr(request, "path", None) or getattr(request.channel, "_path", b"") or b""
    version = request.requestHeaders.hasHeader(b"anthropic-version")
    return api_of(path.partition(b"?")[0], version)


def api_of(path: bytes, anthropic_version: bool) -> str:
    """
    The API a request speaks, which shapes its errors: Anthropic's for the
    Messages API, and for ``/v1/models`` asked with an ``anthropic-version``
    header (as the Anthropic SDK asks); OpenAI's for everything else.
    """
    if _ANTHROPIC_PATH.match(path) or (anthropic_version and _MODELS_PATH.match(path)):
        return errors.ANTHROPIC
    return errors.OPENAI


class GatewayRequest(Request):
    #: The client's X-Request-Id if it is sane, else a new one (set as the request starts).
    request_id = ""
    #: What was asked for, as metrics label it; the route sets it.
    endpoint = "unknown"
    #: What this request did (see :mod:`llmproxy.trace`); started as it arrives.
    trace = Trace(0.0)
    #: Body bytes received, and sent (headers not counted, as nginx's $body_bytes_sent).
    bytes_in = 0
    bytes_out = 0
    _rejected = False
    _send_timer: SendTimer | None = None
    #: Reads a multipart/form-data body as it arrives (see :mod:`llmproxy.forms`).
    form_reader: FormReader | None = None

    @property
    def _site(self) -> GatewaySite:
        # Kept: twisted.web drops the channel once the request is done.
        site: GatewaySite | None = self.__dict__.get("_gateway_site")
        if site is None:
            site = self.__dict__["_gateway_site"] = self.channel.site  # type: ignore[attr-defined]
        return site

    def now(self) -> float:
        """The site's clock; once the request has ended, the time it ended."""
        ended = self.trace.ended
        return ended if ended is not None else self._site.reactor.seconds()

    @property
    def api(self) -> str:
        """The API this request speaks (see :func:`api_of`)."""
        return _api(self)

    def process(self) -> None:
        """Every request, before any route: its id, the default headers, its count."""
        self.request_id = _request_id(self.requestHeaders.getRawHeaders(b"x-request-id"))
        self.setHeader("x-request-id", self.request_id)
        site = self._site
        self.trace = Trace(site.reactor.seconds())
        for name, value in site.default_headers.items():
            self.setHeader(name, value)
        site.begin(self)
        if not _url_is_text(self):
            self._refuse_url()
            return
        if not site.admit(self):
            self.endpoint = "overloaded"
            answer_now(self, errors.overloaded())
            return
        super().process()

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        """A streaming producer is timed while the client does not read (``send_timeout``)."""
        timeout = self._site.send_timeout
        if streaming and timeout > 0:
            producer = self._send_timer = SendTimer(
                self._site.reactor, timeout, producer, self._not_reading
            )
        super().registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:
        if self._send_timer is not None:
            self._send_timer.cancel()
            self._send_timer = None
        super().unregisterProducer()

    def _not_reading(self) -> None:
        """The client accepted no byte for ``send_timeout`` seconds: drop it."""
        self.trace.error_code = "send_timeout"
        transport = self.channel.transport if self.channel is not None else None
        if transport is not None:
            transport.abortConnection()  # type: ignore[attr-defined]

    def _refuse_url(self) -> None:
        """
        A 400 in the API's shape for a path or Host that Klein cannot route
        (see :func:`_url_is_text`).
        """
        error = errors.bad_request("The request path or Host header is not a valid name.")
        self.trace.error_code = error.code or error.type
        set_status(self, error.status)
        body = error.body(self.api)
        self.setHeader("content-type", "application/json")
        self.setHeader("content-length", str(len(body)))
        self.write(body)
        self.finish()

    def gotLength(self, length: int | None) -> None:
        if length is not None and length > self._site.max_body_bytes:
            super().gotLength(0)
            # The channel answers "Expect: 100-continue" after this method; the
            # 413 is the answer, so no "100 Continue" may follow it.
            self.requestHeaders.removeHeader(b"expect")
            self._reject()
            return
        self.form_reader = reader_for(self.requestHeaders.getRawHeaders(b"content-type"))
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self._rejected:
            return
        self.bytes_in += len(data)
        if self.bytes_in > self._site.max_body_bytes:
            self._reject()
            return
        if self.form_reader is not None:
            self.form_reader.feed(data)  # a form is read as it arrives (llmproxy.forms)
        super().handleContentChunk(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if self._rejected:
            return  # answered already; the connection is closing
        super().requestReceived(command, path, version)

    def _reject(self) -> None:
        """Answer 413 straight onto the wire and close: the body is never read."""
        self._rejected = True
        body = errors.too_large(self._site.max_body_bytes).body(self.api)
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
        self._site.observer.refused("rejected", 413)

    def write(self, data: bytes) -> None:
        if self.trace.first_byte is None:
            self.trace.first_byte = self.now()
        self.bytes_out += len(data)
        super().write(data)

    def finish(self) -> None:
        if self.trace.first_byte is None and not self.finished:
            self.trace.first_byte = self.now()
        super().finish()

    def getClientAddress(self) -> Any:
        peer = super().getClientAddress()
        trusted = self._site.trusted_proxies
        host = getattr(peer, "host", None)
        # As bytes: a str name makes twisted.web decode the value as strict UTF-8.
        raw = self.getHeader(b"x-forwarded-for")
        forwarded = raw.decode("latin-1") if raw is not None else None
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

    #: Headers a proxy adds to what it passes on (nginx's shipped config sets the first four).
    FORWARDING_HEADERS = (
        b"x-forwarded-for",
        b"x-real-ip",
        b"x-forwarded-proto",
        b"x-forwarded-host",
        b"forwarded",
        b"via",
    )

    def direct_from_loopback(self) -> bool:
        """
        Whether this request was sent on this host, straight to the proxy: its
        connection's own peer (not the X-Forwarded-For client) is a loopback
        address (127.0.0.0/8, ``::1``, ``::ffff:127.x.x.x``) or a UNIX socket's,
        and it carries none of :attr:`FORWARDING_HEADERS`.

        Any of those headers counts, from any peer, trusted proxy or not
        (unlike :meth:`getClientAddress`, which ignores an untrusted peer's
        X-Forwarded-For): a proxy on this host that is missing from
        ``server.trusted_proxies`` still passes on other hosts' requests, and
        its loopback peer must not vouch for them.  A proxy that adds none of
        them is indistinguishable from a local caller.
        """
        if any(self.requestHeaders.hasHeader(name) for name in self.FORWARDING_HEADERS):
            return False
        peer = super().getClientAddress()
        if isinstance(peer, UNIXAddress):
            return True
        if not isinstance(peer, IPv4Address | IPv6Address):
            return False
        try:
            ip = ipaddress.ip_address(peer.host)
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            return ip.ipv4_mapped.is_loopback
        return ip.is_loopback


class GatewaySite(Site):
    protocol = GatewayChannel  # type: ignore[assignment]
    requestFactory = GatewayRequest
    displayTracebacks = False
    #: Seconds a client has to send a request line and headers (0: no deadline); see
    #: :class:`GatewayChannel`.
    header_timeout = 10.0

    def __init__(
        self,
        resource: IResource,
        max_body_bytes: int,
        trusted_proxies: tuple[str, ...],
        observer: RequestObserver | None = None,
        inflight: InFlight | None = None,
        default_headers: Mapping[str, str] | None = None,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("logFormatter", self._combined)
        # Bodies are JSON, never forms: twisted.web would parse a form body into
        # request.args, and a Content-Type it cannot parse raises there (a 500).
        kwargs.setdefault("parsePOSTFormSubmission", False)
        super().__init__(resource, **kwargs)
        self.max_body_bytes = max_body_bytes
        self.trusted_proxies = frozenset(trusted_proxies)
        #: Secrets that must not reach the combined log line (set with each config).
        self.secrets: tuple[str, ...] = ()
        self.observer: RequestObserver = observer or _NoObserver()
        self.draining = False
        #: Twisted's combined access line, kept until a structured access log replaces it.
        self.combined_log = True
        self.inflight = inflight or InFlight()
        self.default_headers = dict(default_headers or {})
        self.channels: set[GatewayChannel] = set()
        #: Requests in progress at most (``server.max_inflight``; 0: no limit).
        self.max_inflight = 0
        #: Requests in progress that count against ``max_inflight``.
        self.admitted = 0
        #: Seconds a backed-up client is given before it is dropped (0: never).
        self.send_timeout = 60.0

    def log(self, request: http.Request) -> None:
        if self.combined_log:
            super().log(request)

    def _combined(self, timestamp: str, request: http.Request) -> str:
        return http.combinedLogFormatter(timestamp, _LoggedRequest(request, self.secrets))

    def begin(self, request: GatewayRequest) -> None:
        """A request starts: count it in, and out again when it ends, and tell the observer."""
        self.inflight.begin()

        def observe(lost: bool) -> None:
            try:
                self.observer.finished(request, lost=lost)
            finally:
                self.inflight.end()

        def ended(result: object) -> None:
            # The access log and the metrics are not the client's business:
            # they wait for the end of the turn, by when the answer has
            # usually been sent (llmproxy.flushing's call for it was made
            # earlier, when it was written), and time the request as it ends
            # now.  It counts as in flight until then, so a drain waits.
            request.trace.ended = self.reactor.seconds()
            self.reactor.callLater(0, observe, isinstance(result, Failure))

        request.notifyFinish().addBoth(ended)

    def admit(self, request: GatewayRequest) -> bool:
        """
        Whether ``request`` may go on under ``max_inflight`` (counted until it
        ends); what an operator must reach is always admitted, never counted.
        """
        if request.path.rstrip(b"/") in UNREFUSED_PATHS:
            return True
        if self.max_inflight and self.admitted >= self.max_inflight:
            return False
        self.admitted += 1

        def ended(result: object) -> None:
            self.admitted -= 1

        request.notifyFinish().addBoth(ended)
        return True

    def interrupt_streams(self, error: errors.APIError) -> None:
        """
        End every event stream still being answered with ``error`` as its
        last event (the relay writes whole events, so this falls between two).
        """
        for channel in list(self.channels):
            for request in list(getattr(channel, "requests", [])):
                ctype = request.responseHeaders.getRawHeaders(b"content-type") or [b""]
                if request.startedWriting and b"event-stream" in ctype[0] and not request.finished:
                    request.write(error.sse_event(request.api))

    def close_connections(self) -> Deferred[Any]:
        """
        Close every client connection once its buffered output is written
        (loseConnection flushes first); fires when all are closed.
        """
        waiting = [channel.closed for channel in self.channels]
        for channel in list(self.channels):
            channel.loseConnection()
        return DeferredList(waiting)


def set_status(request: Request, status: int) -> None:
    """Set the status with its standard reason phrase (twisted.web lacks some, e.g. 429)."""
    try:
        phrase = HTTPStatus(status).phrase.encode("ascii")
    except ValueError:
        phrase = None  # a non-standard upstream status, e.g. 529: twisted.web's default
    request.setResponseCode(status, phrase)


class RequestSink:
    """A :class:`~llmproxy.sink.ClientSink` over a twisted.web request."""

    def __init__(self, request: Request) -> None:
        self.request = request
        self._gone = False
        request.notifyFinish().addErrback(self._lost)

    def _lost(self, reason: Failure) -> None:
        self._gone = True

    @property
    def gone(self) -> bool:
        return self._gone

    def header(self, name: str, value: str) -> None:
        self.request.setHeader(name, value)

    def start(self, status: int, headers: Mapping[str, str]) -> None:
        set_status(self.request, status)
        for name, value in headers.items():
            self.request.setHeader(name, value)
        if isinstance(self.request, GatewayRequest):
            # The proxy's own time before this first byte: total minus upstream waits.
            request = self.request
            overhead = request.trace.answering(request.now())
            request.setHeader("x-llmproxy-overhead-ms", f"{overhead * 1000:.1f}")

    def write(self, data: bytes) -> None:
        if not self._gone:
            self.request.write(data)

    def register_producer(self, producer: IPushProducer) -> None:
        if not self._gone:
            self.request.registerProducer(producer, True)

    def unregister_producer(self) -> None:
        if not self._gone:
            self.request.unregisterProducer()

    def abort(self) -> None:
        transport = self.request.channel.transport if self.request.channel else None
        if transport is not None and not self._gone:
            transport.abortConnection()  # type: ignore[attr-defined]
