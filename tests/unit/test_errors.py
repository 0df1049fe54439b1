"""One test per row of the error table: OpenAI-shaped, always JSON."""

from __future__ import annotations

from typing import Any

import treq
from twisted.internet import error as ierror
from twisted.internet.defer import fail
from twisted.trial.unittest import SynchronousTestCase

from tests.harness import Answer, Harness, Refused, chat, config_text

KEYS = """
auth:
  keys:
    - name: team-a
      key: key-a
      models: [m1]
      rpm: 2
    - name: team-b
      key_sha256: 7b4ccff5e0e4c1a3f2a9fa3e2f3a0b9e0d7c9e2a0ef8cd9ac1b4e8bc7f9a4e31
"""


def assert_openai_error(answer: Answer, status: int, code: str | None = None) -> dict[str, Any]:
    assert answer.code == status, answer.body
    assert answer.header("content-type") == "application/json"
    error = answer.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert b"Traceback" not in answer.body
    if code is not None:
        assert error["code"] == code
    assert answer.header("x-request-id")
    assert answer.header("x-llmproxy-cache") in ("bypass", "miss", "off")
    return error


class ConnectTimeout:
    def request(self, method: str, url: str, **kwargs: Any) -> Any:
        return fail(ierror.TimeoutError("connect timed out"))


class AuthErrorTests(SynchronousTestCase):
    def test_401_missing_key(self) -> None:
        h = Harness(config_text() + KEYS)
        answer = h.request("POST", "/v1/chat/completions", chat())
        assert_openai_error(answer, 401, "invalid_api_key")
        assert h.seen() == []

    def test_401_unknown_key(self) -> None:
        h = Harness(config_text() + KEYS)
        answer = h.request(
            "POST", "/v1/chat/completions", chat(), headers={"Authorization": "Bearer nope"}
        )
        assert_openai_error(answer, 401, "invalid_api_key")

    def test_401_before_body_is_even_parsed(self) -> None:
        h = Harness(config_text() + KEYS)
        assert_openai_error(h.request("POST", "/v1/chat/completions", raw=b"{bad"), 401)

    def test_key_sha256_authenticates(self) -> None:
        import hashlib

        digest = hashlib.sha256(b"key-b").hexdigest()
        h = Harness(config_text() + KEYS.replace(KEYS.split("key_sha256: ")[1].strip(), digest))
        answer = h.request(
            "POST", "/v1/chat/completions", chat(), headers={"Authorization": "Bearer key-b"}
        )
        assert answer.code == 200

    def test_403_model_not_allowed_for_key(self) -> None:
        h = Harness(config_text() + KEYS)
        answer = h.request(
            "POST",
            "/v1/chat/completions",
            dict(chat(), model="m2"),
            headers={"Authorization": "Bearer key-a"},
        )
        assert_openai_error(answer, 403, "model_not_allowed")
        listed = h.request("GET", "/v1/models", headers={"Authorization": "Bearer key-a"})
        assert [m["id"] for m in listed.json()["data"]] == ["m1"]


class RequestErrorTests(SynchronousTestCase):
    def test_400_bad_body(self) -> None:
        h = Harness()
        for raw, param in (
            (b'{"model": "m1", "messages": [', None),  # unparseable JSON
            (b'"just a string"', None),  # not an object
            (b'{"messages": []}', "model"),  # missing model
            (b'{"model": ["m1"], "messages": []}', "model"),  # non-string model
            (b'{"model": "m1", "messages": [], "stream": "true"}', "stream"),  # wrong type
            (b'{"model": "m1", "messages": [], "cache": "no"}', "cache"),  # bad proxy field
        ):
            error = assert_openai_error(h.request("POST", "/v1/chat/completions", raw=raw), 400)
            assert error["param"] == param and error["type"] == "invalid_request_error", raw
        assert h.seen() == []

    def test_404_unknown_model(self) -> None:
        h = Harness()
        error = assert_openai_error(
            h.request("POST", "/v1/chat/completions", dict(chat(), model="gpt-9")),
            404,
            "model_not_found",
        )
        assert error["param"] == "model"

    def test_404_unknown_route(self) -> None:
        h = Harness()
        assert_openai_error(h.request("GET", "/v1/nothing/here"), 404, "not_found")

    def test_405_wrong_method(self) -> None:
        h = Harness()
        answer = h.request("GET", "/v1/chat/completions")
        assert_openai_error(answer, 405, "method_not_allowed")
        assert answer.header("allow") == "POST"
        h.request("GET", "/nowhere")
        by_status = h.request("GET", "/stats").json()["requests"]["by_status"]
        assert by_status["405"] == 1 and by_status["404"] == 1  # counted like any answer

    def test_429_rate_limit_with_retry_after(self) -> None:
        h = Harness(config_text() + KEYS)
        auth = {"Authorization": "Bearer key-a"}
        assert h.request("POST", "/v1/chat/completions", chat("1"), headers=auth).code == 200
        assert h.request("POST", "/v1/chat/completions", chat("2"), headers=auth).code == 200
        answer = h.request("POST", "/v1/chat/completions", chat("3"), headers=auth)
        error = assert_openai_error(answer, 429, "rate_limit_exceeded")
        assert answer.response.phrase == b"Too Many Requests"
        assert error["type"] == "rate_limit_error"
        retry_after = int(answer.header("retry-after") or "0")
        assert 1 <= retry_after <= 120
        assert len(h.seen()) == 2
        h.clock.advance(120)  # two windows later the key is free again
        assert h.request("POST", "/v1/chat/completions", chat("4"), headers=auth).code == 200


