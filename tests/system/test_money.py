"""
Money and fairness through real processes: the tokens and cost a mock upstream
reported, as /stats, /metrics and the access log tell them; a forced usage
stream that reaches the client as an unforced one would; cache hits that cost
nothing and count as saved; a budget that stops a key across two proxies
sharing a private redis-server; ``max_parallel``; and the ``x-ratelimit-*``
headers counting down.

Every figure asserted here follows from the usage the mock was told to report
(its ``usage`` knob) and the configured prices, so a miscount of any one token
kind, or a cost off by one token, fails.
"""

from __future__ import annotations

import http.client
import json
import math
import re
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from llmproxy.testing.processes import Mock, Proxy, RedisServer, Reply, http_call, wait_for
from tests.system.harness import (
    UPSTREAM_KEY,
    StartProxy,
    events_arrived,
    raw_post,
    read_until,
)

#: Client keys: distinctive, so a test can prove they appear nowhere.
SECRET_A = "sk-client-secret-alpha-7f3a"
SECRET_B = "sk-client-secret-bravo-91c2"

#: What the mock reports: 100 prompt tokens (30 cached), 40 completion tokens
#: (10 of them reasoning), in chat's and in the Responses API's shape.
CHAT_USAGE = {
    "prompt_tokens": 100,
    "completion_tokens": 40,
    "total_tokens": 140,
    "prompt_tokens_details": {"cached_tokens": 30},
    "completion_tokens_details": {"reasoning_tokens": 10},
}
RESPONSES_USAGE = {
    "input_tokens": 100,
    "input_tokens_details": {"cached_tokens": 30},
    "output_tokens": 40,
    "output_tokens_details": {"reasoning_tokens": 10},
    "total_tokens": 140,
}
#: ...which are these disjoint kinds.
KINDS = {"input": 70, "cached_input": 30, "output": 30, "reasoning": 10}

#: The upstream's price per million tokens; reasoning is billed as output:
#: 70 x 2.5 + 30 x 1.25 + (30 + 10) x 10 = 612.5 per million.
UPSTREAM_PRICE = "{input: 2.5, cached_input: 1.25, output: 10}"
UPSTREAM_COST = Decimal("0.0006125")
#: A target's own price wins, and prices reasoning: cached input falls back to
#: input. 70 x 1 + 30 x 1 + 30 x 2 + 10 x 3 = 190 per million.
TARGET_PRICE = "{input: 1, output: 2, reasoning: 3}"
TARGET_COST = Decimal("0.00019")

#: (endpoint, streamed, spaced JSON): each case has a model of its own, so its
#: figures in /stats and /metrics are its own.
SHAPES = {
    "chat-json": ("chat/completions", False, False),
    "chat-stream": ("chat/completions", True, False),
    "chat-stream-spaced": ("chat/completions", True, True),
    "responses-json": ("responses", False, False),
    "responses-stream": ("responses", True, False),
    "responses-stream-spaced": ("responses", True, True),
}


def upstream(mock: Mock, price: str | None = UPSTREAM_PRICE) -> str:
    text = f"upstreams:\n  main:\n    base_url: {mock.base_url}\n    api_key: {UPSTREAM_KEY}\n"
    return text + (f"    price: {price}\n" if price else "")


def keys(*entries: str) -> str:
    return "auth:\n  keys:\n" + "".join(f"    - {e}\n" for e in entries)


def money_config(mock: Mock, log: Path) -> str:
    models = "".join(f"  {name}: {{targets: [{{upstream: main}}]}}\n" for name in SHAPES)
    models += f"  target-priced: {{targets: [{{upstream: main, price: {TARGET_PRICE}}}]}}\n"
    models += "  unpriced: {targets: [{upstream: free}]}\n"
    return (
        upstream(mock)
        + f"  free:\n    base_url: {mock.base_url}\n    api_key: {UPSTREAM_KEY}\n"
        + "models:\n"
        + models
        + keys(f"{{name: team-a, key: {SECRET_A}}}")
        + "cache: {backend: memory}\n"
        + f"access_log: {{path: '{log}', format: json, flush: 0}}\n"
    )


