"""
Failover: try the targets of a plan until one answers, and relay its answer.

Another target is tried only before the first byte reaches the client, and
only for what ``routing.retry_on`` lists: by default connect errors (nothing
reached the upstream), timeouts, and its statuses; a connection lost after the
request was sent, or while a non-streamed body was read, only with ``reset``
(it may be a replay).  When every try failed, the
last upstream HTTP error is passed through; anything else is a 502 or a 504,
and no usable target at all is a 503.  Each attempt's outcome is counted here
(``llmproxy_upstream_attempts``) and reported to routing by the attempt.
"""

from __future__ import annotations

from typing import IO, Protocol

from twisted.internet.defer import CancelledError
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from llmproxy import errors
from llmproxy.answers import Inspector, error_of, is_event_stream, is_piped
from llmproxy.config import Target
from llmproxy.failures import Kind, UpstreamFailure
from llmproxy.metrics import Metrics
from llmproxy.relay import Relay, Relayable, Relayed, pass_error, served_by
from llmproxy.routing.plan import Attempt, Plan
from llmproxy.sink import ClientSink
from llmproxy.upstream.exchange import Exchange
from llmproxy.upstream.forwarder import Forwarder


class Forwardable(Relayable, Protocol):
    """A call the failover loop can send: its request and the body each target gets."""

    def body_for(self, target: Target) -> bytes | IO[bytes] | None: ...


class Attempts:
    log = Logger()

    def __init__(
        self, forwarder: Forwarder, relay: Relay, metrics: Metrics, clock: IReactorTime
    ) -> None:
        self.forwarder = forwarder
        self.relay = relay
        self.metrics = metrics
        self.clock = clock

    async def forward(
        self,
        call: Forwardable,
        plan: Plan,
        sink: ClientSink,
        inspector: Inspector,
        record: bool = False,
    ) -> Relayed | None:
        """
        Try targets until one answers, and relay its answer.  Returns how the
        answer ended, or None when an upstream error was passed through.
        """
        last: UpstreamFailure | None = None
        while (attempt := await plan.next()) is not None:
            with attempt:
                served_by(sink, attempt.target.upstream, attempt.target.model)
                try:
                    exchange, data = await self._open(call, attempt)
                except UpstreamFailure as failure:
                    await self._failed(call, attempt, failure)
                    last = failure
                    if sink.gone:
                        raise CancelledError() from None
                    if plan.retryable(failure):
                        continue
                    break
                with exchange:
                    if data is not None:
                        relayed = await self.relay.answer(
                            call, exchange, data, sink, inspector, record
                        )
                    elif is_piped(exchange.headers):
                        relayed = await self.relay.pipe(call, exchange, sink, inspector)
                    else:
                        relayed = await self.relay.stream(call, exchange, sink, inspector, record)
                await self._ended(call, attempt, relayed.broke)
                return relayed
        if last is None:
            raise errors.unavailable(f"No usable upstream for the model '{plan.model}'.")
        if last.kind is Kind.HTTP and last.status is not None:
            pass_error(last, sink, call)
            call.request.trace.error_code = _upstream_code(last)
            return None
        raise last.to_api_error()

    async def _open(self, call: Forwardable, attempt: Attempt) -> tuple[Exchange, bytes | None]:
        """
        The exchange once its 2xx headers are in, and its body when it is not a
        stream or piped bytes (a body that fails before it is whole can still
        fail over).
        """
        target = attempt.target
        trace = call.request.trace
        trace.attempts += 1
        trace.wait(self.clock.seconds())
        try:
            exchange = await self.forwarder.open(target, call.request, call.body_for(target))
            try:
                await attempt.answered()
                data = None
                if not (is_event_stream(exchange.headers) or is_piped(exchange.headers)):
                    data = await exchange.read()
            except BaseException:
                exchange.close()
                raise
        finally:
            trace.waited(self.clock.seconds())
        trace.upstream_ttfb = attempt.ttfb
        self.metrics.attempt(target.upstream, "ok", attempt.ttfb)
        return exchange, data

    async def _failed(self, call: Forwardable, attempt: Attempt, failure: UpstreamFailure) -> None:
        await attempt.failed(failure)
        self.metrics.attempt(attempt.target.upstream, failure.label)
        self.log.warn(
            "request {request_id}: {upstream} failed: {failure}",
            request_id=call.request.request_id,
            upstream=attempt.target.upstream,
            failure=str(failure),
        )

    async def _ended(
        self, call: Forwardable, attempt: Attempt, broke: UpstreamFailure | None
    ) -> None:
        # The target's health is judged once its answer is over: a stream cut
        # or stalled after its headers counts against it.
        await attempt.ended(broke)
        if broke is None:
            return
        call.request.trace.error_code = broke.to_api_error().code
        self.metrics.attempt(attempt.target.upstream, "cut_" + broke.kind.value)
        self.log.warn(
            "request {request_id}: stream from {upstream} ended early: {failure}",
            request_id=call.request.request_id,
            upstream=attempt.target.upstream,
            failure=str(broke),
        )


def _upstream_code(failure: UpstreamFailure) -> str:
    """The code of an upstream error passed through: its own, when it says one."""
    error = error_of(failure.body or b"")
    if isinstance(error, dict):
        for name in ("code", "type"):
            if isinstance(error.get(name), str) and error[name]:
                return str(error[name])[:64]
    return f"upstream_{failure.status}"
