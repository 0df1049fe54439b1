"""Balancing, failover, cooldowns and affinity, driven by a Clock."""

from __future__ import annotations

from collections import Counter
from typing import Any

import treq
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH

from llmproxy.config import Target, parse_yaml
from llmproxy.failures import Kind, UpstreamFailure
from llmproxy.routing.balancing import LeastBusy, RoundRobin
from llmproxy.routing.health import LocalHealth
from llmproxy.routing.plan import Attempt, Plan
from llmproxy.routing.router import Router
from tests.harness import Harness, Refused, chat, config_text, events, hang_up, router, run, three


def take(plan: Plan) -> Attempt:
    """The plan's next attempt (there must be one)."""
    attempt = run(plan.next())
    assert attempt is not None, "the plan has no target left"
    return attempt


def picks(r: Router, count: int) -> list[str]:
    """Who gets each of ``count`` requests, each over before the next."""
    model = r.models["m1"]
    out = []
    for _ in range(count):
        with take(run(r.plan(model))) as attempt:
            out.append(attempt.target.upstream)
    return out


def report(r: Router, target_id: str) -> dict[str, object]:
    """What /health would say of a target."""
    return r.status()[target_id].as_json()


def fail_target(
    r: Router,
    name: str,
    kind: Kind = Kind.CONNECT,
    status: int | None = None,
    retry_after: float | None = None,
) -> None:
    target = next(t for t in r.models["m1"].targets if t.upstream == name)
    run(r.failed(target, UpstreamFailure(kind, "x", status=status, retry_after=retry_after), False))


# -- through the gateway, with three in-memory mock upstreams -----------------------


def gateway(
    strategy: str = "round_robin",
    weights: tuple[int, int, int] = (1, 1, 1),
    extra: str = "",
    clients: dict[str, Any] | None = None,
) -> Harness:
    text = three(strategy, weights, extra) + "cache: {backend: off}\n"
    return Harness(text, mocks=("a", "b", "c"), clients=clients)


def one_slot(text: str) -> str:
    """The config with one connection to upstream a (so a leaked slot blocks the next request)."""
    return text.replace("api_key: ka\n", "api_key: ka\n    max_connections: 1\n")


def served_by(h: Harness, count: int, **body: Any) -> list[str | None]:
    """Which upstream answered each of ``count`` chat requests."""
    out = []
    for i in range(count):
        answer = h.request("POST", "/v1/chat/completions", chat(f"q{i}", **body))
        assert answer.code == 200, answer.body
        out.append(answer.header("x-llmproxy-upstream"))
    return out


class BrokenStream:
    """An upstream client whose streams break with a bug once their headers are in."""

    def __init__(self) -> None:
        self.calls = 0

    def request(self, method: str, url: str, **kwargs: Any) -> Deferred[Any]:
        self.calls += 1
        return succeed(_BrokenResponse())


class _BrokenResponse:
    code = 200
    phrase = b"OK"
    length = UNKNOWN_LENGTH
    headers = Headers({"content-type": ["text/event-stream"]})

    def deliverBody(self, protocol: Any) -> None:
        raise RuntimeError("a bug after the headers")


class ReleaseOnErrorTests(SynchronousTestCase):
    def test_an_unexpected_error_gives_back_the_slot_and_the_count(self) -> None:
        broken = BrokenStream()
        h = Harness(
            one_slot(three("priority")) + "cache: {backend: off}\n",
            mocks=("a", "b", "c"),
            clients={"a": broken},
        )
        for i in range(2):  # the second finds the one connection slot free again
            answer = h.request("POST", "/v1/chat/completions", chat(f"x{i}", stream=True))
            assert answer.code == 500
        assert broken.calls == 2
        assert h.target("a/up-a")["inflight"] == 0
        assert len(self.flushLoggedErrors(RuntimeError)) == 2


