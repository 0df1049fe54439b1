"""
Hardening of what the proxy holds (issue 14, defects 4 and 5), against real
processes: a real proxy, the mock upstream as a process, a private redis-server.

* A corrupt entry under a live key in Redis is a miss (the upstream answers),
  is then gone (replaced by the fresh answer), and is counted as ``cache_corrupt``.
* A 200 MiB non-streamed answer behind ``server.max_response_bytes: 1 MiB`` is a
  502 ``response_too_large``, the upstream is closed, and the proxy's memory
  stays bounded (its peak RSS, VmHWM, not the answer's size).
"""

from __future__ import annotations

import http.client
import json

from llmproxy.cache import Entry
from llmproxy.testing.processes import Mock, Proxy, RedisServer, proc_status, wait_for
from tests.system.harness import StartProxy, cache_config, chat, post, stats

MIB = 1024 * 1024


def metrics(proxy: Proxy) -> str:
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=5)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    return text


def test_corrupt_redis_entry_is_a_miss_then_gone_and_counted(
    start: StartProxy, fresh_mock: Mock, redis_server: RedisServer
) -> None:
    proxy = start(cache_config(fresh_mock, "redis", redis_server))
    body = chat("corrupt me in redis")
    first = post(proxy, body)
    assert first[1]["x-llmproxy-cache"] == "miss"
    (key,) = redis_server.cli_call("--scan", "--pattern", "llmproxy:cache:*").split()
    assert redis_server.cli_call("SET", key, '{"v":1}\nxx', "EX", "3600") == "OK"

    again = post(proxy, body)  # post() asserts the 200
    assert again[1]["x-llmproxy-cache"] == "miss"
    reply = json.loads(again[2])["choices"][0]["message"]["content"]
    assert reply == "Hello from main! You said: corrupt me in redis"
    assert len(fresh_mock.requests()) == 2  # the upstream answered it
    # Gone: what Redis holds under the key now is the fresh answer, whole.
    stored = redis_server.cli_call("GET", key).encode()
    assert Entry.decode(stored) is not None and stored.endswith(again[2])
    hit = post(proxy, body)
    assert hit[1]["x-llmproxy-cache"] == "hit" and hit[2] == again[2]
    assert len(fresh_mock.requests()) == 2

    cache = stats(proxy)["cache"]
    assert cache["cache_corrupt"] == 1 and cache["hits"] == 1 and cache["misses"] == 2
    assert 'llmproxy_cache_events{name="cache_corrupt"} 1.0' in metrics(proxy)


def test_rss_stays_bounded_on_a_200_mib_answer(start: StartProxy, fresh_mock: Mock) -> None:
    proxy = start(cache_config(fresh_mock, "off", None, f"server: {{max_response_bytes: {MIB}}}\n"))
    post(proxy, chat("warm up"))
    before = proc_status(proxy.process.pid)

    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=60)
    conn.request(
        "POST",
        "/v1/chat/completions",
        json.dumps(chat("huge", mock={"big_body": 200 * MIB})),
        {"Authorization": "Bearer key-a", "Content-Type": "application/json"},
    )
    response = conn.getresponse()
    answer = json.loads(response.read())
    conn.close()
    assert response.status == 502, answer
    assert answer["error"]["code"] == "response_too_large"

    # The upstream was closed long before it had sent the 200 MiB.
    wait_for(lambda: fresh_mock.stats()["disconnects"] == 1, what="the upstream closed")
    assert fresh_mock.stats()["bytes_streamed"] < 200 * MIB
    after = proc_status(proxy.process.pid)
    grown_kib = after["VmHWM"] - before["VmRSS"]
    print(
        f"proxy VmRSS before {before['VmRSS']} KiB, peak (VmHWM) {after['VmHWM']} KiB, "
        f"after {after['VmRSS']} KiB; grew {grown_kib} KiB at peak; "
        f"upstream sent {fresh_mock.stats()['bytes_streamed']} bytes"
    )
    assert grown_kib < 100 * 1024
    assert post(proxy, chat("still fine"))[0] == 200
