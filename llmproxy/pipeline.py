"""
The request pipeline: everything between a parsed client request and the bytes
it gets back, independent of HTTP plumbing.

    authenticate -> resolve model -> authorize -> limits -> cache lookup
      -> plan attempts (router) -> forward (forwarder) -> relay or answer
      -> account tokens, remember response ids, store in the cache

Each step is a collaborator behind a small interface (``Authenticator``,
``Limiter``, ``Router``, ``Forwarder``, ``ResponseCache``); this module only
decides the order and the failure rules: failover only before the first byte,
a visible error event after it, nothing stored that did not complete.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from llmproxy import errors
from llmproxy.affinity import Pin, valid_response_id
from llmproxy.answers import Inspector, error_of, is_event_stream, worth_storing
from llmproxy.auth import Authenticator, Principal, bearer_token
from llmproxy.body import check_fields, parse_body, rewrite_body
from llmproxy.cache import CacheControl, Entry, ResponseCache, cache_key, parse_controls
from llmproxy.cache.flight import Flight
from llmproxy.cache.store import Uncacheable
from llmproxy.config import Model, Target
from llmproxy.failures import Kind, UpstreamFailure
from llmproxy.limits import Limiter
from llmproxy.metrics import Metrics
from llmproxy.router import Plan, Router
from llmproxy.sink import ClientSink
from llmproxy.sse import Event, SSEParser
from llmproxy.upstream.exchange import Exchange
from llmproxy.upstream.forwarder import Forwarder

# POST endpoints whose answers may be cached.
CACHEABLE = frozenset({"chat/completions", "completions", "embeddings", "responses"})

SSE_HEADERS = {
    "content-type": "text/event-stream; charset=utf-8",
    "cache-control": "no-cache",
    "x-accel-buffering": "no",
}


@attrs.frozen
class Call:
    """One client request, parsed by the HTTP layer."""

    endpoint: str  # "chat/completions", "responses", "responses/get", "models", ...
    method: str
    path: str  # upstream path after base_url, e.g. "/responses/resp_1/cancel"
    headers: Mapping[str, str]  # lower-cased names, first values
    request_id: str
    body: bytes | None = None
    payload: dict[str, Any] | None = None
    model: str | None = None
    query: bytes = b""
    response_id: str | None = None


def _estimate_tokens(call: Call, inspector: Inspector) -> int:
    """
    Tokens to charge when the upstream reported no usage (a stream without
    ``stream_options.include_usage``): about four bytes of prompt per token,
    and one token per streamed event, as servers stream token by token.
    """
    return len(call.body or b"") // 4 + inspector.data_events


@attrs.frozen
class _ModelCall:
    """What one model call needs once it has been authorised and keyed."""

    call: Call
    model: Model
    principal: Principal
    controls: CacheControl
    key: str | None
    pinned: Target | None


class Pipeline:
    log = Logger()
    #: Streams larger than this are not recorded for late single-flight joiners.
    MAX_RECORD = 16 * 1024 * 1024

    def __init__(
        self,
        reactor: IReactorTime,
        auth: Authenticator,
        limiter: Limiter,
        router: Router,
        forwarder: Forwarder,
        cache: ResponseCache,
        namespace: str,
        metrics: Metrics,
    ) -> None:
        self.reactor = reactor
        self.auth = auth
        self.limiter = limiter
        self.router = router
        self.forwarder = forwarder
        self.cache = cache
        self.namespace = namespace
        self.metrics = metrics
        self.flights: dict[str, Flight] = {}
        self.max_record = self.MAX_RECORD

    # -- entry points --------------------------------------------------------------

    def authenticate(self, call: Call) -> Principal:
        return self.auth.authenticate(bearer_token(call.headers))

    async def handle(self, call: Call, sink: ClientSink) -> None:
        """A model call: chat/completions, completions, embeddings, responses."""
        principal = self.authenticate(call)
        payload = parse_body(call.body or b"")
        call = attrs.evolve(call, payload=payload, model=check_fields(payload))
        assert call.payload is not None and call.model is not None
        model = self.router.model(call.model)
        if model is None:
            raise errors.model_not_found(call.model)
        self.auth.authorize(principal, model.name)
        await self.limiter.check(principal)
        controls = parse_controls(call.headers.get("cache-control"), call.payload.get("cache"))

        pinned = None
        previous = call.payload.get("previous_response_id")
        if call.endpoint == "responses" and isinstance(previous, str):
            pinned = await self._pinned(principal, model, previous)

        key = None
        if (
            self.cache.enabled
            and call.endpoint in CACHEABLE
            and (controls.lookup or controls.store)
        ):
            scope = principal.name if self.cache.scope == "key" else None
            key = cache_key(self.namespace, call.endpoint, model.name, call.payload, scope)

        model_call = _ModelCall(call, model, principal, controls, key, pinned)
        if key is None or not controls.lookup:
            # Not read from the cache (off, not cacheable, or no-cache: still stored).
            if self.cache.enabled:
                sink.header("x-llmproxy-cache", "bypass")
                self.cache.counters["bypass"] += 1
            else:
                sink.header("x-llmproxy-cache", "off")
            await self._exchange(model_call, sink)
            return
        # An identical request in flight: share its upstream call.
        if await self._join(key, sink):
            return
        entry = await self.cache.lookup(key)
        if entry is not None:
            sink.header("x-llmproxy-cache", "hit")
            self._replay(entry, sink)
            return
        if await self._join(key, sink):  # one may have started during the lookup
            return
        flight = self.flights[key] = Flight(key, self.max_record)
        done = flight.follow(sink, {"x-llmproxy-cache": "miss"})
        flight.task = Deferred.fromCoroutine(self._lead(flight, model_call))
        flight.task.addBoth(flight.finish)
        await done

    async def _join(self, key: str, sink: ClientSink) -> bool:
        flight = self.flights.get(key)
        if flight is None or not flight.joinable:
            return False
        self.cache.counters["coalesced"] += 1
        await flight.follow(sink, {"x-llmproxy-cache": "hit", "x-llmproxy-coalesced": "1"})
        return True

    async def _lead(self, flight: Flight, model_call: _ModelCall) -> None:
        """The one upstream call of a flight, owned by no single client."""
        try:
            await self._exchange(model_call, flight)
        finally:
            if self.flights.get(flight.key) is flight:
                del self.flights[flight.key]

    async def _exchange(self, model_call: _ModelCall, sink: ClientSink) -> None:
        """Forward, then account the tokens and store the answer if it completed."""
        call, model = model_call.call, model_call.model
        controls, key = model_call.controls, model_call.key
        inspector = Inspector(call.endpoint)
        plan = await self.router.plan(model, model_call.pinned)
        record = key is not None and controls.store
        try:
            owner = model_call.principal.name
            stored = await self._forward(call, model, plan, sink, inspector, owner, record)
        finally:
            # Charged even when the client left half-way: what was generated was used.
            self._charge(model_call, inspector)
        if key is None or not controls.store:
            return
        if stored is None:
            self.cache.skip(inspector.uncacheable or Uncacheable.INCOMPLETE)
        elif sink.gone:
            self.cache.skip(Uncacheable.CLIENT_GONE)
        else:
            await self.cache.store(key, stored, controls.ttl)

    def _charge(self, model_call: _ModelCall, inspector: Inspector) -> None:
        if inspector.usage_tokens:
            tokens = inspector.usage_tokens
        elif inspector.answered:
            tokens = _estimate_tokens(model_call.call, inspector)
        else:
            return  # nothing was answered (an error): nothing was generated
        principal = model_call.principal
        self.metrics.tokens(model_call.model.name, principal.name, inspector.usage_tokens)
        charging = Deferred.fromCoroutine(self.limiter.charge_tokens(principal, tokens))
        charging.addErrback(lambda f: self.log.failure("charging tokens failed", f))

    async def handle_response_object(self, call: Call, sink: ClientSink) -> None:
        """GET/DELETE /responses/{id}, /cancel, /input_items: to the target that made it."""
        principal = self.authenticate(call)
        assert call.response_id is not None
        pin = await self._owned(principal, call.response_id, "response_id")
        if pin is None:
            # An open proxy (no keys) with one upstream: it can only be there.
            upstreams = list(self.forwarder.upstreams)
            if len(upstreams) != 1:
                raise errors.response_not_found(call.response_id)
            target = Target(upstream=upstreams[0], model="")
        elif not await self.router.usable_now(pin.target):
            raise errors.unavailable(
                f"The backend that created response '{call.response_id}' is unavailable."
            )
        else:
            target = pin.target
        sink.header("x-llmproxy-cache", "bypass" if self.cache.enabled else "off")
        model = Model(name=target.model, targets=(target,))
        plan = await self.router.plan(model, pinned=target)
        await self._forward(call, model, plan, sink, Inspector(call.endpoint), principal.name)

    async def _owned(self, principal: Principal, response_id: str, param: str) -> Pin | None:
        """
        The pin of a response id the caller may use.  With client keys configured
        only the key that created a response can read, delete, cancel or continue
        it; anything else is "not found" (an unknown id too: its owner cannot be
        checked).  An open proxy has one tenant and routes unknown ids normally.
        """
        if not valid_response_id(response_id):
            raise attrs.evolve(errors.response_not_found(response_id), param=param)
        pin = await self.router.recall(response_id)
        if pin is not None and pin.target.upstream not in self.forwarder.upstreams:
            pin = None  # made by an upstream that is no longer configured
        if self.auth.open:
            return pin
        if pin is None or pin.owner != principal.name:
            error = errors.response_not_found(response_id)
            raise attrs.evolve(error, param=param)
        return pin

    async def _pinned(self, principal: Principal, model: Model, previous: str) -> Target | None:
        pin = await self._owned(principal, previous, "previous_response_id")
        if pin is None:
            return None  # open proxy, id unknown here (expired, restarted): route normally
        for target in model.targets:
            if target.upstream == pin.target.upstream:
                if not await self.router.usable_now(target):
                    raise errors.unavailable(
                        f"The backend that created response '{previous}' is unavailable."
                    )
                return target
        raise errors.bad_request(
            f"Response '{previous}' was made by a backend that does not serve "
            f"the model '{model.name}'.",
            param="previous_response_id",
        )

    # -- forwarding ----------------------------------------------------------------

    async def _forward(
        self,
        call: Call,
        model: Model,
        plan: Plan,
        sink: ClientSink,
        inspector: Inspector,
        owner: str,
        record: bool = False,
    ) -> Entry | None:
        """
        Try targets until one answers, and relay its answer.  Returns what to
        cache (only when ``record`` and the answer completed).
        """
        last: UpstreamFailure | None = None
        while (target := await plan.next()) is not None:
            body = rewrite_body(call.body, target.model or None) if call.body else None
            started = self.reactor.seconds()
            exchange: Exchange | None = None
            try:
                exchange = await self.forwarder.open(
                    target,
                    call.method,
                    call.path,
                    body,
                    call.headers,
                    call.request_id,
                    call.query,
                )
                ttfb = self.reactor.seconds() - started
                # A half-open probe is judged by its headers: a long answer
                # must not keep the target closed to everybody else meanwhile.
                await plan.answered(target)
                streaming = is_event_stream(exchange.headers)
                data = b"" if streaming else await exchange.read()
            except UpstreamFailure as failure:
                await plan.failed(target, failure)
                self.metrics.attempt(target.upstream, failure.label)
                self.log.warn(
                    "request {request_id}: {upstream} failed: {failure}",
                    request_id=call.request_id,
                    upstream=target.upstream,
                    failure=str(failure),
                )
                last = failure
                if sink.gone:
                    raise CancelledError() from None
                if plan.retryable(failure):
                    continue
                break
            except BaseException:
                # Cancelled (the client left) or a bug: either way the upstream
                # connection, its slot and the in-flight count are given back.
                if exchange is not None:
                    exchange.close()
                plan.finished(target)
                raise
            self.metrics.attempt(target.upstream, "ok", ttfb)
            try:
                try:
                    if streaming:
                        entry, broke = await self._relay(
                            call, exchange, sink, inspector, owner, record
                        )
                    else:
                        entry, broke = (
                            await self._answer(
                                call, exchange, data, sink, inspector, owner, record
                            ),
                            None,
                        )
                except BaseException:
                    exchange.close()
                    raise
                # The target's health is judged once its answer is over: a
                # stream cut or stalled after its headers counts against it.
                if broke is None:
                    await plan.succeeded(target, ttfb)
                else:
                    await plan.broke(target, broke)
                return entry if record else None
            finally:
                plan.finished(target)

        if last is None:
            raise errors.unavailable(f"No usable upstream for the model '{model.name}'.")
        if last.kind is Kind.HTTP and last.status is not None:
            self._pass_error(last, sink, plan)
            return None
        sink.header("x-llmproxy-upstream", plan.tried[-1].upstream)
        raise last.to_api_error()

    def _pass_error(self, failure: UpstreamFailure, sink: ClientSink, plan: Plan) -> None:
        """
        The last upstream HTTP error goes to the client with its status and,
        when it is an OpenAI-shaped JSON error, its body as it came (redacted).
        Anything else (an HTML page from a load balancer, an empty body) is
        wrapped, so a client always gets the OpenAI error shape.
        """
        assert failure.status is not None
        headers = {"content-type": "application/json"}
        if failure.headers is not None:
            for name in ("retry-after", "retry-after-ms"):
                value = failure.headers.getRawHeaders(name)
                if value:
                    headers[name] = value[0]
        if plan.tried:
            headers["x-llmproxy-upstream"] = plan.tried[-1].upstream
        body = failure.body
        if not isinstance(error_of(body), dict | str):
            body = errors.APIError(
                failure.status,
                f"The upstream answered HTTP {failure.status}",
                type="upstream_error",
                code="upstream_error",
            ).body()
        elif failure.headers is not None:
            value = failure.headers.getRawHeaders("content-type")
            if value:
                headers["content-type"] = value[0]
        sink.start(failure.status, headers)
        sink.write(body)

    async def _answer(
        self,
        call: Call,
        exchange: Exchange,
        data: bytes,
        sink: ClientSink,
        inspector: Inspector,
        owner: str,
        record: bool,
    ) -> Entry | None:
        headers = exchange.client_headers()
        headers["x-llmproxy-upstream"] = exchange.target.upstream
        inspector.body(data)
        # Remembered before the client can see the id and ask about it.
        await self._remember(inspector, exchange.target, owner)
        inspector.answered = True
        sink.start(exchange.status, headers)
        sink.write(data)
        if not record:
            return None
        if exchange.status != 200 or not worth_storing(call.endpoint, data):
            inspector.uncacheable = Uncacheable.INCOMPLETE
            return None
        if len(data) > self.max_record:
            inspector.uncacheable = Uncacheable.TOO_LARGE
            return None
        return Entry(
            status=200,
            content_type=headers.get("content-type", "application/json"),
            body=data,
            stream=False,
            upstream=exchange.target.upstream,
        )

    async def _relay(
        self,
        call: Call,
        exchange: Exchange,
        sink: ClientSink,
        inspector: Inspector,
        owner: str,
        record: bool,
    ) -> tuple[Entry | None, UpstreamFailure | None]:
        """
        Relay an event stream as it arrives, event by event, with backpressure.
        Returns the entry to cache (when recording and it completed) and the
        failure that cut it after its headers, if any.
        """
        recorded: list[bytes] = []
        size = [0]
        target = exchange.target
        remembering: list[Deferred[None]] = []

        def on_event(event: Event) -> None:
            raw = event.raw
            inspector.event(event)
            if inspector.response_ids:
                remembering.append(Deferred.fromCoroutine(self._remember(inspector, target, owner)))
            if record and inspector.uncacheable is None:
                size[0] += len(raw)
                if size[0] > self.max_record:
                    inspector.uncacheable = Uncacheable.TOO_LARGE
                    recorded.clear()  # never hold a whole long stream
                else:
                    recorded.append(raw)
            sink.write(raw)

        headers = dict(SSE_HEADERS, **{"x-llmproxy-upstream": target.upstream})
        inspector.answered = True
        sink.start(exchange.status, headers)
        done = exchange.stream(on_event)
        assert exchange.producer is not None
        sink.register_producer(exchange.producer)
        broke: UpstreamFailure | None = None
        try:
            await done  # a cancellation propagates: _forward closes the exchange
        except UpstreamFailure as failure:
            broke = failure
        finally:
            if not sink.gone:
                sink.unregister_producer()
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
            # After the first byte nothing is retried: the client sees the cut.
            self.metrics.attempt(target.upstream, "cut_" + broke.kind.value)
            self.log.warn(
                "request {request_id}: stream from {upstream} ended early: {failure}",
                request_id=call.request_id,
                upstream=target.upstream,
                failure=str(broke),
            )
            sink.write(broke.to_api_error().sse_event())
            return None, broke
        if not record or not inspector.complete or inspector.uncacheable or sink.gone:
            if inspector.uncacheable is None:
                inspector.uncacheable = (
                    Uncacheable.CLIENT_GONE if sink.gone else Uncacheable.INCOMPLETE
                )
            return None, None
        return (
            Entry(
                status=200,
                content_type=headers["content-type"],
                body=b"".join(recorded),
                stream=True,
                upstream=target.upstream,
            ),
            None,
        )

    async def _remember(self, inspector: Inspector, target: Target, owner: str) -> None:
        for response_id in inspector.take_response_ids():
            await self.router.remember(response_id, target, owner)

    def _replay(self, entry: Entry, sink: ClientSink) -> None:
        headers = {"content-type": entry.content_type, "x-llmproxy-upstream": entry.upstream}
        if entry.stream:
            headers.update(SSE_HEADERS)
            sink.start(entry.status, headers)
            for event in SSEParser().feed(entry.body):
                sink.write(event.raw)
        else:
            sink.start(entry.status, headers)
            sink.write(entry.body)