class BalancingTests(SynchronousTestCase):
    def test_smooth_weighted_round_robin_is_nginx_sequence(self) -> None:
        r = router(three(weights=(5, 1, 1)))
        assert "".join(picks(r, 14)) == "aabacaa" * 2

    def test_round_robin_spreads_evenly(self) -> None:
        assert Counter(picks(router(three()), 30)) == {"a": 10, "b": 10, "c": 10}

    def test_round_robin_skips_excluded_targets_without_losing_balance(self) -> None:
        rr = RoundRobin()
        a, b, c = (Target(n, n, 1) for n in "abc")
        assert [rr.pick([a, b, c]).upstream for _ in range(3)] == ["a", "b", "c"]
        assert [rr.pick([a, c]).upstream for _ in range(4)] == ["a", "c", "a", "c"]

    def test_least_busy_prefers_fewest_inflight_per_weight_and_rotates_ties(self) -> None:
        inflight = {"a": 2, "b": 0, "c": 0}
        lb = LeastBusy(lambda t: inflight[t.upstream])
        a, b, c = Target("a", "a", 1), Target("b", "b", 1), Target("c", "c", 1)
        assert [lb.pick([a, b, c]).upstream for _ in range(4)] == ["b", "c", "b", "c"]
        heavy = Target("a", "a", 4)  # 2 in flight on weight 4 beats 1 on weight 1
        inflight.update(b=1, c=1)
        assert lb.pick([heavy, b, c]).upstream == "a"

    def test_least_busy_counts_requests_in_flight(self) -> None:
        r = router(three("least_busy"))
        model = r.models["m1"]
        held = []
        for _ in range(3):
            plan = run(r.plan(model))
            held.append(take(plan))
        assert sorted(a.target.upstream for a in held) == ["a", "b", "c"]
        held[1].release()  # that one is free again: it gets the next request
        assert picks(r, 1) == [held[1].target.upstream]

    def test_latency_prefers_the_faster_target_and_still_explores(self) -> None:
        clock = Clock()
        r = router(three("latency"), clock, seed=7)
        for name, ttfb in (("a", 0.5), ("b", 0.05), ("c", 0.9)):
            run(r.succeeded(Target(name, f"up-{name}", 1), ttfb))
        counts = Counter(picks(r, 2000))
        assert counts["b"] > counts["a"] > counts["c"] > 0  # c is still seen (exploration)
        assert counts["b"] > 1000

    def test_latency_tries_unmeasured_targets(self) -> None:
        r = router(three("latency"), seed=3)
        run(r.succeeded(Target("a", "up-a", 1), 0.01))
        run(r.succeeded(Target("b", "up-b", 1), 0.01))
        assert "c" in picks(r, 20)

    def test_random_is_weighted(self) -> None:
        counts = Counter(picks(router(three("random", (6, 3, 1)), seed=5), 10000))
        assert 5700 < counts["a"] < 6300 and 2700 < counts["b"] < 3300 and 800 < counts["c"] < 1200

    def test_priority_takes_targets_in_order(self) -> None:
        assert picks(router(three("priority")), 3) == ["a", "a", "a"]

    def test_even_spread_through_the_gateway(self) -> None:
        h = gateway()
        assert Counter(served_by(h, 30)) == {"a": 10, "b": 10, "c": 10}
        assert [len(h.seen(n)) for n in "abc"] == [10, 10, 10]


