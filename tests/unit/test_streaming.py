"""The streaming relay: event by event, visible truncation, timeouts, cancellation."""

from __future__ import annotations

import json
from typing import Any

import treq
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import Protocol
from twisted.trial.unittest import SynchronousTestCase

from llmproxy.failures import Kind, UpstreamFailure
from llmproxy.relay import KEEPALIVE, KeepAlive
from llmproxy.sse import SSEParser
from llmproxy.upstream.exchange import BodyStream
from tests.harness import Harness, chat, config_text, events, hang_up


def collect_stream(h: Harness, body: dict[str, Any]) -> tuple[Any, list[bytes], Deferred[None]]:
    """Start a stream: its response, the chunks received so far, and its end."""
    d = h.start("POST", "/v1/chat/completions", body)
    response = h.result(d)
    chunks: list[bytes] = []
    done = treq.collect(response, chunks.append)
    return response, chunks, done


class StreamRelayTests(SynchronousTestCase):
    def test_stream_headers_and_events_in_order(self) -> None:
        h = Harness()
        answer = h.request(
            "POST",
            "/v1/chat/completions",
            chat("one two", stream=True, stream_options={"include_usage": True}),
        )
        assert answer.code == 200
        assert answer.header("content-type") == "text/event-stream; charset=utf-8"
        assert answer.header("cache-control") == "no-cache"
        assert answer.header("x-accel-buffering") == "no"
        found = events(answer.body)
        assert found[-1] == "data: [DONE]"
        chunks = [json.loads(e[len("data: ") :]) for e in found[:-1]]
        assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
        assert text == "Hello from a! You said: one two"
        usage = chunks[-1]
        assert usage["choices"] == [] and usage["usage"]["total_tokens"] > 0

    def test_usage_chunk_passes_through_byte_for_byte(self) -> None:
        h = Harness()
        answer = h.request(
            "POST",
            "/v1/chat/completions",
            chat("x", stream=True, stream_options={"include_usage": True}),
        )
        usage_events = [e for e in events(answer.body) if '"choices":[]' in e]
        assert len(usage_events) == 1
        # Exactly the mock's compact framing: nothing was re-serialised.
        assert usage_events[0].startswith('data: {"id":"chatcmpl_')

    def test_events_reach_the_client_before_the_stream_ends(self) -> None:
        h = Harness()
        response, chunks, done = collect_stream(
            h, chat("a b c", stream=True, mock={"interval": 1.0})
        )
        h.pump()
        first = b"".join(chunks)
        assert first.count(b"\n\n") == 1  # the role chunk, sent at once
        assert not done.called
        h.clock.advance(1.0)
        h.pump()
        assert b"".join(chunks).count(b"\n\n") == 2
        h.tick(1.0, 10)
        h.result(done)
        assert events(b"".join(chunks))[-1] == "data: [DONE]"

    def test_responses_stream_is_relayed_with_event_lines(self) -> None:
        h = Harness()
        answer = h.request("POST", "/v1/responses", {"model": "m1", "input": "hi", "stream": True})
        found = events(answer.body)
        names = [e.split("\n")[0] for e in found]
        assert names[0] == "event: response.created"
        assert names[-1] == "event: response.completed"
        assert "data: [DONE]" not in found
        rid = json.loads(found[0].split("data: ", 1)[1])["response"]["id"]
        # The id from response.created was remembered: the object is reachable.
        assert h.request("GET", f"/v1/responses/{rid}").code == 200


class TruncationTests(SynchronousTestCase):
    def test_cut_mid_stream_is_a_visible_truncation(self) -> None:
        h = Harness()
        answer = h.request("POST", "/v1/chat/completions", chat(stream=True, mock={"cut_after": 3}))
        assert answer.code == 200
        found = events(answer.body)
        assert len(found) == 4
        assert "data: [DONE]" not in found
        assert found[-1].startswith("event: error\ndata: ")
        error = json.loads(found[-1].split("data: ", 1)[1])
        assert error["error"]["code"] == "bad_gateway"
        assert len(h.seen()) == 1  # nothing is retried after the first byte

    def test_clean_close_without_done_is_also_a_truncation(self) -> None:
        h = Harness()
        answer = h.request(
            "POST", "/v1/chat/completions", chat(stream=True, mock={"omit_done": True})
        )
        found = events(answer.body)
        assert found[-1].startswith("event: error")
        assert "ended the stream before it finished" in found[-1]
        again = h.request(
            "POST", "/v1/chat/completions", chat(stream=True, mock={"omit_done": True})
        )
        assert again.header("x-llmproxy-cache") == "miss"  # the truncated stream was not stored