@pytest.fixture(scope="module")
def money(tmp_path_factory: pytest.TempPathFactory, mock: Mock) -> Iterator[Proxy]:
    """A proxy with prices, one key, a memory cache and a JSON access log written at once."""
    workdir = tmp_path_factory.mktemp("money")
    proxy = Proxy(workdir, money_config(mock, workdir / "access.log"), name="money")
    yield proxy
    proxy.stop()


# -- clients ---------------------------------------------------------------------------


def call(
    proxy: Proxy,
    path: str,
    body: dict[str, Any] | None = None,
    secret: str | None = SECRET_A,
    request_id: str | None = None,
    method: str = "POST",
) -> Reply:
    headers = {}
    if secret:
        headers["Authorization"] = f"Bearer {secret}"
    if request_id:
        headers["X-Request-Id"] = request_id
    return http_call(proxy.port, method, path, body, headers)


def ask(
    model: str, endpoint: str, stream: bool, knobs: dict[str, Any], text: str
) -> dict[str, Any]:
    """A request body for ``endpoint``; a chat stream asks for its usage."""
    if endpoint == "responses":
        body: dict[str, Any] = {"model": model, "input": text}
    else:
        body = {"model": model, "messages": [{"role": "user", "content": text}]}
    if stream:
        body["stream"] = True
        if endpoint == "chat/completions":
            body["stream_options"] = {"include_usage": True}
    return {**body, "mock": knobs}


def admin(proxy: Proxy, path: str) -> bytes:
    """An operator's endpoint, asked from the proxy's own host (no admin keys)."""
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=5)
    conn.request("GET", path)
    response = conn.getresponse()
    data = response.read()
    assert response.status == 200, data
    return data


def stats(proxy: Proxy) -> dict[str, Any]:
    found: dict[str, Any] = json.loads(admin(proxy, "/stats"))
    return found


def metric(proxy: Proxy, name: str, **labels: str) -> float | None:
    """One sample of ``/metrics`` by name and labels (None when there is none)."""
    text = admin(proxy, "/metrics").decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return None


def log_record(proxy: Proxy, request_id: str) -> dict[str, Any]:
    """The access-log record of ``request_id``, once it is written (``flush: 0``: at once)."""
    path = proxy.config_path.parent / "access.log"

    def found() -> dict[str, Any]:
        if not path.exists():
            return {}
        for line in path.read_text().splitlines():
            record: dict[str, Any] = json.loads(line)
            if record["request_id"] == request_id:
                return record
        return {}

    return wait_for(found, what=f"the access-log record of {request_id}")


# -- exact usage and cost ---------------------------------------------------------------


@pytest.mark.parametrize("model", list(SHAPES))
def test_token_kinds_and_cost_agree_with_the_upstream_everywhere(
    money: Proxy, fresh_mock: Mock, model: str
) -> None:
    endpoint, stream, spaced = SHAPES[model]
    usage = RESPONSES_USAGE if endpoint == "responses" else CHAT_USAGE
    knobs = {"usage": usage, "spaced": spaced}
    rid = f"money-{model}"
    reply = call(
        money,
        f"/v1/{endpoint}",
        ask(model, endpoint, stream, knobs, f"count {model}"),
        request_id=rid,
    )
    assert reply.status == 200, reply.body
    if spaced:
        # The usage the proxy had to find was written with spaces.
        assert b'"usage": {' in reply.body
    if stream:
        assert "x-llmproxy-cost-usd" not in reply.headers  # headers left before the usage came
    else:
        assert Decimal(reply.headers["x-llmproxy-cost-usd"]) == UPSTREAM_COST

    record = log_record(money, rid)
    assert {k: record[f"{k}_tokens"] for k in KINDS} == KINDS
    assert record["tokens_estimated"] is False
    assert Decimal(repr(record["cost_usd"])) == UPSTREAM_COST
    assert record["saved_usd"] is None

    row = stats(money)["keys"]["team-a"][model]
    assert row["requests"] == 1
    assert row["tokens"] == KINDS
    assert row["estimated_tokens"] == {"input": 0, "output": 0}
    assert Decimal(repr(row["cost_usd"])) == UPSTREAM_COST
    assert row["estimated_cost_usd"] == 0

    for kind, count in KINDS.items():
        labels = {"key": "team-a", "model": model, "kind": kind}
        assert metric(money, "llmproxy_tokens_total", **labels) == count
    cost = metric(money, "llmproxy_cost_usd_total", key="team-a", model=model)
    assert cost is not None and Decimal(repr(cost)) == UPSTREAM_COST
    assert metric(money, "llmproxy_estimated_cost_usd_total", key="team-a", model=model) is None
    requests = metric(money, "llmproxy_requests_total", key="team-a", model=model, status="200")
    assert requests == 1