class CooldownTests(SynchronousTestCase):
    def test_cooldown_transitions(self) -> None:
        clock = Clock()
        r = router(
            three(
                "priority",
                extra="routing: {cooldown: {failures: 3, seconds: 10, max_seconds: 25}}\n",
            ),
            clock,
        )
        fail_target(r, "a")
        fail_target(r, "a")
        assert picks(r, 1) == ["a"]  # two failures: still healthy
        fail_target(r, "a")
        assert report(r, "a/up-a")["state"] == "cooling_down"
        assert picks(r, 3) == ["b", "b", "b"]  # a cooling target is left alone
        clock.advance(10)
        assert report(r, "a/up-a")["state"] == "half_open"
        model = r.models["m1"]
        probe_plan = run(r.plan(model))
        probe = take(probe_plan)
        assert probe.target.upstream == "a"  # exactly one probe goes through...
        assert report(r, "a/up-a")["state"] == "probing"
        assert picks(r, 2) == ["b", "b"]  # ...and nobody else meanwhile
        run(probe.failed(UpstreamFailure(Kind.CONNECT, "still down")))
        assert report(r, "a/up-a")["cooldown_remaining"] == 20  # doubled
        clock.advance(20)
        plan = run(r.plan(model))
        probe = take(plan)
        run(probe.failed(UpstreamFailure(Kind.TIMEOUT, "still down")))
        assert report(r, "a/up-a")["cooldown_remaining"] == 25  # capped
        clock.advance(25)
        plan = run(r.plan(model))
        with take(plan) as probe:
            run(probe.answered())  # the probe passes with its 2xx headers
        assert report(r, "a/up-a")["state"] == "healthy"
        assert picks(r, 2) == ["a", "a"]

    def test_probe_without_verdict_is_released(self) -> None:
        clock = Clock()
        r = router(
            three("priority", extra="routing: {cooldown: {failures: 1, seconds: 5}}\n"), clock
        )
        fail_target(r, "a")
        clock.advance(5)
        plan = run(r.plan(r.models["m1"]))
        take(plan).release()  # e.g. the client went away before the headers
        assert report(r, "a/up-a")["state"] == "half_open"
        assert picks(r, 1) == ["a"]

    def test_429_retry_after_cools_for_that_long(self) -> None:
        clock = Clock()
        r = router(three("priority"), clock)
        fail_target(r, "a", Kind.HTTP, 429, retry_after=7)
        found = report(r, "a/up-a")
        assert found["state"] == "cooling_down" and found["cooldown_remaining"] == 7
        clock.advance(7)
        assert report(r, "a/up-a")["state"] == "half_open"

    def test_client_errors_do_not_count_against_a_target(self) -> None:
        r = router(three("priority", extra="routing: {cooldown: {failures: 1}}\n"))
        fail_target(r, "a", Kind.HTTP, 400)
        fail_target(r, "a", Kind.HTTP, 404)
        assert report(r, "a/up-a")["state"] == "healthy"
        fail_target(r, "a", Kind.HTTP, 503)
        assert report(r, "a/up-a")["state"] == "cooling_down"

    def test_429_with_retry_after_fails_over_and_cools(self) -> None:
        h = gateway("priority")
        h.mocks["a"].config = {"status": 429, "headers": {"Retry-After": "30"}}
        assert served_by(h, 1) == ["b"]
        report = h.request("GET", "/health").json()["targets"]["a/up-a"]
        assert report["state"] == "cooling_down" and report["cooldown_remaining"] == 30
        assert served_by(h, 3) == ["b", "b", "b"]
        assert len(h.seen("a")) == 1
        h.clock.advance(30)
        h.mocks["a"].config = {}
        assert served_by(h, 2) == ["a", "a"]

    def test_streams_cut_after_headers_count_against_the_target(self) -> None:
        h = gateway("priority", extra="routing: {cooldown: {failures: 3, seconds: 60}}\n")
        h.mocks["a"].config = {"cut_after": 2}
        for i in range(3):
            answer = h.request("POST", "/v1/chat/completions", chat(f"c{i}", stream=True))
            assert answer.header("x-llmproxy-upstream") == "a" and b"event: error" in answer.body
        assert h.target("a/up-a")["state"] == "cooling_down"
        assert served_by(h, 1, stream=True) == ["b"]

    def test_a_probe_abandoned_while_being_claimed_is_released(self) -> None:
        class SlowClaim(LocalHealth):
            async def claim_probe(self, target: Target, ttl: float) -> bool:
                await Deferred()  # never answers: the request is cancelled meanwhile
                return True

        clock = Clock()
        config = parse_yaml(
            three("priority", extra="routing: {cooldown: {failures: 1}}\n"), "t", {}
        )
        r = Router(config, clock, health=SlowClaim())
        fail_target(r, "a")
        clock.advance(30)
        plan = run(r.plan(r.models["m1"]))
        pending = Deferred.fromCoroutine(plan.next())
        self.assertNoResult(pending)
        assert report(r, "a/up-a")["state"] == "probing"
        pending.cancel()
        self.failureResultOf(pending, CancelledError)
        assert report(r, "a/up-a")["state"] == "half_open"

    def test_failures_of_attempts_started_before_a_trip_do_not_extend_it(self) -> None:
        clock = Clock()
        r = router(
            three("priority", extra="routing: {cooldown: {failures: 3, seconds: 10}}\n"), clock
        )
        for _ in range(6):  # six hung requests time out together
            fail_target(r, "a", Kind.TIMEOUT)
        found = report(r, "a/up-a")
        assert found["state"] == "cooling_down" and found["cooldown_remaining"] == 10
        clock.advance(10)
        assert report(r, "a/up-a")["state"] == "half_open"

    def test_a_long_probe_does_not_close_the_target_to_others(self) -> None:
        one = "  m1:\n    targets:\n      - upstream: a\n"
        h = Harness(
            config_text(models=one) + "routing: {cooldown: {failures: 1, seconds: 10}}\n"
            "cache: {backend: off}\n"
        )
        h.mocks["a"].config = {"status": 500}
        assert h.request("POST", "/v1/chat/completions", chat("x")).code == 500
        h.clock.advance(10)
        h.mocks["a"].config = {}
        # The probe is a long stream; its 200 headers close the breaker at once.
        probe = h.start(
            "POST", "/v1/chat/completions", chat("probe", stream=True, mock={"interval": 5.0})
        )
        h.pump()
        assert h.target("a/m1")["state"] == "healthy"
        assert h.request("POST", "/v1/chat/completions", chat("meanwhile")).code == 200
        response = h.result(probe)
        chunks: list[bytes] = []
        done = treq.collect(response, chunks.append)
        h.tick(5, 20)
        h.result(done)
        assert events(b"".join(chunks))[-1] == "data: [DONE]"

    def test_an_older_exchange_ending_does_not_free_the_probe(self) -> None:
        clock = Clock()
        r = router(
            "upstreams:\n  a: {base_url: 'http://a/v1'}\n  b: {base_url: 'http://b/v1'}\n"
            "models:\n  m1:\n    strategy: priority\n    targets: [{upstream: a}, {upstream: b}]\n"
            "routing: {cooldown: {failures: 1, seconds: 10}}\n",
            clock,
        )
        model = r.models["m1"]
        old = run(r.plan(model))
        long_stream = take(old)  # a long stream on a, begun while it was healthy
        tripper = take(run(r.plan(model)))
        run(tripper.failed(UpstreamFailure(Kind.HTTP, "x", status=500)))
        clock.advance(10)
        probe = take(run(r.plan(model)))
        assert probe.target.upstream == "a" and report(r, "a/m1")["state"] == "probing"
        long_stream.release()  # the old stream ends: the probe is still the probe's
        assert report(r, "a/m1")["state"] == "probing"
        assert take(run(r.plan(model))).target.upstream == "b"  # no second probe