class StreamTimeoutTests(SynchronousTestCase):
    def test_stream_idle_timeout_mid_stream_closes_the_upstream(self) -> None:
        # stall_after_headers with stall_after=2 never finishes; the operator's
        # stream_idle timeout (off by default) ends it.
        h2 = Harness(config_text(timeouts="{stream_idle: 5}"))
        d = h2.start(
            "POST",
            "/v1/chat/completions",
            chat(stream=True, mock={"stall_after_headers": True, "stall_after": 2}),
        )
        response = h2.result(d)
        chunks: list[bytes] = []
        done = treq.collect(response, chunks.append)
        h2.pump()
        assert b"".join(chunks).count(b"\n\n") == 2
        h2.clock.advance(5)
        h2.pump()
        h2.result(done)
        found = events(b"".join(chunks))
        assert len(found) == 3 and found[-1].startswith("event: error")
        error = json.loads(found[-1].split("data: ", 1)[1])["error"]
        assert error["code"] == "upstream_timeout"
        assert "stream_idle timeout of 5s" in error["message"]
        assert h2.mocks["a"].stats["disconnects"] == 1  # the stalled upstream was closed

    def test_paused_client_does_not_trip_the_idle_timer(self) -> None:
        h = Harness()
        seen: list[bytes] = []
        stream = BodyStream(h.clock, seen.append, idle=5, remaining=100)
        stream.pauseProducing()
        h.clock.advance(50)
        self.assertNoResult(stream.done)
        stream.resumeProducing()
        h.clock.advance(5)
        failure = self.failureResultOf(stream.done, UpstreamFailure)
        assert "idle timeout of 5s" in str(failure.value)

    def test_total_timeout_ends_a_long_stream(self) -> None:
        h = Harness(config_text(timeouts="{idle: 5, total: 12}"))
        d = h.start(
            "POST",
            "/v1/chat/completions",
            chat(stream=True, mock={"infinite": True, "interval": 1.0, "chunk_bytes": 10}),
        )
        response = h.result(d)
        chunks: list[bytes] = []
        done = treq.collect(response, chunks.append)
        h.tick(1.0, 15)
        h.result(done)
        found = events(b"".join(chunks))
        assert found[-1].startswith("event: error")
        assert "total timeout" in found[-1]


class DisconnectTests(SynchronousTestCase):
    def test_client_disconnect_closes_the_upstream(self) -> None:
        h = Harness()
        d = h.start(
            "POST",
            "/v1/chat/completions",
            chat(stream=True, mock={"infinite": True, "interval": 1.0, "chunk_bytes": 10}),
        )
        response = h.result(d)
        h.clock.advance(1.0)
        h.pump()
        assert h.mocks["a"].stats["active_streams"] == 1
        hang_up(response)
        h.pump()
        assert h.mocks["a"].stats["disconnects"] == 1
        assert h.mocks["a"].stats["active_streams"] == 0
        assert h.request("GET", "/stats").json()["inflight"] == 1  # only that /stats request

    def test_a_total_timeout_while_the_client_held_the_stream_is_not_the_targets_fault(
        self,
    ) -> None:
        h = Harness()
        stream = BodyStream(h.clock, lambda data: None, idle=5, remaining=100)
        h.clock.advance(10)
        stream.pauseProducing()
        h.clock.advance(90)  # total fires while the client has held the stream paused
        timeout = self.failureResultOf(stream.done, UpstreamFailure).value
        assert timeout.client_slow and not timeout.counts_against()
        assert UpstreamFailure(Kind.TIMEOUT, "total timeout").counts_against()


def keepalive_timers(h: Harness) -> list[IDelayedCall]:
    """The keep-alive timers pending on the harness's clock."""
    return [
        call
        for call in h.clock.getDelayedCalls()
        if getattr(getattr(call, "func", None), "__func__", None) is KeepAlive._beat
    ]


def shape(body: bytes) -> list[str]:
    """A stream's blocks told apart: ``ka`` (our comment), ``[DONE]``, ``error``, ``event``."""
    found = []
    for block in events(body):
        if block == KEEPALIVE.decode().strip():
            found.append("ka")
        elif block == "data: [DONE]":
            found.append("[DONE]")
        elif block.startswith("event: error\n"):
            found.append("error")
        else:
            found.append("event")
    return found


class Reader(Protocol):
    """A client reading a stream as it comes, which can hang up."""

    def __init__(self) -> None:
        self.received = b""

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def hang_up(self) -> None:
        assert self.transport is not None
        self.transport.stopProducing()  # type: ignore[attr-defined]


