"""
Writing one answer to a client sink: a live upstream answer (a whole body, or
a stream event by event with backpressure), an upstream error passed through,
or a cached entry replayed.

A stream is relayed one whole event at a time, so an error event appended
after a cut never lands inside a half-written one: after the first byte
nothing is retried, and the client sees the cut as an SSE ``error`` event and
no ``[DONE]``.  While an answer goes by it is inspected (usage, response ids)
and, when the cache wants it, recorded.  The response ids it hands out are
remembered with the target that made them: a whole body's before the client
gets it; a stream's as its event goes by (at once in this process; in Redis,
for the rest of a fleet, a round trip later).

While a stream's upstream is silent (a reasoning model thinking for minutes),
the client gets a ``: keep-alive`` SSE comment every ``server.sse_keepalive``
seconds (:class:`KeepAlive`), so that nginx's and the client's read timeouts
do not cut it.  The silence is timed from the headers and from each event
relayed, and the comments stop with the stream's terminal event, its end, its
cut, or its client.  Written from a timer, a comment always falls between two
whole events.  It is traffic to the client only: the upstream's own timers
(``timeouts.stream_idle`` between events, when set; ``timeouts.total``) still
count the upstream's silence.  No comment is recorded for the cache,
neither ours nor a comment-only event of the upstream's (``: PROCESSING``,
which the live client still gets), so a replay is the answer's events alone.
"""

from __future__ import annotations

from collections.abc import Callable
from decimal import Decimal
from typing import Protocol

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from llmproxy import errors
from llmproxy.answers import Inspector, error_of, worth_storing
from llmproxy.auth import Principal
from llmproxy.cache.entry import Entry, Recording, Uncacheable
from llmproxy.calls import ClientRequest
from llmproxy.config import Target
from llmproxy.failures import Kind, UpstreamFailure
from llmproxy.routing.affinity import AffinityStore, Pin
from llmproxy.sink import COST_HEADER, ClientSink
from llmproxy.sse import Event, SSEParser
from llmproxy.upstream.exchange import RATE_LIMIT_PREFIXES, Exchange, rate_limit_headers

SSE_HEADERS = {
    "content-type": "text/event-stream; charset=utf-8",
    "cache-control": "no-cache",
    "x-accel-buffering": "no",
}

#: Costs are given to 10^-12 USD: exact for any price with up to six decimals per
#: million tokens.
_QUANTUM = Decimal("0.000000000001")

#: What a stream's client gets while its upstream is silent: an SSE comment.
KEEPALIVE = b": keep-alive\n\n"


class Relayable(Protocol):
    """What the relay needs of a call."""

    @property
    def request(self) -> ClientRequest: ...

    @property
    def principal(self) -> Principal: ...


@attrs.frozen
class Relayed:
    """How a relayed answer ended."""

    #: What to store (only when recording, and the answer is complete and whole).
    entry: Entry | None = None
    #: Why nothing is to be stored, when recording.
    skipped: Uncacheable | None = None
    #: What cut the answer after its headers.
    broke: UpstreamFailure | None = None


def served_by(sink: ClientSink, upstream: str, model: str | None) -> None:
    """
    Tell the client which upstream answered (or was tried last), and the
    model it was asked for, so a fallback to another model is visible.
    """
    sink.header("x-llmproxy-upstream", upstream)
    if model is not None:
        sink.header("x-llmproxy-model", model)


class KeepAlive:
    """
    Writes :data:`KEEPALIVE` to a stream's sink after every ``interval``
    seconds in which nothing else was relayed (never, with ``interval`` 0).
    One timer, pushed back by each event like the upstream's idle timer.
    """

    def __init__(self, reactor: IReactorTime, interval: float, sink: ClientSink) -> None:
        self.reactor = reactor
        self.interval = interval
        self.sink = sink
        self._over = False
        self._call: IDelayedCall | None = None

    def start(self) -> None:
        """The headers are out: time the silence from now (unless it is already over)."""
        if self.interval > 0 and not self._over and self._call is None:
            self._call = self.reactor.callLater(self.interval, self._beat)

    def relayed(self) -> None:
        """An upstream event went to the client: time the silence from now."""
        if self._call is not None and self._call.active():
            self._call.reset(self.interval)

    def stop(self) -> None:
        """No more comments, ever (idempotent)."""
        self._over = True
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    def _beat(self) -> None:
        self._call = None
        if self.sink.gone:
            self.stop()
            return
        self.sink.write(KEEPALIVE)
        self._call = self.reactor.callLater(self.interval, self._beat)


