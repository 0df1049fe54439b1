"""
Against real providers (``-m integration``): a real proxy in front of OpenAI,
driven by the openai SDK, and one in front of Anthropic's Messages API, driven
by the anthropic SDK.  Needs OPENAI_API_KEY, or ANTHROPIC_API_KEY (and network
access to the provider); each is skipped with that reason otherwise.  Not part
of the default run.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import anthropic
import openai
import pytest

from llmproxy.testing.processes import Proxy

pytestmark = pytest.mark.integration

MODEL = os.environ.get("LLMPROXY_IT_MODEL", "gpt-4o-mini")
CLAUDE = os.environ.get("LLMPROXY_IT_CLAUDE_MODEL", "claude-haiku-4-5")


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    if not os.environ.get("OPENAI_API_KEY"):
        pytest.skip("set OPENAI_API_KEY to run the integration tests against OpenAI")
    base = os.environ.get("OPENAI_BASE_URL", "https://api.openai.com/v1")
    config = (
        f"upstreams:\n  openai:\n    base_url: {base}\n    api_key: ${{OPENAI_API_KEY}}\n"
        f"models:\n  {MODEL}:\n    targets: [{{upstream: openai}}]\n"
        "cache: {backend: memory}\n"
    )
    p = Proxy(tmp_path_factory.mktemp("integration"), config)
    yield p
    p.stop()


def client(proxy: Proxy) -> openai.OpenAI:
    return openai.OpenAI(base_url=proxy.base_url, api_key="unused", max_retries=0)


def test_chat_completion(proxy: Proxy) -> None:
    answer = client(proxy).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Say the word: pong"}], max_tokens=5
    )
    assert "pong" in (answer.choices[0].message.content or "").lower()


def test_streaming_with_usage(proxy: Proxy) -> None:
    chunks = list(
        client(proxy).chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "Count: 1 2 3"}],
            max_tokens=10,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens > 0


def test_responses_api(proxy: Proxy) -> None:
    c = client(proxy)
    first = c.responses.create(model=MODEL, input="Remember the number 7.")
    follow = c.responses.create(model=MODEL, input="What number?", previous_response_id=first.id)
    assert "7" in follow.output_text


def test_upstream_key_never_reaches_the_client(proxy: Proxy) -> None:
    key = os.environ["OPENAI_API_KEY"]
    with pytest.raises(openai.BadRequestError) as info:
        client(proxy).chat.completions.create(model=MODEL, messages=[], max_tokens=1)
    assert key not in str(info.value.body) and key not in proxy.process.log()


@pytest.fixture(scope="module")
def claude_proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    if not os.environ.get("ANTHROPIC_API_KEY"):
        pytest.skip("set ANTHROPIC_API_KEY to run the integration test against Anthropic")
    config = (
        "upstreams:\n  anthropic:\n    base_url: https://api.anthropic.com/v1\n"
        "    api_key: ${ANTHROPIC_API_KEY}\n    apis: [anthropic]\n"
        f"models:\n  claude:\n    targets: [{{upstream: anthropic, model: {CLAUDE}}}]\n"
        "cache: {backend: memory}\n"
    )
    p = Proxy(tmp_path_factory.mktemp("integration-anthropic"), config)
    yield p
    p.stop()


def test_anthropic_messages(claude_proxy: Proxy) -> None:
    c = anthropic.Anthropic(
        base_url=f"http://127.0.0.1:{claude_proxy.port}", api_key="unused", max_retries=0
    )
    ask: list[anthropic.types.MessageParam] = [{"role": "user", "content": "Say the word: pong"}]
    raw = c.messages.with_raw_response.create(model="claude", max_tokens=10, messages=ask)
    assert raw.headers["x-llmproxy-upstream"] == "anthropic"
    assert (raw.request_id or "").startswith("req_")  # Anthropic's own, passed back
    message = raw.parse()
    assert message.content[0].type == "text" and "pong" in message.content[0].text.lower()
    assert message.usage.input_tokens > 0 and message.usage.output_tokens > 0

    with c.messages.stream(
        model="claude", max_tokens=10, messages=[{"role": "user", "content": "Count: 1 2 3"}]
    ) as stream:
        final = stream.get_final_message()
    assert final.stop_reason in ("end_turn", "max_tokens") and final.usage.output_tokens > 0

    assert c.messages.count_tokens(model="claude", messages=ask).input_tokens > 0
    assert [m.id for m in c.models.list().data] == ["claude"]

    # An error from Anthropic, in its shape, without the upstream key anywhere.
    key = os.environ["ANTHROPIC_API_KEY"]
    with pytest.raises(anthropic.BadRequestError) as info:
        c.messages.create(model="claude", max_tokens=0, messages=ask)
    assert isinstance(info.value.body, dict) and info.value.body["type"] == "error"
    assert key not in str(info.value.body) and key not in claude_proxy.process.log()
