"""
The Anthropic Messages API through the proxy, as users run it: a real proxy
process in front of real mock upstreams (``twistd -n llmproxy-mock``) that
insist on their own ``x-api-key``, driven by the official ``anthropic`` SDK and
by raw HTTP.

Asserted with what clients get (status, headers, bytes, the SDK's parsed
objects and exception classes), what each upstream saw (path, headers, body
bytes) and what ``/stats`` counts.

The SDK (2.x) sends its ``api_key`` as ``Authorization: Bearer``; the raw
requests here send the client key as ``x-api-key``, as older SDKs and curl
users do.  Both must reach the upstream as the target's ``x-api-key`` only.
"""

from __future__ import annotations

import asyncio
import http.client
import itertools
import json
import signal
import socket
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest
from anthropic.types import MessageParam

from llmproxy.testing.processes import Mock, Proxy, Reply, closed_port, http_call, wait_for
from tests.system.harness import (
    StartProxy,
    events_arrived,
    raw_post,
    read_to_close,
    read_until,
    response_ended,
)

CLIENT_KEY = "sk-client-a"
#: May use only these two models (one OpenAI-only, one Anthropic-only).
LIMITED_KEY = "sk-client-limited"
#: One request a minute.
SLOW_KEY = "sk-client-slow"
UPSTREAM_KEYS = {"a": "sk-up-a", "b": "sk-up-b", "o": "sk-up-o"}
VERSION = "2023-06-01"
MAX_BODY = 8192

#: Every public model that has a target serving the Anthropic API.
CLAUDE_MODELS = {
    "claude",
    "claude-only",
    "claude-usage",
    "claude-usage-stream",
    "claude-count",
    "claude-keyless",
    "claude-dead",
}

#: What the mock reports with the ``usage`` knob: cache reads are cached input,
#: cache writes are input (Anthropic's ``input_tokens`` counts neither).
USAGE = {
    "input_tokens": 50,
    "cache_creation_input_tokens": 5,
    "cache_read_input_tokens": 20,
    "output_tokens": 7,
}
TOKENS = {"input": 55, "cached_input": 20, "output": 7, "reasoning": 0}

_prompts = itertools.count()


def prompt(what: str) -> str:
    """A prompt no other request of this module sends (the proxy caches)."""
    return f"{what} number {next(_prompts)}"


def config(mocks: dict[str, Mock], server: str = "", routing: str = "") -> str:
    """The module's config; ``server`` and ``routing`` add settings to those sections."""
    a, b, o, n = (mocks[name].base_url for name in "abon")
    return f"""
server: {{max_body_bytes: {MAX_BODY}{server}}}
upstreams:
  a: {{base_url: {a}, api_key: sk-up-a, apis: [anthropic]}}
  b: {{base_url: {b}, api_key: sk-up-b, apis: [anthropic, openai]}}
  o: {{base_url: {o}, api_key: sk-up-o}}
  n: {{base_url: {n}, apis: [anthropic]}}
  dead: {{base_url: "http://127.0.0.1:{closed_port()}/v1", api_key: sk-up-dead, apis: [anthropic]}}
models:
  claude:
    strategy: priority
    targets: [{{upstream: a, model: claude-sonnet-4-5}}, {{upstream: b}}]
  claude-only: {{targets: [{{upstream: a, model: claude-sonnet-4-5}}]}}
  claude-usage: {{targets: [{{upstream: a}}]}}
  claude-usage-stream: {{targets: [{{upstream: a}}]}}
  claude-count: {{targets: [{{upstream: a}}]}}
  claude-keyless: {{targets: [{{upstream: n}}]}}
  claude-dead: {{targets: [{{upstream: dead}}]}}
  gpt-only: {{targets: [{{upstream: o}}]}}
routing:
  cooldown: {{failures: 1000, seconds: 1, max_seconds: 1}}
{routing}auth:
  keys:
    - {{name: team-a, key: {CLIENT_KEY}}}
    - {{name: team-limited, key: {LIMITED_KEY}, models: [gpt-only, claude-only]}}
    - {{name: team-slow, key: {SLOW_KEY}, rpm: 1}}
cache: {{backend: memory}}
"""


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("anthropic")


@pytest.fixture(scope="module")
def upstreams(workdir: Path) -> Iterator[dict[str, Mock]]:
    """Mocks a, b and o, each insisting on its own key; n, which wants none."""
    mocks = {name: Mock(workdir, name, api_key=key) for name, key in UPSTREAM_KEYS.items()}
    mocks["n"] = Mock(workdir, "n")
    yield mocks
    for m in mocks.values():
        m.stop()


@pytest.fixture(scope="module")
def proxy(workdir: Path, upstreams: dict[str, Mock]) -> Iterator[Proxy]:
    p = Proxy(workdir, config(upstreams), name="anthropic-proxy")
    yield p
    p.stop()


@pytest.fixture
def mocks(upstreams: dict[str, Mock]) -> dict[str, Mock]:
    for m in upstreams.values():
        m.reset()
    return upstreams


def client(proxy: Proxy, key: str = CLIENT_KEY) -> anthropic.Anthropic:
    return anthropic.Anthropic(
        api_key=key, base_url=f"http://127.0.0.1:{proxy.port}", max_retries=0
    )


def ask(text: str) -> list[MessageParam]:
    return [{"role": "user", "content": text}]


def reply_of(mock: str, text: str) -> str:
    """What mock ``mock`` answers to ``text``."""
    return f"Hello from {mock}! You said: {text}"