def test_a_targets_price_wins_and_prices_reasoning(money: Proxy, fresh_mock: Mock) -> None:
    body = ask("target-priced", "chat/completions", False, {"usage": CHAT_USAGE}, "target price")
    reply = call(money, "/v1/chat/completions", body, request_id="money-target-price")
    assert reply.status == 200, reply.body
    assert Decimal(reply.headers["x-llmproxy-cost-usd"]) == TARGET_COST
    assert Decimal(repr(log_record(money, "money-target-price")["cost_usd"])) == TARGET_COST


def test_without_a_price_there_is_no_cost(money: Proxy, fresh_mock: Mock) -> None:
    body = ask("unpriced", "chat/completions", False, {"usage": CHAT_USAGE}, "no price")
    reply = call(money, "/v1/chat/completions", body, request_id="money-unpriced")
    assert reply.status == 200, reply.body
    assert "x-llmproxy-cost-usd" not in reply.headers
    record = log_record(money, "money-unpriced")
    assert {k: record[f"{k}_tokens"] for k in KINDS} == KINDS
    assert record["cost_usd"] is None
    assert stats(money)["keys"]["team-a"]["unpriced"]["cost_usd"] == 0
    assert metric(money, "llmproxy_cost_usd_total", key="team-a", model="unpriced") is None


def test_an_answer_without_usage_is_estimated_and_counted_apart(
    money: Proxy, fresh_mock: Mock
) -> None:
    body = ask("chat-json", "chat/completions", False, {"no_usage": True}, "no usage here")
    before = stats(money)["keys"].get("team-a", {}).get("chat-json")
    reply = call(money, "/v1/chat/completions", body, request_id="money-estimated")
    assert reply.status == 200 and b'"usage"' not in reply.body
    record = log_record(money, "money-estimated")
    assert record["tokens_estimated"] is True
    assert record["input_tokens"] > 0 and record["output_tokens"] > 0
    row = stats(money)["keys"]["team-a"]["chat-json"]
    # The exact figures did not move; the estimate went to its own columns.
    if before is not None:
        assert row["tokens"] == before["tokens"]
        assert row["cost_usd"] == before["cost_usd"]
    assert row["estimated_tokens"] == {
        "input": record["input_tokens"],
        "output": record["output_tokens"],
    }
    assert row["estimated_cost_usd"] > 0
    labels = {"key": "team-a", "model": "chat-json", "kind": "input"}
    assert metric(money, "llmproxy_estimated_tokens_total", **labels) == record["input_tokens"]


