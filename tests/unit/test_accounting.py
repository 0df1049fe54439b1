"""Usage, cost and saved cost, end to end in memory: what the client, /stats and /metrics see."""

from __future__ import annotations

import json
import re
from decimal import Decimal
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from tests.harness import Harness, chat, config_text

PRICED = config_text(
    models=(
        "  m1:\n    targets:\n      - upstream: a\n        model: upstream-m1\n"
        "        price: {input: 2.5, cached_input: 1.25, output: 10}\n"
        "  m2:\n    targets:\n      - upstream: a\n"
    ),
    extra="auth:\n  keys:\n    - {name: team-a, key: ka}\n",
)
AUTH = {"Authorization": "Bearer ka"}
#: What the mock is told to report: 40 prompt tokens (32 cached), 20 out (8 reasoning).
REPORTED = {
    "prompt_tokens": 40,
    "completion_tokens": 20,
    "total_tokens": 60,
    "prompt_tokens_details": {"cached_tokens": 32},
    "completion_tokens_details": {"reasoning_tokens": 8},
}
#: 8 * 2.5 + 32 * 1.25 + (12 + 8) * 10, per million.
COST = Decimal("0.00026")


def row(h: Harness, model: str = "m1") -> dict[str, Any]:
    stats = h.request("GET", "/stats", headers=AUTH).json()
    found: dict[str, Any] = stats["keys"]["team-a"][model]
    return found


class CostTests(SynchronousTestCase):
    def test_a_priced_answer_says_its_cost_and_is_counted_by_kind(self) -> None:
        h = Harness(PRICED)
        answer = h.request(
            "POST", "/v1/chat/completions", chat(mock={"usage": REPORTED}), headers=AUTH
        )
        assert answer.code == 200
        assert answer.header("x-llmproxy-cost-usd") == "0.00026"
        r = row(h)
        assert r["tokens"] == {"input": 8, "cached_input": 32, "output": 12, "reasoning": 8}
        assert r["requests"] == 1 and Decimal(repr(r["cost_usd"])) == COST
        assert r["estimated_tokens"] == {"input": 0, "output": 0}
        metrics = h.request("GET", "/metrics", headers=AUTH).body.decode()
        assert 'llmproxy_tokens_total{key="team-a",kind="cached_input",model="m1"} 32.0' in metrics
        assert 'llmproxy_cost_usd_total{key="team-a",model="m1"} 0.00026' in metrics
        assert "ka" not in json.dumps(h.request("GET", "/stats", headers=AUTH).json()["keys"])

    def test_no_price_no_cost_and_no_guess(self) -> None:
        h = Harness(PRICED)
        body = {**chat(mock={"usage": REPORTED}), "model": "m2"}
        answer = h.request("POST", "/v1/chat/completions", body, headers=AUTH)
        assert answer.code == 200 and answer.header("x-llmproxy-cost-usd") is None
        r = row(h, "m2")
        assert r["tokens"]["cached_input"] == 32 and r["cost_usd"] == 0.0

    def test_an_answer_without_usage_is_estimated_apart(self) -> None:
        h = Harness(PRICED)
        answer = h.request(
            "POST", "/v1/chat/completions", chat(mock={"no_usage": True}), headers=AUTH
        )
        assert answer.code == 200 and "usage" not in answer.json()
        assert answer.header("x-llmproxy-cost-usd") is None  # an estimate is no cost to quote
        r = row(h)
        assert r["tokens"] == {"input": 0, "cached_input": 0, "output": 0, "reasoning": 0}
        assert r["estimated_tokens"]["input"] > 0 and r["cost_usd"] == 0.0
        assert r["estimated_cost_usd"] > 0

    def test_a_cache_hit_costs_nothing_and_counts_as_saved(self) -> None:
        h = Harness(PRICED)
        for _ in range(2):
            answer = h.request(
                "POST", "/v1/chat/completions", chat(mock={"usage": REPORTED}), headers=AUTH
            )
        assert answer.header("x-llmproxy-cache") == "hit"
        assert answer.header("x-llmproxy-cost-usd") is None
        r = row(h)
        assert r["requests"] == 2 and r["tokens"]["cached_input"] == 32  # one call's worth
        assert Decimal(repr(r["cost_usd"])) == COST and Decimal(repr(r["saved_usd"])) == COST


class ForcedUsageTests(SynchronousTestCase):
    FORCED = PRICED + "routing: {stream_usage: force}\ncache: {backend: off}\n"

    def test_the_client_gets_the_bytes_it_would_have_got_and_the_usage_is_counted(self) -> None:
        plain = Harness(PRICED + "cache: {backend: off}\n")
        forced = Harness(self.FORCED)
        body = chat("three little words", stream=True, mock={"usage": REPORTED})
        without = plain.request("POST", "/v1/chat/completions", body, headers=AUTH)
        withit = forced.request("POST", "/v1/chat/completions", body, headers=AUTH)
        assert _normalised(withit.body) == _normalised(without.body)
        assert withit.body.count(b"data: ") == without.body.count(b"data: ") > 3
        assert b'"usage"' not in withit.body
        sent = json.loads(forced.seen()[-1]["body"])
        assert sent["stream_options"] == {"include_usage": True}
        assert "stream_options" not in json.loads(plain.seen()[-1]["body"])
        assert row(forced)["tokens"] == {
            "input": 8,
            "cached_input": 32,
            "output": 12,
            "reasoning": 8,
        }
        assert row(plain)["tokens"]["input"] == 0  # estimated instead
        assert row(plain)["estimated_tokens"]["input"] > 0

    def test_a_stream_that_asked_for_its_usage_keeps_it(self) -> None:
        forced = Harness(self.FORCED)
        body = chat("x", stream=True, stream_options={"include_usage": True})
        answer = forced.request("POST", "/v1/chat/completions", body, headers=AUTH)
        assert b'"choices":[],"usage":{' in answer.body


def _normalised(body: bytes) -> bytes:
    """The stream's bytes with the mock's per-call id and time written as placeholders."""
    body = re.sub(rb'"id":"chatcmpl_[0-9a-f]+"', b'"id":"ID"', body)
    return re.sub(rb'"created":\d+', b'"created":0', body)


class FlightCostTests(SynchronousTestCase):
    def test_only_the_request_that_made_the_call_is_told_its_cost(self) -> None:
        h = Harness(PRICED)
        body = chat("together", mock={"gate": True, "usage": REPORTED})
        pending = [h.start("POST", "/v1/chat/completions", body, headers=AUTH) for _ in range(3)]
        h.pump()
        h.mocks["a"].gated.pop().callback(None)
        answers = [h.finish(d) for d in pending]
        assert len(h.seen()) == 1 and len({a.body for a in answers}) == 1
        costs = sorted(a.header("x-llmproxy-cost-usd") or "" for a in answers)
        assert costs == ["", "", "0.00026"]
        assert [a.header("x-llmproxy-coalesced") for a in answers].count("1") == 2
        assert Decimal(repr(row(h)["cost_usd"])) == COST


class BudgetStatsTests(SynchronousTestCase):
    def test_stats_show_each_budget_and_its_spend_by_name(self) -> None:
        h = Harness(
            PRICED.replace(
                "{name: team-a, key: ka}", "{name: team-a, key: ka, budget: {usd: 5, period: day}}"
            )
        )
        h.request("POST", "/v1/chat/completions", chat(mock={"usage": REPORTED}), headers=AUTH)
        budget = h.request("GET", "/stats", headers=AUTH).json()["budgets"]["team-a"]
        assert budget["usd"] == 5 and budget["period"] == "day"
        assert Decimal(repr(budget["spent_usd"])) == COST
