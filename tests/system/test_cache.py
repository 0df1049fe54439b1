"""
The cache as users run it, against both backends: a real proxy process, a real
mock upstream, and a private redis-server.  Asserted with upstream request
counts, recorded bytes, the x-llmproxy-cache header and what Redis holds.
"""

from __future__ import annotations

import asyncio
import http.client
import json
from collections.abc import Iterator

import openai
import pytest

from llmproxy.testing.processes import Mock, Proxy, RedisServer, wait_for
from tests.system.harness import StartProxy, cache_config, chat, post, raw_post, stats

Cached = tuple[Proxy, RedisServer | None]


@pytest.fixture(scope="module", params=["memory", "redis"])
def cache_backend(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, mock: Mock
) -> Iterator[Cached]:
    """
    One proxy per backend for the whole module (each start costs a second of
    CPU): the tests below share it, and :func:`cached_proxy` empties its
    cache before each, so what a test sees is what it did.
    """
    tmp = tmp_path_factory.mktemp(f"cache-{request.param}")
    redis = RedisServer(tmp) if request.param == "redis" else None
    proxy = Proxy(tmp, cache_config(mock, request.param, redis))
    yield proxy, redis
    proxy.stop()
    if redis is not None:
        redis.stop()


@pytest.fixture
def cached_proxy(cache_backend: Cached, fresh_mock: Mock) -> Cached:
    """The module's proxy with its cache purged (``DELETE /cache``, as an operator would)."""
    proxy, redis = cache_backend
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=5)
    conn.request("DELETE", "/cache")
    assert conn.getresponse().status == 200
    conn.close()
    if redis is not None:
        assert redis.cli_call("--scan", "--pattern", "llmproxy:cache:*") == ""
    return cache_backend


def test_basic_caching(cached_proxy: Cached, fresh_mock: Mock) -> None:
    proxy, redis = cached_proxy
    first = post(proxy, chat("cache me"))
    second = post(proxy, chat("cache me"))
    assert first[1]["x-llmproxy-cache"] == "miss" and second[1]["x-llmproxy-cache"] == "hit"
    assert second[2] == first[2] and len(fresh_mock.requests()) == 1
    # The SDK reads the hit like any answer.
    client = openai.OpenAI(base_url=proxy.base_url, api_key="key-a", max_retries=0)
    answer = client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "cache me"}]
    )
    assert answer.choices[0].message.content == "Hello from main! You said: cache me"
    if redis is not None:
        keys = redis.cli_call("--scan", "--pattern", "llmproxy:cache:*").split()
        assert len(keys) == 1
        assert 0 < int(redis.cli_call("TTL", keys[0])) <= 3600


def test_changed_temperature_misses_reordered_keys_hit(
    cached_proxy: Cached, fresh_mock: Mock
) -> None:
    proxy, _ = cached_proxy
    post(proxy, {"model": "m", "temperature": 0.5, "messages": [{"role": "user", "content": "t"}]})
    reordered = post(
        proxy, {"messages": [{"content": "t", "role": "user"}], "temperature": 0.5, "model": "m"}
    )
    assert reordered[1]["x-llmproxy-cache"] == "hit"
    changed = post(
        proxy, {"model": "m", "temperature": 0.6, "messages": [{"role": "user", "content": "t"}]}
    )
    assert changed[1]["x-llmproxy-cache"] == "miss"
    assert len(fresh_mock.requests()) == 2