def test_a_cache_hit_costs_nothing_and_counts_as_saved(money: Proxy, fresh_mock: Mock) -> None:
    body = ask("target-priced", "chat/completions", False, {"usage": CHAT_USAGE}, "cache me")
    first = call(money, "/v1/chat/completions", body, request_id="money-cache-miss")
    assert first.headers["x-llmproxy-cache"] == "miss"
    before = stats(money)["keys"]["team-a"]["target-priced"]
    hit = call(money, "/v1/chat/completions", body, request_id="money-cache-hit")
    assert hit.headers["x-llmproxy-cache"] == "hit"
    assert hit.body == first.body
    # The hit's answer made no upstream call, so it carries no cost of one.
    assert "x-llmproxy-cost-usd" not in hit.headers
    assert len(fresh_mock.requests()) == 1

    record = log_record(money, "money-cache-hit")
    assert record["cost_usd"] == 0
    assert Decimal(repr(record["saved_usd"])) == TARGET_COST
    after = stats(money)["keys"]["team-a"]["target-priced"]
    assert after["requests"] == before["requests"] + 1
    assert after["tokens"] == before["tokens"]  # nothing was generated
    assert after["cost_usd"] == before["cost_usd"]
    saved = Decimal(repr(after["saved_usd"])) - Decimal(repr(before["saved_usd"]))
    assert saved == TARGET_COST
    total = metric(money, "llmproxy_saved_cost_usd_total", key="team-a", model="target-priced")
    assert total is not None and Decimal(repr(total)) == Decimal(repr(after["saved_usd"]))


def test_no_client_key_appears_in_stats_metrics_or_the_log(money: Proxy, fresh_mock: Mock) -> None:
    body = ask("chat-json", "chat/completions", False, {}, "where is my key")
    assert call(money, "/v1/chat/completions", body, request_id="money-secrets").status == 200
    log_record(money, "money-secrets")
    refused = call(money, "/v1/chat/completions", body, secret=SECRET_B)
    assert refused.status == 401
    seen = {
        "/stats": admin(money, "/stats"),
        "/metrics": admin(money, "/metrics"),
        "access log": (money.config_path.parent / "access.log").read_bytes(),
        "proxy log": money.process.log().encode(),
    }
    for where, text in seen.items():
        for secret in (SECRET_A, SECRET_B, UPSTREAM_KEY):
            assert secret.encode() not in text, f"{secret} in {where}"
    assert b'key="team-a"' in seen["/metrics"]


# -- usage on streams that did not ask for it ------------------------------------------


def without_ids(data: bytes) -> bytes:
    """A stream with its per-answer id and creation time blanked (all else as sent)."""
    data = re.sub(rb'"id": ?"chatcmpl[-_][^"]*"', b'"id":"-"', data)
    return re.sub(rb'"created": ?\d+', b'"created":0', data)


def test_a_forced_usage_stream_reaches_the_client_as_an_unforced_one(
    start: StartProxy, tmp_path: Path, fresh_mock: Mock
) -> None:
    base = upstream(fresh_mock) + "models:\n  m: {targets: [{upstream: main}]}\n"
    base += keys(f"{{name: team-a, key: {SECRET_A}}}") + "cache: {backend: off}\n"
    plain = start(base, name="plain")
    forced = start(base + "routing: {stream_usage: force}\n", name="forced")
    body = {"model": "m", "messages": [{"role": "user", "content": "force it"}], "stream": True}
    body["mock"] = {"usage": CHAT_USAGE}

    got_plain = call(plain, "/v1/chat/completions", body, request_id="forced-plain")
    got_forced = call(forced, "/v1/chat/completions", body, request_id="forced-forced")
    assert got_plain.status == got_forced.status == 200
    assert got_forced.body.endswith(b"data: [DONE]\n\n")
    assert b"usage" not in got_forced.body
    assert without_ids(got_forced.body) == without_ids(got_plain.body)

    # The upstream was asked for the usage by the forcing proxy only...
    sent = [json.loads(r["body"]) for r in fresh_mock.requests()]
    assert "stream_options" not in sent[0]
    assert sent[1]["stream_options"] == {"include_usage": True}
    # ...which counted it exactly, where the other could only estimate.
    assert stats(forced)["keys"]["team-a"]["m"]["tokens"] == KINDS
    assert stats(plain)["keys"]["team-a"]["m"]["tokens"] == dict.fromkeys(KINDS, 0)

    # The openai SDK parses the same chunks from both, none of them a usage chunk.
    chunks = []
    for proxy in (plain, forced):
        client = openai.OpenAI(api_key=SECRET_A, base_url=proxy.base_url, max_retries=0)
        stream = client.chat.completions.create(
            model="m",
            messages=[{"role": "user", "content": "force it"}],
            stream=True,
            extra_body={"mock": {"usage": CHAT_USAGE}},
        )
        chunks.append([c.model_dump(exclude={"id", "created"}) for c in stream])
    assert chunks[0] == chunks[1]
    assert all(c["usage"] is None and c["choices"] for c in chunks[1])
    assert stats(forced)["keys"]["team-a"]["m"]["tokens"] == {k: 2 * n for k, n in KINDS.items()}


