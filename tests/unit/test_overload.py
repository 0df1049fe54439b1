"""
Overload and stuck clients (issue 14, defects 6 and 7): a bound on the wait
for a connection slot, a global bound on requests in progress, and a bound on
a client that accepts no bytes.  The real gateway in memory, on one Clock.
"""

from __future__ import annotations

from typing import TypeVar

import treq
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from llmproxy.config import parse_yaml
from llmproxy.site import SendTimer
from tests.harness import Answer, Harness, chat, three

T = TypeVar("T")


def one_connection(queue_timeout: float = 2, first_byte: float = 600, server: str = "") -> str:
    """Upstream ``a`` with one connection, behind models m1 and m2, no cache."""
    return (
        "upstreams:\n"
        "  a:\n"
        "    base_url: http://a.test/v1\n"
        "    api_key: ka\n"
        "    max_connections: 1\n"
        f"    queue_timeout: {queue_timeout}\n"
        f"    timeouts: {{first_byte: {first_byte}}}\n"
        "models:\n"
        "  m1:\n"
        "    targets:\n"
        "      - upstream: a\n"
        "cache: {backend: off}\n" + (f"server: {server}\n" if server else "")
    )


def held(h: Harness, content: str) -> None:
    """Start a request the upstream never answers (its client is dropped at the end)."""
    body = chat(content, mock={"hang": True})
    h.start("POST", "/v1/chat/completions", body).addErrback(lambda f: None)


def pending(d: Deferred[T]) -> bool:
    """Whether ``d`` has no result yet (it may be chained to one that has)."""
    seen: list[object] = []

    def note(result: object) -> object:
        seen.append(result)
        return result

    d.addBoth(note)
    return not seen


def assert_overloaded(answer: Answer) -> None:
    """A 503 in OpenAI's error shape that asks the client to come back in a second."""
    assert answer.code == 503
    assert answer.header("retry-after") == "1"
    assert answer.header("content-type") == "application/json"
    error = answer.json()["error"]
    assert error["code"] == "overloaded"
    assert error["type"] == "server_error"
    assert set(error) == {"message", "type", "param", "code"}


class QueueTimeoutTests(SynchronousTestCase):
    def test_the_excess_waits_for_a_slot_no_longer_than_queue_timeout(self) -> None:
        h = Harness(one_connection(queue_timeout=2, first_byte=600))
        held(h, "held")
        queued = h.start("POST", "/v1/chat/completions", chat("queued"))
        h.tick(1.9)
        assert pending(queued)  # still within its queue_timeout
        h.tick(0.1)
        assert_overloaded(h.finish(queued))
        assert len(h.seen()) == 1  # the queued request never reached the upstream
        hang_up_all(h)

    def test_a_queue_timeout_tries_the_next_target_and_is_not_the_targets_fault(self) -> None:
        text = three("priority", extra="cache: {backend: off}\n").replace(
            "api_key: ka\n", "api_key: ka\n    max_connections: 1\n    queue_timeout: 1\n"
        )
        h = Harness(text, mocks=("a", "b", "c"))
        held(h, "held")
        queued = h.start("POST", "/v1/chat/completions", chat("queued"))
        h.tick(1)
        answer = h.finish(queued)
        assert answer.code == 200
        assert answer.header("x-llmproxy-upstream") == "b"
        assert h.target("a/up-a")["consecutive_failures"] == 0
        assert h.target("a/up-a")["state"] == "healthy"
        exposition = h.gateway.metrics.exposition()
        assert b'llmproxy_upstream_attempts_total{outcome="queue",upstream="a"} 1.0' in exposition
        hang_up_all(h)

    def test_the_first_byte_timer_starts_once_the_slot_is_had(self) -> None:
        h = Harness(one_connection(queue_timeout=60, first_byte=10))
        # A stream of about 17 s holds the one connection longer than first_byte.
        body = chat("first", stream=True, mock={"interval": 1, "words": 14})
        first = h.start("POST", "/v1/chat/completions", body)
        queued = h.start("POST", "/v1/chat/completions", chat("queued", mock={"delay": 8}))
        h.tick(1, times=12)
        assert pending(queued)  # queued past first_byte: the timer has not started
        h.tick(1, times=18)  # sent once the stream ended, answered 8 s later
        assert h.finish(first).code == 200
        assert h.finish(queued).code == 200

    def test_queue_timeout_is_configured_per_upstream(self) -> None:
        config = parse_yaml(one_connection(queue_timeout=0.5), "t", {})
        assert config.upstreams["a"].queue_timeout == 0.5
        default = parse_yaml(one_connection().replace("    queue_timeout: 2\n", ""), "t", {})
        assert default.upstreams["a"].queue_timeout == 5.0


