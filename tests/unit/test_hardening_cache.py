"""
Hardening of what the proxy holds (issue 14, defects 4 and 5), in memory:

* a corrupt cache entry (one that does not decode, or is no answer we store)
  is a miss, is deleted, and is counted as ``cache_corrupt``;
* a non-streamed answer (or an error body) larger than
  ``server.max_response_bytes`` is a 502 ``response_too_large``, and the
  upstream connection is closed.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from llmproxy.cache import Entry, MemoryBackend
from tests.harness import Answer, Harness, chat, config_text, events, run


def ask(h: Harness, body: Any) -> Answer:
    return h.request("POST", "/v1/chat/completions", body)


def backend(h: Harness) -> MemoryBackend:
    found = h.gateway.shared.cache
    assert isinstance(found, MemoryBackend)
    return found


def head(**fields: object) -> bytes:
    """An entry's header line with ``fields`` over a valid non-stream one."""
    values: dict[str, object] = {
        "v": 1,
        "status": 200,
        "content_type": "application/json",
        "stream": False,
        "upstream": "a",
        "model": "upstream-m1",
    }
    values.update(fields)
    return json.dumps(values).encode() + b"\n"


CHAT_BODY = b'{"choices":[{"message":{"content":"planted"},"finish_reason":"stop"}]}'

#: What a backend may hold that is no answer to replay.
CORRUPT = {
    "truncated": b'{"v":1}\nxx',
    "not json": b"garbage without a header line",
    "no newline": head().rstrip(b"\n"),
    "status 599": head(status=599) + CHAT_BODY,
    "status as text": head(status="200") + CHAT_BODY,
    "empty body": head(),
    "non-JSON body": head() + b"<html>oops</html>",
    "header injection": head(content_type="text/plain\r\nSet-Cookie: x=1") + CHAT_BODY,
    "stream not SSE": head(stream=True, content_type="text/event-stream") + b"not an event",
    "stream cut mid-event": head(stream=True) + b'data: {"choices":[]}\n\ndata: {"cho',
    "stream without terminal": head(stream=True) + b'data: {"choices":[]}\n\n',
    "old version": head(v=0) + CHAT_BODY,
}


class CorruptEntryTests(SynchronousTestCase):
    """An entry that does not decode or validate is a miss, deleted, and counted."""

    def _plant(self, body: dict[str, Any], value: bytes) -> tuple[Harness, str]:
        h = Harness(config_text())
        first = ask(h, body)
        assert first.code == 200 and first.header("x-llmproxy-cache") == "miss"
        store = backend(h)
        (key,) = list(store._items)
        store.set(key, value, 3600)
        return h, key

    def _assert_miss_then_gone(self, h: Harness, key: str, body: dict[str, Any]) -> Answer:
        again = ask(h, body)
        assert again.code == 200, again.body
        assert again.header("x-llmproxy-cache") == "miss"
        assert len(h.seen()) == 2  # the upstream answered it
        # Deleted, then replaced by the fresh answer: the next one is a good hit.
        stored = run(backend(h).get(key))
        assert stored is not None and Entry.decode(stored) is not None
        hit = ask(h, body)
        assert hit.header("x-llmproxy-cache") == "hit" and hit.body == again.body
        assert len(h.seen()) == 2
        return again

    def test_truncated_entry_is_a_miss_deleted_and_counted(self) -> None:
        body = chat("corrupt me")
        h, key = self._plant(body, b'{"v":1}\nxx')
        self._assert_miss_then_gone(h, key, body)
        stats = h.request("GET", "/stats").json()["cache"]
        assert stats["cache_corrupt"] == 1
        assert stats["hits"] == 1 and stats["misses"] == 2
        metrics = h.request("GET", "/metrics").body.decode()
        assert 'llmproxy_cache_events{name="cache_corrupt"} 1.0' in metrics

    def test_status_599_entry_is_not_replayed(self) -> None:
        body = chat("599")
        h, key = self._plant(body, head(status=599) + CHAT_BODY)
        self._assert_miss_then_gone(h, key, body)
        assert h.request("GET", "/stats").json()["cache"]["cache_corrupt"] == 1

    def test_stream_entry_with_a_non_sse_body_is_not_an_empty_200(self) -> None:
        body = chat("stream", stream=True)
        h, key = self._plant(
            body, head(stream=True, content_type="text/event-stream") + b"not an event at all"
        )
        again = self._assert_miss_then_gone(h, key, body)
        assert events(again.body)[-1] == "data: [DONE]"
        assert h.request("GET", "/stats").json()["cache"]["cache_corrupt"] == 1

    def test_corrupt_entry_is_deleted_even_when_nothing_replaces_it(self) -> None:
        body = chat("failing now")
        h, key = self._plant(body, b'{"v":1}\nxx')
        h.mocks["a"].config = {"status": 500}  # the fresh answer is an error: not stored
        assert ask(h, body).code == 500
        assert key not in backend(h)._items
        stats = h.request("GET", "/stats").json()["cache"]
        assert stats["cache_corrupt"] == 1 and stats["entries"] == 0

    def test_decode_refuses_every_kind_of_corruption_and_keeps_what_is_stored(self) -> None:
        for name, value in CORRUPT.items():
            assert Entry.decode(value) is None, name
        stream = Entry(200, "text/event-stream", b"data: {}\n\ndata: [DONE]\n\n", True, "a")
        typed = Entry(
            200,
            "text/event-stream",
            b'event: response.completed\ndata: {"type":"response.completed"}\n\n',
            True,
            "a",
            "m",
        )
        plain = Entry(200, "application/json", CHAT_BODY, False, "a", None)
        for entry in (stream, typed, plain):
            assert Entry.decode(entry.encode()) == entry