class FailoverTests(SynchronousTestCase):
    def test_fallback_tier_only_when_weighted_targets_are_out(self) -> None:
        clock = Clock()
        r = router(
            three("round_robin", (1, 1, 0), extra="routing: {cooldown: {failures: 1}}\n"), clock
        )
        assert "c" not in picks(r, 10)
        fail_target(r, "a")
        fail_target(r, "b")
        assert picks(r, 2) == ["c", "c"]

    def test_fallback_tier_within_one_request(self) -> None:
        r = router(three("round_robin", (1, 1, 0)))
        plan = run(r.plan(r.models["m1"]))
        first, second = take(plan), take(plan)
        assert {first.target.upstream, second.target.upstream} == {"a", "b"}
        assert take(plan).target.upstream == "c"  # both weighted ones tried: the fallback

    def test_retries_bound_the_attempts(self) -> None:
        r = router(three(extra="routing: {retries: 1}\n"))
        plan = run(r.plan(r.models["m1"]))
        assert run(plan.next()) is not None and run(plan.next()) is not None
        assert run(plan.next()) is None

    def test_failover_from_refused_and_500_targets(self) -> None:
        h = gateway(clients={"a": Refused()})
        h.mocks["b"].config = {"status": 500}
        assert set(served_by(h, 9)) == {"c"}
        # a and b are now cooling: c serves without any failed attempt first.
        before = len(h.seen("b"))
        served_by(h, 3)
        assert len(h.seen("b")) == before

    def test_4xx_is_not_retried(self) -> None:
        h = gateway("priority")
        h.mocks["a"].config = {"status": 422}
        answer = h.request("POST", "/v1/chat/completions", chat())
        assert answer.code == 422 and answer.header("x-llmproxy-upstream") == "a"
        assert len(h.seen("b")) == 0 and len(h.seen("c")) == 0

    def test_every_try_failing_passes_the_last_http_error(self) -> None:
        h = gateway("priority")
        for name in "abc":
            h.mocks[name].config = {"status": 503}
        answer = h.request("POST", "/v1/chat/completions", chat())
        assert answer.code == 503
        assert answer.json()["error"]["message"] == "mock c failed with 503"
        assert [len(h.seen(n)) for n in "abc"] == [1, 1, 1]

    def test_every_try_refused_is_502(self) -> None:
        h = gateway(clients={n: Refused() for n in "abc"})
        answer = h.request("POST", "/v1/chat/completions", chat())
        assert answer.code == 502 and answer.json()["error"]["code"] == "bad_gateway"
        assert answer.header("x-llmproxy-upstream") in ("a", "b", "c")  # the last one tried

    def test_hanging_target_times_out_then_fails_over(self) -> None:
        h = gateway("priority", extra="")
        h.mocks["a"].config = {"hang": True}
        d = h.start("POST", "/v1/chat/completions", chat())
        h.clock.advance(120)  # first_byte default
        h.pump()
        response = h.result(d)
        assert response.code == 200
        assert response.headers.getRawHeaders("x-llmproxy-upstream") == ["b"]

    def test_stream_cut_is_not_retried(self) -> None:
        h = gateway("priority")
        h.mocks["a"].config = {"cut_after": 2}
        answer = h.request("POST", "/v1/chat/completions", chat(stream=True))
        assert answer.code == 200 and b"event: error" in answer.body
        assert len(h.seen("b")) == 0

    def test_every_strategy_serves_and_fails_over(self) -> None:
        for strategy in ("round_robin", "least_busy", "latency", "random", "priority"):
            h = gateway(strategy, clients={"b": Refused()})
            assert "b" not in served_by(h, 12), strategy

    def test_non_json_upstream_errors_are_wrapped_json_ones_pass(self) -> None:
        h = gateway("priority", extra="routing: {retries: 0}\n")
        h.mocks["a"].config = {"status": 503, "body": "<html>bad gateway</html>"}
        answer = h.request("POST", "/v1/chat/completions", chat("html"))
        assert answer.code == 503 and answer.header("content-type") == "application/json"
        assert answer.json()["error"]["code"] == "upstream_error"
        body = {
            "error": {
                "message": "overloaded",
                "type": "server_error",
                "param": None,
                "code": "overloaded",
            }
        }
        h.mocks["a"].config = {"status": 529, "body": body}
        passed = h.request("POST", "/v1/chat/completions", chat("json"))
        assert passed.code == 529 and passed.json() == body


