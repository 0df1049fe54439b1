"""
Single-flight: identical requests in flight at once share one upstream call,
through the gateway (counted at the mock, never timed) and in the Flight itself
(pacing by the fastest follower, dropping a stuck one).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.iweb import IResponse
from zope.interface import implementer

from llmproxy.cache.flight import Flight
from tests.harness import Harness, Refused, chat, config_text, events, hang_up


def start_many(h: Harness, body: Any, count: int) -> list[Deferred[IResponse]]:
    """``count`` identical chat requests, all sent before any is answered."""
    return [h.start("POST", "/v1/chat/completions", body) for _ in range(count)]


class GatewayFlightTests(SynchronousTestCase):
    def test_ten_identical_requests_make_one_upstream_call(self) -> None:
        h = Harness(config_text())
        pending = start_many(h, chat("together", mock={"gate": True}), 10)
        h.pump()
        assert len(h.mocks["a"].gated) == 1
        h.mocks["a"].gated.pop().callback(None)
        answers = [h.finish(d) for d in pending]
        assert len(h.seen()) == 1
        assert len({a.body for a in answers}) == 1 and all(a.code == 200 for a in answers)
        assert sorted(a.header("x-llmproxy-cache") or "" for a in answers) == ["hit"] * 9 + ["miss"]
        assert sorted(a.header("x-llmproxy-coalesced") or "" for a in answers) == [""] + ["1"] * 9
        assert h.request("GET", "/stats").json()["cache"]["coalesced"] == 9

    def test_ten_identical_streams_make_one_upstream_call(self) -> None:
        h = Harness(config_text())
        body = chat("one two three", stream=True, mock={"interval": 1.0})
        early = start_many(h, body, 5)
        h.pump()
        h.clock.advance(1)
        h.clock.advance(1)
        h.pump()
        late = start_many(h, body, 5)  # join after a few events went out
        h.pump()
        h.tick(1, 15)
        answers = [h.finish(d) for d in early + late]
        assert len(h.seen()) == 1
        assert len({a.body for a in answers}) == 1
        assert events(answers[0].body)[-1] == "data: [DONE]"
        again = h.request("POST", "/v1/chat/completions", body)
        assert again.header("x-llmproxy-cache") == "hit"  # and it was stored

    def test_followers_are_served_when_the_leader_leaves(self) -> None:
        h = Harness(config_text())
        body = chat("leader leaves", stream=True, mock={"interval": 1.0})
        leader = h.result(start_many(h, body, 1)[0])
        follower = start_many(h, body, 1)[0]
        h.tick(1)
        hang_up(leader)
        h.pump()
        h.tick(1, 15)
        answer = h.finish(follower)
        assert events(answer.body)[-1] == "data: [DONE]"
        assert h.mocks["a"].stats["disconnects"] == 0 and len(h.seen()) == 1

    def test_the_upstream_is_cancelled_when_nobody_listens(self) -> None:
        h = Harness(config_text())
        body = chat("all leave", stream=True, mock={"interval": 1.0, "infinite": True})
        responses = [h.result(d) for d in start_many(h, body, 3)]
        h.tick(1)
        for response in responses[:2]:
            hang_up(response)
            h.pump()
            assert h.mocks["a"].stats["disconnects"] == 0
        hang_up(responses[2])
        h.pump()
        assert h.mocks["a"].stats["disconnects"] == 1
        # The abandoned flight is gone: the same request now makes a new call.
        again = h.result(start_many(h, body, 1)[0])
        assert again.headers.getRawHeaders("x-llmproxy-cache") == ["miss"]
        assert len(h.seen()) == 2
        hang_up(again)
        h.pump()

    def test_followers_share_the_leaders_error(self) -> None:
        h = Harness(config_text())
        pending = start_many(h, chat("fail together", mock={"gate": True, "status": 400}), 4)
        h.pump()
        h.mocks["a"].gated.pop().callback(None)
        answers = [h.finish(d) for d in pending]
        assert [a.code for a in answers] == [400] * 4
        assert len(h.seen()) == 1

    def test_errors_of_a_shared_request_keep_their_headers(self) -> None:
        h = Harness(clients={"a": Refused()})  # the memory cache is on: a flight
        answer = h.request("POST", "/v1/chat/completions", chat("x"))
        assert answer.code == 502
        assert answer.header("x-llmproxy-upstream") == "a"
        assert answer.header("x-llmproxy-cache") == "miss"


@implementer(IPushProducer)
class Upstream:
    """The producer a flight's upstream exchange registers: records pauses."""

    def __init__(self) -> None:
        self.paused = False

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False

    def stopProducing(self) -> None:
        pass


class Sink:
    """A client of a flight: keeps what it is sent and the producer it is given."""

    gone = False

    def __init__(self) -> None:
        self.written = b""
        self.aborted = False
        self.producer: Any = None

    def header(self, name: str, value: str) -> None:
        pass

    def start(self, status: int, headers: Mapping[str, str]) -> None:
        pass

    def write(self, data: bytes) -> None:
        self.written += data

    def register_producer(self, producer: IPushProducer) -> None:
        self.producer = producer

    def unregister_producer(self) -> None:
        self.producer = None

    def abort(self) -> None:
        self.aborted = True


class FlightTests(SynchronousTestCase):
    def test_the_fastest_follower_sets_the_pace_and_a_stuck_one_is_dropped(self) -> None:
        flight = Flight("k", max_record=1 << 20, max_backlog=100)
        fast, slow = Sink(), Sink()
        flight.follow(fast)
        slow_done = flight.follow(slow)
        upstream = Upstream()
        flight.start(200, {})
        flight.register_producer(upstream)
        slow.producer.pauseProducing()
        assert not upstream.paused  # the fast one still reads
        fast.producer.pauseProducing()
        assert upstream.paused  # everybody backed up: pause the upstream
        fast.producer.resumeProducing()
        assert not upstream.paused
        flight.write(b"x" * 60)
        assert not slow.aborted
        flight.write(b"x" * 60)  # 120 bytes behind while the other one read on
        assert slow.aborted and len(flight.followers) == 1
        assert fast.written == b"x" * 120
        self.assertNoResult(slow_done)  # it left: it hears no more of the flight

    def test_a_follower_joining_while_all_are_paused_is_served(self) -> None:
        flight = Flight("k", max_record=1 << 20)
        first = Sink()
        flight.follow(first)
        upstream = Upstream()
        flight.start(200, {})
        flight.register_producer(upstream)
        first.producer.pauseProducing()
        assert upstream.paused
        flight.follow(Sink())  # a new reader: the upstream goes on
        assert not upstream.paused

    def test_a_late_follower_gets_what_was_sent_then_the_rest(self) -> None:
        flight = Flight("k", max_record=1 << 20)
        early, late = Sink(), Sink()
        flight.follow(early)
        flight.start(200, {})
        flight.write(b"one ")
        flight.follow(late)
        flight.write(b"two")
        assert early.written == late.written == b"one two"
