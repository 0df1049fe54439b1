"""Per-key limits on a Clock: sliding window, rate-limit headers, tokens charged from usage."""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from llmproxy.auth import Principal
from llmproxy.config import ApiKey
from llmproxy.errors import APIError
from llmproxy.limits import Admission, MemoryLimiter, duration, estimate, retry_after
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

        def check() -> Deferred[Admission]:
            return Deferred.fromCoroutine(limiter.admit(who))

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


class HeaderTests(SynchronousTestCase):
    """OpenAI's x-ratelimit-* headers: counting down, and when the window is empty again."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.limiter = MemoryLimiter(self.clock)

    def admit(self, who: Principal) -> dict[str, str]:
        return dict(self.successResultOf(Deferred.fromCoroutine(self.limiter.admit(who))).headers)

    def refused(self, who: Principal) -> APIError:
        return self.failureResultOf(Deferred.fromCoroutine(self.limiter.admit(who)), APIError).value

    def charge(self, who: Principal, tokens: int) -> None:
        self.successResultOf(Deferred.fromCoroutine(self.limiter.charge(who, tokens, None)))

    def test_the_numbers_count_down_and_reset_when_the_window_empties(self) -> None:
        who = Principal("k", ApiKey(name="k", key="x", rpm=3, tpm=100))
        assert self.admit(who) == {
            "x-ratelimit-limit-requests": "3",
            "x-ratelimit-remaining-requests": "2",
            # This minute's request decays through all of the next one.
            "x-ratelimit-reset-requests": "2m0s",
            "x-ratelimit-limit-tokens": "100",
            "x-ratelimit-remaining-tokens": "100",
            "x-ratelimit-reset-tokens": "0s",
        }
        self.clock.advance(15)
        second = self.admit(who)
        assert second["x-ratelimit-remaining-requests"] == "1"
        assert second["x-ratelimit-reset-requests"] == "1m45s"
        self.charge(who, 30)
        self.clock.advance(15.5)
        third = self.admit(who)
        assert third["x-ratelimit-remaining-requests"] == "0"
        assert third["x-ratelimit-reset-requests"] == "1m29.5s"
        assert third["x-ratelimit-remaining-tokens"] == "70"
        assert third["x-ratelimit-reset-tokens"] == "1m29.5s"
        # A refusal carries them too, beside its Retry-After; it counts nothing.
        over = self.refused(who)
        assert over.headers["x-ratelimit-remaining-requests"] == "0"
        assert over.headers["x-ratelimit-reset-requests"] == "1m29.5s"
        assert over.headers["x-ratelimit-remaining-tokens"] == "70"
        assert "Retry-After" in over.headers
        # t=100: the first minute's 3 requests and 30 tokens count a third.
        self.clock.advance(100 - self.clock.seconds())
        later = self.admit(who)
        assert later["x-ratelimit-remaining-requests"] == "1"  # 3 - (1 + 1)
        assert later["x-ratelimit-reset-requests"] == "1m20s"
        assert later["x-ratelimit-remaining-tokens"] == "90"
        assert later["x-ratelimit-reset-tokens"] == "20s"  # the previous minute slides out
        self.clock.advance(200)
        assert self.admit(who)["x-ratelimit-remaining-tokens"] == "100"

    def test_a_tokens_refusal_carries_the_headers(self) -> None:
        who = Principal("k", ApiKey(name="k", key="x", tpm=10))
        self.charge(who, 10)
        over = self.refused(who)
        assert "tokens per minute" in over.message
        assert over.headers["x-ratelimit-limit-tokens"] == "10"
        assert over.headers["x-ratelimit-remaining-tokens"] == "0"
        assert over.headers["x-ratelimit-reset-tokens"] == "2m0s"
        assert "x-ratelimit-limit-requests" not in over.headers  # no rpm: no request headers

    def test_only_the_limits_a_key_has(self) -> None:
        requests = self.admit(Principal("r", ApiKey(name="r", key="x", rpm=5)))
        assert sorted(requests) == [
            "x-ratelimit-limit-requests",
            "x-ratelimit-remaining-requests",
            "x-ratelimit-reset-requests",
        ]
        assert self.admit(Principal("u", ApiKey(name="u", key="y"))) == {}
        assert self.admit(Principal("anonymous")) == {}

    def test_resets_are_written_as_openai_does(self) -> None:
        assert duration(0) == "0s"
        assert duration(0.02) == "20ms"
        assert duration(0.0004) == "1ms"  # rounded up: never too early
        assert duration(1) == "1s"
        assert duration(1.5) == "1.5s"
        assert duration(59.999) == "59.999s"
        assert duration(90) == "1m30s"
        assert duration(360) == "6m0s"
        assert duration(3723.25) == "1h2m3.25s"
        assert duration(120 - 30.0) == "1m30s"  # no float noise


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