class AffinityTests(SynchronousTestCase):
    def test_affinity_across_follow_ups(self) -> None:
        h = gateway()
        first = h.request("POST", "/v1/responses", {"model": "m1", "input": "start"})
        owner = first.header("x-llmproxy-upstream") or "?"
        rid = first.json()["id"]
        for i in range(10):
            answer = h.request(
                "POST",
                "/v1/responses",
                {
                    "model": "m1",
                    "input": f"follow {i}",
                    "previous_response_id": rid,
                },
            )
            assert answer.code == 200 and answer.header("x-llmproxy-upstream") == owner
            rid = answer.json()["id"]
        assert len(h.seen(owner)) == 11

    def test_affinity_to_an_unusable_target_is_a_clear_503(self) -> None:
        h = gateway(extra="routing: {cooldown: {failures: 1}}\n")
        first = h.request("POST", "/v1/responses", {"model": "m1", "input": "start"})
        owner = first.header("x-llmproxy-upstream") or "?"
        rid = first.json()["id"]
        h.mocks[owner].config = {"status": 500}
        # Fail the owner once with a fresh request (round robin reaches it in three).
        for i in range(3):
            h.request("POST", "/v1/chat/completions", chat(f"x{i}"))
        answer = h.request(
            "POST", "/v1/responses", {"model": "m1", "input": "again", "previous_response_id": rid}
        )
        assert answer.code == 503
        assert rid in answer.json()["error"]["message"]
        assert h.request("GET", f"/v1/responses/{rid}").code == 503


