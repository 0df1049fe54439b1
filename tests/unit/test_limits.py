"""Per-key limits on a Clock: sliding window, tokens charged from usage."""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from llmproxy.auth import Principal
from llmproxy.config import ApiKey
from llmproxy.errors import APIError
from llmproxy.limits import MemoryLimiter, estimate, retry_after
from tests.harness import Harness, chat, config_text, hang_up


class WindowTests(SynchronousTestCase):
    def test_sliding_estimate_and_retry_after(self) -> None:
        assert estimate(previous=60, current=0, now=30.0) == 30  # half of the last minute
        assert estimate(previous=60, current=10, now=45.0) == 25
        # 10 allowed, 20 in the previous minute, none now: free once 10 of them slid out.
        assert retry_after(previous=20, current=0, limit=10, now=60.0) == 30
        assert retry_after(previous=0, current=10, limit=10, now=75.0) == 45
        # Full this minute: free only when enough of it has slid out of the next one.
        assert retry_after(previous=0, current=2, limit=1, now=0.0) == 90
        assert retry_after(previous=4, current=2, limit=1, now=30.0) == 60

    def test_rpm_slides_with_the_clock(self) -> None:
        clock = Clock()
        limiter = MemoryLimiter(clock)
        who = Principal("k", ApiKey(name="k", key="x", rpm=2))

        def check() -> Deferred[None]:
            return Deferred.fromCoroutine(limiter.check(who))

        self.successResultOf(check())
        self.successResultOf(check())
        refused = self.failureResultOf(check(), APIError).value
        # Two more minutes' worth? No: at t=90 the first minute counts half (1 of 2).
        assert refused.status == 429 and refused.headers["Retry-After"] == "90"
        clock.advance(89)
        self.failureResultOf(check(), APIError)  # the advice was not too short
        clock.advance(1)  # t=90: the estimate is 1
        self.successResultOf(check())
        self.failureResultOf(check(), APIError)


class TokenChargeTests(SynchronousTestCase):
    def test_tpm_counts_usage_tokens(self) -> None:
        text = (
            config_text()
            + ("auth:\n  keys:\n    - {name: t, key: tk, tpm: 10}\n")
            + "cache: {backend: off}\n"
        )
        h = Harness(text)
        auth = {"Authorization": "Bearer tk"}
        first = h.request("POST", "/v1/chat/completions", chat("one two three"), headers=auth)
        assert first.code == 200 and first.json()["usage"]["total_tokens"] == 11  # 3 in, 8 out
        over = h.request("POST", "/v1/chat/completions", chat("again"), headers=auth)
        assert over.code == 429 and "tokens per minute" in over.json()["error"]["message"]
        h.clock.advance(120)
        assert h.request("POST", "/v1/chat/completions", chat("later"), headers=auth).code == 200

    def test_streamed_usage_is_charged_too(self) -> None:
        text = config_text() + "auth:\n  keys:\n    - {name: t, key: tk, tpm: 5}\n"
        h = Harness(text)
        auth = {"Authorization": "Bearer tk"}
        body = chat("x", stream=True, stream_options={"include_usage": True})
        assert h.request("POST", "/v1/chat/completions", body, headers=auth).code == 200
        assert h.request("POST", "/v1/chat/completions", chat("y"), headers=auth).code == 429

    def test_streams_without_usage_are_still_charged(self) -> None:
        h = Harness(
            config_text()
            + "auth:\n  keys:\n    - {name: t, key: k, tpm: 20}\ncache: {backend: off}\n"
        )
        auth = {"Authorization": "Bearer k"}
        codes = [
            h.request("POST", "/v1/chat/completions", chat(f"s{i}", stream=True), headers=auth).code
            for i in range(4)
        ]
        assert codes[0] == 200 and 429 in codes

    def test_refused_requests_are_not_charged(self) -> None:
        h = Harness(
            config_text()
            + "auth:\n  keys:\n    - {name: t, key: k, tpm: 1000}\ncache: {backend: off}\n"
        )
        auth = {"Authorization": "Bearer k"}
        huge = chat("x" * 8000, mock={"status": 400})  # e.g. context_length_exceeded
        assert h.request("POST", "/v1/chat/completions", huge, headers=auth).code == 400
        assert h.request("POST", "/v1/chat/completions", chat("small"), headers=auth).code == 200

    def test_a_stream_abandoned_half_way_is_still_charged(self) -> None:
        h = Harness(
            config_text()
            + "auth:\n  keys:\n    - {name: t, key: k, tpm: 300}\ncache: {backend: off}\n"
        )
        auth = {"Authorization": "Bearer k"}
        body = chat("y" * 1200, stream=True, mock={"interval": 1.0})  # about 300 prompt tokens
        response = h.result(h.start("POST", "/v1/chat/completions", body, headers=auth))
        h.tick(1)
        hang_up(response)
        h.pump()
        assert h.request("POST", "/v1/chat/completions", chat("z"), headers=auth).code == 429