class UpstreamErrorTests(SynchronousTestCase):
    def test_502_upstream_failed(self) -> None:
        h = Harness(clients={"a": Refused()})
        answer = h.request("POST", "/v1/chat/completions", chat())
        error = assert_openai_error(answer, 502, "bad_gateway")
        assert "connection refused" in error["message"]

    def test_502_upstream_5xx_after_retries_passes_the_last_error(self) -> None:
        h = Harness()
        answer = h.request("POST", "/v1/chat/completions", chat(mock={"status": 500}))
        assert answer.code == 500
        assert answer.json()["error"]["message"] == "mock a failed with 500"

    def test_503_no_usable_upstream(self) -> None:
        one_model = "  m1:\n    targets:\n      - upstream: a\n"
        h = Harness(config_text(models=one_model), clients={"a": Refused()})
        for _ in range(3):  # three consecutive failures put the only target in cooldown
            h.request("POST", "/v1/chat/completions", chat())
        answer = h.request("POST", "/v1/chat/completions", chat())
        assert_openai_error(answer, 503, "no_upstream_available")
        health = h.request("GET", "/health")
        assert health.code == 503 and health.json()["status"] == "unavailable"

    def test_504_upstream_timed_out(self) -> None:
        h = Harness(config_text(timeouts="{first_byte: 10}"))
        d = h.start("POST", "/v1/chat/completions", chat(mock={"hang": True}))
        h.clock.advance(10)
        h.pump()
        response = h.result(d)
        body: list[bytes] = []
        h.result(treq.collect(response, body.append))
        answer = Answer(response, b"".join(body))
        error = assert_openai_error(answer, 504, "upstream_timeout")
        assert "no response headers within 10s" in error["message"]
        # The hanging upstream's connection was closed, not left open.
        assert h.mocks["a"].stats["requests"] == 1

    def test_504_connect_timeout(self) -> None:
        h = Harness(config_text(timeouts="{connect: 3}"), clients={"a": ConnectTimeout()})
        error = assert_openai_error(
            h.request("POST", "/v1/chat/completions", chat()), 504, "upstream_timeout"
        )
        assert "connect timeout of 3s" in error["message"]

    def test_504_body_stalls_before_reaching_the_client(self) -> None:
        h = Harness(config_text(timeouts="{idle: 4}"))
        d = h.start("POST", "/v1/chat/completions", chat(mock={"stall_after_headers": True}))
        h.tick(4)
        response = h.result(d)
        body: list[bytes] = []
        h.result(treq.collect(response, body.append))
        error = assert_openai_error(Answer(response, b"".join(body)), 504, "upstream_timeout")
        assert "idle timeout of 4s" in error["message"]


class Exploding:
    """An upstream client with a bug: it raises where it should return a Deferred."""

    def request(self, method: str, url: str, **kwargs: Any) -> Any:
        raise RuntimeError("secret internals sk-upstream-a-secret")


class InternalErrorTests(SynchronousTestCase):
    def test_500_internal_errors_are_generic_and_logged(self) -> None:
        h = Harness(clients={"a": Exploding()})
        answer = h.request("POST", "/v1/chat/completions", chat())
        error = assert_openai_error(answer, 500, "internal_error")
        rid = answer.header("x-request-id")
        assert rid is not None
        assert "secret" not in error["message"] and rid in error["message"]
        assert b"secret" not in answer.body
        # The operator gets the traceback in the log, under the same request id.
        logged = self.flushLoggedErrors(RuntimeError)
        assert len(logged) == 1
        # The attempt gave back what it held: the target takes requests again.
        assert h.target("a/upstream-m1")["inflight"] == 0