class Relay:
    log = Logger()

    def __init__(
        self, affinity: AffinityStore, max_record: int, reactor: IReactorTime, keepalive: float
    ) -> None:
        #: Where response ids are remembered with the target that made them.
        self.affinity = affinity
        #: Answers larger than this are not recorded (nor stored).
        self.max_record = max_record
        #: What times the keep-alives of silent streams.
        self.reactor = reactor
        #: Seconds of upstream silence in a stream before a keep-alive comment (0: never).
        self.keepalive = keepalive

    async def answer(
        self,
        call: Relayable,
        exchange: Exchange,
        data: bytes,
        sink: ClientSink,
        inspector: Inspector,
        record: bool,
    ) -> Relayed:
        """A whole body, already read."""
        inspector.price = exchange.target.price
        inspector.body(data)
        # Remembered before the client can see the id and ask about it.
        await self._remember(call, inspector, exchange.target)
        headers = _passed_headers(call, exchange.client_headers())
        cost = inspector.usage.cost(inspector.price) if inspector.usage is not None else None
        if cost is not None:
            headers[COST_HEADER] = usd(cost)
        inspector.answered = True
        sink.start(exchange.status, headers)
        sink.write(data)
        if not record:
            return Relayed()
        endpoint = call.request.endpoint
        if exchange.status != 200 or not worth_storing(endpoint, data, inspector.parsed):
            return Relayed(skipped=Uncacheable.INCOMPLETE)
        if len(data) > self.max_record:
            return Relayed(skipped=Uncacheable.TOO_LARGE)
        content_type = headers.get("content-type", "application/json")
        target = exchange.target
        return Relayed(
            entry=Entry(
                200, content_type, data, False, target.upstream, target.model, _kept(inspector)
            )
        )

    async def stream(
        self,
        call: Relayable,
        exchange: Exchange,
        sink: ClientSink,
        inspector: Inspector,
        record: bool,
    ) -> Relayed:
        """An event stream, relayed as it arrives."""
        recording = Recording(self.max_record) if record else None
        remembering: list[Deferred[None]] = []
        keepalive = KeepAlive(self.reactor, self.keepalive, sink)

        def on_event(upstream_event: Event) -> None:
            event = inspector.event(upstream_event)
            if inspector.object_ids:
                remembering.append(self._remember_soon(call, inspector, exchange.target))
            if event is None:
                return  # nothing of it is the client's
            if recording is not None and inspector.uncacheable is None and not event.is_comment:
                recording.add(event.raw)
            sink.write(event.raw)
            if inspector.terminal is None:
                keepalive.relayed()
            else:
                keepalive.stop()  # the answer is whole: nothing more to keep alive

        inspector.price = exchange.target.price
        inspector.answered = True
        headers = _passed_headers(call, exchange.client_headers())
        headers.pop("content-type", None)  # a stream is relayed as one, whatever it said
        sink.start(exchange.status, {**SSE_HEADERS, **headers})
        broke = await self._pump(exchange, sink, on_event, keepalive)
        for pending in remembering:
            await pending
        if broke is None:
            tail = exchange.rest()
            if tail:
                sink.write(tail)
            if inspector.terminal is None:
                broke = UpstreamFailure(
                    Kind.CUT, "the upstream ended the stream before it finished"
                )
        if broke is not None:
            sink.write(broke.to_api_error().sse_event(call.request.api))
            return Relayed(broke=broke)
        if recording is None:
            return Relayed()
        return _recorded(recording, inspector, sink, exchange.target)

    async def pipe(
        self, call: Relayable, exchange: Exchange, sink: ClientSink, inspector: Inspector
    ) -> Relayed:
        """
        Raw bytes (audio, a file's content), relayed as they arrive with
        backpressure and never held, nor cached.  Bytes cannot say they were
        cut short: a cut closes the client's connection mid-body instead, so
        the client sees an incomplete chunked body, never a whole-looking one.
        """
        inspector.answered = True
        sink.start(exchange.status, _passed_headers(call, exchange.client_headers()))

        def on_data(data: bytes) -> None:
            inspector.body_bytes += len(data)
            sink.write(data)

        done = exchange.pipe(on_data)
        assert exchange.producer is not None
        sink.register_producer(exchange.producer)
        try:
            await done  # a cancellation propagates: the caller closes the exchange
        except UpstreamFailure as failure:
            sink.abort()
            return Relayed(broke=failure)
        finally:
            if not sink.gone:
                sink.unregister_producer()
        return Relayed()

    async def _pump(
        self,
        exchange: Exchange,
        sink: ClientSink,
        on_event: Callable[[Event], None],
        keepalive: KeepAlive,
    ) -> UpstreamFailure | None:
        """
        Relay the body with backpressure, and ``keepalive`` while it is
        silent; the failure that cut it, if any.
        """
        done = exchange.stream(on_event)
        assert exchange.producer is not None
        sink.register_producer(exchange.producer)
        keepalive.start()
        try:
            await done  # a cancellation propagates: the caller closes the exchange
        except UpstreamFailure as failure:
            return failure
        finally:
            keepalive.stop()
            if not sink.gone:
                sink.unregister_producer()
        return None

    def _remember_soon(
        self, call: Relayable, inspector: Inspector, target: Target
    ) -> Deferred[None]:
        """Remember while the stream goes on; a failure is logged, never left unhandled."""
        remembering = Deferred.fromCoroutine(self._remember(call, inspector, target))
        remembering.addErrback(lambda f: self.log.failure("remembering a response id failed", f))
        return remembering

    async def _remember(self, call: Relayable, inspector: Inspector, target: Target) -> None:
        for object_id in inspector.take_object_ids():
            await self.affinity.remember(object_id, Pin(target, call.principal.name))


