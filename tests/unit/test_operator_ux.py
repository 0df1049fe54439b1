"""What an operator or a caller reads when something is off: /metrics without
``_created`` series, and a 404 for an unknown model that says what may be used."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from llmproxy import errors
from tests.harness import Harness, chat, config_text

KEYS = """
auth:
  keys:
    - {name: all, key: key-all}
    - {name: narrow, key: key-narrow, models: [m2]}
"""


class MetricsTests(SynchronousTestCase):
    def test_no_created_series(self) -> None:
        h = Harness()
        assert h.request("POST", "/v1/chat/completions", chat()).code == 200
        text = h.request("GET", "/metrics").body.decode()
        assert "llmproxy_requests_total{" in text
        assert "_created" not in text


class UnknownModelTests(SynchronousTestCase):
    def test_the_404_lists_the_models_the_caller_may_use(self) -> None:
        h = Harness(config_text(extra=KEYS))
        answer = h.request(
            "POST",
            "/v1/chat/completions",
            dict(chat(), model="gpt-5"),
            headers={"Authorization": "Bearer key-narrow"},
        )
        assert answer.code == 404
        message = answer.json()["error"]["message"]
        assert "'gpt-5'" in message and "Models you may use: m2." in message
        assert "m1" not in message
        wide = h.request(
            "GET", "/v1/models/gpt-5", headers={"Authorization": "Bearer key-all"}
        ).json()
        assert "Models you may use: m1, m2." in wide["error"]["message"]

    def test_the_list_is_capped(self) -> None:
        names = [f"model-{i}" for i in range(25)]
        message = errors.model_not_found("x", names).message
        assert "model-19" in message and "model-20" not in message
        assert message.endswith("and 5 more.")
        assert errors.model_not_found("x", []).message.endswith("You may use none.")


class HealthTests(SynchronousTestCase):
    def test_a_cooling_target_shows_the_failures_that_tripped_it(self) -> None:
        h = Harness(
            config_text(extra="routing: {retries: 0, cooldown: {failures: 2, seconds: 30}}\n")
        )
        h.mocks["a"].config = {"status": 500}
        for n in range(2):
            assert h.request("POST", "/v1/chat/completions", chat(f"fail {n}")).code == 500
        target = h.target("a/upstream-m1")
        assert target["state"] == "cooling_down"
        assert target["consecutive_failures"] == 2
        assert target["cooling_until"] == 30 and target["cooldown_remaining"] == 30
        assert target["last_error"] == "http: HTTP 500"
        h.mocks["a"].config = {}
        h.tick(30)
        assert h.request("POST", "/v1/chat/completions", chat("probe")).code == 200
        target = h.target("a/upstream-m1")
        assert (target["state"], target["consecutive_failures"]) == ("healthy", 0)
