"""
Keep-alives as users meet them: a real proxy in front of a real mock upstream
that falls silent in the middle of a stream.  On the wire the client gets
``: keep-alive`` comments between whole events, the stream then completes,
and its replay from the cache carries no comment at all.
"""

from __future__ import annotations

import json

from llmproxy.relay import KEEPALIVE
from llmproxy.testing.processes import Mock, wait_for
from tests.system.harness import (
    StartProxy,
    cache_config,
    chat,
    post,
    raw_post,
    read_until,
    response_ended,
)


def dechunk(data: bytes) -> bytes:
    """The body of a whole chunked HTTP response."""
    body = b""
    while True:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            return body
        body, data = body + data[:size], data[size + 2 :]


def blocks(body: bytes) -> list[bytes]:
    """A stream's blocks (events and comments), each with its blank line."""
    return [block + b"\n\n" for block in body.split(b"\n\n") if block]


def read_stream(received: bytes) -> tuple[bytes, list[bytes], list[bytes]]:
    """A whole streamed response: its head, every block, and the events alone."""
    head, _, chunked = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    live = blocks(dechunk(chunked))
    return head, live, [block for block in live if block != KEEPALIVE]


def test_a_silent_stream_is_kept_alive_and_cached_without_comments(
    start: StartProxy, fresh_mock: Mock
) -> None:
    proxy = start(cache_config(fresh_mock, "memory", None, "server: {sse_keepalive: 0.1}\n"))
    # Two events, then the upstream holds the rest until it is released.
    body = chat("think hard", stream=True, mock={"gate_after": 2})
    sock = raw_post(proxy.port, body, headers={"Authorization": "Bearer key-a"})
    try:
        received = read_until(sock, lambda r: KEEPALIVE in r, "a keep-alive comment")
        assert fresh_mock.stats()["gated"] == 1  # it came while the upstream was silent
        fresh_mock.release()
        received = read_until(sock, response_ended, "the end of the stream", received=received)
    finally:
        sock.close()
    head, live, answer = read_stream(received)
    assert b"x-llmproxy-cache: miss" in head.lower()
    assert KEEPALIVE in live  # a block of its own, between whole events
    assert all(block.startswith(b"data: ") for block in answer)
    assert answer[-1] == b"data: [DONE]\n\n"
    chunks = [json.loads(block[len(b"data: ") :]) for block in answer[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == "Hello from main! You said: think hard"

    _, headers, replayed = post(proxy, body)
    assert headers["x-llmproxy-cache"] == "hit"
    assert replayed == b"".join(answer)
    assert not [line for line in replayed.split(b"\n") if line.startswith(b":")]
    wait_for(lambda: len(fresh_mock.requests()) == 1, what="one upstream request")
