"""
``timeouts.idle`` and ``timeouts.stream_idle``: a reasoning model may fall
silent for minutes between the events of a stream.  ``idle`` bounds the silence
before the body's first byte (and a stream's first event) and within a body read
whole; between a stream's events only ``stream_idle`` does, and by default
nothing but ``total`` does, while keep-alive comments hold the client.
"""

from __future__ import annotations

import json

import treq
from twisted.internet.interfaces import IProtocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import ResponseDone, ResponseFailed
from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse

from llmproxy.config import ConfigError, Target, Timeouts, Upstream, parse_yaml
from llmproxy.failures import Kind, UpstreamFailure
from llmproxy.redact import Redactor
from llmproxy.relay import KEEPALIVE
from llmproxy.sse import Event
from llmproxy.upstream.exchange import Exchange, Slot
from tests.harness import Answer, Harness, chat, config_text, events
from tests.unit.test_streaming import collect_stream, keepalive_timers, shape

#: The target every request below is served by.
TARGET = "a/upstream-m1"


def error_of(body: bytes) -> dict[str, str]:
    """The ``error`` object of a stream's last event (an SSE ``error`` event)."""
    found: dict[str, str] = json.loads(events(body)[-1].split("data: ", 1)[1])["error"]
    return found


def whole(h: Harness, response: IResponse) -> Answer:
    """A response read to its end."""
    body: list[bytes] = []
    h.result(treq.collect(response, body.append))
    return Answer(response, b"".join(body))


class StreamIdleTests(SynchronousTestCase):
    def test_a_long_silence_between_events_does_not_cut_the_stream_by_default(self) -> None:
        # Two events, then the upstream thinks for 10 minutes (ten times ``idle``).
        h = Harness()
        response, chunks, done = collect_stream(h, chat(stream=True, mock={"gate_after": 2}))
        h.pump()
        assert shape(b"".join(chunks)) == ["event", "event"]
        h.tick(15, 40)
        self.assertNoResult(done)
        assert h.mocks["a"].stats["disconnects"] == 0
        assert b"".join(chunks).count(KEEPALIVE) == 40  # the client's connection was kept alive
        h.mocks["a"].gated.pop().callback(None)  # the upstream resumes
        h.pump()
        h.result(done)
        body = b"".join(chunks)
        assert shape(body)[:2] == ["event", "event"] and shape(body)[-1] == "[DONE]"
        assert "error" not in shape(body)
        text = "".join(
            json.loads(e[len("data: ") :])["choices"][0]["delta"].get("content", "")
            for e in events(body)
            if e.startswith("data: {")
        )
        assert text == "Hello from a! You said: hello"
        assert h.target(TARGET)["consecutive_failures"] == 0
        assert keepalive_timers(h) == []

    def test_events_slower_than_idle_are_all_relayed(self) -> None:
        # 90 s between events, ``idle`` 60: the old rule cut it at t=60.
        h = Harness()
        response, chunks, done = collect_stream(
            h, chat(stream=True, mock={"text": "hi", "interval": 90})
        )
        h.tick(5, 80)
        h.result(done)
        found = shape(b"".join(chunks))
        # Every event came, each 90 s silence held open by keep-alives; nothing was cut.
        assert [block for block in found if block != "ka"] == ["event"] * 3 + ["[DONE]"]
        assert found[1:6] == ["ka"] * 5
        assert h.mocks["a"].stats["disconnects"] == 0

    def test_stream_idle_cuts_a_silence_between_events(self) -> None:
        h = Harness(config_text(timeouts="{stream_idle: 5}"))
        response, chunks, done = collect_stream(
            h, chat(stream=True, mock={"text": "hi", "interval": 6})
        )
        h.tick(1, 4)
        self.assertNoResult(done)
        h.tick(1)  # 5 s since the first event, the next one due at 6
        h.result(done)
        assert shape(b"".join(chunks)) == ["event", "error"]
        error = error_of(b"".join(chunks))
        assert error["code"] == "upstream_timeout"
        assert "stream_idle timeout of 5s" in error["message"]
        assert h.mocks["a"].stats["disconnects"] == 1  # the silent upstream was closed
        assert h.target(TARGET)["consecutive_failures"] == 1  # counted against the target

    def test_idle_still_bounds_a_body_read_whole(self) -> None:
        h = Harness(config_text(timeouts="{idle: 4, stream_idle: 0}"))
        d = h.start("POST", "/v1/chat/completions", chat(mock={"stall_after_headers": True}))
        h.tick(1, 3)
        self.assertNoResult(d)
        h.tick(1)
        answer = whole(h, h.result(d))
        assert answer.code == 504
        error = answer.json()["error"]
        assert error["code"] == "upstream_timeout" and "idle timeout of 4s" in error["message"]

    def test_stream_idle_is_parsed_and_checked(self) -> None:
        assert Timeouts().stream_idle == 0
        parsed = parse_yaml(config_text(timeouts="{stream_idle: 30}"), "t", {})
        assert parsed.upstreams["a"].timeouts.stream_idle == 30
        with self.assertRaises(ConfigError) as raised:
            parse_yaml(config_text(timeouts="{stream_idle: -1}"), "t", {})
        assert str(raised.exception) == "upstreams.a.timeouts.stream_idle: must be >= 0, got -1"


