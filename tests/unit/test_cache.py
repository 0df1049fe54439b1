"""The response cache and single-flight, in memory: counted, never timed."""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.defer import fail
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from llmproxy.cache import MemoryBackend, cache_key, parse_controls
from llmproxy.config import Redis
from llmproxy.errors import APIError
from llmproxy.redisclient import SharedRedis
from tests.harness import Answer, Harness, chat, config_text, events, hang_up

KEYS = """
auth:
  keys:
    - {name: team-a, key: key-a}
    - {name: team-b, key: key-b}
"""


def cached(extra: str = "") -> Harness:
    return Harness(config_text() + extra)


def ask(
    h: Harness, body: Any, headers: dict[str, str] | None = None, path: str = "/v1/chat/completions"
) -> Answer:
    return h.request("POST", path, body, headers=headers)


# -- keys -------------------------------------------------------------------------


# -- non-streamed -----------------------------------------------------------------


class GoneRedis:
    """A Redis connection whose every command fails, as when the server is gone."""

    def __getattr__(self, command: str) -> Any:
        return lambda *args, **kwargs: fail(ConnectionError("Not connected"))


# -- streams ----------------------------------------------------------------------


class KeyTests(SynchronousTestCase):
    def test_key_covers_endpoint_model_body_and_scope(self) -> None:
        body = {"messages": [{"role": "user", "content": "x"}], "temperature": 0.2, "model": "m"}
        base = cache_key("ns", "chat/completions", "m", body, "team-a")
        assert base.startswith("ns:cache:") and len(base) == len("ns:cache:") + 64
        reordered = dict(reversed(list(body.items())))
        assert cache_key("ns", "chat/completions", "m", reordered, "team-a") == base
        assert (
            cache_key("ns", "chat/completions", "m", {**body, "cache": {"ttl": 5}}, "team-a")
            == base
        )
        for changed in (
            cache_key("ns", "completions", "m", body, "team-a"),
            cache_key("ns", "chat/completions", "m2", body, "team-a"),
            cache_key("ns", "chat/completions", "m", {**body, "temperature": 0.3}, "team-a"),
            cache_key("ns", "chat/completions", "m", {**body, "stream": True}, "team-a"),
            cache_key("ns", "chat/completions", "m", body, "team-b"),
            cache_key("ns", "chat/completions", "m", body, None),
            cache_key("other", "chat/completions", "m", body, "team-a"),
        ):
            assert changed != base

    def test_controls(self) -> None:
        assert parse_controls(None, None) == parse_controls("", {})
        assert (
            not parse_controls("no-cache", None).lookup and parse_controls("no-cache", None).store
        )
        ctl = parse_controls("max-age=0, no-store", None)
        assert not ctl.lookup and not ctl.store
        ctl = parse_controls(None, {"no-cache": True, "ttl": 5})
        assert not ctl.lookup and ctl.store and ctl.ttl == 5
        bad_controls: tuple[object, ...] = (
            {"ttl": -1},
            {"ttl": "5"},
            {"ttl": 1e17},
            {"ttl": float("inf")},
            {"ttl": float("nan")},
            {"no-store": "yes"},
            {"nope": True},
            [],
        )
        for bad in bad_controls:
            with self.assertRaises(APIError):
                parse_controls(None, bad)


