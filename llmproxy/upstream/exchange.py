"""
One upstream response whose headers have arrived, and the reading of its body.

The body is received by a :class:`BodyStream`: registered as the producer of
the client's response, so a slow client pauses the upstream socket (and the
idle timer, since a paused read is not the upstream's silence); stopped, it
closes the upstream connection.  Three timeouts apply from here on:

* ``idle``: the longest silence while we are reading, before the body's first
  byte and between any two chunks of a body read whole; in a stream, until its
  first whole event;
* ``stream_idle``: the longest silence between a stream's events once its first
  event has arrived (0, the default: none, since a reasoning model may think for
  minutes mid-stream; the relay's keep-alive comments hold the client meanwhile);
* ``total``: the whole exchange, headers included (the deadline it was given).

A body read whole (:meth:`Exchange.read`: a non-streamed answer, an error
body) is held only up to ``max_body`` bytes (``server.max_response_bytes``):
past it the read fails with :class:`ResponseTooLarge` and the upstream
connection is closed, so the redactor never sees more than that either.
A stream is relayed event by event, never held, and not bounded here.

Every byte an :class:`Exchange` hands on for a client (a whole body, a stream
event's raw bytes) has passed the redactor.  Closing an exchange gives its connection slot back,
exactly once, whatever state it is in.
"""

from __future__ import annotations

from collections.abc import Callable

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import PotentialDataLoss, ResponseDone, ResponseFailed
from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse
from zope.interface import implementer

from llmproxy import errors
from llmproxy.config import Target, Upstream
from llmproxy.failures import Kind, UpstreamFailure
from llmproxy.redact import Redactor
from llmproxy.sse import Event, SSEParser

# Upstream response headers a client gets; the rest (cookies, Content-Length and
# Content-Encoding after treq decoded the body, hop-by-hop, organisation ids) stay.
RESPONSE_HEADERS = (
    "content-type",
    "retry-after",
    "retry-after-ms",
    "openai-processing-ms",
    "request-id",  # Anthropic's, which its SDK reports with every error
)

#: The upstream's own rate-limit headers (OpenAI's ``x-ratelimit-limit-requests``...,
#: Anthropic's ``anthropic-ratelimit-requests-remaining``...).
RATE_LIMIT_PREFIXES = (b"x-ratelimit-", b"anthropic-ratelimit-")


def rate_limit_headers(headers: Headers) -> dict[str, str]:
    """The upstream's ``x-ratelimit-*`` and ``anthropic-ratelimit-*`` headers, first values."""
    return {
        name.decode("latin-1").lower(): values[0].decode("latin-1")
        for name, values in headers.getAllRawHeaders()
        if name.lower().startswith(RATE_LIMIT_PREFIXES) and values
    }


#: The default bound of a body read whole (``server.max_response_bytes``).
MAX_BODY = 64 * 1024 * 1024


@attrs.define
class ResponseTooLarge(UpstreamFailure):
    """
    A body read whole that grew past ``limit``: answered 502
    ``response_too_large``, never retried (another target would make the
    same answer, and bill for it), and no sign that the target is unhealthy.
    """

    limit: int = MAX_BODY

    @property
    def label(self) -> str:
        return "too_large"

    def retry_reason(self) -> str | int:
        return "too_large"  # no ``routing.retry_on`` entry can name it

    def counts_against(self) -> bool:
        return False

    def to_api_error(self) -> errors.APIError:
        return errors.APIError(
            502,
            f"The upstream's answer is larger than {self.limit} bytes",
            type="upstream_error",
            code="response_too_large",
        )


class Slot:
    """One of an upstream's connections, held by one exchange and released exactly once."""

    def __init__(self, release: Callable[[], object]) -> None:
        self._release: Callable[[], object] | None = release

    def release(self) -> None:
        release, self._release = self._release, None
        if release is not None:
            release()