#: A 1 MiB answer, written one 64 KiB piece every 10 ms.
BIG = {"big_body": 1024 * 1024, "interval": 0.01}


def bounded(limit: int = 4096) -> Harness:
    return Harness(config_text(extra=f"server: {{max_response_bytes: {limit}}}\n"))


class ResponseBoundTests(SynchronousTestCase):
    """``server.max_response_bytes`` bounds every body the proxy holds whole."""

    def test_answer_over_the_bound_is_a_502_and_the_upstream_is_closed(self) -> None:
        h = bounded()
        pending = h.start("POST", "/v1/chat/completions", chat("big", mock=BIG))
        h.tick(0.01, 5)
        answer = h.finish(pending)
        assert answer.code == 502
        assert answer.json()["error"]["code"] == "response_too_large"
        assert answer.json()["error"]["type"] == "upstream_error"
        mock = h.mocks["a"]
        assert mock.stats["disconnects"] == 1  # closed, not read to the end
        assert mock.stats["bytes_streamed"] < 1024 * 1024
        assert len(h.seen()) == 1  # never retried: another target would bill again
        attempts = h.request("GET", "/stats").json()["upstream_attempts"]
        assert attempts == {"a:too_large": 1}
        # The target is not blamed, and the gateway still answers.
        assert ask(h, chat("small")).code == 200

    def test_answer_within_the_bound_is_relayed(self) -> None:
        h = bounded(8192)
        answer = ask(h, chat("fits", mock={"big_body": 8000}))
        assert answer.code == 200 and len(answer.body) == 8000
        assert h.mocks["a"].stats["disconnects"] == 0

    def test_error_body_over_the_bound_is_not_held(self) -> None:
        h = bounded()
        pending = h.start("POST", "/v1/chat/completions", chat("e", mock={"status": 400, **BIG}))
        h.tick(0.01, 5)
        answer = h.finish(pending)
        assert answer.code == 400  # the upstream's status, in our error shape
        assert answer.json()["error"]["code"] == "upstream_error"
        assert len(answer.body) < 4096
        assert h.mocks["a"].stats["disconnects"] == 1

    def test_streams_are_not_capped(self) -> None:
        h = bounded(1024)
        answer = ask(h, chat("long stream", stream=True, mock={"words": 200}))
        assert answer.code == 200 and len(answer.body) > 4 * 1024
        assert events(answer.body)[-1] == "data: [DONE]"

    def test_the_default_bound_is_64_mib(self) -> None:
        h = Harness(config_text())
        assert h.config.server.max_response_bytes == 64 * 1024 * 1024