class StoreTests(SynchronousTestCase):
    def test_repeat_is_a_hit_with_the_same_bytes(self) -> None:
        h = cached()
        first = ask(h, chat("same"))
        second = ask(h, chat("same"))
        assert first.header("x-llmproxy-cache") == "miss"
        assert second.header("x-llmproxy-cache") == "hit"
        assert second.body == first.body
        assert second.header("x-llmproxy-upstream") == "a"
        assert second.header("content-type") == "application/json"
        assert len(h.seen()) == 1

    def test_changed_temperature_misses_and_reordered_keys_hit(self) -> None:
        h = cached()
        ask(h, {"model": "m1", "temperature": 0.1, "messages": [{"role": "user", "content": "t"}]})
        hit = ask(
            h, {"messages": [{"content": "t", "role": "user"}], "temperature": 0.1, "model": "m1"}
        )
        assert hit.header("x-llmproxy-cache") == "hit"
        miss = ask(
            h, {"model": "m1", "temperature": 0.2, "messages": [{"role": "user", "content": "t"}]}
        )
        assert miss.header("x-llmproxy-cache") == "miss"
        assert len(h.seen()) == 2

    def test_other_endpoints_are_cached(self) -> None:
        for endpoint, body in (
            ("/v1/embeddings", {"model": "m1", "input": ["a"]}),
            ("/v1/completions", {"model": "m1", "prompt": "p"}),
            ("/v1/responses", {"model": "m1", "input": "r"}),
        ):
            h = cached()
            assert ask(h, body, path=endpoint).header("x-llmproxy-cache") == "miss", endpoint
            again = ask(h, body, path=endpoint)
            assert again.header("x-llmproxy-cache") == "hit", endpoint
            assert len(h.seen()) == 1, endpoint

    def test_errors_and_empty_answers_are_never_stored(self) -> None:
        h = cached()
        ask(h, chat("e", mock={"status": 500}))
        ask(h, chat("e", mock={"status": 500}))
        assert len(h.seen()) == 2  # the error was not served from the cache
        ask(h, chat("empty", mock={"text": ""}))
        assert ask(h, chat("empty", mock={"text": ""})).header("x-llmproxy-cache") == "miss"
        stats = h.request("GET", "/stats").json()["cache"]
        assert stats["stores"] == 0 and stats["skipped"]["incomplete_or_error"] == 4

    def test_scope_key_isolates_tenants(self) -> None:
        h = cached(KEYS)
        a = {"Authorization": "Bearer key-a"}
        b = {"Authorization": "Bearer key-b"}
        ask(h, chat("secret plan"), a)
        assert ask(h, chat("secret plan"), a).header("x-llmproxy-cache") == "hit"
        assert ask(h, chat("secret plan"), b).header("x-llmproxy-cache") == "miss"
        assert len(h.seen()) == 2

    def test_scope_shared_shares_between_tenants(self) -> None:
        h = cached(KEYS + "cache: {scope: shared}\n")
        ask(h, chat("common"), {"Authorization": "Bearer key-a"})
        again = ask(h, chat("common"), {"Authorization": "Bearer key-b"})
        assert again.header("x-llmproxy-cache") == "hit" and len(h.seen()) == 1

    def test_header_controls(self) -> None:
        h = cached()
        ask(h, chat("c"))
        refreshed = ask(h, chat("c"), {"Cache-Control": "no-cache"})
        assert refreshed.header("x-llmproxy-cache") == "bypass" and len(h.seen()) == 2
        assert ask(h, chat("c")).header("x-llmproxy-cache") == "hit"
        ask(h, chat("never"), {"Cache-Control": "no-store"})
        assert ask(h, chat("never")).header("x-llmproxy-cache") == "miss"

    def test_body_controls_and_ttl(self) -> None:
        h = cached()
        ask(h, chat("nostore", cache={"no-store": True}))
        assert ask(h, chat("nostore")).header("x-llmproxy-cache") == "miss"
        ask(h, chat("short", cache={"ttl": 10}))
        assert ask(h, chat("short", cache={"ttl": 10})).header("x-llmproxy-cache") == "hit"
        h.clock.advance(11)
        assert ask(h, chat("short", cache={"ttl": 10})).header("x-llmproxy-cache") == "miss"
        # The proxy-only field never reaches the upstream.
        assert all("cache" not in json.loads(r["body"]) for r in h.seen())

    def test_default_ttl_expires(self) -> None:
        h = cached("cache: {ttl: 60}\n")
        ask(h, chat("t"))
        h.clock.advance(59)
        assert ask(h, chat("t")).header("x-llmproxy-cache") == "hit"
        h.clock.advance(2)
        assert ask(h, chat("t")).header("x-llmproxy-cache") == "miss"

    def test_cache_off_and_bypassed_endpoints(self) -> None:
        h = cached("cache: {backend: off}\n")
        assert ask(h, chat("x")).header("x-llmproxy-cache") == "off"
        h2 = cached()
        made = ask(h2, {"model": "m1", "input": "x"}, path="/v1/responses")
        assert (
            h2.request("GET", f"/v1/responses/{made.json()['id']}").header("x-llmproxy-cache")
            == "bypass"
        )

    def test_error_event_streams_are_not_stored(self) -> None:
        h = cached()
        body = chat("oom", stream=True, mock={"error_chunk": "CUDA out of memory"})
        first = ask(h, body)
        assert 'data: {"error":{"message":"CUDA out of memory"' in first.body.decode()
        assert events(first.body)[-1] == "data: [DONE]"
        assert ask(h, body).header("x-llmproxy-cache") == "miss"
        assert h.request("GET", "/stats").json()["cache"]["skipped"]["error_event"] == 2

    def test_streams_larger_than_the_record_limit_are_not_held(self) -> None:
        h = cached("cache: {max_bytes: 2000}\n")  # records are bounded by the memory cache
        body = chat("long", stream=True, mock={"words": 50})
        first = ask(h, body)
        assert events(first.body)[-1] == "data: [DONE]"
        assert ask(h, body).header("x-llmproxy-cache") == "miss"
        assert h.request("GET", "/stats").json()["cache"]["skipped"]["too_large"] >= 1