class HealthCheckTests(SynchronousTestCase):
    def test_active_health_checks(self) -> None:
        h = gateway(
            "priority",
            extra="routing: {cooldown: {failures: 1, seconds: 300},"
            " health_checks: {interval: 10, timeout: 5}}\n",
        )
        h.mocks["a"].config = {"status": 500}
        assert h.checks is not None
        h.checks.startService()  # the first round of checks runs at once
        h.pump()
        assert [r["path"] for r in h.seen("a")] == ["/v1/models"]
        assert h.target("a/up-a")["state"] == "cooling_down"
        h.mocks["a"].config = {}
        h.tick(10)
        # A passing check lets the target be probed now, not in 300 seconds.
        assert h.target("a/up-a")["state"] == "half_open"
        assert served_by(h, 1) == ["a"]
        h.checks.stopService()
        h.tick(10)
        assert [r["path"] for r in h.seen("a")].count("/v1/models") == 2  # no more checks

    def test_a_check_that_times_out_counts_against_the_upstream(self) -> None:
        h = gateway(
            "priority",
            extra="routing: {cooldown: {failures: 1, seconds: 300},"
            " health_checks: {interval: 60, timeout: 5}}\n",
        )
        h.mocks["a"].config = {"hang": True}
        assert h.checks is not None
        h.checks.startService()
        h.pump()
        assert h.target("a/up-a")["state"] == "healthy"
        h.tick(5)
        assert h.target("a/up-a")["state"] == "cooling_down"
        assert len(h.seen("b")) == 1  # and the round went on to the next upstream
        h.checks.stopService()

    def test_stopping_does_not_wait_for_a_check_under_way(self) -> None:
        h = gateway("priority", extra="routing: {health_checks: {interval: 10, timeout: 5}}\n")
        h.mocks["a"].config = {"hang": True}
        assert h.checks is not None
        h.checks.startService()
        h.pump()
        stopped = h.checks.stopService()
        h.pump()
        self.successResultOf(stopped)  # at once, not after the check's 5s timeout
        h.tick(5)
        assert h.seen("b") == []  # the round was cut short, not carried on


class SlotTests(SynchronousTestCase):
    def test_connection_slots_are_released_on_every_path(self) -> None:
        h = Harness(one_slot(three("priority")) + "cache: {backend: off}\n", mocks=("a", "b", "c"))
        h.request("POST", "/v1/chat/completions", chat("ok"))
        h.request("POST", "/v1/chat/completions", chat("cut", stream=True, mock={"cut_after": 1}))
        h.request("POST", "/v1/chat/completions", chat("err", mock={"status": 400}))
        d = h.start(
            "POST",
            "/v1/chat/completions",
            chat("gone", stream=True, mock={"interval": 1.0, "infinite": True}),
        )
        response = h.result(d)
        hang_up(response)
        h.pump()
        # With a leaked slot this would wait for a free connection instead.
        assert served_by(h, 1) == ["a"]
        assert h.target("a/up-a")["inflight"] == 0