def test_streaming_caching(cached_proxy: Cached, fresh_mock: Mock) -> None:
    proxy, _ = cached_proxy
    body = chat("stream", stream=True, stream_options={"include_usage": True})
    first = post(proxy, body)
    second = post(proxy, body)
    assert second[1]["x-llmproxy-cache"] == "hit" and second[2] == first[2]
    assert second[2].endswith(b"data: [DONE]\n\n") and b'"choices":[]' in second[2]
    assert (
        second[1]["content-type"] == first[1]["content-type"] == "text/event-stream; charset=utf-8"
    )
    assert len(fresh_mock.requests()) == 1
    # And the SDK streams the hit.
    client = openai.OpenAI(base_url=proxy.base_url, api_key="key-a", max_retries=0)
    chunks = list(
        client.chat.completions.create(
            model="m",
            messages=[{"role": "user", "content": "stream"}],
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert (
        "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        == "Hello from main! You said: stream"
    )
    assert len(fresh_mock.requests()) == 1


def test_responses_streaming_caching(cached_proxy: Cached, fresh_mock: Mock) -> None:
    proxy, _ = cached_proxy
    body = {"model": "m", "input": "typed", "stream": True}
    first = post(proxy, body, path="/v1/responses")
    second = post(proxy, body, path="/v1/responses")
    assert second[1]["x-llmproxy-cache"] == "hit"
    assert second[2] == first[2]
    assert second[2].startswith(b"event: response.created\n")
    assert b"event: response.completed\n" in second[2]
    assert len(fresh_mock.requests()) == 1


def test_controls(cached_proxy: Cached, fresh_mock: Mock) -> None:
    proxy, _ = cached_proxy
    post(proxy, chat("ctl"))
    assert (
        post(proxy, chat("ctl"), headers={"Cache-Control": "no-cache"})[1]["x-llmproxy-cache"]
        == "bypass"
    )
    assert len(fresh_mock.requests()) == 2
    post(proxy, chat("nostore"), headers={"Cache-Control": "no-store"})
    assert post(proxy, chat("nostore"))[1]["x-llmproxy-cache"] == "miss"
    post(proxy, chat("body", cache={"no-store": True}))
    assert post(proxy, chat("body"))[1]["x-llmproxy-cache"] == "miss"
    assert all("cache" not in json.loads(r["body"]) for r in fresh_mock.requests())


def test_scope_isolation(cached_proxy: Cached, fresh_mock: Mock) -> None:
    proxy, _ = cached_proxy
    post(proxy, chat("mine"), key="key-a")
    assert post(proxy, chat("mine"), key="key-b")[1]["x-llmproxy-cache"] == "miss"
    assert post(proxy, chat("mine"), key="key-a")[1]["x-llmproxy-cache"] == "hit"
    assert len(fresh_mock.requests()) == 2


def test_cut_and_abandoned_streams_are_not_stored(cached_proxy: Cached, fresh_mock: Mock) -> None:
    proxy, redis = cached_proxy
    stores = stats(proxy)["cache"]["stores"]
    body = chat("cut", stream=True, mock={"cut_after": 2})
    assert b"event: error" in post(proxy, body)[2]
    assert post(proxy, body)[1]["x-llmproxy-cache"] == "miss"
    abandoned = chat("abandon", stream=True, mock={"stall_after_headers": True, "stall_after": 2})
    sock = raw_post(proxy.port, abandoned, headers={"Authorization": "Bearer key-a"})
    wait_for(lambda: fresh_mock.stats()["streams"] == 3, what="the abandoned stream to start")
    sock.close()
    wait_for(lambda: fresh_mock.stats()["disconnects"] == 1, what="upstream closed")
    assert stats(proxy)["cache"]["stores"] == stores
    if redis is not None:
        assert redis.cli_call("--scan", "--pattern", "llmproxy:cache:*") == ""


def test_concurrent_identical_requests_share_one_call(
    cached_proxy: Cached, fresh_mock: Mock
) -> None:
    proxy, _ = cached_proxy

    async def run(stream: bool, already: int) -> list[str]:
        client = openai.AsyncOpenAI(base_url=proxy.base_url, api_key="key-a", max_retries=0)

        async def one() -> str:
            if stream:
                chunks = await client.chat.completions.create(
                    model="m",
                    messages=[{"role": "user", "content": f"together {stream}"}],
                    stream=True,
                    extra_body={"mock": {"gate": True}},
                )
                return "".join(
                    [c.choices[0].delta.content or "" async for c in chunks if c.choices]
                )
            answer = await client.chat.completions.create(
                model="m",
                messages=[{"role": "user", "content": f"together {stream}"}],
                extra_body={"mock": {"gate": True}},
            )
            return answer.choices[0].message.content or ""

        tasks = [asyncio.ensure_future(one()) for _ in range(10)]

        def coalesced() -> bool:
            return stats(proxy)["cache"]["coalesced"] >= already + 9

        deadline = asyncio.get_running_loop().time() + 20
        while not (fresh_mock.stats()["gated"] == 1 and coalesced()):
            assert asyncio.get_running_loop().time() < deadline, "requests did not line up"
            await asyncio.sleep(0.01)
        fresh_mock.release()
        return await asyncio.gather(*tasks)

    for stream in (False, True):
        already = stats(proxy)["cache"]["coalesced"]
        before = len(fresh_mock.requests())
        answers = asyncio.run(run(stream, already))
        assert answers == [f"Hello from main! You said: together {stream}"] * 10
        assert len(fresh_mock.requests()) == before + 1


def test_purge(cached_proxy: Cached, fresh_mock: Mock) -> None:
    proxy, redis = cached_proxy
    for i in range(3):
        post(proxy, chat(f"purge {i}"))
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=5)
    conn.request("DELETE", "/cache")
    response = conn.getresponse()
    assert response.status == 200 and json.loads(response.read()) == {"purged": 3}
    assert post(proxy, chat("purge 0"))[1]["x-llmproxy-cache"] == "miss"
    if redis is not None:
        assert len(redis.cli_call("--scan", "--pattern", "llmproxy:cache:*").split()) == 1


def test_memory_bound_is_honoured_under_eviction(start: StartProxy, fresh_mock: Mock) -> None:
    config = cache_config(fresh_mock, "memory", None)
    proxy = start(config.replace("max_bytes: 200000", "max_bytes: 4000"))
    for i in range(12):
        post(proxy, chat(f"fill {i}"))
    cache = stats(proxy)["cache"]
    assert cache["bytes"] <= 4000 and 0 < cache["entries"] < 12
    assert post(proxy, chat("fill 11"))[1]["x-llmproxy-cache"] == "hit"  # recent: kept
    assert post(proxy, chat("fill 0"))[1]["x-llmproxy-cache"] == "miss"  # oldest: evicted