class KeepAliveTests(SynchronousTestCase):
    """``: keep-alive`` comments while the upstream is silent (``server.sse_keepalive``)."""

    #: A reply in 4 events, 40 s apart: role (t=0), "hi" (40), finish (80), [DONE] (120),
    #: then the mock closes the stream at t=160.
    SLOW = {"text": "hi", "interval": 40}

    def test_a_silence_gets_a_keepalive_at_each_interval_and_not_before(self) -> None:
        h = Harness()
        response, chunks, done = collect_stream(h, chat(stream=True, mock=self.SLOW))
        h.tick(14)
        assert b"".join(chunks).count(b"\n\n") == 1 and KEEPALIVE not in b"".join(chunks)
        h.tick(1)  # 15 s of silence since the headers
        assert b"".join(chunks).endswith(b"}\n\n" + KEEPALIVE)
        h.tick(14)
        assert b"".join(chunks).count(KEEPALIVE) == 1
        h.tick(1)
        assert b"".join(chunks).count(KEEPALIVE) == 2
        h.tick(10, 20)
        h.result(done)

    def test_each_event_starts_the_silence_again(self) -> None:
        h = Harness()
        response, chunks, done = collect_stream(h, chat(stream=True, mock=self.SLOW))
        h.tick(1, 170)
        h.result(done)
        # 40 s between events: comments at +15 and +30 after each; none after [DONE],
        # though the upstream took 40 s more to close the stream.
        assert shape(b"".join(chunks)) == ["event", "ka", "ka"] * 3 + ["[DONE]"]

    def test_events_closer_than_the_interval_need_no_keepalive(self) -> None:
        h = Harness()
        response, chunks, done = collect_stream(
            h, chat(stream=True, mock={"text": "a b c d e f", "interval": 10})
        )
        h.tick(1, 100)  # 9 events in 90 s, never 15 s of silence
        h.result(done)
        assert KEEPALIVE not in b"".join(chunks)
        assert events(b"".join(chunks))[-1] == "data: [DONE]"

    def test_no_keepalive_after_a_cut(self) -> None:
        h = Harness()
        response, chunks, done = collect_stream(
            h, chat(stream=True, mock={**self.SLOW, "cut_after": 2})
        )
        h.tick(5, 20)  # cut at t=80
        h.result(done)
        found = shape(b"".join(chunks))
        assert found == ["event", "ka", "ka", "event", "ka", "ka", "error"]
        assert keepalive_timers(h) == []

    def test_no_keepalive_after_the_client_left(self) -> None:
        body = chat(stream=True, mock=self.SLOW)
        for cache in ("memory", "off"):  # through a single flight, and straight to the client
            h = Harness(config_text(extra=f"cache: {{backend: {cache}}}\n"))
            response = h.result(h.start("POST", "/v1/chat/completions", body))
            reader = Reader()
            response.deliverBody(reader)
            h.tick(15)
            assert reader.received.endswith(b"}\n\n" + KEEPALIVE)
            assert len(keepalive_timers(h)) == 1
            reader.hang_up()
            h.pump()
            assert h.mocks["a"].stats["disconnects"] == 1
            assert keepalive_timers(h) == []

    def test_zero_switches_keepalives_off(self) -> None:
        h = Harness(config_text(extra="server: {sse_keepalive: 0}\n"))
        response, chunks, done = collect_stream(h, chat(stream=True, mock=self.SLOW))
        h.tick(1)
        assert keepalive_timers(h) == []
        h.tick(10, 20)
        h.result(done)
        assert KEEPALIVE not in b"".join(chunks)
        assert events(b"".join(chunks))[-1] == "data: [DONE]"

    def test_no_comment_is_cached_neither_ours_nor_the_upstreams(self) -> None:
        h = Harness()
        body = chat(stream=True, mock={**self.SLOW, "comment": "PROCESSING"})
        response, chunks, done = collect_stream(h, body)
        h.tick(10, 20)
        h.result(done)
        live = b"".join(chunks)
        # The live client got both kinds of comment: the upstream's before each event.
        assert live.count(KEEPALIVE) == 6 and live.count(b": PROCESSING\n\n") == 4
        hit = h.request("POST", "/v1/chat/completions", body)
        assert hit.header("x-llmproxy-cache") == "hit"
        assert hit.body == live.replace(KEEPALIVE, b"").replace(b": PROCESSING\n\n", b"")
        assert not [line for line in hit.body.split(b"\n") if line.startswith(b":")]
        assert events(hit.body)[-1] == "data: [DONE]"
        assert len(h.seen()) == 1

    def test_only_comment_lines_make_a_comment(self) -> None:
        parsed = SSEParser().feed(
            b": PROCESSING\n\n:\r\n\r\n: note\ndata: x\n\ndata:\n\nid: 7\n\nevent: ping\n\n"
        )
        assert [e.is_comment for e in parsed] == [True, True, False, False, False, False]

    def test_keepalives_do_not_hold_off_the_upstream_stream_idle_timeout(self) -> None:
        # Only when the operator bounds the silence between events (off by default).
        h = Harness(config_text(timeouts="{stream_idle: 50}"))
        response, chunks, done = collect_stream(
            h, chat(stream=True, mock={"stall_after_headers": True, "stall_after": 2})
        )
        h.tick(5, 9)
        self.assertNoResult(done)
        h.tick(5)  # 50 s of upstream silence, though the client got a comment every 15 s
        h.result(done)
        assert shape(b"".join(chunks)) == ["event", "event", "ka", "ka", "ka", "error"]
        found = events(b"".join(chunks))
        error = json.loads(found[-1].split("data: ", 1)[1])["error"]
        assert error["code"] == "upstream_timeout"
        assert "stream_idle timeout of 50s" in error["message"]
        assert h.mocks["a"].stats["disconnects"] == 1
        assert keepalive_timers(h) == []
