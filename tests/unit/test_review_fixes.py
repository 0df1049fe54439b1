"""
Regression tests for what reviews found: probes judged by their headers,
slow clients not blamed on targets, single-flight pacing, leaks on errors.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IPushProducer
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from llmproxy.cache.flight import Flight
from llmproxy.forwarder import UpstreamFailure, _BodyStream
from llmproxy.health import counts_against
from tests.harness import Harness, chat, config_text, events, hang_up
from tests.trial import trial_case

ONE = "  m1:\n    targets:\n      - upstream: a\n"


def test_a_long_probe_does_not_close_the_target_to_others() -> None:
    h = Harness(
        config_text(models=ONE) + "routing: {cooldown: {failures: 1, seconds: 10}}\n"
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
    assert h.gateway.router.health_report()["a/m1"]["state"] == "healthy"
    assert h.request("POST", "/v1/chat/completions", chat("meanwhile")).code == 200
    response = h.result(probe)
    chunks: list[bytes] = []
    done = response.collect(chunks.append)
    h.tick(5, 20)
    h.result(done)
    assert events(b"".join(chunks))[-1] == "data: [DONE]"


def test_total_timeout_of_a_paused_client_is_not_the_targets_fault() -> None:
    h = Harness()
    stream = _BodyStream(h.clock, lambda data: None, idle=5, remaining=100)
    stream.done.addErrback(lambda f: None)
    h.clock.advance(10)
    stream.pauseProducing()
    h.clock.advance(90)  # total fires while the client has held the stream paused
    assert stream.failed is not None and stream.failed.client_slow
    assert not counts_against(stream.failed)
    assert counts_against(UpstreamFailure("timeout", "total timeout"))


@implementer(IPushProducer)
class Upstream:
    def __init__(self) -> None:
        self.paused = False

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False

    def stopProducing(self) -> None:
        pass


class Sink:
    def __init__(self) -> None:
        self.written = b""
        self.aborted = False
        self.producer: Any = None

    gone = False

    def header(self, name: str, value: str) -> None:
        pass

    def start(self, status: int, headers: Any) -> None:
        pass

    def write(self, data: bytes) -> None:
        self.written += data

    def register_producer(self, producer: Any) -> None:
        self.producer = producer

    def unregister_producer(self) -> None:
        self.producer = None

    def abort(self) -> None:
        self.aborted = True


def test_the_fastest_follower_sets_the_pace_and_a_stuck_one_is_dropped() -> None:
    flight = Flight("k", max_record=1 << 20)
    flight.MAX_BACKLOG = 100
    fast, slow = Sink(), Sink()
    flight.follow(fast)
    slow_done = flight.follow(slow)
    slow_done.addErrback(lambda f: None)
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


class LeakTests(SynchronousTestCase):
    def test_an_unexpected_error_gives_back_the_slot_and_the_count(self) -> None:
        h = Harness(config_text() + "cache: {backend: off}\n")
        slots = h.gateway.pipeline.forwarder.slots["a"]
        full = slots.tokens

        async def broken(*args: Any) -> None:
            raise RuntimeError("a bug after the headers")

        h.gateway.pipeline._relay = broken  # type: ignore[method-assign]
        answer = h.request("POST", "/v1/chat/completions", chat("x", stream=True))
        assert answer.code == 500
        assert slots.tokens == full
        assert h.gateway.router.inflight.get("a/upstream-m1", 0) == 0
        assert len(self.flushLoggedErrors(RuntimeError)) == 1


def test_errors_of_a_shared_request_keep_their_headers() -> None:
    from twisted.internet import error as ierror
    from twisted.internet.defer import fail

    class Refused:
        def request(self, method: str, url: str, **kwargs: Any) -> Any:
            return fail(ierror.ConnectionRefusedError("refused"))

    h = Harness(clients={"a": Refused()})  # the memory cache is on: a flight
    answer = h.request("POST", "/v1/chat/completions", chat("x"))
    assert answer.code == 502
    assert answer.header("x-llmproxy-upstream") == "a"
    assert answer.header("x-llmproxy-cache") == "miss"


def test_unusable_previous_response_ids_are_refused_without_touching_redis() -> None:
    h = Harness(config_text() + "auth:\n  keys:\n    - {name: t, key: k}\n")
    answer = h.request(
        "POST",
        "/v1/responses",
        {
            "model": "m1",
            "input": "x",
            "previous_response_id": "\ud800" * 3,
        },
        headers={"Authorization": "Bearer k"},
    )
    assert answer.code == 404
    assert answer.json()["error"]["param"] == "previous_response_id"
    assert h.seen() == []


def test_streams_without_usage_are_still_charged() -> None:
    h = Harness(
        config_text() + "auth:\n  keys:\n    - {name: t, key: k, tpm: 20}\ncache: {backend: off}\n"
    )
    auth = {"Authorization": "Bearer k"}
    codes = [
        h.request("POST", "/v1/chat/completions", chat(f"s{i}", stream=True), headers=auth).code
        for i in range(4)
    ]
    assert codes[0] == 200 and 429 in codes


def test_only_connection_trouble_makes_redis_back_off() -> None:
    import txredisapi
    from twisted.internet.defer import Deferred, fail
    from twisted.internet.task import Clock

    from llmproxy.redisclient import RedisUnavailable, SharedRedis

    class Connection:
        error: Exception

        def get(self, key: str) -> Any:
            return fail(self.error)

    connection = Connection()
    redis = SharedRedis(Clock(), "redis://x", 0.25, connection=connection)

    def outcome() -> Any:
        results: list[Any] = []
        Deferred.fromCoroutine(redis.call("get", "k")).addBoth(results.append)
        return results[0]

    connection.error = txredisapi.InvalidData("cannot encode")
    assert outcome().check(RedisUnavailable) and redis.available  # one call's problem
    connection.error = txredisapi.ResponseError("ERR invalid expire time")
    assert outcome().check(RedisUnavailable) and redis.available
    connection.error = txredisapi.ConnectionError("Not connected")
    assert outcome().check(RedisUnavailable) and not redis.available  # Redis is away


def test_refused_requests_are_not_charged() -> None:
    h = Harness(
        config_text() + "auth:\n  keys:\n    - {name: t, key: k, tpm: 1000}\n"
        "cache: {backend: off}\n"
    )
    auth = {"Authorization": "Bearer k"}
    huge = chat("x" * 8000, mock={"status": 400})  # e.g. context_length_exceeded
    assert h.request("POST", "/v1/chat/completions", huge, headers=auth).code == 400
    assert h.request("POST", "/v1/chat/completions", chat("small"), headers=auth).code == 200


def test_a_stream_abandoned_half_way_is_still_charged() -> None:
    h = Harness(
        config_text() + "auth:\n  keys:\n    - {name: t, key: k, tpm: 300}\ncache: {backend: off}\n"
    )
    auth = {"Authorization": "Bearer k"}
    body = chat("y" * 1200, stream=True, mock={"interval": 1.0})  # about 300 prompt tokens
    response = h.result(h.start("POST", "/v1/chat/completions", body, headers=auth))
    h.clock.advance(1)
    h.pump()
    hang_up(response)
    h.pump()
    assert h.request("POST", "/v1/chat/completions", chat("z"), headers=auth).code == 429


def test_an_older_exchange_ending_does_not_free_the_probe() -> None:
    from twisted.internet.task import Clock

    from llmproxy.forwarder import UpstreamFailure as Failure
    from tests.unit.test_routing import router, run

    clock = Clock()
    r = router(
        "upstreams:\n  a: {base_url: 'http://a/v1'}\n  b: {base_url: 'http://b/v1'}\n"
        "models:\n  m1:\n    strategy: priority\n    targets: [{upstream: a}, {upstream: b}]\n"
        "routing: {cooldown: {failures: 1, seconds: 10}}\n",
        clock,
    )
    model = r.models["m1"]
    old = run(r.plan(model))
    old_target = run(old.next())  # a long stream on a, begun while it was healthy
    tripper = run(r.plan(model))
    target = run(tripper.next())
    run(tripper.failed(target, Failure("http", "x", status=500)))
    clock.advance(10)
    probe_plan = run(r.plan(model))
    probe = run(probe_plan.next())
    assert probe.upstream == "a" and r.health_report()["a/m1"]["state"] == "probing"
    old.finished(old_target)  # the old stream ends: the probe is still the probe's
    assert r.health_report()["a/m1"]["state"] == "probing"
    assert run(run(r.plan(model)).next()).upstream == "b"  # no second probe


def test_a_follower_joining_while_all_are_paused_is_served() -> None:
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


TrialTests = trial_case(globals())
