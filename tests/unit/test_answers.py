"""What the proxy reads from answers: usage, response ids, terminal events, cache fitness."""

from __future__ import annotations

import json
from decimal import Decimal

from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers

from llmproxy.answers import Inspector, Usage, is_event_stream, worth_storing
from llmproxy.cache.entry import Uncacheable
from llmproxy.config import Price
from llmproxy.sse import parse_event


class InspectorTests(SynchronousTestCase):
    def test_usage_is_read_from_the_end_of_an_answer(self) -> None:
        inspector = Inspector("embeddings")
        inspector.body(
            b'{"data": [{"embedding": "x"}], "note": "say \\"usage\\": {\\"prompt_tokens\\": 9}",'
            b' "usage": {"prompt_tokens": 7, "total_tokens": 7}}'
        )
        assert inspector.usage == Usage(input=7)

    def test_streamed_usage_and_the_terminator(self) -> None:
        inspector = Inspector("chat/completions")
        inspector.event(parse_event(b'data: {"choices":[{"delta":{"content":"hi"}}]}\n\n'))
        usage = b'{"prompt_tokens":5,"completion_tokens":7,"total_tokens":12}'
        inspector.event(parse_event(b'data: {"choices":[],"usage":' + usage + b"}\n\n"))
        assert not inspector.complete
        inspector.event(parse_event(b"data: [DONE]\n\n"))
        assert inspector.usage == Usage(5, 0, 7, 0) and inspector.data_events == 2
        assert inspector.complete and inspector.uncacheable is None


class UsageTests(SynchronousTestCase):
    CHAT = {
        "prompt_tokens": 1200,
        "completion_tokens": 300,
        "total_tokens": 1500,
        "prompt_tokens_details": {"cached_tokens": 1024, "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 256, "audio_tokens": 0},
    }
    RESPONSES = {
        "input_tokens": 1200,
        "input_tokens_details": {"cached_tokens": 1024},
        "output_tokens": 300,
        "output_tokens_details": {"reasoning_tokens": 256},
        "total_tokens": 1500,
    }

    def test_kinds_are_disjoint_and_add_up_to_the_total(self) -> None:
        for usage in (self.CHAT, self.RESPONSES):
            found = Usage.of(usage)
            assert found == Usage(input=176, cached_input=1024, output=44, reasoning=256)
            assert found is not None and found.total == 1500 and not found.estimated

    def test_whitespace_never_matters(self) -> None:
        compact = json.dumps({"choices": [], "usage": self.CHAT}, separators=(",", ":"))
        spaced = json.dumps({"choices": [], "usage": self.CHAT}, indent=2)
        for text in (compact, spaced, spaced.replace(": ", " :\t")):
            whole = Inspector("chat/completions")
            whole.body(text.encode())
            streamed = Inspector("chat/completions")
            streamed.event(parse_event(b"data: " + text.replace("\n", "").encode() + b"\n\n"))
            assert whole.usage == streamed.usage == Usage(176, 1024, 44, 256), text

    def test_responses_usage_comes_from_its_completed_event(self) -> None:
        inspector = Inspector("responses")
        done = {"type": "response.completed", "response": {"id": "r", "usage": self.RESPONSES}}
        event = b"event: response.completed\ndata: " + json.dumps(done).encode() + b"\n\n"
        inspector.event(parse_event(event))
        assert inspector.usage == Usage(176, 1024, 44, 256)

    def test_nonsense_is_no_usage_and_never_negative(self) -> None:
        assert Usage.of({"total_tokens": 12}) is None
        assert Usage.of(None) is None and Usage.of([1]) is None
        odd = {
            "prompt_tokens": 5,
            "completion_tokens": True,
            "prompt_tokens_details": {"cached_tokens": 9},
        }
        assert Usage.of(odd) == Usage(input=0, cached_input=5)

    def test_cost_bills_each_kind_and_reasoning_as_output(self) -> None:
        usage = Usage(input=176, cached_input=1024, output=44, reasoning=256)
        price = Price(input=2.5, output=10, cached_input=1.25)
        expected = (Decimal(176) * Decimal("2.5") + 1024 * Decimal("1.25") + 300 * 10) / 10**6
        assert usage.cost(price) == expected == Decimal("0.00472")
        assert (
            usage.cost(Price(input=2.5, output=10, reasoning=20))
            == (Decimal(1200) * Decimal("2.5") + 44 * 10 + 256 * 20) / 10**6
        )
        assert usage.cost(None) is None


class StripUsageTests(SynchronousTestCase):
    """A forced usage is taken out of the stream: the chunk, and every ``"usage": null``."""

    def test_the_client_gets_the_stream_it_asked_for(self) -> None:
        asked = [
            b'data: {"id":"c","choices":[{"delta":{"content":"hi"}}]}\n\n',
            b'data: {"id":"c","choices":[{"delta":{},"finish_reason":"stop"}]}\n\n',
            b"data: [DONE]\n\n",
        ]
        forced = [
            b'data: {"id":"c","choices":[{"delta":{"content":"hi"}}],"usage":null}\n\n',
            b'data: {"id":"c","choices":[{"delta":{},"finish_reason":"stop"}],"usage": null}\n\n',
            b'data: {"id":"c","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2}}\n\n',
            b"data: [DONE]\n\n",
        ]
        inspector = Inspector("chat/completions", strip_usage=True)
        relayed = [e.raw for raw in forced if (e := inspector.event(parse_event(raw))) is not None]
        assert relayed == asked
        assert inspector.usage == Usage(3, 0, 2, 0) and inspector.data_events == 2

    def test_without_forcing_nothing_changes(self) -> None:
        inspector = Inspector("chat/completions")
        raw = b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2}}\n\n'
        event = inspector.event(parse_event(raw))
        assert event is not None and event.raw == raw and inspector.usage == Usage(3, 0, 2, 0)

    def test_object_ids_are_taken_once(self) -> None:
        inspector = Inspector("responses")
        created = b'event: response.created\ndata: {"response": {"object": "response", "id": "r1"}}'
        inspector.event(parse_event(created + b"\n\n"))
        assert inspector.take_object_ids() == ["r1"] and inspector.take_object_ids() == []
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

    def test_a_responses_answer_is_parsed_once(self) -> None:
        body = b'{"object": "response", "id": "resp_1", "status": "completed", "output": [{}]}'
        inspector = Inspector("responses")
        inspector.body(body)
        assert inspector.parsed == json.loads(body) and inspector.object_ids == ["resp_1"]
        # What the inspector parsed is what is judged: the bytes are not read again.
        assert worth_storing("responses", b"not json", inspector.parsed)
        assert not worth_storing("responses", b"not json")
        chat = Inspector("chat/completions")
        chat.body(b'{"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 2}}')
        assert chat.parsed is None and chat.usage is not None  # found without parsing it all

    def test_event_streams_are_told_by_their_content_type(self) -> None:
        sse = Headers({"content-type": ["text/event-stream; charset=utf-8"]})
        assert is_event_stream(sse)
        assert not is_event_stream(Headers({"content-type": ["application/json"]}))
        assert not is_event_stream(Headers())
