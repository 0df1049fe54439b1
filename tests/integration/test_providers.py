"""
Against real providers (``-m integration``): a real proxy in front of OpenAI,
driven by the openai SDK.  Needs OPENAI_API_KEY (and network access to the
provider); skipped with that reason otherwise.  Not part of the default run.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import openai
import pytest

from llmproxy.testing.processes import Proxy

pytestmark = pytest.mark.integration

MODEL = os.environ.get("LLMPROXY_IT_MODEL", "gpt-4o-mini")


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
