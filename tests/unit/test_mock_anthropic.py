"""
The mock upstream's Anthropic Messages API, driven in memory: the bytes and
statuses an Anthropic client gets, as the real API sends them.
"""

from __future__ import annotations

import json
from typing import Any

import treq
from treq.testing import RequestTraversalAgent
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers

from llmproxy.testing.mock import MockUpstream
from llmproxy.upstream.client import upstream_client
from tests.harness import run

KEY = "sk-ant-mock"
GOOD = {"x-api-key": KEY, "anthropic-version": "2023-06-01", "content-type": "application/json"}
STREAM_ORDER = [
    "message_start",
    "content_block_start",
    "ping",
    *["content_block_delta"] * 7,
    "content_block_stop",
    "message_delta",
    "message_stop",
]


def ask(text: str = "hi there", **extra: Any) -> dict[str, Any]:
    return {
        "model": "claude-test",
        "max_tokens": 100,
        "messages": [{"role": "user", "content": text}],
        **extra,
    }


class Answer:
    def __init__(self, code: int, headers: Headers, body: bytes) -> None:
        self.code, self.headers, self.body = code, headers, body

    def header(self, name: str) -> str | None:
        values = self.headers.getRawHeaders(name)
        return values[0] if values else None

    def json(self) -> Any:
        return json.loads(self.body)

    def events(self) -> list[tuple[str, dict[str, Any]]]:
        """(event name, data) of each SSE event, checking each block's framing."""
        found = []
        for block in self.body.decode().split("\n\n")[:-1]:
            head, data = block.split("\n")
            assert head.startswith("event: ") and data.startswith("data: "), block
            payload = data[len("data: ") :]
            parsed = json.loads(payload)
            assert json.dumps(parsed, separators=(",", ":")) == payload, "not compact JSON"
            found.append((head[len("event: ") :], parsed))
        assert self.body.endswith(b"\n\n")
        return found


class MessagesTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.mock = MockUpstream(self.clock, name="a", api_key=KEY)
        self.agent = RequestTraversalAgent(self.mock.app.resource())
        self.client = upstream_client(self.agent)

    def call(
        self,
        body: Any = None,
        path: str = "/v1/messages",
        headers: dict[str, str] | None = None,
        method: str = "POST",
    ) -> Answer:
        sent = Headers({k: [v] for k, v in (GOOD if headers is None else headers).items()})
        data = json.dumps(body).encode() if body is not None else None
        d = self.client.request(
            method, "http://a.test" + path, data=data, headers=sent, unbuffered=True
        )
        collected: list[bytes] = []

        async def whole() -> Answer:
            response = await d
            await treq.collect(response, collected.append)
            return Answer(response.code, response.headers, b"".join(collected))

        pending = Deferred.fromCoroutine(whole())
        for _ in range(100):
            self.clock.advance(0)
            self.agent.flush()
        return run(pending)

    def test_a_message(self) -> None:
        answer = self.call(ask("hi there"))
        assert answer.code == 200
        assert answer.header("content-type") == "application/json"
        assert (answer.header("request-id") or "").startswith("req_")
        message = answer.json()
        assert message["id"].startswith("msg_")
        del message["id"]
        assert message == {
            "type": "message",
            "role": "assistant",
            "model": "claude-test",
            "content": [{"type": "text", "text": "Hello from a! You said: hi there"}],
            "stop_reason": "end_turn",
            "stop_sequence": None,
            "usage": {
                "input_tokens": 2,
                "cache_creation_input_tokens": 0,
                "cache_read_input_tokens": 0,
                "output_tokens": 7,
            },
        }

    def test_content_blocks_and_system(self) -> None:
        """The last user message's text blocks are echoed; ``system`` is counted, not echoed."""
        blocks = [
            {"type": "text", "text": "look at"},
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": ""}},
            {"type": "text", "text": "this"},
        ]
        body = ask(system=[{"type": "text", "text": "be brief please"}])
        body["messages"] = [
            {"role": "user", "content": "first"},
            {"role": "assistant", "content": [{"type": "text", "text": "ok"}]},
            {"role": "user", "content": blocks},
        ]
        message = self.call(body).json()
        assert message["content"][0]["text"] == "Hello from a! You said: look at this"
        # system 3 + "first" 1 + "ok" 1 + "look at this" 3
        assert message["usage"]["input_tokens"] == 8
        assert self.call(body, "/v1/messages/count_tokens").json() == {"input_tokens": 8}

    def test_max_tokens_cuts_the_reply(self) -> None:
        message = self.call(ask(max_tokens=3)).json()
        assert message["content"][0]["text"] == "Hello from a!"
        assert message["stop_reason"] == "max_tokens"
        assert message["usage"]["output_tokens"] == 3
        answer = self.call(ask(max_tokens=3, stream=True))
        deltas = [d["delta"]["text"] for e, d in answer.events() if e == "content_block_delta"]
        assert deltas == ["Hello", " from", " a!"]
        delta = [d for e, d in answer.events() if e == "message_delta"][0]
        assert delta["delta"]["stop_reason"] == "max_tokens"
        assert delta["usage"] == {"output_tokens": 3}

    def test_max_tokens_is_required(self) -> None:
        body = ask()
        del body["max_tokens"]
        answer = self.call(body)
        assert answer.code == 400
        assert answer.json() == {
            "type": "error",
            "error": {"type": "invalid_request_error", "message": "max_tokens: Field required"},
        }

    def test_a_stream(self) -> None:
        answer = self.call(ask("hi there", stream=True))
        assert answer.code == 200
        assert answer.header("content-type") == "text/event-stream"
        assert (answer.header("request-id") or "").startswith("req_")
        events = answer.events()
        assert [e for e, _ in events] == STREAM_ORDER
        assert all(data["type"] == name for name, data in events)
        start = events[0][1]["message"]
        assert start["id"].startswith("msg_")
        assert {k: v for k, v in start.items() if k != "id"} == {
            "type": "message",
            "role": "assistant",
            "model": "claude-test",
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {
                "input_tokens": 2,
                "cache_creation_input_tokens": 0,
                "cache_read_input_tokens": 0,
                "output_tokens": 1,
            },
        }
        assert events[1][1] == {
            "type": "content_block_start",
            "index": 0,
            "content_block": {"type": "text", "text": ""},
        }
        assert events[3][1] == {
            "type": "content_block_delta",
            "index": 0,
            "delta": {"type": "text_delta", "text": "Hello"},
        }
        text = "".join(d["delta"]["text"] for e, d in events if e == "content_block_delta")
        assert text == "Hello from a! You said: hi there"
        assert events[-3][1] == {"type": "content_block_stop", "index": 0}
        assert events[-2][1] == {
            "type": "message_delta",
            "delta": {"stop_reason": "end_turn", "stop_sequence": None},
            "usage": {"output_tokens": 7},
        }
        assert answer.body.endswith(b'event: message_stop\ndata: {"type":"message_stop"}\n\n')

    def test_usage_knob(self) -> None:
        knobs = {"usage": {"cache_read_input_tokens": 5}}
        message = self.call(ask(mock=knobs)).json()
        assert message["usage"]["cache_read_input_tokens"] == 5
        assert message["usage"]["input_tokens"] == 2
        events = self.call(ask(stream=True, mock=knobs)).events()
        assert events[0][1]["message"]["usage"]["cache_read_input_tokens"] == 5
        assert "usage" not in self.call(ask(mock={"no_usage": True})).json()

    def test_error_chunk_ends_the_stream(self) -> None:
        events = self.call(ask(stream=True, mock={"error_chunk": "boom"})).events()
        assert [e for e, _ in events] == STREAM_ORDER[:-1] + ["error"]
        assert events[-1][1] == {"type": "error", "error": {"type": "api_error", "message": "boom"}}

    def test_count_tokens(self) -> None:
        body = {"model": "claude-test", "messages": [{"role": "user", "content": "one two three"}]}
        answer = self.call(body, "/v1/messages/count_tokens")
        assert answer.code == 200
        assert answer.json() == {"input_tokens": 3}
        assert (answer.header("request-id") or "").startswith("req_")

    def test_x_api_key(self) -> None:
        refused = {
            "type": "error",
            "error": {"type": "authentication_error", "message": "invalid x-api-key"},
        }
        wrong = self.call(ask(), headers={**GOOD, "x-api-key": "nope"})
        assert (wrong.code, wrong.json()) == (401, refused)
        missing = {k: v for k, v in GOOD.items() if k != "x-api-key"}
        assert self.call(ask(), headers=missing).code == 401
        bearer = {**missing, "authorization": f"Bearer {KEY}"}
        answer = self.call(ask(), headers=bearer)
        assert (answer.code, answer.json()) == (401, refused)
        assert self.call(ask()).code == 200

    def test_anthropic_version_is_required(self) -> None:
        headers = {k: v for k, v in GOOD.items() if k != "anthropic-version"}
        answer = self.call(ask(), headers=headers)
        assert answer.code == 400
        assert answer.json()["error"]["type"] == "invalid_request_error"
        assert "anthropic-version" in answer.json()["error"]["message"]

    def test_overloaded(self) -> None:
        answer = self.call(ask(mock={"overloaded": True}))
        assert answer.code == 529
        assert answer.json() == {
            "type": "error",
            "error": {"type": "overloaded_error", "message": "Overloaded"},
        }

    def test_status_knob_speaks_anthropic(self) -> None:
        for status, kind in [
            (429, "rate_limit_error"),
            (500, "api_error"),
            (403, "permission_error"),
        ]:
            answer = self.call(ask(mock={"status": status, "headers": {"retry-after": "3"}}))
            assert answer.code == status
            assert answer.json() == {
                "type": "error",
                "error": {"type": kind, "message": f"mock a failed with {status}"},
            }
            assert answer.header("retry-after") == "3"
        custom = self.call(ask(mock={"status": 400, "body": {"x": 1}}))
        assert (custom.code, custom.json()) == (400, {"x": 1})

    def test_stream_knobs_apply(self) -> None:
        answer = self.call(ask(stream=True, mock={"words": 2, "comment": "keepalive"}))
        assert answer.body.startswith(b": keepalive\n\nevent: message_start\n")
        deltas = answer.body.count(b"event: content_block_delta\n")
        assert deltas == 2
        assert b'"usage":{"output_tokens":2}' in answer.body

    def test_models_for_an_anthropic_client(self) -> None:
        page = self.call(path="/v1/models", method="GET").json()
        assert page["has_more"] is False
        assert page["first_id"] == page["data"][0]["id"]
        assert page["last_id"] == page["data"][-1]["id"]
        assert {"type", "id", "display_name", "created_at"} == set(page["data"][0])
        assert page["data"][0]["created_at"].endswith("Z")
        bad = self.call(path="/v1/models", method="GET", headers={**GOOD, "x-api-key": "no"})
        assert bad.code == 401
        openai = self.call(
            path="/v1/models", method="GET", headers={"authorization": f"Bearer {KEY}"}
        )
        assert openai.json()["object"] == "list"
        assert openai.header("request-id") is None

    def test_openai_routes_keep_bearer_auth(self) -> None:
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
        refused = self.call(body, "/v1/chat/completions", headers={"x-api-key": KEY})
        assert refused.code == 401
        assert refused.json()["error"]["code"] == "invalid_api_key"
        ok = self.call(body, "/v1/chat/completions", headers={"authorization": f"Bearer {KEY}"})
        assert ok.json()["choices"][0]["message"]["content"] == "Hello from a! You said: hi"