# -- budgets across a fleet -------------------------------------------------------------


def fleet_config(mock: Mock, redis: RedisServer) -> str:
    return (
        upstream(mock)
        + "models:\n  m: {targets: [{upstream: main}]}\n"
        + keys(
            f"{{name: daily, key: {SECRET_A}, budget: {{usd: 0.001, period: day}}}}",
            f"{{name: lifetime, key: {SECRET_B}, budget: {{usd: 0.0005, period: total}}}}",
        )
        + "cache: {backend: off}\n"
        + f"redis: {{url: '{redis.url}', timeout: 1.0}}\n"
    )


def spent(redis: RedisServer, key: str) -> Decimal:
    value = redis.cli_call("GET", key)
    return Decimal(value) if value else Decimal(0)


def test_a_budget_stops_a_key_across_two_proxies_sharing_redis(
    start: StartProxy, fresh_mock: Mock, redis_server: RedisServer
) -> None:
    one = start(fleet_config(fresh_mock, redis_server), name="one")
    two = start(fleet_config(fresh_mock, redis_server), name="two")
    body = ask("m", "chat/completions", False, {"usage": CHAT_USAGE}, "spend")
    now = datetime.now(UTC)
    day = datetime(now.year, now.month, now.day, tzinfo=UTC)
    spend_key = f"llmproxy:budget:daily:day:{int(day.timestamp())}"

    # 0.0006125 a request against 0.001 a day: each proxy lets one through,
    # the second because the first one's spend is not yet over the budget.
    assert call(one, "/v1/chat/completions", body).status == 200
    wait_for(lambda: spent(redis_server, spend_key) == UPSTREAM_COST, what="the first charge")
    assert call(two, "/v1/chat/completions", body).status == 200
    wait_for(lambda: spent(redis_server, spend_key) == 2 * UPSTREAM_COST, what="both charges")

    for proxy in (one, two):
        before = time.time()
        refused = call(proxy, "/v1/chat/completions", body)
        after = time.time()
        assert refused.status == 429, refused.body
        error = refused.json()["error"]
        assert (error["type"], error["code"]) == ("insufficient_quota", "insufficient_quota")
        assert "daily" in error["message"] and SECRET_A not in refused.body.decode()
        midnight = (day + timedelta(days=1)).timestamp()
        retry = int(refused.headers["retry-after"])
        assert math.ceil(midnight - after) <= retry <= math.ceil(midnight - before)
    assert len(fresh_mock.requests()) == 2  # the refused ones never went upstream
    budget = stats(two)["budgets"]["daily"]
    assert Decimal(repr(budget["spent_usd"])) == 2 * UPSTREAM_COST

    # A budget for all time: refused once spent, and no Retry-After (it never resets).
    assert call(two, "/v1/chat/completions", body, secret=SECRET_B).status == 200
    total_key = "llmproxy:budget:lifetime:total"
    wait_for(lambda: spent(redis_server, total_key) == UPSTREAM_COST, what="the lifetime charge")
    refused = call(one, "/v1/chat/completions", body, secret=SECRET_B)
    assert refused.status == 429
    assert refused.json()["error"]["code"] == "insufficient_quota"
    assert "retry-after" not in refused.headers