class StreamStoreTests(SynchronousTestCase):
    def test_stream_is_replayed_byte_for_byte(self) -> None:
        h = cached()
        body = chat("stream me", stream=True, stream_options={"include_usage": True})
        first = ask(h, body)
        second = ask(h, body)
        assert second.header("x-llmproxy-cache") == "hit"
        assert second.body == first.body
        assert events(second.body)[-1] == "data: [DONE]"
        assert any('"choices":[]' in e for e in events(second.body))  # usage chunk kept
        for name in ("content-type", "cache-control", "x-accel-buffering", "x-llmproxy-upstream"):
            assert second.header(name) == first.header(name)
        assert len(h.seen()) == 1
        # stream is part of the key: the plain request is a different entry.
        assert (
            ask(h, chat("stream me", stream_options={"include_usage": True})).header(
                "x-llmproxy-cache"
            )
            == "miss"
        )

    def test_responses_stream_is_replayed_byte_for_byte(self) -> None:
        h = cached()
        body = {"model": "m1", "input": "typed events", "stream": True}
        first = ask(h, body, path="/v1/responses")
        second = ask(h, body, path="/v1/responses")
        assert second.header("x-llmproxy-cache") == "hit" and second.body == first.body
        assert events(second.body)[-1].startswith("event: response.completed\n")

    def test_cut_stream_leaves_nothing_behind(self) -> None:
        h = cached()
        ask(h, chat("cut", stream=True, mock={"cut_after": 3}))
        assert (
            ask(h, chat("cut", stream=True, mock={"cut_after": 3})).header("x-llmproxy-cache")
            == "miss"
        )
        assert h.request("GET", "/stats").json()["cache"]["stores"] == 0

    def test_abandoned_stream_leaves_nothing_behind(self) -> None:
        h = cached()
        body = chat("abandon", stream=True, mock={"interval": 1.0})
        response = h.result(h.start("POST", "/v1/chat/completions", body))
        h.clock.advance(1)
        h.pump()
        hang_up(response)
        h.pump()
        h.tick(1, 20)
        assert h.mocks["a"].stats["disconnects"] == 1
        stats = h.request("GET", "/stats").json()["cache"]
        assert stats["stores"] == 0 and stats["entries"] == 0


class BackendTests(SynchronousTestCase):
    def test_purge(self) -> None:
        h = cached()
        for i in range(3):
            ask(h, chat(f"p{i}"))
        purged = h.request("DELETE", "/cache")
        assert purged.code == 200 and purged.json() == {"purged": 3}
        assert ask(h, chat("p0")).header("x-llmproxy-cache") == "miss"

    def test_purge_needs_admin_key_when_configured(self) -> None:
        h = cached("auth: {admin_keys: [root-key]}\n")
        assert h.request("DELETE", "/cache").code == 401
        assert h.request("GET", "/stats").code == 401
        assert h.request("GET", "/metrics").code == 401
        ok = h.request("DELETE", "/cache", headers={"Authorization": "Bearer root-key"})
        assert ok.code == 200

    def test_memory_bound_is_honoured_under_eviction(self) -> None:
        backend = MemoryBackend(Clock(), max_bytes=1000)
        for i in range(20):
            backend.set(f"k{i}", b"x" * 200, 60)
            assert backend.bytes <= 1000
        assert len(backend) == 4
        assert backend.get("k0").result is None and backend.get("k19").result == b"x" * 200
        backend.get("k16")  # recently used survives the next eviction
        backend.set("new", b"y" * 200, 60)
        assert backend.get("k16").result is not None and backend.get("k17").result is None
        backend.set("huge", b"z" * 5000, 60)  # larger than the bound: not stored
        assert backend.get("huge").result is None and backend.bytes <= 1000

    def test_gateway_memory_bound(self) -> None:
        h = cached("cache: {max_bytes: 3000}\n")
        for i in range(10):
            ask(h, chat(f"fill {i}"))
        stats = h.request("GET", "/stats").json()["cache"]
        assert stats["bytes"] <= 3000 and 0 < stats["entries"] < 10
        assert ask(h, chat("fill 9")).header("x-llmproxy-cache") == "hit"
        assert ask(h, chat("fill 0")).header("x-llmproxy-cache") == "miss"

    def test_backend_trouble_is_a_miss_never_a_failure(self) -> None:
        redis = SharedRedis(Clock(), Redis(url="redis://gone"), connection=GoneRedis())
        h = Harness(
            config_text() + "redis: {url: 'redis://gone'}\ncache: {backend: redis}\n", redis=redis
        )
        for _ in range(2):
            answer = ask(h, chat("still works"))
            assert answer.code == 200 and answer.header("x-llmproxy-cache") == "miss"
        assert len(h.seen()) == 2
        assert h.request("GET", "/stats").json()["cache"]["errors"] == 4