@implementer(IPushProducer)
class BodyStream(Protocol):
    """
    Receives an upstream body chunk by chunk, under the idle and total
    timeouts; ``done`` fires when it ends cleanly, or fails with an
    :class:`UpstreamFailure`.  Cancelling ``done`` closes the connection.

    ``idle`` bounds each silence of the upstream while it is read (0: no
    bound); :meth:`relax` replaces it from then on, under another name (a
    stream's ``stream_idle``, once its first event has arrived).
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
        #: The longest silence allowed now (0: none), and the setting it comes from.
        self.idle = idle
        self.idle_name = "idle"
        self.done: Deferred[None] = Deferred(lambda d: self.stopProducing())
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

    def relax(self, idle: float, name: str) -> None:
        """
        From now on, bound each silence by ``idle`` seconds (0: no bound but the
        total timeout), reported as the ``name`` timeout; the silence in course
        is timed again from now.
        """
        self.idle, self.idle_name = idle, name
        self._disarm()
        self._arm()

    def _arm(self) -> None:
        if self.paused or self.done.called:
            return
        if self.idle <= 0:
            self._disarm()
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
        detail = (
            f"{self.idle_name} timeout of {self.idle:g}s" if which == "idle" else "total timeout"
        )
        now = self.reactor.seconds()
        paused = self.paused_for + (now - self.paused_since if self.paused else 0.0)
        # Out of time mostly because the client held the stream paused.
        client_slow = which == "total" and paused > (now - self.started) / 2
        if client_slow:
            detail += " (the client was not reading)"
        self.failed = UpstreamFailure(Kind.TIMEOUT, detail, client_slow=client_slow)
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


class _Discard(Protocol):
    def connectionMade(self) -> None:
        self.transport.stopProducing()  # type: ignore[union-attr]


def discard(response: IResponse) -> None:
    """Close the connection of a response whose body nobody wants."""
    response.deliverBody(_Discard())


@attrs.define
class Exchange:
    """An upstream response whose headers have arrived; the body is still to come."""

    reactor: IReactorTime
    redact: Redactor
    target: Target
    upstream: Upstream
    response: IResponse
    deadline: float
    slot: Slot
    body_stream: BodyStream | None = None
    _parser: SSEParser | None = None
    _closed: bool = False
    #: The most bytes :meth:`read` holds (``server.max_response_bytes``).
    max_body: int = MAX_BODY

    @property
    def status(self) -> int:
        return self.response.code

    @property
    def headers(self) -> Headers:
        return self.response.headers

    @property
    def producer(self) -> IPushProducer | None:
        """What pauses the upstream read, once the body is being received."""
        return self.body_stream

    def client_headers(self) -> dict[str, str]:
        """The upstream's headers that a client gets (its ``x-ratelimit-*`` too)."""
        found = {}
        for name in RESPONSE_HEADERS:
            value = self.headers.getRawHeaders(name)
            if value:
                found[name] = value[0]
        found.update(rate_limit_headers(self.headers))
        return found

    async def read(self) -> bytes:
        """
        The whole body (for non-streamed answers), under the same timeouts and
        at most ``max_body`` bytes: past that, :class:`ResponseTooLarge` (and
        the connection is closed, so the rest is never received).
        """
        chunks: list[bytes] = []
        size = 0

        def on_data(data: bytes) -> None:
            nonlocal size
            stream = self.body_stream
            assert stream is not None
            if stream.failed is not None:
                return  # already given up: what still arrives is dropped
            size += len(data)
            if size <= self.max_body:
                chunks.append(data)
                return
            chunks.clear()
            stream.failed = ResponseTooLarge(
                Kind.CUT, f"answer larger than {self.max_body} bytes", limit=self.max_body
            )
            stream.stopProducing()

        await self._receive(on_data)
        return self.redact(b"".join(chunks))

    def stream(self, on_event: Callable[[Event], None]) -> Deferred[None]:
        """
        Deliver the body one whole server-sent event at a time; fires when it
        ends cleanly.  Until the first event, the upstream's silences are bound by
        ``timeouts.idle``; after it, by ``timeouts.stream_idle`` (0: not at all).
        """
        parser = self._parser = SSEParser()
        first = True

        def on_data(data: bytes) -> None:
            nonlocal first
            parsed = parser.feed(data)
            if first and parsed:
                first = False
                assert self.body_stream is not None
                self.body_stream.relax(self.upstream.timeouts.stream_idle, "stream_idle")
            for event in parsed:
                raw = self.redact(event.raw)
                on_event(event if raw is event.raw else attrs.evolve(event, raw=raw))

        return self._receive(on_data)

    def pipe(self, on_data: Callable[[bytes], None]) -> Deferred[None]:
        """
        Deliver a body that is neither JSON nor events (audio, a file's bytes)
        chunk by chunk as it arrives, never held; fires when it ends cleanly.
        Each chunk is redacted alone (a secret split across two is not seen).
        """
        return self._receive(lambda data: on_data(self.redact(data)))

    def rest(self) -> bytes:
        """After :meth:`stream` ended: the bytes of an event the upstream never finished."""
        return self.redact(self._parser.pending()) if self._parser is not None else b""

    def close(self) -> None:
        """Abandon the exchange: close the upstream connection now (idempotent)."""
        if self._closed:
            return
        self._closed = True
        if self.body_stream is None:
            discard(self.response)
        elif not self.body_stream.done.called:
            self.body_stream.stopProducing()
        self.slot.release()

    def __enter__(self) -> Exchange:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _receive(self, on_data: Callable[[bytes], None]) -> Deferred[None]:
        remaining = max(0.001, self.deadline - self.reactor.seconds())
        stream = self.body_stream = BodyStream(
            self.reactor, on_data, self.upstream.timeouts.idle, remaining
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

    def _released(self, result: object) -> object:
        self.slot.release()
        return result
