"""
The mock upstream as an Anthropic client sees it: a real ``twistd -n
llmproxy-mock`` process driven by the official ``anthropic`` SDK.

This SDK (2.x) sends its ``api_key`` as ``Authorization: Bearer``; the mock wants
``x-api-key`` on these routes, so the clients here send that header as well.
"""

from __future__ import annotations

from collections.abc import Iterator

import anthropic
import pytest
from anthropic.types import MessageParam

from llmproxy.testing.processes import Mock

KEY = "sk-ant-mock-key"
ASK: list[MessageParam] = [{"role": "user", "content": "hello there"}]


@pytest.fixture(scope="module")
def claude_mock(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mock]:
    m = Mock(tmp_path_factory.mktemp("anthropic"), "a", api_key=KEY)
    yield m
    m.stop()


@pytest.fixture
def client(claude_mock: Mock) -> anthropic.Anthropic:
    claude_mock.reset()
    return connect(claude_mock, KEY)


def connect(mock: Mock, key: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(
        base_url=f"http://127.0.0.1:{mock.port}",
        api_key=key,
        default_headers={"x-api-key": key},
        max_retries=0,
    )


def test_create(client: anthropic.Anthropic, claude_mock: Mock) -> None:
    raw = client.messages.with_raw_response.create(
        model="claude-test", max_tokens=64, system="be brief", messages=ASK
    )
    assert (raw.request_id or "").startswith("req_")
    message = raw.parse()
    assert message.type == "message" and message.role == "assistant"
    assert message.model == "claude-test"
    assert message.content[0].type == "text"
    assert message.content[0].text == "Hello from a! You said: hello there"
    assert message.stop_reason == "end_turn"
    assert message.usage.input_tokens == 4
    assert message.usage.output_tokens == 7
    seen = claude_mock.requests()[-1]["headers"]
    assert seen["x-api-key"] == KEY
    assert seen["anthropic-version"]


def test_stream(client: anthropic.Anthropic) -> None:
    with client.messages.stream(model="claude-test", max_tokens=64, messages=ASK) as stream:
        kinds = [event.type for event in stream]
        message = stream.get_final_message()
    assert kinds[:3] == ["message_start", "content_block_start", "content_block_delta"]
    assert kinds[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert message.content[0].type == "text"
    assert message.content[0].text == "Hello from a! You said: hello there"
    assert message.stop_reason == "end_turn"
    assert (message.usage.input_tokens, message.usage.output_tokens) == (2, 7)


def test_count_tokens(client: anthropic.Anthropic) -> None:
    counted = client.messages.count_tokens(model="claude-test", system="be brief", messages=ASK)
    assert counted.input_tokens == 4


def test_errors_are_typed(client: anthropic.Anthropic, claude_mock: Mock) -> None:
    with pytest.raises(anthropic.AuthenticationError):
        connect(claude_mock, "nope").messages.create(
            model="claude-test", max_tokens=8, messages=ASK
        )
    claude_mock.configure(overloaded=True)
    with pytest.raises(anthropic.APIStatusError) as caught:
        client.messages.create(model="claude-test", max_tokens=8, messages=ASK)
    assert caught.value.status_code == 529
    assert caught.value.body == {
        "type": "error",
        "error": {"type": "overloaded_error", "message": "Overloaded"},
    }


def test_models(client: anthropic.Anthropic) -> None:
    ids = [model.id for model in client.models.list()]
    assert "mock-model" in ids and len(ids) == 3