def _recorded(
    recording: Recording, inspector: Inspector, sink: ClientSink, target: Target
) -> Relayed:
    """What to store of a stream that ended cleanly, or why nothing."""
    skipped = inspector.uncacheable or (Uncacheable.TOO_LARGE if recording.too_large else None)
    if skipped is None and sink.gone:
        skipped = Uncacheable.CLIENT_GONE
    if skipped is None and not inspector.complete:
        skipped = Uncacheable.INCOMPLETE
    if skipped is not None:
        return Relayed(skipped=skipped)
    body = recording.body()
    content_type = SSE_HEADERS["content-type"]
    return Relayed(
        entry=Entry(200, content_type, body, True, target.upstream, target.model, _kept(inspector))
    )


def usd(cost: Decimal) -> str:
    """A cost as plain decimal dollars (``0.000185``), never in exponent form."""
    text = format(cost.quantize(_QUANTUM), "f").rstrip("0").rstrip(".")
    return text or "0"


def _kept(inspector: Inspector) -> tuple[int, int, int, int] | None:
    """What an entry keeps of the answer's usage (an exact one only)."""
    return inspector.usage.counts() if inspector.usage is not None else None


def _passed_headers(call: Relayable, headers: dict[str, str]) -> dict[str, str]:
    """
    The upstream's headers, less its rate-limit ones (``x-ratelimit-*``,
    ``anthropic-ratelimit-*``) when the caller's key has limits of its own:
    the key's are the proxy's (set at admission), not the upstream account's.
    """
    key = call.principal.key
    if key is not None and key.rate_limited:
        prefixes = tuple(p.decode("ascii") for p in RATE_LIMIT_PREFIXES)
        return {k: v for k, v in headers.items() if not k.startswith(prefixes)}
    return headers


def pass_error(failure: UpstreamFailure, sink: ClientSink, caller: Relayable) -> None:
    """
    The last upstream HTTP error goes to the client with its status and, when
    it is a JSON error (OpenAI's or Anthropic's shape), its body as it came
    (redacted).  Anything else (an HTML page from a load balancer, an empty
    body) is wrapped, so a client always gets an error in its API's shape.
    """
    assert failure.status is not None
    headers = {"content-type": "application/json"}
    if failure.headers is not None:
        for name in ("retry-after", "retry-after-ms", "request-id"):
            value = failure.headers.getRawHeaders(name)
            if value:
                headers[name] = value[0]
        headers.update(_passed_headers(caller, rate_limit_headers(failure.headers)))
    body = failure.body
    if not isinstance(error_of(body), dict | str):
        body = errors.APIError(
            failure.status,
            f"The upstream answered HTTP {failure.status}",
            type="upstream_error",
            code="upstream_error",
        ).body(caller.request.api)
    elif failure.headers is not None:
        value = failure.headers.getRawHeaders("content-type")
        if value:
            headers["content-type"] = value[0]
    sink.start(failure.status, headers)
    sink.write(body)


def replay(entry: Entry, sink: ClientSink) -> None:
    """A cached answer, with the headers it had (a stream event by event)."""
    served_by(sink, entry.upstream, entry.model)
    if entry.stream:
        sink.start(entry.status, SSE_HEADERS)
        for event in SSEParser().feed(entry.body):
            sink.write(event.raw)
    else:
        sink.start(entry.status, {"content-type": entry.content_type})
        sink.write(entry.body)
