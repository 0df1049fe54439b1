"""
Routing as users run it: three real mock upstream processes (and a dead port)
behind a real ``twistd -n llmproxy``; two proxies sharing cooldowns in Redis.
"""

from __future__ import annotations

import json
import urllib.request
import weakref

import openai
import pytest

from llmproxy.testing.processes import Mock, Proxy, RedisServer, closed_port, wait_for
from tests.system.harness import StartProxy

Trio = dict[str, Mock]


def config(
    trio: Trio,
    strategy: str = "round_robin",
    weights: dict[str, int] | None = None,
    extra: str = "",
    dead: int | None = None,
    names: str = "abc",
    timeouts: str = "{connect: 2, first_byte: 3, idle: 3, total: 30}",
) -> str:
    weights = weights or {}
    lines = ["upstreams:"]
    for name in names:
        url = f"http://127.0.0.1:{dead}/v1" if name == "d" else trio[name].base_url
        lines.append(f"  {name}:\n    base_url: {url}\n    timeouts: {timeouts}")
    lines.append(f"models:\n  m:\n    strategy: {strategy}\n    targets:")
    for name in names:
        lines.append(f"      - upstream: {name}\n        weight: {weights.get(name, 1)}")
    lines.append("cache: {backend: off}")
    return "\n".join(lines) + "\n" + extra


_clients: weakref.WeakKeyDictionary[Proxy, openai.OpenAI] = weakref.WeakKeyDictionary()


def sdk(proxy: Proxy) -> openai.OpenAI:
    """
    One SDK client per proxy, gone with it: making one loads the CA bundle
    (about 35 ms of CPU each), and these tests ask some ninety questions.
    """
    if proxy not in _clients:
        _clients[proxy] = openai.OpenAI(base_url=proxy.base_url, api_key="x", max_retries=0)
    return _clients[proxy]


def ask(proxy: Proxy, text: str = "hi") -> tuple[str, str]:
    """One chat completion: (who answered, what it said)."""
    raw = sdk(proxy).chat.completions.with_raw_response.create(
        model="m", messages=[{"role": "user", "content": text}]
    )
    answer = raw.parse()
    return raw.headers["x-llmproxy-upstream"], answer.choices[0].message.content or ""


def counts(trio: Trio) -> dict[str, int]:
    return {name: len(m.requests()) for name, m in trio.items()}


def health(proxy: Proxy) -> dict[str, dict[str, object]]:
    """What /health says of each target (it answers 503 when none is usable)."""
    try:
        with urllib.request.urlopen(proxy.url + "/health", timeout=5) as response:
            body = response.read()
    except urllib.error.HTTPError as e:
        body = e.read()
    targets: dict[str, dict[str, object]] = json.loads(body)["targets"]
    return targets


def test_even_spread(fresh_trio: Trio, start: StartProxy) -> None:
    proxy = start(config(fresh_trio))
    for i in range(30):
        who, said = ask(proxy, f"q{i}")
        assert said == f"Hello from {who}! You said: q{i}"
    assert counts(fresh_trio) == {"a": 10, "b": 10, "c": 10}


def test_weights_are_honoured(fresh_trio: Trio, start: StartProxy) -> None:
    proxy = start(config(fresh_trio, weights={"a": 5, "b": 1, "c": 1}))
    order = "".join(ask(proxy, f"q{i}")[0] for i in range(14))
    assert order == "aabacaa" * 2


def test_dead_port_and_500s_failed_over(fresh_trio: Trio, start: StartProxy) -> None:
    fresh_trio["b"].configure(status=500)
    proxy = start(
        config(
            fresh_trio,
            dead=closed_port(),
            names="dbc",
            extra="routing: {retries: 2, cooldown: {failures: 3, seconds: 300}}\n",
        )
    )
    answers = [ask(proxy, f"q{i}") for i in range(20)]
    assert all(who == "c" for who, _ in answers)
    assert [said for _, said in answers] == [f"Hello from c! You said: q{i}" for i in range(20)]
    # Three 500s put b in cooldown: it is left alone from then on.
    assert len(fresh_trio["b"].requests()) == 3
    report = health(proxy)
    assert report["b/m"]["state"] == "cooling_down"
    assert report["d/m"]["state"] == "cooling_down"


