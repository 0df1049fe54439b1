"""What the proxy reads from answers: usage, response ids, terminal events, cache fitness."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers

from llmproxy.answers import Inspector, is_event_stream, worth_storing
from llmproxy.cache.entry import Uncacheable
from llmproxy.sse import parse_event


class InspectorTests(SynchronousTestCase):
    def test_usage_is_read_from_the_end_of_an_answer(self) -> None:
        inspector = Inspector("embeddings")
        inspector.body(
            b'{"data": [{"embedding": "x"}], "note": "say \\"total_tokens\\": 999",'
            b' "usage": {"prompt_tokens": 7, "total_tokens": 7}}'
        )
        assert inspector.usage_tokens == 7

    def test_streamed_usage_and_the_terminator(self) -> None:
        inspector = Inspector("chat/completions")
        inspector.event(parse_event(b'data: {"choices":[{"delta":{"content":"hi"}}]}\n\n'))
        inspector.event(parse_event(b'data: {"choices":[],"usage":{"total_tokens":12}}\n\n'))
        assert not inspector.complete
        inspector.event(parse_event(b"data: [DONE]\n\n"))
        assert inspector.usage_tokens == 12 and inspector.data_events == 2
        assert inspector.complete and inspector.uncacheable is None

    def test_response_ids_are_taken_once(self) -> None:
        inspector = Inspector("responses")
        created = b'event: response.created\ndata: {"response": {"object": "response", "id": "r1"}}'
        inspector.event(parse_event(created + b"\n\n"))
        assert inspector.take_response_ids() == ["r1"] and inspector.take_response_ids() == []
        inspector.event(parse_event(b"event: response.completed\ndata: {}\n\n"))
        assert inspector.complete

    def test_truncated_and_error_streams_are_unfit_for_the_cache(self) -> None:
        cut_short = b'data: {"choices":[{"delta":{},"finish_reason": "length"}]}\n\n'
        truncated = Inspector("chat/completions")
        truncated.event(parse_event(cut_short))
        assert truncated.uncacheable is Uncacheable.TRUNCATED
        failed = Inspector("chat/completions")
        failed.event(parse_event(b'data: {"choices":[{"delta":{},"finish_reason":"stop"}]}\n\n'))
        failed.event(parse_event(b'event: error\ndata: {"type": "error"}\n\n'))
        assert failed.uncacheable is Uncacheable.ERROR_EVENT
        vllm = Inspector("chat/completions")
        vllm.event(parse_event(b'data: {"error": {"message": "CUDA out of memory"}}\n\n'))
        assert vllm.uncacheable is Uncacheable.ERROR_EVENT


class WorthStoringTests(SynchronousTestCase):
    def test_only_complete_non_empty_answers(self) -> None:
        stop = b'{"choices": [{"finish_reason": "stop", "message": {"content": "hi"}}]}'
        assert worth_storing("chat/completions", stop)
        for body in (
            b'{"choices": [{"finish_reason": "length", "message": {"content": "h"}}]}',
            b'{"choices": [{"finish_reason": "stop", "message": {"content": ""}}]}',
            b'{"error": {"message": "no"}}',
            b"not json",
        ):
            assert not worth_storing("chat/completions", body), body
        assert worth_storing("embeddings", b'{"data": [{"embedding": [0.1]}]}')
        assert not worth_storing("embeddings", b'{"data": []}')
        assert worth_storing("responses", b'{"status": "completed", "output": [{}]}')
        assert not worth_storing("responses", b'{"status": "in_progress", "output": [{}]}')

    def test_event_streams_are_told_by_their_content_type(self) -> None:
        sse = Headers({"content-type": ["text/event-stream; charset=utf-8"]})
        assert is_event_stream(sse)
        assert not is_event_stream(Headers({"content-type": ["application/json"]}))
        assert not is_event_stream(Headers())
