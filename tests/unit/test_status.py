"""
The status page in memory: the snapshot (traffic ring, targets, cache, keys,
process), the page rendered server-side (what a browser without JavaScript
shows), the guard it shares with /stats, the event stream (a snapshot a
second; it ends with its client, on drain, and follows a reload), and that no
key ever appears.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from llmproxy.config import parse_yaml
from llmproxy.status import WINDOW, Headroom, Traffic, go_duration, quantile, render_page
from tests.harness import Harness, chat, config_text

UPSTREAM_SECRET = "sk-upstream-a-secret"
KEYS = """
auth:
  keys:
    - {name: alice, key: sk-alice-0001, rpm: 10, tpm: 1000}
    - {name: bob, key: sk-bob-0002, budget: {usd: 5}}
  admin_keys: [sk-admin-0003]
"""
COOLING = "\nrouting:\n  cooldown: {failures: 1, seconds: 30}\n"
TWO = """
  m1:
    targets:
      - upstream: a
        model: upstream-m1
  m2:
    targets:
      - upstream: b
        model: upstream-m2
"""
ADMIN = {"authorization": "Bearer sk-admin-0003"}
ALICE = {"authorization": "Bearer sk-alice-0001"}
BOB = {"authorization": "Bearer sk-bob-0002"}
PRICE = "\n    price: {input: 1000000, output: 1000000}\n"


def harness(extra: str = KEYS + COOLING) -> Harness:
    text = config_text({"a": UPSTREAM_SECRET, "b": "sk-upstream-b-secret"}, extra, models=TWO)
    return Harness(text, mocks=("a", "b"))


def snapshot(h: Harness, headers: dict[str, str] | None = None) -> dict[str, Any]:
    """The snapshot the page was rendered from (its embedded JSON)."""
    page = h.request("GET", "/status", headers=ADMIN if headers is None else headers)
    assert page.code == 200, page.body
    text = page.body.decode()
    start = text.index('<script id="snapshot" type="application/json">') + 46
    found: dict[str, Any] = json.loads(text[start : text.index("</script>", start)])
    return found


def row(rows: list[dict[str, Any]], **match: Any) -> dict[str, Any]:
    return next(r for r in rows if all(r[k] == v for k, v in match.items()))


class Stream(Protocol):
    """An open /status/events: its bytes as they arrive, and its events."""

    def __init__(self, h: Harness, headers: dict[str, str] | None = None) -> None:
        self.h = h
        self.response = h.result(h.start("GET", "/status/events", headers=headers or ADMIN))
        self.chunks: list[bytes] = []
        self.done: Deferred[None] = Deferred()
        self.response.deliverBody(self)

    def dataReceived(self, data: bytes) -> None:
        self.chunks.append(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.done.callback(None)

    def hang_up(self) -> None:
        """The client goes away."""
        transport: Any = self.transport  # the response body's producer
        transport.stopProducing()
        self.h.pump()

    @property
    def text(self) -> str:
        return b"".join(self.chunks).decode()

    def snapshots(self) -> list[dict[str, Any]]:
        blocks = [b for b in self.text.split("\n\n") if b.startswith("data: {")]
        return [json.loads(b[len("data: ") :]) for b in blocks]


class TrafficTests(SynchronousTestCase):
    def test_a_second_counts_requests_errors_and_timings(self) -> None:
        traffic = Traffic()
        for duration in (0.1, 0.1, 0.1, 2.0):
            traffic.add(100.5, 200, duration, duration / 2)
        traffic.add(100.9, 502, 0.2, 0.1)
        at, requests, errors, p50, p95, t50, t95 = traffic.summary(101.2)["last"]
        assert (at, requests, errors) == (100, 5, 1)
        assert abs(p50 - 0.1) < 0.006 and abs(p95 - 2.0) < 0.1
        assert abs(t50 - 0.05) < 0.003 and abs(t95 - 1.0) < 0.05

    def test_the_window_is_five_minutes_and_forgets_what_is_older(self) -> None:
        traffic = Traffic()
        traffic.add(10.0, 200, 0.1, 0.1)
        traffic.add(10.0, 500, 0.1, 0.1)
        summary = traffic.summary(11.0)
        assert summary["requests"] == 2 and summary["error_rate"] == 0.5
        assert summary["rps"] == round(2 / WINDOW, 3)
        assert traffic.history(11.0) == [summary["last"]]
        traffic.add(10.0 + WINDOW, 200, 0.1, 0.1)  # the same slot of the ring, a lap later
        later = traffic.summary(11.0 + WINDOW)
        assert later["requests"] == 1 and later["error_rate"] == 0.0
        assert [r[0] for r in traffic.history(11.0 + WINDOW)] == [10 + WINDOW]

    def test_quantiles_of_nothing_are_none(self) -> None:
        assert quantile({}, 0.5) is None
        assert Traffic().summary(5.0)["p95"] is None

    def test_headroom_is_the_last_admission_until_its_window_empties(self) -> None:
        headroom = Headroom()
        headers = {
            "x-ratelimit-limit-requests": "10",
            "x-ratelimit-remaining-requests": "7",
            "x-ratelimit-reset-requests": "1m30s",
        }
        headroom.saw("alice", headers, 100.0)
        assert headroom.of("alice", 150.0) == {"requests": [7, 10]}
        assert headroom.of("alice", 190.0) == {"requests": [10, 10]}
        assert headroom.of("bob", 150.0) == {}
        assert go_duration("1m30s") == 90 and go_duration("20ms") == 0.02


class SnapshotTests(SynchronousTestCase):
    def test_a_cooling_target_shows_its_state_time_left_and_last_error(self) -> None:
        h = harness()
        assert h.request("POST", "/v1/chat/completions", chat(), ALICE).code == 200
        failed = h.request("POST", "/v1/chat/completions", chat(mock={"status": 500}), ALICE)
        assert failed.code == 500
        h.tick(2.0)
        targets = snapshot(h)["targets"]
        cooling = row(targets, model="m1")
        assert cooling["state"] == "cooling" and cooling["upstream"] == "a"
        assert cooling["upstream_model"] == "upstream-m1"
        assert 27 <= cooling["cooling_left"] <= 28
        assert cooling["last_error"] == "http: HTTP 500" and cooling["last_error_ago"] == 2.0
        assert row(targets, model="m2")["state"] == "up"
        assert row(targets, model="m2")["last_error"] is None

    def test_a_cooled_target_is_probing(self) -> None:
        h = harness()
        h.request("POST", "/v1/chat/completions", chat(mock={"status": 500}), ALICE)
        h.tick(31.0)
        assert row(snapshot(h)["targets"], model="m1")["state"] == "probing"

    def test_traffic_counts_model_calls_and_their_errors_not_the_operator(self) -> None:
        h = harness()
        h.request("POST", "/v1/chat/completions", chat(), ALICE)
        h.request("POST", "/v1/chat/completions", chat(mock={"status": 500}), ALICE)
        for _ in range(3):
            h.request("GET", "/stats", headers=ADMIN)
            h.request("GET", "/health")
        h.tick(1.0)
        snapshot(h)
        traffic = snapshot(h)["traffic"]
        assert traffic["requests"] == 2 and traffic["error_rate"] == 0.5
        assert traffic["last"][1:3] == [2, 1]

    def test_keys_show_requests_tokens_cost_budget_and_headroom_by_name(self) -> None:
        text = config_text({"a": UPSTREAM_SECRET, "b": "kb"}, KEYS, models=TWO)
        h = Harness(text.replace("    api_key: kb\n", "    api_key: kb" + PRICE), mocks=("a", "b"))
        h.request("POST", "/v1/chat/completions", chat(), ALICE)
        h.request("POST", "/v1/chat/completions", chat(model="m2"), BOB)
        keys = snapshot(h)["keys"]
        assert [k["name"] for k in keys] == ["alice", "bob"]
        alice, bob = keys
        assert alice["requests"] == 1 and alice["tokens"]["output"] > 0
        assert alice["headroom"] == {"requests": [9, 10], "tokens": [1000, 1000]}
        assert alice["budget"] is None and alice["cost_usd"] == 0.0
        assert bob["cost_usd"] > 0 and bob["headroom"] == {}
        assert bob["budget"] == {"usd": 5.0, "spent_usd": bob["cost_usd"]}

    def test_cache_counts_hits_entries_and_coalesced(self) -> None:
        h = harness()
        for _ in range(3):
            assert h.request("POST", "/v1/chat/completions", chat(), ALICE).code == 200
        cache = snapshot(h)["cache"]
        assert (cache["hits"], cache["misses"], cache["entries"]) == (2, 1, 1)
        assert cache["hit_ratio"] == round(2 / 3, 4) and cache["bytes"] > 0
        assert cache["coalesced"] == 0 and cache["skipped"] == {}

    def test_the_process_says_version_config_uptime_worker_and_redis(self) -> None:
        h = harness()
        h.tick(5.0)
        process = snapshot(h)["process"]
        assert process["config"] == "test" and process["redis"] == "not configured"
        assert process["uptime"] == 5.0 and process["loaded_ago"] == 5.0
        assert process["workers"] == [process["pid"]] and process["worker"] == 0
        h.gateway.apply(parse_yaml(config_text(extra=KEYS), "reloaded.yaml", {}))
        h.tick(1.0)
        process = snapshot(h)["process"]
        assert process["config"] == "reloaded.yaml"
        assert process["uptime"] == 6.0 and process["loaded_ago"] == 1.0


class PageTests(SynchronousTestCase):
    def test_the_page_is_a_static_table_without_javascript(self) -> None:
        h = harness()
        h.request("POST", "/v1/chat/completions", chat(mock={"status": 500}), ALICE)
        page = h.request("GET", "/status", headers=ADMIN)
        assert page.header("content-type") == "text/html; charset=utf-8"
        assert page.header("cache-control") == "no-store"
        assert "default-src 'none'" in (page.header("content-security-policy") or "")
        text = page.body.decode()
        for panel in ("traffic", "targets", "cache", "keys", "process"):
            assert f'<section id="{panel}">' in text
        assert '<tr class="cooling" data-target="a/upstream-m1"><td>m1</td>' in text
        assert '<td class="state">cooling 30s</td>' in text
        assert '<tr class="up" data-target="b/upstream-m2">' in text
        assert '<tr data-key="alice"><td>alice</td><td class="requests">1</td>' in text
        assert "<polyline" in text and "http://" not in text  # no CDN, no upstream URL
        assert '<div id="banner" hidden>' in text

    def test_names_are_escaped(self) -> None:
        h = harness()
        snap = snapshot(h)
        snap["targets"][0]["model"] = "<script>alert(1)</script>"
        snap["keys"][0]["name"] = '"><img src=x>'
        text = render_page(snap)
        assert "<script>alert(1)" not in text and "<img src=x>" not in text

    def test_no_key_or_secret_appears_in_the_page_or_the_stream(self) -> None:
        h = harness()
        h.request("POST", "/v1/chat/completions", chat(), ALICE)
        h.request("POST", "/v1/chat/completions", chat(model="m2"), BOB)
        h.request("POST", "/v1/chat/completions", chat(mock={"status": 500}), ALICE)
        stream = Stream(h)
        h.tick(1.0, 2)
        page = h.request("GET", "/status", headers=ADMIN).body.decode()
        assert len(stream.snapshots()) >= 2
        for secret in h.config.secrets():
            assert secret not in page and secret not in stream.text
        for name in ("alice", "bob"):
            assert name in page and name in stream.text
        stream.hang_up()


class GuardTests(SynchronousTestCase):
    def test_both_are_guarded_as_stats_is(self) -> None:
        h = harness()
        for path in ("/status", "/status/events", "/stats"):
            assert h.request("GET", path).code == 401
            assert h.request("GET", path, headers=ALICE).code == 401
        forwarded = {"x-forwarded-for": "203.0.113.9"}
        keys_only = harness(KEYS.replace("  admin_keys: [sk-admin-0003]\n", ""))
        for path in ("/status", "/status/events", "/stats"):
            assert keys_only.request("GET", path, headers=forwarded).code == 403
        assert keys_only.request("GET", "/status").code == 200
        assert harness("").request("GET", "/status", headers=forwarded).code == 200


class EventStreamTests(SynchronousTestCase):
    def test_a_snapshot_a_second_the_first_with_its_history(self) -> None:
        h = harness()
        h.request("POST", "/v1/chat/completions", chat(), ALICE)
        h.tick(1.0)
        stream = Stream(h)
        assert stream.response.headers.getRawHeaders("content-type") == [
            "text/event-stream; charset=utf-8"
        ]
        assert stream.response.headers.getRawHeaders("x-accel-buffering") == ["no"]
        assert stream.text.startswith("retry: 2000\n\n")
        first = stream.snapshots()
        assert len(first) == 1 and len(first[0]["history"]) == 1
        h.request("POST", "/v1/chat/completions", chat("again"), ALICE)
        h.tick(1.0, 3)
        later = stream.snapshots()[1:]
        assert len(later) == 3 and all("history" not in s for s in later)
        assert row(later[-1]["keys"], name="alice")["requests"] == 2
        assert later[0]["traffic"]["last"][1] == 1  # the second before it
        stream.hang_up()

    def test_it_ends_when_its_client_goes(self) -> None:
        h = harness()
        before = len(h.clock.getDelayedCalls())
        stream = Stream(h)
        h.tick(1.0)
        assert h.site.inflight.count == 1
        stream.hang_up()
        h.tick(1.0, 2)
        assert h.site.inflight.count == 0
        assert len(h.clock.getDelayedCalls()) == before

    def test_it_ends_cleanly_when_the_site_drains(self) -> None:
        h = harness()
        stream = Stream(h)
        h.tick(1.0)
        h.site.draining = True
        h.tick(1.0)
        assert stream.done.called and h.site.inflight.count == 0
        assert stream.text.endswith("event: bye\ndata: {}\n\n")

    def test_it_follows_a_reload_and_ends_when_the_caller_is_refused(self) -> None:
        h = harness()
        stream = Stream(h)
        added = config_text({"a": UPSTREAM_SECRET, "b": "kb"}, KEYS, models=TWO + "  m3:\n")
        added = added.replace("  m3:\n", "  m3:\n    targets:\n      - upstream: b\n")
        h.gateway.apply(parse_yaml(added, "test", {}))
        h.tick(1.0)
        assert [r["model"] for r in stream.snapshots()[-1]["targets"]] == ["m1", "m2", "m3"]
        other_admin = KEYS.replace("sk-admin-0003", "sk-admin-9999")
        h.gateway.apply(parse_yaml(config_text(extra=other_admin), "test", {}))
        h.tick(1.0, 2)
        assert stream.done.called and h.site.inflight.count == 0

    def test_it_takes_no_snapshot_while_the_client_does_not_read(self) -> None:
        h = harness()
        stream = Stream(h)
        h.pump()
        channel: Any = next(iter(h.site.channels))
        producer = channel.requests[0].producer  # the stream (wrapped in the send timer)
        assert producer is not None
        producer.pauseProducing()
        count = len(stream.snapshots())
        h.tick(1.0, 3)
        assert len(stream.snapshots()) == count
        producer.resumeProducing()
        h.tick(1.0)
        assert len(stream.snapshots()) == count + 1
        stream.hang_up()