# -- max_parallel ---------------------------------------------------------------------


def test_max_parallel_refuses_the_third_stream_and_admits_it_once_one_ends(
    start: StartProxy, fresh_mock: Mock
) -> None:
    proxy = start(
        upstream(fresh_mock)
        + "models:\n  m: {targets: [{upstream: main}]}\n"
        + keys(f"{{name: narrow, key: {SECRET_A}, max_parallel: 2}}")
        + "cache: {backend: off}\n"
    )
    auth = {"Authorization": f"Bearer {SECRET_A}"}
    held = {
        "model": "m",
        "messages": [{"role": "user", "content": "hold on"}],
        "stream": True,
        "mock": {"gate_after": 1},
    }
    # Two streams, each held by the mock after its first event.
    socks = [raw_post(proxy.port, held, headers=auth) for _ in range(2)]
    firsts = [read_until(s, events_arrived(1), "the first event") for s in socks]

    third = call(proxy, "/v1/chat/completions", {**held, "mock": {}})
    assert third.status == 429, third.body
    assert third.json()["error"]["code"] == "concurrency_limit_exceeded"
    assert "retry-after" in third.headers
    assert len(fresh_mock.requests()) == 2

    # One stream ends (both are released; the first is read to its end): a slot is free.
    fresh_mock.release()
    for sock, first in zip(socks, firsts, strict=True):
        rest = read_until(sock, lambda r: r.endswith(b"0\r\n\r\n"), "the end", received=first)
        assert b"data: [DONE]" in rest
        sock.close()
    admitted = call(proxy, "/v1/chat/completions", {**held, "mock": {}})
    assert admitted.status == 200 and admitted.body.endswith(b"data: [DONE]\n\n")


# -- rate-limit headers -----------------------------------------------------------------


def test_ratelimit_headers_count_down_and_upstreams_pass_for_unlimited_keys(
    start: StartProxy, fresh_mock: Mock
) -> None:
    proxy = start(
        upstream(fresh_mock)
        + "models:\n  m: {targets: [{upstream: main}]}\n"
        + keys(
            f"{{name: limited, key: {SECRET_A}, rpm: 3, tpm: 100000}}",
            f"{{name: free, key: {SECRET_B}}}",
        )
        + "cache: {backend: off}\n"
    )
    theirs = {"x-ratelimit-remaining-requests": "4999", "x-ratelimit-limit-requests": "5000"}
    fresh_mock.configure(headers=theirs)
    body = {"model": "m", "messages": [{"role": "user", "content": "count"}]}

    remaining = []
    for _ in range(3):
        reply = call(proxy, "/v1/chat/completions", body)
        assert reply.status == 200, reply.body
        assert reply.headers["x-ratelimit-limit-requests"] == "3"
        assert reply.headers["x-ratelimit-limit-tokens"] == "100000"
        remaining.append(
            (
                int(reply.headers["x-ratelimit-remaining-requests"]),
                int(reply.headers["x-ratelimit-remaining-tokens"]),
            )
        )
    assert [r for r, _ in remaining] == [2, 1, 0]
    tokens = [t for _, t in remaining]
    assert tokens[0] <= 100000 and tokens[0] > tokens[1] > tokens[2]

    refused = call(proxy, "/v1/chat/completions", body)
    assert refused.status == 429
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    assert refused.headers["x-ratelimit-limit-requests"] == "3"
    assert re.fullmatch(r"(\d+m)?[\d.]+s", refused.headers["x-ratelimit-reset-requests"])
    assert int(refused.headers["retry-after"]) >= 1

    # A key without limits sees the upstream's own figures.
    free = call(proxy, "/v1/chat/completions", body, secret=SECRET_B)
    assert free.status == 200
    assert free.headers["x-ratelimit-remaining-requests"] == "4999"
    assert free.headers["x-ratelimit-limit-requests"] == "5000"
    assert "x-ratelimit-limit-tokens" not in free.headers
