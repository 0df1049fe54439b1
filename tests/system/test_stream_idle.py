"""
A reasoning pause as users meet it: a real proxy whose upstream ``idle`` timeout
is 1 s, in front of a real mock upstream that falls silent between two events
of a stream for longer than that.  The stream is not cut (``stream_idle`` is
off by default): the client gets keep-alive comments meanwhile, and the whole
answer with its ``[DONE]`` once the upstream resumes.
"""

from __future__ import annotations

import json
import time

from llmproxy.relay import KEEPALIVE
from llmproxy.testing.processes import Mock, upstream_block
from tests.system.harness import (
    CACHE_MODELS,
    UPSTREAM_KEY,
    StartProxy,
    chat,
    raw_post,
    read_until,
    response_ended,
)
from tests.system.test_keepalive import read_stream

#: Keep-alives to wait for while the upstream is held: 5 x 0.3 s, past ``idle`` (1 s).
HELD_FOR = 5


def test_a_pause_between_events_longer_than_idle_does_not_cut_the_stream(
    start: StartProxy, fresh_mock: Mock
) -> None:
    proxy = start(
        upstream_block([fresh_mock], api_key=UPSTREAM_KEY, extra="    timeouts: {idle: 1}")
        + CACHE_MODELS
        + "cache: {backend: off}\nserver: {sse_keepalive: 0.3}\n"
    )
    # Two events, then the upstream holds the rest until it is released.
    body = chat("think hard", stream=True, mock={"gate_after": 2})
    sock = raw_post(proxy.port, body, headers={"Authorization": "Bearer key-a"})
    try:
        received = read_until(sock, lambda r: KEEPALIVE in r, "a first keep-alive comment")
        held_since = time.monotonic()
        # Hold the upstream past ``idle`` (or until the proxy gives up on it).
        received = read_until(
            sock,
            lambda r: r.count(KEEPALIVE) >= HELD_FOR or response_ended(r),
            f"{HELD_FOR} keep-alive comments",
            received=received,
        )
        assert not response_ended(received), received[-500:]
        assert time.monotonic() - held_since > 1.0  # longer than ``idle``
        assert fresh_mock.stats()["gated"] == 1  # the upstream was silent all along
        assert fresh_mock.stats()["disconnects"] == 0
        fresh_mock.release()
        received = read_until(sock, response_ended, "the end of the stream", received=received)
    finally:
        sock.close()
    _, live, answer = read_stream(received)
    assert live.count(KEEPALIVE) >= HELD_FOR
    assert all(block.startswith(b"data: ") for block in answer)  # no error event
    assert answer[-1] == b"data: [DONE]\n\n"
    chunks = [json.loads(block[len(b"data: ") :]) for block in answer[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == "Hello from main! You said: think hard"