class MaxInflightTests(SynchronousTestCase):
    def test_the_excess_is_turned_away_at_once_and_counted(self) -> None:
        h = Harness(one_connection(server="{max_inflight: 1}"))
        first = h.start("POST", "/v1/chat/completions", chat("first", mock={"delay": 5}))
        assert_overloaded(h.request("POST", "/v1/chat/completions", chat("second")))
        assert len(h.seen()) == 1
        exposition = h.gateway.metrics.exposition()
        assert (
            b'llmproxy_requests_total{endpoint="overloaded",key="",model="",status="503"} 1.0'
            in exposition
        )
        h.tick(5)
        assert h.finish(first).code == 200
        assert h.request("POST", "/v1/chat/completions", chat("third")).code == 200

    def test_operators_can_always_look(self) -> None:
        h = Harness(one_connection(server="{max_inflight: 1}"))
        held(h, "held")
        for path in ("/health", "/health/live", "/health/ready", "/stats", "/metrics"):
            assert h.request("GET", path).code != 503, path
        assert h.request("GET", "/stats").json()["inflight"] == 2  # the held one and this
        hang_up_all(h)

    def test_no_limit_by_default(self) -> None:
        assert parse_yaml(one_connection(), "t", {}).server.max_inflight == 0
        h = Harness(one_connection(queue_timeout=60))
        for i in range(5):
            held(h, f"r{i}")
        assert h.request("GET", "/v1/models").code == 200
        hang_up_all(h)


class SendTimeoutTests(SynchronousTestCase):
    def stream(self, h: Harness) -> list[bytes]:
        """Start an endless stream to the harness's client; the chunks it has read."""
        body = chat("endless", stream=True, mock={"infinite": True, "interval": 0.5})
        response = h.result(h.start("POST", "/v1/chat/completions", body))
        chunks: list[bytes] = []
        # It ends only by a dropped connection, which is what the tests look at.
        treq.collect(response, chunks.append).addErrback(lambda f: None)
        h.pump()
        assert chunks
        return chunks

    def back_up(self, h: Harness) -> None:
        """The client's socket fills up: the transport pauses the channel, as a kernel would."""
        (channel,) = h.site.channels
        channel.pauseProducing()

    def test_a_client_that_accepts_nothing_is_dropped_and_the_upstream_closed(self) -> None:
        h = Harness(one_connection(server="{send_timeout: 5}"))
        self.stream(h)
        self.back_up(h)
        h.tick(1, times=4)
        assert h.mocks["a"].stats["disconnects"] == 0  # not before send_timeout
        h.tick(1)
        assert h.mocks["a"].stats["disconnects"] == 1
        assert h.mocks["a"].stats["active_streams"] == 0
        assert not h.site.channels  # the client's connection is gone
        # The slot is free again (one connection; a held one would queue this).
        assert h.request("POST", "/v1/chat/completions", chat("next")).code == 200

    def test_a_client_that_reads_again_in_time_is_kept(self) -> None:
        h = Harness(one_connection(server="{send_timeout: 5}"))
        chunks = self.stream(h)
        self.back_up(h)
        h.tick(1, times=4)
        (channel,) = h.site.channels
        channel.resumeProducing()
        h.tick(1, times=4)
        self.back_up(h)
        h.tick(1, times=4)  # 8 s backed up in all, never 5 in a row
        assert h.mocks["a"].stats["disconnects"] == 0
        channel.resumeProducing()
        received = len(chunks)
        h.tick(1)
        assert len(chunks) > received
        hang_up_all(h)

    def test_send_timeout_defaults_to_nginxs_and_zero_is_never(self) -> None:
        assert parse_yaml(one_connection(), "t", {}).server.send_timeout == 60.0
        h = Harness(one_connection(server="{send_timeout: 0}"))
        self.stream(h)
        self.back_up(h)
        h.tick(60, times=2)
        assert h.mocks["a"].stats["disconnects"] == 0
        hang_up_all(h)


class SendTimerTests(SynchronousTestCase):
    def test_it_passes_every_call_on_and_expires_once(self) -> None:
        h = Harness()
        calls: list[str] = []
        expired: list[bool] = []

        @implementer(IPushProducer)
        class Producer:
            def pauseProducing(self) -> None:
                calls.append("pause")

            def resumeProducing(self) -> None:
                calls.append("resume")

            def stopProducing(self) -> None:
                calls.append("stop")

        timer = SendTimer(h.clock, 3, Producer(), lambda: expired.append(True))
        timer.pauseProducing()
        timer.pauseProducing()  # paused again: still timed from the first
        h.clock.advance(3)
        assert expired == [True]
        timer.resumeProducing()
        timer.stopProducing()
        h.clock.advance(10)
        assert expired == [True]
        assert calls == ["pause", "pause", "resume", "stop"]


def hang_up_all(h: Harness) -> None:
    """Drop every client connection still open (so no timer outlives the test)."""
    for channel in list(h.site.channels):
        assert channel.transport is not None
        channel.transport.abortConnection()  # type: ignore[attr-defined]
    h.pump()
