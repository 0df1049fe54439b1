"""
The Anthropic Messages API through the in-memory gateway: which upstreams
serve it, how a request is forwarded (``x-api-key``, the ``anthropic-*``
headers), errors in Anthropic's shape, its streams (terminal event, a cut, the
cache) and its usage.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from twisted.trial.unittest import SynchronousTestCase

from llmproxy import errors
from llmproxy.answers import Inspector, Usage, worth_storing
from llmproxy.auth import bearer_token
from llmproxy.config import ConfigError, parse_yaml
from llmproxy.site import api_of
from llmproxy.sse import SSEParser
from tests.harness import Harness, events

VERSION = {"anthropic-version": "2023-06-01"}

CONFIG = """
upstreams:
  a: {base_url: http://a.test/v1, api_key: sk-up-a, apis: [anthropic]}
  b: {base_url: http://b.test/v1, api_key: sk-up-b, apis: [openai, anthropic]}
  o: {base_url: http://o.test/v1, api_key: sk-up-o}
models:
  claude:
    strategy: priority
    targets:
      - {upstream: a, model: claude-sonnet-4-5, weight: 2}
      - {upstream: b, weight: 1}
  claude-only: {targets: [{upstream: a}]}
  gpt: {targets: [{upstream: o}]}
  both: {targets: [{upstream: o}, {upstream: b}]}
auth:
  keys:
    - {name: team-a, key: sk-client-a}
    - {name: narrow, key: sk-client-n, models: [gpt]}
cache: {backend: memory}
"""

KEY = {"x-api-key": "sk-client-a", **VERSION}


def message(text: str = "hello", model: str = "claude", **extra: Any) -> dict[str, Any]:
    return {
        "model": model,
        "max_tokens": 100,
        "messages": [{"role": "user", "content": text}],
        **extra,
    }


def anthropic_error(answer: Any) -> tuple[str, str]:
    body = answer.json()
    assert body["type"] == "error", body
    assert set(body["error"]) == {"type", "message"}, body
    return body["error"]["type"], body["error"]["message"]


def harness() -> Harness:
    return Harness(CONFIG, mocks=("a", "b", "o"))


class ConfigTests(SynchronousTestCase):
    def test_apis_default_to_openai_and_reach_the_targets(self) -> None:
        config = parse_yaml(CONFIG, "t", {})
        assert config.upstreams["o"].apis == frozenset({"openai"})
        assert config.upstreams["b"].apis == frozenset({"openai", "anthropic"})
        claude = config.models["claude"]
        assert [t.apis for t in claude.targets] == [
            frozenset({"anthropic"}),
            config.upstreams["b"].apis,
        ]
        assert [t.upstream for t in claude.serving("openai").targets] == ["b"]
        assert claude.serving("anthropic") is claude
        assert not config.models["gpt"].serves("anthropic")

    def test_unknown_or_empty_apis_and_a_proxy_header_are_refused(self) -> None:
        for apis, message in (("[grpc]", "expected one of openai, anthropic"), ("[]", "at least")):
            text = CONFIG.replace("apis: [anthropic]}", f"apis: {apis}}}", 1)
            with pytest.raises(ConfigError, match=message) as caught:
                parse_yaml(text, "t", {})
            assert "upstreams.a.apis" in str(caught.value)
        text = CONFIG.replace("apis: [anthropic]}", "apis: [anthropic], headers: {X-Api-Key: k}}")
        with pytest.raises(ConfigError, match="set by the proxy"):
            parse_yaml(text, "t", {})


class ShapeTests(SynchronousTestCase):
    def test_the_api_of_a_request_follows_its_path(self) -> None:
        assert api_of(b"/v1/messages", False) == errors.ANTHROPIC
        assert api_of(b"/messages/count_tokens", False) == errors.ANTHROPIC
        assert api_of(b"/v1/messagesx", False) == errors.OPENAI
        assert api_of(b"/v1/models", False) == errors.OPENAI
        assert api_of(b"/v1/models/claude", True) == errors.ANTHROPIC
        assert api_of(b"/v1/chat/completions", True) == errors.OPENAI

    def test_each_status_has_its_anthropic_type(self) -> None:
        table = {
            400: "invalid_request_error",
            401: "authentication_error",
            403: "permission_error",
            404: "not_found_error",
            405: "invalid_request_error",
            413: "request_too_large",
            429: "rate_limit_error",
            500: "api_error",
            502: "api_error",
            504: "api_error",
            503: "overloaded_error",
        }
        for status, kind in table.items():
            error = errors.APIError(status, "why")
            assert json.loads(error.body(errors.ANTHROPIC)) == {
                "type": "error",
                "error": {"type": kind, "message": "why"},
            }
        event = errors.bad_gateway("cut").sse_event(errors.ANTHROPIC)
        assert event.startswith(b"event: error\ndata: {")
        assert json.loads(event.split(b"data: ")[1]) == {
            "type": "error",
            "error": {"type": "api_error", "message": "cut"},
        }

    def test_a_key_from_x_api_key_or_bearer_and_two_different_are_refused(self) -> None:
        assert bearer_token({"x-api-key": "k1"}) == "k1"
        assert bearer_token({"authorization": "Bearer k1"}) == "k1"
        assert bearer_token({"authorization": "Bearer k1", "x-api-key": "k1"}) == "k1"
        with pytest.raises(errors.APIError) as caught:
            bearer_token({"authorization": "Bearer k1", "x-api-key": "k2"})
        assert caught.value.status == 401

    def test_messages_usage_counts_cache_reads_as_cached_and_writes_as_input(self) -> None:
        usage = Usage.of(
            {
                "input_tokens": 50,
                "cache_creation_input_tokens": 5,
                "cache_read_input_tokens": 20,
                "output_tokens": 7,
            }
        )
        assert usage == Usage(input=55, cached_input=20, output=7)

    def test_a_stream_is_complete_at_message_stop_unless_truncated(self) -> None:
        def inspected(stop: str) -> Inspector:
            inspector = Inspector("messages")
            raw = (
                b"event: message_start\ndata: "
                b'{"type":"message_start","message":{"usage":{"input_tokens":9,'
                b'"cache_read_input_tokens":3,"output_tokens":1}}}\n\n'
                b"event: message_delta\ndata: "
                b'{"type":"message_delta","delta":{"stop_reason":"' + stop.encode() + b'"},'
                b'"usage":{"output_tokens":12}}\n\n'
                b'event: message_stop\ndata: {"type":"message_stop"}\n\n'
            )
            for event in SSEParser().feed(raw):
                assert inspector.event(event) is event
            return inspector

        done = inspected("end_turn")
        assert done.terminal == "message_stop" and done.complete
        assert done.uncacheable is None
        assert done.usage == Usage(input=9, cached_input=3, output=12)
        truncated = inspected("max_tokens")
        assert truncated.uncacheable is not None

    def test_a_whole_message_is_worth_storing_only_when_finished(self) -> None:
        def body(stop: str | None, content: list[Any]) -> bytes:
            return json.dumps({"type": "message", "stop_reason": stop, "content": content}).encode()

        text = [{"type": "text", "text": "hi"}]
        assert worth_storing("messages", body("end_turn", text))
        assert not worth_storing("messages", body("max_tokens", text))
        assert not worth_storing("messages", body(None, text))
        assert not worth_storing("messages", body("end_turn", []))


class ForwardingTests(SynchronousTestCase):
    def test_the_upstream_gets_x_api_key_the_anthropic_headers_and_the_body(self) -> None:
        h = harness()
        raw = (
            b'{"model": "claude", "max_tokens": 100, "cache": {"ttl": 5},'
            b' "messages": [{"role": "user", "content": "hi"}]}'
        )
        answer = h.request(
            "POST",
            "/v1/messages",
            raw=raw,
            headers={
                "Authorization": "Bearer sk-client-a",
                "anthropic-beta": "prompt-caching-2024-07-31",
                "X-Other": "no",
                **VERSION,
            },
        )
        assert answer.code == 200, answer.body
        seen = h.seen("a")[-1]
        assert seen["path"] == "/v1/messages"
        assert seen["headers"]["x-api-key"] == "sk-up-a"
        assert "authorization" not in seen["headers"]
        assert seen["headers"]["anthropic-version"] == "2023-06-01"
        assert seen["headers"]["anthropic-beta"] == "prompt-caching-2024-07-31"
        assert "x-other" not in seen["headers"]
        assert seen["body"] == (
            '{"model": "claude-sonnet-4-5", "max_tokens": 100,'
            ' "messages": [{"role": "user", "content": "hi"}]}'
        )
        assert answer.json()["type"] == "message"
        assert (
            answer.header(
                "request-id",
            )
            is not None
        )

    def test_an_openai_request_never_gets_the_anthropic_headers(self) -> None:
        h = harness()
        body = {"model": "gpt", "messages": [{"role": "user", "content": "hi"}]}
        headers = {"Authorization": "Bearer sk-client-a", "anthropic-beta": "x", **VERSION}
        assert h.request("POST", "/v1/chat/completions", body, headers=headers).code == 200
        seen = h.seen("o")[-1]["headers"]
        assert seen["authorization"] == "Bearer sk-up-o"
        assert "x-api-key" not in seen and "anthropic-beta" not in seen

    def test_only_targets_that_serve_the_api_are_tried(self) -> None:
        h = harness()
        chat = {"model": "claude", "messages": [{"role": "user", "content": "hi"}]}
        openai = h.request("POST", "/v1/chat/completions", chat, headers=KEY)
        assert openai.code == 200 and openai.header("x-llmproxy-upstream") == "b"
        both = h.request("POST", "/v1/messages", message(model="both"), headers=KEY)
        assert both.code == 200 and both.header("x-llmproxy-upstream") == "b"
        assert h.seen("o") == []

    def test_529_is_retried_on_another_target_and_cools_the_first(self) -> None:
        h = harness()
        h.mocks["a"].config = {"overloaded": True}
        for n in range(3):
            answer = h.request("POST", "/v1/messages", message(f"try {n}"), headers=KEY)
            assert answer.code == 200, answer.body
            assert answer.header("x-llmproxy-upstream") == "b"
        assert h.target("a/claude-sonnet-4-5")["state"] == "cooling_down"
        # With a Retry-After, one 529 is enough, as one 429 is.
        h = harness()
        h.mocks["a"].config = {"overloaded": True, "headers": {"retry-after": "20"}}
        answer = h.request("POST", "/v1/messages", message(), headers=KEY)
        assert answer.header("x-llmproxy-upstream") == "b"
        target = h.target("a/claude-sonnet-4-5")
        assert target["state"] == "cooling_down" and target["cooldown_remaining"] == 20

    def test_count_tokens_is_relayed_and_never_charged(self) -> None:
        h = harness()
        body = {"model": "claude", "messages": [{"role": "user", "content": "count these words"}]}
        answer = h.request("POST", "/v1/messages/count_tokens", body, headers=KEY)
        assert answer.code == 200 and answer.json() == {"input_tokens": 3}
        assert h.seen("a")[-1]["path"] == "/v1/messages/count_tokens"
        stats = h.request("GET", "/stats").json()
        assert stats["keys"]["team-a"]["claude"]["tokens"] == dict.fromkeys(
            ("input", "cached_input", "output", "reasoning"), 0
        )
        assert stats["keys"]["team-a"]["claude"]["estimated_tokens"] == {"input": 0, "output": 0}


class ErrorTests(SynchronousTestCase):
    def test_the_gateways_errors_are_anthropic_shaped_on_messages(self) -> None:
        h = harness()
        cases = [
            (message(model="nope"), KEY, 404, "not_found_error"),
            (message(model="gpt"), KEY, 404, "not_found_error"),
            (message(), VERSION, 401, "authentication_error"),
            (message(), {"x-api-key": "wrong", **VERSION}, 401, "authentication_error"),
            (
                message(),
                {"x-api-key": "sk-client-a", "Authorization": "Bearer sk-client-n", **VERSION},
                401,
                "authentication_error",
            ),
            (message(), {"x-api-key": "sk-client-n", **VERSION}, 403, "permission_error"),
            ({"max_tokens": 5}, KEY, 400, "invalid_request_error"),
        ]
        for body, headers, status, kind in cases:
            answer = h.request("POST", "/v1/messages", body, headers=headers)
            assert answer.code == status, (body, headers, answer.body)
            assert anthropic_error(answer)[0] == kind
        malformed = h.request("POST", "/v1/messages", raw=b"{not json", headers=KEY)
        assert (malformed.code, anthropic_error(malformed)[0]) == (400, "invalid_request_error")
        unknown = h.request("POST", "/v1/messages/nothing", message(), headers=KEY)
        assert (unknown.code, anthropic_error(unknown)[0]) == (404, "not_found_error")

    def test_an_openai_route_on_an_anthropic_only_model_is_an_openai_404(self) -> None:
        h = harness()
        chat = {"model": "claude-only", "messages": [{"role": "user", "content": "hi"}]}
        answer = h.request("POST", "/v1/chat/completions", chat, headers=KEY)
        assert answer.code == 404
        assert answer.json()["error"]["code"] == "model_not_found"
        assert "OpenAI API" in answer.json()["error"]["message"]

    def test_an_upstream_4xx_passes_through_and_a_non_json_one_is_wrapped(self) -> None:
        h = harness()
        theirs = {"type": "error", "error": {"type": "invalid_request_error", "message": "bad"}}
        answer = h.request(
            "POST", "/v1/messages", message(mock={"status": 400, "body": theirs}), headers=KEY
        )
        assert answer.code == 400 and answer.json() == theirs
        h.mocks["a"].config = {"status": 502, "body": "<html>bad gateway</html>"}
        h.mocks["b"].config = {"status": 502, "body": "<html>bad gateway</html>"}
        wrapped = h.request("POST", "/v1/messages", message(), headers=KEY)
        assert wrapped.code == 502
        assert anthropic_error(wrapped)[0] == "api_error"

    def test_models_are_listed_in_the_shape_of_the_api_that_asks(self) -> None:
        h = harness()
        listed = h.request("GET", "/v1/models", headers=KEY).json()
        assert listed == {
            "data": [
                {
                    "type": "model",
                    "id": name,
                    "display_name": name,
                    "created_at": "1970-01-01T00:00:00Z",
                }
                for name in ("claude", "claude-only", "both")
            ],
            "has_more": False,
            "first_id": "claude",
            "last_id": "both",
        }
        openai = h.request("GET", "/v1/models", headers={"x-api-key": "sk-client-a"}).json()
        assert [m["id"] for m in openai["data"]] == ["claude", "gpt", "both"]
        one = h.request("GET", "/models/claude-only", headers=KEY)
        assert one.json()["type"] == "model"
        missing = h.request("GET", "/v1/models/gpt", headers=KEY)
        assert (missing.code, anthropic_error(missing)[0]) == (404, "not_found_error")


class StreamTests(SynchronousTestCase):
    def test_the_events_are_relayed_in_order_and_a_repeat_is_a_hit(self) -> None:
        h = harness()
        body = message("stream this please", stream=True)
        first = h.request("POST", "/v1/messages", body, headers=KEY)
        assert first.code == 200
        assert first.header("content-type") == "text/event-stream; charset=utf-8"
        kinds = [e.split("\n")[0] for e in events(first.body)]
        assert kinds[:3] == ["event: message_start", "event: content_block_start", "event: ping"]
        assert kinds[-3:] == [
            "event: content_block_stop",
            "event: message_delta",
            "event: message_stop",
        ]
        assert set(kinds[3:-3]) == {"event: content_block_delta"}
        again = h.request("POST", "/v1/messages", body, headers=KEY)
        assert again.header("x-llmproxy-cache") == "hit"
        assert again.body == first.body
        assert len(h.seen("a")) == 1
        row = h.request("GET", "/stats").json()["keys"]["team-a"]["claude"]
        assert row["tokens"]["input"] == 3 and row["tokens"]["output"] > 0

    def test_another_anthropic_version_is_another_cache_entry(self) -> None:
        h = harness()
        h.request("POST", "/v1/messages", message("versioned"), headers=KEY)
        other = {**KEY, "anthropic-version": "2026-10-21"}
        again = h.request("POST", "/v1/messages", message("versioned"), headers=other)
        assert again.header("x-llmproxy-cache") == "miss"

    def test_a_cut_stream_ends_with_an_anthropic_error_event(self) -> None:
        h = harness()
        answer = h.request(
            "POST", "/v1/messages", message(stream=True, mock={"cut_after": 3}), headers=KEY
        )
        assert answer.code == 200
        last = events(answer.body)[-1]
        assert last.startswith("event: error\ndata: ")
        payload = json.loads(last.split("data: ", 1)[1])
        assert payload["type"] == "error" and payload["error"]["type"] == "api_error"
        assert b"message_stop" not in answer.body
        again = h.request(
            "POST", "/v1/messages", message(stream=True, mock={"cut_after": 3}), headers=KEY
        )
        assert again.header("x-llmproxy-cache") == "miss"  # nothing was stored

    def test_a_truncated_or_failed_answer_is_not_stored(self) -> None:
        h = harness()
        cases = [
            message("one two three four five", max_tokens=2),
            message("one two three four five", max_tokens=2, stream=True),
            message("failing", stream=True, mock={"error_chunk": "overloaded"}),
        ]
        for body in cases:
            assert h.request("POST", "/v1/messages", body, headers=KEY).code == 200
            again = h.request("POST", "/v1/messages", body, headers=KEY)
            assert again.header("x-llmproxy-cache") == "miss", body


class HealthCheckTests(SynchronousTestCase):
    def test_an_anthropic_only_upstream_is_checked_as_anthropic_asks(self) -> None:
        h = Harness(
            CONFIG + "routing: {health_checks: {interval: 10, timeout: 5}}\n",
            mocks=("a", "b", "o"),
        )
        assert h.checks is not None
        h.checks.startService()
        h.pump()
        h.checks.stopService()
        checked = h.seen("a")[-1]
        assert checked["path"] == "/v1/models"
        assert checked["headers"]["x-api-key"] == "sk-up-a"
        assert checked["headers"]["anthropic-version"] == "2023-06-01"
        assert "authorization" not in checked["headers"]
        assert h.seen("b")[-1]["headers"]["authorization"] == "Bearer sk-up-b"
        assert h.target("a/claude-sonnet-4-5")["state"] == "healthy"
