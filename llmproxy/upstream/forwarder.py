"""
Sending one request to one target and waiting for its response headers.

The forwarding rules: the upstream URL, key and model come only from config;
the client's ``Authorization`` (or ``x-api-key``), cookies, ``Host`` and
hop-by-hop headers are never forwarded; redirects are not followed.  The
upstream's key goes as ``Authorization: Bearer``, or, for a request of the
Anthropic Messages API, as ``x-api-key`` (Anthropic's way), never both.  Each upstream has
``max_connections`` slots (Twisted's pool caps idle connections, not
concurrent ones); a request waits for a free one no longer than the
upstream's ``queue_timeout``, then fails with :class:`QueueTimeout` (the next
target, or 503 ``overloaded``; not the target's fault).  Two of the four
timeouts apply here:

* ``connect``: the TCP (and TLS) connection, enforced by the Agent;
* ``first_byte``: from sending (once a slot is had, never while queued) until
  the response headers arrive.

Every failure is raised as an :class:`~llmproxy.failures.UpstreamFailure`
(an error status too, with its body read), except a client that went away,
which is a ``CancelledError``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import IO

import attrs
from twisted.internet import error as ierror
from twisted.internet.defer import CancelledError, DeferredSemaphore
from twisted.internet.defer import TimeoutError as DeferTimeoutError
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import Cooperator
from twisted.python.failure import Failure
from twisted.web.client import (
    FileBodyProducer,
    RequestNotSent,
    RequestTransmissionFailed,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer, IResponse

from llmproxy import errors
from llmproxy.calls import ClientRequest
from llmproxy.config import Target, Upstream
from llmproxy.failures import Kind, UpstreamFailure
from llmproxy.redact import Redactor
from llmproxy.upstream.client import UpstreamClient
from llmproxy.upstream.exchange import MAX_BODY, Exchange, Slot, discard

# Headers a client may send that are passed upstream; everything else (cookies,
# Host, hop-by-hop, the client's Authorization) stays here.
REQUEST_HEADERS = ("accept", "openai-beta", "user-agent")
#: ...and, on requests of the Anthropic Messages API, its version and beta flags.
ANTHROPIC_HEADERS = ("anthropic-version", "anthropic-beta")
#: The Messages API version a health check of an Anthropic-only upstream names.
ANTHROPIC_VERSION = "2023-06-01"

# Nothing reached the upstream: another target may safely be tried.
_CONNECTION_ERRORS = (
    ierror.ConnectError,
    ierror.DNSLookupError,
    ierror.ConnectionLost,
    RequestNotSent,
)
# The request was sent (all or part of it), then the connection was lost with
# no whole response: the upstream may be generating it still.  (A pooled
# connection the peer had closed is sent again by the pool itself.)
_LOST_AFTER_SENDING = (ResponseNeverReceived, RequestTransmissionFailed, ResponseFailed)


@attrs.define
class QueueTimeout(UpstreamFailure):
    """
    No free connection to the upstream within its ``queue_timeout``: nothing
    reached it, so another target may be tried (as after a refused connection),
    and it says the proxy is busy, not that the target is unhealthy.  With no
    other target it is a 503 ``overloaded`` with ``Retry-After``.
    """

    @property
    def label(self) -> str:
        return "queue"

    def retry_reason(self) -> str | int:
        return "connect"  # nothing was sent: as safe to try elsewhere as a refusal

    def counts_against(self) -> bool:
        return False

    def to_api_error(self) -> errors.APIError:
        return errors.overloaded(f"The upstream is busy ({self.message}); try again shortly.")


def request_headers(
    upstream: Upstream,
    client: Mapping[str, str],
    request_id: str,
    content_type: str | None,
    api: str = errors.OPENAI,
) -> Headers:
    """What an upstream is sent: a few of the client's headers, then the upstream's own."""
    headers: dict[str, list[str]] = {}
    passed = REQUEST_HEADERS + (ANTHROPIC_HEADERS if api == errors.ANTHROPIC else ())
    for name in passed:
        if name in client:
            headers[name] = [client[name]]
    headers["x-request-id"] = [request_id]
    for name, value in upstream.headers.items():
        headers[name] = [value]
    if upstream.api_key and api == errors.ANTHROPIC:
        headers["x-api-key"] = [upstream.api_key]
    elif upstream.api_key:
        headers["authorization"] = [f"Bearer {upstream.api_key}"]
    if content_type is not None:
        headers["content-type"] = [content_type]
    return Headers(headers)


def probe_headers(upstream: Upstream) -> Headers:
    """
    A health check authenticates as OpenAI's API does, unless its upstream
    serves only Anthropic's, which also wants to know the API version.
    """
    if errors.OPENAI in upstream.apis:
        return request_headers(upstream, {}, "health-check", None)
    asked = {"anthropic-version": ANTHROPIC_VERSION}
    return request_headers(upstream, asked, "health-check", None, errors.ANTHROPIC)


def connection_slots(upstreams: Mapping[str, Upstream]) -> dict[str, DeferredSemaphore]:
    """One semaphore of ``max_connections`` per upstream."""
    return {name: DeferredSemaphore(u.max_connections) for name, u in upstreams.items()}


class Forwarder:
    """Sends requests to upstreams, one exchange at a time."""

    def __init__(
        self,
        reactor: IReactorTime,
        upstreams: Mapping[str, Upstream],
        clients: Mapping[str, UpstreamClient],
        redact: Redactor,
        max_response_bytes: int = MAX_BODY,
        slots: Mapping[str, DeferredSemaphore] | None = None,
    ) -> None:
        self.reactor = reactor
        self.upstreams = upstreams
        self.clients = clients
        self.redact = redact
        #: The most bytes of a body read whole (``server.max_response_bytes``).
        self.max_response_bytes = max_response_bytes
        #: ``max_connections`` per upstream; given, they outlive a reload (see
        #: :class:`~llmproxy.assembly.LiveGateway`), so two configs' requests
        #: share one bound.
        self._slots = dict(slots) if slots is not None else connection_slots(upstreams)
        #: What paces spooled bodies (a form upload) into upstream connections.
        self._cooperator = Cooperator(scheduler=lambda work: reactor.callLater(0, work))

    async def open(
        self, target: Target, request: ClientRequest, body: bytes | IO[bytes] | None
    ) -> Exchange:
        """
        Send ``request`` to ``target`` with ``body`` and wait for the response
        headers.  A 2xx answer comes back as an :class:`Exchange` (the body still
        to read); an error status as an :class:`UpstreamFailure` of kind
        ``http``, its (redacted) body read, so the caller can retry or pass it
        through.
        """
        upstream = self.upstreams[target.upstream]
        url = upstream.base_url + request.path
        if request.query:
            url += "?" + request.query.decode("ascii")
        # A form keeps its own type: its boundary says where the parts are.
        content_type = request.upload.content_type if request.upload else "application/json"
        headers = request_headers(
            upstream,
            request.headers,
            request.request_id,
            content_type if body is not None else None,
            request.api,
        )
        data: bytes | IBodyProducer | None = None
        if isinstance(body, bytes):
            data = body
        elif body is not None:
            # A spooled form, read as the connection takes it, on our reactor.
            data = FileBodyProducer(body, self._cooperator)
        deadline = self.reactor.seconds() + upstream.timeouts.total
        slot = await self._slot(upstream)
        try:
            response = await self._send(upstream, request.method, url, headers, data, deadline)
        except BaseException:
            slot.release()
            raise
        exchange = Exchange(
            self.reactor,
            self.redact,
            target,
            upstream,
            response,
            deadline,
            slot,
            max_body=self.max_response_bytes,
        )
        if 200 <= response.code < 300:
            return exchange
        raise await self._refusal(exchange)

    async def _slot(self, upstream: Upstream) -> Slot:
        """A free connection to ``upstream``, waited for no longer than its queue_timeout."""
        semaphore = self._slots[upstream.name]
        if semaphore.tokens > 0:
            # A free one: take it now, with no timer to arm and cancel.
            semaphore.tokens -= 1
            return Slot(semaphore.release)
        wait = min(upstream.queue_timeout, upstream.timeouts.total)
        try:
            await semaphore.acquire().addTimeout(wait, self.reactor)
        except DeferTimeoutError:
            raise QueueTimeout(
                Kind.TIMEOUT, f"no free connection to {upstream.name} within {wait:g}s"
            ) from None
        return Slot(semaphore.release)

    async def _send(
        self,
        upstream: Upstream,
        method: str,
        url: str,
        headers: Headers,
        body: bytes | IBodyProducer | None,
        deadline: float,
    ) -> IResponse:
        """The response headers, within ``first_byte`` (and the total deadline)."""
        timed_out = False

        def first_byte_timeout() -> None:
            nonlocal timed_out
            timed_out = True
            request.cancel()

        remaining = max(0.001, deadline - self.reactor.seconds())
        timer = self.reactor.callLater(
            min(upstream.timeouts.first_byte, remaining), first_byte_timeout
        )
        try:
            request = self.clients[upstream.name].request(
                method, url, headers=headers, data=body, unbuffered=True, allow_redirects=False
            )
            response: IResponse = await request
            return response
        except Exception as e:
            failure = _translate(e, upstream, timed_out)
            if failure is e:
                raise
            raise failure from None
        finally:
            if timer.active():
                timer.cancel()

    async def _refusal(self, exchange: Exchange) -> UpstreamFailure:
        """What a non-2xx answer means (its connection is given back)."""
        status, headers = exchange.status, exchange.headers
        if 300 <= status < 400:
            exchange.close()
            return UpstreamFailure(
                Kind.CONNECT, f"the upstream answered a redirect ({status}), not followed"
            )
        try:
            data = await exchange.read()
        except UpstreamFailure as e:
            data = e.body
        return UpstreamFailure(
            Kind.HTTP,
            f"HTTP {status}",
            status=status,
            # An error may quote part of a key: mask every run of one, too.
            body=self.redact.fragments(data or b""),
            headers=headers,
            retry_after=parse_retry_after(headers),
        )

    async def probe(self, name: str, path: str, timeout: float) -> bool:
        """An active health check: does ``GET {base_url}{path}`` answer 2xx in time?"""
        upstream = self.upstreams[name]
        request = self.clients[name].request(
            "GET",
            upstream.base_url + path,
            headers=probe_headers(upstream),
            unbuffered=True,
            allow_redirects=False,
        )
        timed_out = False

        def expire() -> None:
            nonlocal timed_out
            timed_out = True
            request.cancel()

        timer = self.reactor.callLater(timeout, expire)
        try:
            response = await request
        except Exception as e:  # noqa: BLE001 - any failure but a cancel means "not healthy"
            # Cancelling an Agent request errbacks with ResponseNeverReceived
            # wrapping CancelledError, whether we timed out or the check was stopped.
            if _cancelled(e) and not timed_out:
                raise CancelledError() from None
            return False
        finally:
            if timer.active():
                timer.cancel()
        discard(response)
        return bool(200 <= response.code < 300)


def parse_retry_after(headers: Headers) -> float | None:
    """Seconds from ``retry-after-ms`` or ``retry-after``, if either is a number."""
    for name, scale in ((b"retry-after-ms", 0.001), (b"retry-after", 1.0)):
        value = headers.getRawHeaders(name)
        if value:
            try:
                return max(0.0, float(value[0]) * scale)
            except ValueError:
                continue
    return None


def _translate(e: Exception, upstream: Upstream, timed_out: bool) -> Exception:
    """
    What an exception from the HTTP client means: one of ours, a client that
    left (cancelling an Agent request errbacks with ResponseNeverReceived
    wrapping CancelledError), or a bug, returned as it is.
    """
    if timed_out:
        return UpstreamFailure(
            Kind.TIMEOUT, f"no response headers within {upstream.timeouts.first_byte:g}s"
        )
    if _cancelled(e):
        return CancelledError()
    if isinstance(e, ierror.TimeoutError):
        return UpstreamFailure(Kind.TIMEOUT, f"connect timeout of {upstream.timeouts.connect:g}s")
    if isinstance(e, _LOST_AFTER_SENDING) and not _tls_failed(e):
        return UpstreamFailure(Kind.RESET, _describe(e))
    if isinstance(e, (*_CONNECTION_ERRORS, *_LOST_AFTER_SENDING)):
        return UpstreamFailure(Kind.CONNECT, _describe(e))
    return e


def _cancelled(e: BaseException) -> bool:
    if isinstance(e, CancelledError):
        return True
    reasons = getattr(e, "reasons", None) or []
    return any(isinstance(r, Failure) and r.check(CancelledError) for r in reasons)


def _tls_failed(e: Exception) -> bool:
    """Did the TLS handshake fail?  Then no byte of the request left in the clear."""
    reasons = getattr(e, "reasons", None) or []
    return any(isinstance(r, Failure) and r.check("OpenSSL.SSL.Error") for r in reasons)


def _describe(e: Exception) -> str:
    if isinstance(e, ierror.ConnectionRefusedError):
        return "connection refused"
    if isinstance(e, ierror.DNSLookupError):
        return "DNS lookup failed"
    if isinstance(e, RequestNotSent):
        return "the connection closed before the request was sent"
    if _tls_failed(e):
        return "TLS handshake failed"
    if isinstance(e, ResponseNeverReceived):
        return "connection lost after the request was sent, before any response"
    if isinstance(e, RequestTransmissionFailed):
        return "connection lost while the request was being sent"
    if isinstance(e, ResponseFailed):
        return "connection lost during the response headers"
    return type(e).__name__