def test_429_retry_after_cools_then_recovers(fresh_trio: Trio, start: StartProxy) -> None:
    # The smallest Retry-After there is (whole seconds); the unit layer covers
    # how long a cooldown lasts with a Clock (tests/unit/test_routing.py).
    fresh_trio["a"].configure(status=429, headers={"Retry-After": "1"})
    proxy = start(config(fresh_trio, strategy="priority", names="ab"))
    assert ask(proxy, "first")[0] == "b"
    assert [ask(proxy, f"q{i}")[0] for i in range(5)] == ["b"] * 5
    assert len(fresh_trio["a"].requests()) == 1  # cooling: left alone
    fresh_trio["a"].configure()
    wait_for(lambda: health(proxy)["a/m"]["state"] == "half_open", what="a's cooldown to end")
    assert ask(proxy, "back")[0] == "a"


def test_stream_cut_is_not_retried(fresh_trio: Trio, start: StartProxy) -> None:
    fresh_trio["a"].configure(cut_after=2)
    proxy = start(config(fresh_trio, strategy="priority", names="ab"))
    stream = sdk(proxy).chat.completions.create(
        model="m", messages=[{"role": "user", "content": "x"}], stream=True
    )
    got = []
    with pytest.raises(openai.APIError):
        for chunk in stream:
            got.append(chunk)
    assert len(got) == 2
    assert len(fresh_trio["b"].requests()) == 0


def test_fallback_tier(fresh_trio: Trio, start: StartProxy) -> None:
    proxy = start(config(fresh_trio, weights={"a": 1, "b": 1, "c": 0}))
    assert {ask(proxy, f"q{i}")[0] for i in range(6)} == {"a", "b"}
    fresh_trio["a"].configure(status=503)
    fresh_trio["b"].configure(status=502)
    assert ask(proxy, "both down")[0] == "c"


def test_affinity_across_ten_follow_ups(fresh_trio: Trio, start: StartProxy) -> None:
    proxy = start(config(fresh_trio))
    client = sdk(proxy)
    raw = client.responses.with_raw_response.create(model="m", input="start")
    owner = raw.headers["x-llmproxy-upstream"]
    response = raw.parse()
    for i in range(10):
        raw = client.responses.with_raw_response.create(
            model="m", input=f"follow {i}", previous_response_id=response.id
        )
        assert raw.headers["x-llmproxy-upstream"] == owner
        response = raw.parse()
        assert response.output_text == f"Hello from {owner}! You said: follow {i}"
    assert client.responses.retrieve(response.id).id == response.id
    assert counts(fresh_trio)[owner] == 12


def test_two_proxies_share_cooldowns_through_redis(
    fresh_trio: Trio, start: StartProxy, redis_server: RedisServer
) -> None:
    fresh_trio["a"].configure(status=500)
    extra = (
        f"redis: {{url: '{redis_server.url}', timeout: 0.5}}\n"
        "routing: {cooldown: {failures: 2, seconds: 300}}\n"
    )
    text = config(fresh_trio, strategy="priority", names="ab", extra=extra)
    first, second = start(text, "p1"), start(text, "p2")
    assert ask(first, "one")[0] == "b"  # a failed once (first process)
    assert ask(second, "two")[0] == "b"  # a failed again (second process): now down
    assert len(fresh_trio["a"].requests()) == 2
    stored = redis_server.cli_call("HGET", "llmproxy:health:a/m", "open_until")
    assert float(stored) > 0
    # Both processes now agree a is down: neither sends it anything.
    for proxy in (first, second, first):
        assert ask(proxy, "more")[0] == "b"
        assert health(proxy)["a/m"]["state"] == "cooling_down"
    assert len(fresh_trio["a"].requests()) == 2