def words(text: str) -> int:
    """The mock's token count: words."""
    return len(text.split())


# -- raw HTTP ------------------------------------------------------------------------


def call(
    proxy: Proxy,
    path: str,
    body: dict[str, Any] | bytes | None = None,
    headers: dict[str, str] | None = None,
    method: str = "POST",
    key: str | None = CLIENT_KEY,
    version: str | None = VERSION,
) -> Reply:
    """One request (``key`` as ``x-api-key``, with ``anthropic-version``); any status."""
    sent = {"Content-Type": "application/json"}
    if version is not None:
        sent["anthropic-version"] = version
    if key is not None:
        sent["x-api-key"] = key
    sent.update(headers or {})
    return http_call(proxy.port, method, path, body, sent)


def message_body(model: str, text: str, **extra: Any) -> dict[str, Any]:
    return {"model": model, "max_tokens": 64, "messages": ask(text), **extra}


def events(body: bytes) -> list[tuple[str, dict[str, Any]]]:
    """
    The events of an Anthropic stream, each framed exactly ``event: X\\ndata: {...}``
    with the data's ``type`` X (SSE comments, such as keep-alives, are skipped).
    """
    assert body.endswith(b"\n\n"), body[-200:]
    found = []
    for frame in body[:-2].split(b"\n\n"):
        if frame.startswith(b":"):
            continue
        head, _, data = frame.partition(b"\n")
        assert head.startswith(b"event: ") and data.startswith(b"data: "), frame
        assert b"\n" not in data, frame
        name, payload = head[7:].decode(), json.loads(data[6:])
        assert payload["type"] == name, frame
        found.append((name, payload))
    return found


def kinds(body: bytes) -> list[str]:
    return [name for name, _ in events(body)]


def split_response(received: bytes) -> tuple[str, dict[str, str], bytes]:
    """A raw chunked HTTP response: (status line, lower-cased headers, de-chunked body)."""
    head, _, rest = received.partition(b"\r\n\r\n")
    status, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    assert headers.get("transfer-encoding") == "chunked", head
    body = b""
    while True:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            return status, headers, body
        body, rest = body + rest[:size], rest[size + 2 :]


def read_response(sock: socket.socket) -> tuple[str, dict[str, str], bytes]:
    received = read_until(sock, response_ended, "the end of the stream")
    sock.close()
    return split_response(received)


def anthropic_error(reply: Reply, status: int, kind: str) -> str:
    """Assert an Anthropic-shaped error of ``status`` and ``kind``; its message."""
    assert reply.status == status, reply.body
    assert reply.headers["content-type"].startswith("application/json")
    found = reply.json()
    assert found["type"] == "error", found
    assert found["error"]["type"] == kind, found
    message = found["error"]["message"]
    assert isinstance(message, str) and message
    return message


def stats(proxy: Proxy) -> dict[str, Any]:
    """/stats, asked from loopback (no admin keys are configured)."""
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=5)
    conn.request("GET", "/stats")
    response = conn.getresponse()
    data = response.read()
    assert response.status == 200, data
    found: dict[str, Any] = json.loads(data)
    return found


def seen(mock: Mock, path: str = "/v1/messages") -> list[dict[str, Any]]:
    """What ``mock`` received on ``path``."""
    return [r for r in mock.requests() if r["path"] == path]


def assert_upstream_auth(request: dict[str, Any], upstream: str) -> None:
    """The upstream got its own key as ``x-api-key``, nothing else of the client's."""
    headers = request["headers"]
    assert headers["x-api-key"] == UPSTREAM_KEYS[upstream]
    assert "authorization" not in headers
    for secret in (CLIENT_KEY, LIMITED_KEY, SLOW_KEY):
        assert all(secret not in value for value in headers.values()), headers
        assert secret not in request["body"]


# -- the SDK's calls -----------------------------------------------------------------


def test_create_is_parsed_by_the_sdk(proxy: Proxy, mocks: dict[str, Mock]) -> None:
    text = prompt("hello there")
    c = client(proxy)
    raw = c.messages.with_raw_response.create(model="claude", max_tokens=64, messages=ask(text))
    assert raw.headers["x-llmproxy-upstream"] == "a"
    assert (raw.request_id or "").startswith("req_")
    message = raw.parse()
    assert message.type == "message" and message.role == "assistant"
    assert message.content[0].type == "text"
    assert message.content[0].text == reply_of("a", text)
    assert message.stop_reason == "end_turn"
    assert message.usage.input_tokens == words(text)
    assert message.usage.output_tokens == words(reply_of("a", text))

    (request,) = seen(mocks["a"])
    assert request["method"] == "POST"
    assert json.loads(request["body"])["model"] == "claude-sonnet-4-5"
    assert request["headers"]["anthropic-version"] == c.default_headers["anthropic-version"]
    assert_upstream_auth(request, "a")
    assert mocks["b"].requests() == [] and mocks["o"].requests() == []


