"""
Redis trouble is a cache miss, never a failed request: a private redis-server
is paused (SIGSTOP), killed and restarted under a running proxy; and two proxy
processes share one Redis.
"""

from __future__ import annotations

import http.client
import itertools
import json

from llmproxy.testing.processes import Mock, Proxy, RedisServer, wait_for
from tests.system.harness import (
    StartProxy,
    cache_config,
    caching_works,
    chat,
    events_arrived,
    post,
    raw_post,
    read_until,
    response_ended,
    stats,
)

_unique = itertools.count()


def test_two_proxies_share_entries(
    start: StartProxy, fresh_mock: Mock, redis_server: RedisServer
) -> None:
    text = cache_config(fresh_mock, "redis", redis_server)
    first, second = start(text, "p1"), start(text, "p2")
    body = chat("shared", stream=True)
    made = post(first, body)
    again = post(second, body)
    assert again[1]["x-llmproxy-cache"] == "hit" and again[2] == made[2]
    assert len(fresh_mock.requests()) == 1


def test_paused_redis_is_a_miss(
    redis_proxy: Proxy, fresh_mock: Mock, redis_server: RedisServer
) -> None:
    assert caching_works(redis_proxy)
    redis_server.pause()
    try:
        for i in range(3):
            status, headers, body = post(redis_proxy, chat(f"while paused {i}"))
            assert status == 200 and headers["x-llmproxy-cache"] == "miss"
            assert body.count(b"while paused") == 1
        assert stats(redis_proxy)["cache"]["errors"] >= 1
    finally:
        redis_server.resume()
    wait_for(lambda: caching_works(redis_proxy), what="caching to resume")


def test_killed_and_restarted_redis(
    redis_proxy: Proxy, fresh_mock: Mock, redis_server: RedisServer
) -> None:
    assert caching_works(redis_proxy)
    redis_server.stop()
    for i in range(3):
        status, headers, _ = post(redis_proxy, chat(f"while down {i}"))
        assert status == 200 and headers["x-llmproxy-cache"] == "miss"
    status, _, body = post(redis_proxy, chat("stream while down", stream=True))
    assert status == 200 and body.endswith(b"data: [DONE]\n\n")
    conn = http.client.HTTPConnection("127.0.0.1", redis_proxy.port, timeout=10)
    conn.request("DELETE", "/cache")
    purge = conn.getresponse()
    assert purge.status == 503
    assert json.loads(purge.read())["error"]["code"] == "cache_unavailable"
    redis_server.start()  # same port, empty: the proxy reconnects on its own
    wait_for(lambda: caching_works(redis_proxy), timeout=30, what="caching to resume")


def test_two_proxies_share_rate_limits(
    start: StartProxy, fresh_mock: Mock, redis_server: RedisServer
) -> None:
    text = cache_config(fresh_mock, "off", redis_server).replace(
        "{name: team-a, key: key-a}", "{name: team-a, key: key-a, rpm: 3}"
    )
    first, second = start(text, "p1"), start(text, "p2")
    for proxy in (first, second, first):
        assert post(proxy, chat(f"limited {proxy.port}"))[0] == 200
    conn = http.client.HTTPConnection("127.0.0.1", second.port, timeout=10)
    conn.request(
        "POST",
        "/v1/chat/completions",
        json.dumps(chat("one too many")),
        {"Authorization": "Bearer key-a"},
    )
    refused = conn.getresponse()
    assert refused.status == 429
    assert int(refused.getheader("Retry-After") or "0") >= 1
    assert json.loads(refused.read())["error"]["code"] == "rate_limit_exceeded"
    keys = redis_server.cli_call("--scan", "--pattern", "llmproxy:limit:requests:team-a:*")
    assert sum(int(redis_server.cli_call("GET", k)) for k in keys.split()) == 3
    assert len(fresh_mock.requests()) == 3


def test_answers_finished_while_draining_are_still_stored(
    start: StartProxy, fresh_mock: Mock, redis_server: RedisServer
) -> None:
    import signal

    proxy = start(cache_config(fresh_mock, "redis", redis_server), "draining")
    # The mock holds the stream after its first event until released.
    body = chat("drained", stream=True, mock={"gate_after": 1})
    sock = raw_post(proxy.port, body, headers={"Authorization": "Bearer key-a"})
    received = read_until(sock, events_arrived(1), "the stream to start")
    proxy.process.signal(signal.SIGTERM)
    wait_for(lambda: "draining 1 in-flight requests" in proxy.process.log(), what="the drain")
    fresh_mock.release()
    received = read_until(sock, response_ended, "the end of the stream", received=received)
    assert b"data: [DONE]" in received
    proxy.process.proc.wait(timeout=30)
    # Redis was still there when the drained stream finished: it was stored.
    assert len(redis_server.cli_call("--scan", "--pattern", "llmproxy:cache:*").split()) == 1
    assert "cache store failed" not in proxy.process.log()