class BodyTransport(StringTransport):
    """The body's side of the upstream connection: stopping it loses the body, as treq's does."""

    def __init__(self) -> None:
        super().__init__()
        self.protocol: IProtocol | None = None
        self.stopped = False

    def stopProducing(self) -> None:
        self.stopped = True
        if self.protocol is not None:
            protocol, self.protocol = self.protocol, None
            protocol.connectionLost(Failure(ResponseFailed([])))


class FakeResponse:
    """Upstream response headers that have arrived; the test plays the body."""

    code = 200
    headers = Headers({"content-type": ["text/event-stream"]})

    def __init__(self) -> None:
        self.transport = BodyTransport()
        self.protocol: IProtocol | None = None

    def deliverBody(self, protocol: IProtocol) -> None:
        self.protocol = self.transport.protocol = protocol
        protocol.makeConnection(self.transport)

    def send(self, data: bytes) -> None:
        assert self.protocol is not None
        self.protocol.dataReceived(data)


def exchange(clock: Clock, **timeouts: float) -> tuple[Exchange, FakeResponse]:
    """An exchange of a stream whose headers arrived at ``clock``'s now."""
    response = FakeResponse()
    upstream = Upstream("a", "http://a.test/v1", timeouts=Timeouts(**timeouts))
    found = Exchange(
        reactor=clock,
        redact=Redactor(()),
        target=Target("a", "m"),
        upstream=upstream,
        response=response,  # type: ignore[arg-type]
        deadline=clock.seconds() + upstream.timeouts.total,
        slot=Slot(lambda: None),
    )
    return found, response


class ExchangeIdleTests(SynchronousTestCase):
    """Which bound an upstream's silence meets, at the level of one exchange."""

    def test_idle_bounds_the_silence_until_the_first_whole_event(self) -> None:
        clock = Clock()
        ex, response = exchange(clock, idle=5, stream_idle=0)
        got: list[Event] = []
        done = ex.stream(got.append)
        clock.advance(3)
        response.send(b'data: {"half":')  # a first byte, but no whole event yet
        clock.advance(4)
        self.assertNoResult(done)
        clock.advance(1)  # 5 s since that byte, still no event
        failure = self.failureResultOf(done, UpstreamFailure).value
        assert failure.kind is Kind.TIMEOUT and failure.message == "idle timeout of 5s"
        assert failure.counts_against()
        assert got == [] and response.transport.stopped

    def test_after_the_first_event_only_total_bounds_the_silence(self) -> None:
        clock = Clock()
        ex, response = exchange(clock, idle=5, total=900)
        got: list[Event] = []
        done = ex.stream(got.append)
        response.send(b"data: 1\n\n")
        clock.advance(800)  # a reasoning pause of 800 s
        self.assertNoResult(done)
        assert clock.getDelayedCalls() and all(
            call.getTime() == 900 for call in clock.getDelayedCalls()
        )  # only the total timer is left
        response.send(b"data: [DONE]\n\n")
        assert response.protocol is not None
        response.protocol.connectionLost(Failure(ResponseDone()))
        self.successResultOf(done)
        assert [event.raw for event in got] == [b"data: 1\n\n", b"data: [DONE]\n\n"]
        assert clock.getDelayedCalls() == []

    def test_stream_idle_bounds_each_silence_after_the_first_event(self) -> None:
        clock = Clock()
        ex, response = exchange(clock, idle=60, stream_idle=5)
        done = ex.stream(lambda event: None)
        response.send(b"data: 1\n\n")
        clock.advance(4)
        response.send(b"data: 2\n\n")
        clock.advance(4)
        self.assertNoResult(done)
        clock.advance(1)
        failure = self.failureResultOf(done, UpstreamFailure).value
        assert failure.kind is Kind.TIMEOUT and failure.message == "stream_idle timeout of 5s"
        assert failure.counts_against()