def test_stream_is_parsed_by_the_sdk(proxy: Proxy, mocks: dict[str, Mock]) -> None:
    text = prompt("stream to me")
    with client(proxy).messages.stream(model="claude", max_tokens=64, messages=ask(text)) as stream:
        seen_kinds = [event.type for event in stream]
        message = stream.get_final_message()
    assert seen_kinds[:2] == ["message_start", "content_block_start"]
    assert seen_kinds[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert message.content[0].type == "text"
    assert message.content[0].text == reply_of("a", text)
    assert message.stop_reason == "end_turn"
    assert message.usage.output_tokens == words(reply_of("a", text))

    (request,) = seen(mocks["a"])
    sent = json.loads(request["body"])
    assert sent["model"] == "claude-sonnet-4-5" and sent["stream"] is True
    assert_upstream_auth(request, "a")


def test_count_tokens(proxy: Proxy, mocks: dict[str, Mock]) -> None:
    text = prompt("count these few words")
    counted = client(proxy).messages.count_tokens(
        model="claude", system="be brief", messages=ask(text)
    )
    assert counted.input_tokens == words(text) + 2
    (request,) = seen(mocks["a"], "/v1/messages/count_tokens")
    assert json.loads(request["body"])["model"] == "claude-sonnet-4-5"
    assert_upstream_auth(request, "a")


def test_models_list_and_retrieve(proxy: Proxy, mocks: dict[str, Mock]) -> None:
    page = client(proxy).models.list()
    ids = [model.id for model in page.data]
    assert sorted(ids) == sorted(CLAUDE_MODELS)
    assert page.has_more is False
    assert (page.first_id, page.last_id) == (ids[0], ids[-1])
    for model in page.data:
        assert model.type == "model"
        assert isinstance(model.display_name, str) and model.display_name
        assert isinstance(model.created_at, datetime)

    # The key's allow-list and the targets' APIs both narrow the list.
    limited = client(proxy, LIMITED_KEY).models.list()
    assert [model.id for model in limited.data] == ["claude-only"]

    found = client(proxy).models.retrieve("claude")
    assert (found.id, found.type) == ("claude", "model")
    assert isinstance(found.created_at, datetime)
    for missing in ("nope", "gpt-only"):
        with pytest.raises(anthropic.NotFoundError):
            client(proxy).models.retrieve(missing)

    # Without anthropic-version, /v1/models stays OpenAI's.
    openai_page = openai.OpenAI(
        base_url=proxy.base_url, api_key=CLIENT_KEY, max_retries=0
    ).models.list()
    openai_ids = {model.id for model in openai_page.data}
    assert "gpt-only" in openai_ids and "claude" in openai_ids
    assert "claude-only" not in openai_ids  # no OpenAI target: not usable that way
    assert openai_page.data[0].object == "model"


def test_routes_without_the_v1_prefix(proxy: Proxy, mocks: dict[str, Mock]) -> None:
    text = prompt("no prefix")
    reply = call(proxy, "/messages", message_body("claude", text))
    assert reply.status == 200, reply.body
    assert reply.json()["content"] == [{"type": "text", "text": reply_of("a", text)}]

    streamed = call(proxy, "/messages", message_body("claude", text, stream=True))
    assert streamed.status == 200, streamed.body
    assert streamed.headers["content-type"].startswith("text/event-stream")
    assert kinds(streamed.body)[-1] == "message_stop"

    counted = call(proxy, "/messages/count_tokens", {"model": "claude", "messages": ask(text)})
    assert counted.status == 200, counted.body
    assert counted.json() == {"input_tokens": words(text)}

    listed = call(proxy, "/models", method="GET")
    assert listed.status == 200, listed.body
    assert {m["id"] for m in listed.json()["data"]} == CLAUDE_MODELS
    assert listed.json()["has_more"] is False

    assert [r["path"] for r in mocks["a"].requests()] == [
        "/v1/messages",
        "/v1/messages",
        "/v1/messages/count_tokens",
    ]


def test_async_client(proxy: Proxy, mocks: dict[str, Mock]) -> None:
    text = prompt("async hello")

    async def run() -> tuple[str, str]:
        async with anthropic.AsyncAnthropic(
            api_key=CLIENT_KEY, base_url=f"http://127.0.0.1:{proxy.port}", max_retries=0
        ) as c:
            message = await c.messages.create(model="claude", max_tokens=64, messages=ask(text))
            async with c.messages.stream(
                model="claude", max_tokens=64, messages=ask(text + " streamed")
            ) as stream:
                final = await stream.get_final_message()
        assert message.content[0].type == "text" and final.content[0].type == "text"
        return message.content[0].text, final.content[0].text

    assert asyncio.run(run()) == (reply_of("a", text), reply_of("a", text + " streamed"))


# -- what the upstream sees, what the client gets back --------------------------------


def test_upstream_gets_its_key_the_headers_and_the_body_byte_for_byte(
    proxy: Proxy, mocks: dict[str, Mock]
) -> None:
    text = prompt("caf\u00e9 au lait")
    knobs = json.dumps(
        {
            "headers": {
                "request-id": "req_upstream_0123",
                "anthropic-ratelimit-requests-limit": "50",
                "anthropic-ratelimit-requests-remaining": "49",
                "anthropic-ratelimit-tokens-reset": "2026-01-01T00:00:00Z",
            }
        }
    )
    # Spacing, key order, escapes and number formats a re-serialisation would change.
    tail = (
        '"max_tokens" :64,\n  "temperature": 0.50, "top_k": 1e1,'
        ' "messages": [{"role":"user","content": "' + text.replace("\u00e9", "\\u00e9") + '"}],'
        ' "metadata": {"user_id": "u-\u00e9"},  "mock": ' + knobs
    )
    sent = (
        '{ "model":  "claude", '
        + tail
        + ', "cache": {"ttl": 60}, "stop_sequences": ["\\n\\nHuman:"] }'
    )
    expected = '{ "model":  "claude-sonnet-4-5", ' + tail + ', "stop_sequences": ["\\n\\nHuman:"] }'
    beta = "prompt-caching-2024-07-31, token-efficient-tools-2025-02-19"
    reply = call(
        proxy,
        "/v1/messages",
        sent.encode(),
        headers={"anthropic-version": "2023-01-01", "anthropic-beta": beta},
    )
    assert reply.status == 200, reply.body
    assert reply.json()["content"][0]["text"] == reply_of("a", text)
    assert reply.headers["request-id"] == "req_upstream_0123"
    assert reply.headers["anthropic-ratelimit-requests-limit"] == "50"
    assert reply.headers["anthropic-ratelimit-requests-remaining"] == "49"
    assert reply.headers["anthropic-ratelimit-tokens-reset"] == "2026-01-01T00:00:00Z"

    (request,) = seen(mocks["a"])
    assert request["body"] == expected
    assert request["headers"]["anthropic-version"] == "2023-01-01"
    assert request["headers"]["anthropic-beta"] == beta
    assert_upstream_auth(request, "a")


def test_the_upstream_headers_reach_a_streaming_client(
    proxy: Proxy, mocks: dict[str, Mock]
) -> None:
    knobs = {"headers": {"request-id": "req_stream_77", "anthropic-ratelimit-tokens-limit": "9"}}
    reply = call(
        proxy, "/v1/messages", message_body("claude", prompt("hdrs"), stream=True, mock=knobs)
    )
    assert reply.status == 200, reply.body
    assert reply.headers["request-id"] == "req_stream_77"
    assert reply.headers["anthropic-ratelimit-tokens-limit"] == "9"
    assert_upstream_auth(seen(mocks["a"])[0], "a")


def test_chat_completions_on_a_mixed_model_go_to_its_openai_target(
    proxy: Proxy, mocks: dict[str, Mock]
) -> None:
    text = prompt("openai way")
    oai = openai.OpenAI(base_url=proxy.base_url, api_key=CLIENT_KEY, max_retries=0)
    raw = oai.chat.completions.with_raw_response.create(
        model="claude", messages=[{"role": "user", "content": text}]
    )
    assert raw.headers["x-llmproxy-upstream"] == "b"
    assert raw.parse().choices[0].message.content == reply_of("b", text)
    assert mocks["a"].requests() == []
    (request,) = seen(mocks["b"], "/v1/chat/completions")
    assert request["headers"]["authorization"] == "Bearer sk-up-b"


def test_an_upstream_without_a_key_gets_no_key_at_all(proxy: Proxy, mocks: dict[str, Mock]) -> None:
    body = message_body("claude-keyless", prompt("keyless"))
    reply = call(proxy, "/v1/messages", body, {"Authorization": f"Bearer {CLIENT_KEY}"})
    assert reply.status == 200, reply.body
    assert reply.json()["content"][0]["text"].startswith("Hello from n!")
    (request,) = seen(mocks["n"])
    headers = request["headers"]
    assert "x-api-key" not in headers and "authorization" not in headers
    assert all(CLIENT_KEY not in value for value in headers.values()), headers


def test_an_unreachable_upstream_is_an_anthropic_api_error(
    proxy: Proxy, mocks: dict[str, Mock]
) -> None:
    reply = call(proxy, "/v1/messages", message_body("claude-dead", prompt("dead")))
    anthropic_error(reply, 502, "api_error")
    with pytest.raises(anthropic.InternalServerError) as info:
        client(proxy).messages.create(model="claude-dead", max_tokens=8, messages=ask("hi"))
    assert info.value.status_code == 502
    streamed = call(proxy, "/v1/messages", message_body("claude-dead", "hi", stream=True))
    anthropic_error(streamed, 502, "api_error")


# -- client auth -----------------------------------------------------------------------


def test_client_key_from_x_api_key_or_bearer(proxy: Proxy, mocks: dict[str, Mock]) -> None:
    body = message_body("claude", prompt("auth"))
    assert call(proxy, "/v1/messages", body).status == 200
    bearer = call(proxy, "/v1/messages", body, {"Authorization": f"Bearer {CLIENT_KEY}"}, key=None)
    assert bearer.status == 200, bearer.body
    both = call(proxy, "/v1/messages", body, {"Authorization": f"Bearer {CLIENT_KEY}"})
    assert both.status == 200, both.body
    for request in seen(mocks["a"]):
        assert_upstream_auth(request, "a")


@pytest.mark.parametrize(
    ("x_api_key", "authorization"),
    [
        (CLIENT_KEY, f"Bearer {LIMITED_KEY}"),
        (LIMITED_KEY, f"Bearer {CLIENT_KEY}"),
        (CLIENT_KEY, "Bearer sk-wrong"),
        ("sk-wrong", f"Bearer {CLIENT_KEY}"),
        (None, None),
        ("sk-wrong", None),
        (None, "Bearer sk-wrong"),
    ],
)
def test_bad_client_keys_are_refused(
    proxy: Proxy, mocks: dict[str, Mock], x_api_key: str | None, authorization: str | None
) -> None:
    headers = {"Authorization": authorization} if authorization else {}
    reply = call(
        proxy, "/v1/messages", message_body("claude", prompt("no")), headers, key=x_api_key
    )
    anthropic_error(reply, 401, "authentication_error")
    count = {"model": "claude", "messages": ask("no")}
    counted = call(proxy, "/v1/messages/count_tokens", count, headers, key=x_api_key)
    anthropic_error(counted, 401, "authentication_error")
    assert mocks["a"].requests() == [] and mocks["b"].requests() == []


def test_sdk_with_a_wrong_key_raises_authentication_error(
    proxy: Proxy, mocks: dict[str, Mock]
) -> None:
    with pytest.raises(anthropic.AuthenticationError) as info:
        client(proxy, "sk-wrong").messages.create(model="claude", max_tokens=8, messages=ask("hi"))
    assert info.value.status_code == 401
    assert isinstance(info.value.body, dict)
    assert info.value.body["type"] == "error"
    assert info.value.body["error"]["type"] == "authentication_error"
    assert mocks["a"].requests() == []


# -- errors, Anthropic-shaped --------------------------------------------------------


def test_unknown_model_is_not_found(proxy: Proxy, mocks: dict[str, Mock]) -> None:
    with pytest.raises(anthropic.NotFoundError) as info:
        client(proxy).messages.create(model="nope", max_tokens=8, messages=ask("hi"))
    assert isinstance(info.value.body, dict)
    assert info.value.body["error"]["type"] == "not_found_error"
    anthropic_error(call(proxy, "/v1/messages", message_body("nope", "hi")), 404, "not_found_error")
    streamed = call(proxy, "/v1/messages", message_body("nope", "hi", stream=True))
    anthropic_error(streamed, 404, "not_found_error")
    retrieved = call(proxy, "/v1/models/nope", method="GET")
    anthropic_error(retrieved, 404, "not_found_error")


def test_a_model_without_anthropic_targets_is_not_found(
    proxy: Proxy, mocks: dict[str, Mock]
) -> None:
    with pytest.raises(anthropic.NotFoundError):
        client(proxy).messages.create(model="gpt-only", max_tokens=8, messages=ask("hi"))
    reply = call(proxy, "/v1/messages", message_body("gpt-only", "hi"))
    anthropic_error(reply, 404, "not_found_error")
    counted = call(proxy, "/v1/messages/count_tokens", {"model": "gpt-only", "messages": ask("x")})
    anthropic_error(counted, 404, "not_found_error")
    assert mocks["o"].requests() == []


def test_chat_completions_on_an_anthropic_only_model_is_not_found_openai_style(
    proxy: Proxy, mocks: dict[str, Mock]
) -> None:
    oai = openai.OpenAI(base_url=proxy.base_url, api_key=CLIENT_KEY, max_retries=0)
    with pytest.raises(openai.NotFoundError):
        oai.chat.completions.create(
            model="claude-only", messages=[{"role": "user", "content": "hi"}]
        )
    reply = call(
        proxy,
        "/v1/chat/completions",
        {"model": "claude-only", "messages": ask("hi")},
        {"Authorization": f"Bearer {CLIENT_KEY}"},
        key=None,
        version=None,
    )
    assert reply.status == 404, reply.body
    found = reply.json()
    assert set(found) == {"error"}, found
    assert isinstance(found["error"]["message"], str)
    assert mocks["a"].requests() == []


def test_a_model_the_key_may_not_use_is_permission_denied(
    proxy: Proxy, mocks: dict[str, Mock]
) -> None:
    with pytest.raises(anthropic.PermissionDeniedError) as info:
        client(proxy, LIMITED_KEY).messages.create(model="claude", max_tokens=8, messages=ask("x"))
    assert info.value.status_code == 403
    assert isinstance(info.value.body, dict)
    assert info.value.body["error"]["type"] == "permission_error"
    assert mocks["a"].requests() == [] and mocks["b"].requests() == []


def test_over_the_rpm_is_rate_limited_with_retry_after(
    proxy: Proxy, mocks: dict[str, Mock]
) -> None:
    slow = client(proxy, SLOW_KEY)
    slow.messages.create(model="claude", max_tokens=8, messages=ask(prompt("first")))
    with pytest.raises(anthropic.RateLimitError) as info:
        slow.messages.create(model="claude", max_tokens=8, messages=ask(prompt("second")))
    assert info.value.status_code == 429
    assert int(info.value.response.headers["retry-after"]) >= 1
    assert isinstance(info.value.body, dict)
    assert info.value.body["type"] == "error"
    assert info.value.body["error"]["type"] == "rate_limit_error"
    assert len(mocks["a"].requests()) == 1


def test_a_body_over_max_body_bytes_is_too_large(proxy: Proxy, mocks: dict[str, Mock]) -> None:
    big = "x" * (MAX_BODY + 100)
    anthropic_error(
        call(proxy, "/v1/messages", message_body("claude", big)), 413, "request_too_large"
    )
    with pytest.raises(anthropic.ContentTooLargeError):
        client(proxy).messages.create(model="claude", max_tokens=8, messages=ask(big))
    assert mocks["a"].requests() == []


def test_malformed_json_is_an_invalid_request(proxy: Proxy, mocks: dict[str, Mock]) -> None:
    broken = b'{"model": "claude", "max_tokens": 8, "messages": ['
    anthropic_error(call(proxy, "/v1/messages", broken), 400, "invalid_request_error")
    with pytest.raises(anthropic.BadRequestError) as info:
        client(proxy).post("/v1/messages", cast_to=anthropic.types.Message, content=broken)
    assert isinstance(info.value.body, dict)
    assert info.value.body["error"]["type"] == "invalid_request_error"
    no_model = call(proxy, "/v1/messages", {"max_tokens": 8, "messages": ask("hi")})
    anthropic_error(no_model, 400, "invalid_request_error")
    not_a_list = call(proxy, "/v1/messages", {"model": "claude", "max_tokens": 8, "messages": "hi"})
    anthropic_error(not_a_list, 400, "invalid_request_error")
    assert mocks["a"].requests() == []


def test_upstream_4xx_bodies_pass_through(proxy: Proxy, mocks: dict[str, Mock]) -> None:
    refusal = {
        "type": "error",
        "error": {"type": "invalid_request_error", "message": "messages.0: upstream says no"},
    }
    body = message_body("claude", prompt("refused"), mock={"status": 400, "body": refusal})
    reply = call(proxy, "/v1/messages", body)
    assert reply.status == 400
    assert reply.body == json.dumps(refusal).encode()
    assert reply.headers["x-llmproxy-upstream"] == "a"
    with pytest.raises(anthropic.BadRequestError) as info:
        client(proxy).messages.create(
            model="claude",
            max_tokens=8,
            messages=ask(prompt("refused")),
            extra_body={"mock": {"status": 400, "body": refusal}},
        )
    assert info.value.body == refusal
    # A 4xx is the client's problem: never retried on the other target.
    assert len(seen(mocks["a"])) == 2 and mocks["b"].requests() == []


# -- failover --------------------------------------------------------------------------


def test_overloaded_target_fails_over_before_the_first_byte(
    proxy: Proxy, mocks: dict[str, Mock]
) -> None:
    mocks["a"].configure(overloaded=True)
    text = prompt("over")
    raw = client(proxy).messages.with_raw_response.create(
        model="claude", max_tokens=64, messages=ask(text)
    )
    assert raw.headers["x-llmproxy-upstream"] == "b"
    message = raw.parse()
    assert message.content[0].type == "text"
    assert message.content[0].text == reply_of("b", text)

    streamed = call(proxy, "/v1/messages", message_body("claude", text + " streamed", stream=True))
    assert streamed.status == 200, streamed.body
    assert streamed.headers["x-llmproxy-upstream"] == "b"
    assert kinds(streamed.body)[-1] == "message_stop"

    assert len(seen(mocks["a"])) == 2
    tried = seen(mocks["b"])
    assert len(tried) == 2
    for request in tried:
        assert json.loads(request["body"])["model"] == "claude"  # the target names no model
        assert_upstream_auth(request, "b")


# -- streams ---------------------------------------------------------------------------


def test_stream_events_in_order_relayed_as_they_come(proxy: Proxy, mocks: dict[str, Mock]) -> None:
    text = prompt("one two three")
    body = message_body("claude", text, stream=True, mock={"gate_after": 2})
    sock = raw_post(
        proxy.port, body, "/v1/messages", {"x-api-key": CLIENT_KEY, "anthropic-version": VERSION}
    )
    early = read_until(sock, events_arrived(2), "the first two events")
    wait_for(lambda: mocks["a"].stats()["gated"] == 1, what="the mock to hold the rest")
    assert b"event: message_start\n" in early and b"event: content_block_start\n" in early
    assert b"content_block_delta" not in early and b"message_stop" not in early
    mocks["a"].release()
    received = read_until(sock, response_ended, "the rest of the stream", received=early)
    sock.close()
    status, headers, streamed = split_response(received)
    assert status.startswith("HTTP/1.1 200"), status
    assert headers["content-type"].startswith("text/event-stream")

    found = events(streamed)
    names = [name for name, _ in found]
    deltas = words(reply_of("a", text))
    assert names == [
        "message_start",
        "content_block_start",
        "ping",
        *["content_block_delta"] * deltas,
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    said = "".join(data["delta"]["text"] for name, data in found if name == "content_block_delta")
    assert said == reply_of("a", text)
    assert found[-2][1]["delta"]["stop_reason"] == "end_turn"


def test_a_cut_stream_ends_with_an_error_event(proxy: Proxy, mocks: dict[str, Mock]) -> None:
    body = message_body("claude", prompt("cut me"), stream=True, mock={"cut_after": 3})
    reply = call(proxy, "/v1/messages", body)
    assert reply.status == 200
    found = events(reply.body)
    assert [name for name, _ in found] == ["message_start", "content_block_start", "ping", "error"]
    error = found[-1][1]
    assert set(error) == {"type", "error"}, error
    assert error["type"] == "error" and error["error"]["type"] == "api_error", error
    assert isinstance(error["error"]["message"], str) and error["error"]["message"]
    assert b"message_stop" not in reply.body
    # Already begun: not retried elsewhere.
    assert mocks["b"].requests() == []

    with pytest.raises(anthropic.APIError):  # noqa: PT012 - the error comes while iterating
        with client(proxy).messages.stream(
            model="claude",
            max_tokens=64,
            messages=ask(prompt("cut the sdk")),
            extra_body={"mock": {"cut_after": 3}},
        ) as stream:
            for _ in stream:
                pass


# -- cache -----------------------------------------------------------------------------


def test_a_repeated_message_is_a_cache_hit(proxy: Proxy, mocks: dict[str, Mock]) -> None:
    c = client(proxy)
    text = prompt("cache me")
    first = c.messages.with_raw_response.create(model="claude", max_tokens=64, messages=ask(text))
    second = c.messages.with_raw_response.create(model="claude", max_tokens=64, messages=ask(text))
    assert first.headers["x-llmproxy-cache"] == "miss"
    assert second.headers["x-llmproxy-cache"] == "hit"
    assert second.http_response.content == first.http_response.content
    message = second.parse()
    assert message.content[0].type == "text"
    assert message.content[0].text == reply_of("a", text)
    assert len(seen(mocks["a"])) == 1


def test_a_repeated_stream_is_a_cache_hit(proxy: Proxy, mocks: dict[str, Mock]) -> None:
    text = prompt("cache my stream")
    c = client(proxy)
    body = message_body("claude", text, stream=True)
    version = str(c.default_headers["anthropic-version"])
    first = call(proxy, "/v1/messages", body, version=version)
    second = call(proxy, "/v1/messages", body, version=version)
    assert first.headers["x-llmproxy-cache"] == "miss"
    assert second.headers["x-llmproxy-cache"] == "hit"
    assert second.headers["content-type"].startswith("text/event-stream")
    assert second.body == first.body
    assert kinds(second.body)[-1] == "message_stop"

    # The SDK's identical request is answered from the cache too, and parses.
    raw = c.messages.with_raw_response.create(
        model="claude", max_tokens=64, messages=ask(text), stream=True
    )
    assert raw.headers["x-llmproxy-cache"] == "hit"
    stream = raw.parse()
    said = "".join(
        event.delta.text
        for event in stream
        if event.type == "content_block_delta" and event.delta.type == "text_delta"
    )
    assert said == reply_of("a", text)
    assert len(seen(mocks["a"])) == 1


def test_the_api_version_and_beta_flags_are_part_of_the_cache_key(
    proxy: Proxy, mocks: dict[str, Mock]
) -> None:
    body = message_body("claude", prompt("versioned"))

    def verdict(headers: dict[str, str]) -> str:
        reply = call(proxy, "/v1/messages", body, headers)
        assert reply.status == 200, reply.body
        return reply.headers["x-llmproxy-cache"]

    assert verdict({}) == "miss"
    assert verdict({}) == "hit"
    assert verdict({"anthropic-version": "2023-01-01"}) == "miss"
    assert verdict({"anthropic-beta": "some-beta-2025"}) == "miss"
    assert verdict({"anthropic-beta": "some-beta-2025"}) == "hit"
    assert len(seen(mocks["a"])) == 3


@pytest.mark.parametrize("streamed", [False, True])
def test_an_answer_cut_by_max_tokens_is_not_stored(
    proxy: Proxy, mocks: dict[str, Mock], streamed: bool
) -> None:
    body = {
        "model": "claude",
        "max_tokens": 2,
        "messages": ask(prompt("a reply longer than two tokens")),
        "stream": streamed,
    }
    replies = [call(proxy, "/v1/messages", body) for _ in range(2)]
    for reply in replies:
        assert reply.status == 200, reply.body
        assert reply.headers["x-llmproxy-cache"] == "miss"
        assert b'"stop_reason":"max_tokens"' in reply.body.replace(b": ", b":")
    assert len(seen(mocks["a"])) == 2


def test_a_stream_ending_in_an_error_event_is_not_stored(
    proxy: Proxy, mocks: dict[str, Mock]
) -> None:
    body = message_body("claude", prompt("fail late"), stream=True, mock={"error_chunk": "boom"})
    replies = [call(proxy, "/v1/messages", body) for _ in range(2)]
    for reply in replies:
        assert reply.status == 200, reply.body
        assert reply.headers["x-llmproxy-cache"] == "miss"
        assert kinds(reply.body)[-1] == "error"
    cut = message_body("claude", prompt("cut late"), stream=True, mock={"cut_after": 4})
    for _ in range(2):
        assert call(proxy, "/v1/messages", cut).headers["x-llmproxy-cache"] == "miss"
    assert len(seen(mocks["a"])) == 4


def test_identical_streams_in_flight_share_one_upstream_call(
    proxy: Proxy, mocks: dict[str, Mock]
) -> None:
    body = message_body("claude", prompt("together"), stream=True, mock={"gate": True})
    headers = {"x-api-key": CLIENT_KEY, "anthropic-version": VERSION}
    before = stats(proxy)["cache"]["coalesced"]
    leader = raw_post(proxy.port, body, "/v1/messages", headers)
    wait_for(lambda: mocks["a"].stats()["gated"] == 1, what="the leader to reach the upstream")
    follower = raw_post(proxy.port, body, "/v1/messages", headers)
    wait_for(
        lambda: stats(proxy)["cache"]["coalesced"] == before + 1,
        what="the follower to join the leader's call",
    )
    mocks["a"].release()
    _, led, leader_body = read_response(leader)
    _, followed, follower_body = read_response(follower)
    assert led["x-llmproxy-cache"] == "miss"
    assert followed["x-llmproxy-cache"] == "hit"
    assert followed["x-llmproxy-coalesced"] == "1"
    assert follower_body == leader_body
    assert kinds(leader_body)[-1] == "message_stop"
    assert len(seen(mocks["a"])) == 1
    # ...and stored: a third is a plain hit.
    third = call(proxy, "/v1/messages", body)
    assert third.headers["x-llmproxy-cache"] == "hit" and third.body == leader_body
    assert len(seen(mocks["a"])) == 1


def test_identical_messages_in_flight_share_one_upstream_call(
    proxy: Proxy, mocks: dict[str, Mock]
) -> None:
    text = prompt("all at once")
    before = stats(proxy)["cache"]["coalesced"]

    async def run() -> list[tuple[str, str]]:
        async with anthropic.AsyncAnthropic(
            api_key=CLIENT_KEY, base_url=f"http://127.0.0.1:{proxy.port}", max_retries=0
        ) as c:

            async def one() -> tuple[str, str]:
                raw = await c.messages.with_raw_response.create(
                    model="claude",
                    max_tokens=64,
                    messages=ask(text),
                    extra_body={"mock": {"gate": True}},
                )
                message = await raw.parse()
                assert message.content[0].type == "text"
                return raw.headers.get("x-llmproxy-coalesced", ""), message.content[0].text

            tasks = [asyncio.ensure_future(one()) for _ in range(5)]
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 20
            while not (
                mocks["a"].stats()["gated"] == 1
                and stats(proxy)["cache"]["coalesced"] == before + 4
            ):
                assert loop.time() < deadline, "the requests did not line up"
                await asyncio.sleep(0.01)
            mocks["a"].release()
            return await asyncio.gather(*tasks)

    answers = asyncio.run(run())
    assert sorted(answers) == [("", reply_of("a", text))] + [("1", reply_of("a", text))] * 4
    assert len(seen(mocks["a"])) == 1


# -- accounting ------------------------------------------------------------------------


def tokens_of(proxy: Proxy, model: str) -> dict[str, int]:
    row = stats(proxy)["keys"].get("team-a", {}).get(model, {})
    tokens = row.get("tokens", {})
    estimated = row.get("estimated_tokens", {})
    found = {kind: tokens.get(kind, 0) for kind in TOKENS}
    found.update({f"estimated_{k}": v for k, v in estimated.items()})
    return found


def settled(proxy: Proxy, model: str, expected: dict[str, int]) -> None:
    """/stats shows ``expected`` for ``model`` (within a deadline: charging may lag)."""
    want = {**expected, "estimated_input": 0, "estimated_output": 0}
    try:
        wait_for(lambda: tokens_of(proxy, model) == want, timeout=5, what=f"{model}'s tokens")
    except AssertionError:
        pass
    assert tokens_of(proxy, model) == want


def test_tokens_of_a_message_are_counted_by_kind(proxy: Proxy, mocks: dict[str, Mock]) -> None:
    message = client(proxy).messages.create(
        model="claude-usage",
        max_tokens=64,
        messages=ask(prompt("usage")),
        extra_body={"mock": {"usage": USAGE}},
    )
    assert message.usage.cache_read_input_tokens == 20
    settled(proxy, "claude-usage", TOKENS)


def test_tokens_of_a_stream_are_counted_by_kind(proxy: Proxy, mocks: dict[str, Mock]) -> None:
    # message_start says output_tokens 7 too: a proxy adding it to
    # message_delta's (cumulative) 7 counts 14.
    with client(proxy).messages.stream(
        model="claude-usage-stream",
        max_tokens=64,
        messages=ask(prompt("usage streamed")),
        extra_body={"mock": {"usage": USAGE}},
    ) as stream:
        message = stream.get_final_message()
    assert message.usage.output_tokens == 7
    settled(proxy, "claude-usage-stream", TOKENS)


def test_count_tokens_is_never_charged(proxy: Proxy, mocks: dict[str, Mock]) -> None:
    c = client(proxy)
    counted = c.messages.count_tokens(
        model="claude-count", messages=ask("these words are counted, not used")
    )
    assert counted.input_tokens == 6
    assert len(seen(mocks["a"], "/v1/messages/count_tokens")) == 1
    settled(proxy, "claude-count", dict.fromkeys(TOKENS, 0))
    # A message after it is charged its own tokens only.
    c.messages.create(
        model="claude-count",
        max_tokens=64,
        messages=ask(prompt("then a message")),
        extra_body={"mock": {"usage": USAGE}},
    )
    settled(proxy, "claude-count", TOKENS)


# -- a proxy of their own --------------------------------------------------------------


def test_a_stream_the_drain_cuts_ends_with_an_anthropic_error_event(
    start: StartProxy, mocks: dict[str, Mock]
) -> None:
    proxy = start(config(mocks, server=", drain_seconds: 0.2"), "drained")
    body = message_body("claude", "held forever", stream=True, mock={"gate_after": 3})
    sock = raw_post(
        proxy.port, body, "/v1/messages", {"x-api-key": CLIENT_KEY, "anthropic-version": VERSION}
    )
    received = read_until(sock, events_arrived(3), "the stream to start")
    proxy.process.signal(signal.SIGTERM)
    received += read_to_close(sock)
    last = received.rstrip(b"\r\n").rsplit(b"\r\n", 1)[-1]
    head, _, data = last.partition(b"\n")
    assert head == b"event: error", last
    found = json.loads(data.removeprefix(b"data: "))
    # Anthropic's shape (api_error, or overloaded_error: the proxy is going away).
    assert set(found) == {"type", "error"}, found
    assert found["type"] == "error", found
    assert found["error"]["type"] in ("api_error", "overloaded_error"), found
    assert isinstance(found["error"]["message"], str) and found["error"]["message"]
    assert b"message_stop" not in received


def test_health_checks_ask_an_anthropic_upstream_its_way(
    start: StartProxy, mocks: dict[str, Mock]
) -> None:
    proxy = start(
        config(mocks, routing="  health_checks: {interval: 0.1, timeout: 2}\n"), "health-checked"
    )

    def probes() -> list[dict[str, Any]]:
        found = [r for r in mocks["a"].requests() if r["method"] == "GET"]
        return found if len(found) >= 5 else []

    for probe in wait_for(probes, what="five health checks of upstream a"):
        assert probe["path"] == "/v1/models"
        assert probe["headers"]["anthropic-version"]
        assert_upstream_auth(probe, "a")
    # Answered 2xx: the target is healthy, and serves.
    reply = call(proxy, "/v1/messages", message_body("claude-only", "still there?"))
    assert reply.status == 200, reply.body
