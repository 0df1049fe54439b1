"""Body rewriting keeps every other byte; the SSE parser cuts whole events."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from llmproxy.body import check_fields, parse_body, rewrite_body
from llmproxy.errors import APIError
from llmproxy.sse import SSEParser, parse_event


class RewriteTests(SynchronousTestCase):
    def test_only_model_and_cache_change(self) -> None:
        raw = b'{ "temperature" : 0.70, "model":"public",\n "cache": {"ttl": 5},"x":"\\u00e9" }'
        out = rewrite_body(raw, "private/name")
        assert out == b'{ "temperature" : 0.70, "model":"private/name","x":"\\u00e9" }'
        assert json.loads(out) == {"temperature": 0.7, "model": "private/name", "x": "\u00e9"}

    def test_an_untouched_body_is_identical(self) -> None:
        raw = b'{"input": "a",   "n": 1e3}'
        assert rewrite_body(raw, None) is raw

    def test_cache_is_removed_wherever_it_stands(self) -> None:
        for raw in (
            b'{"cache":{}}',
            b'{"cache":{},"a":1}',
            b'{"a":1,"cache":{}}',
            b'{"a":1, "cache":{} ,"b":2}',
        ):
            out = json.loads(rewrite_body(raw, None))
            expected = {k: v for k, v in json.loads(raw).items() if k != "cache"}
            assert out == expected, raw

    def test_duplicate_model_members_are_all_rewritten(self) -> None:
        out = rewrite_body(b'{"model":"a","model":"b"}', "t")
        assert out == b'{"model":"t","model":"t"}'


class CheckFieldsTests(SynchronousTestCase):
    def test_bad_bodies_are_400_naming_the_field(self) -> None:
        for raw, param in (
            (b"{not json", None),
            (b"[1, 2]", None),
            (b'{"messages": []}', "model"),
            (b'{"model": 5}', "model"),
            (b'{"model": ""}', "model"),
            (b'{"model": "m", "stream": "yes"}', "stream"),
            (b'{"model": "m", "messages": "hi"}', "messages"),
            (b'{"model": "m", "stream_options": []}', "stream_options"),
        ):
            with self.assertRaises(APIError) as info:
                check_fields(parse_body(raw))
            assert info.exception.status == 400 and info.exception.param == param, raw

    def test_the_model_name_is_returned(self) -> None:
        assert check_fields({"model": "m", "stream": True}) == "m"


class SSEParserTests(SynchronousTestCase):
    def test_events_split_across_chunks(self) -> None:
        parser = SSEParser()
        stream = b'data: {"a":1}\n\nevent: x\ndata: 2\r\n\r\n: comment\n\ndata: [DONE]\n\n'
        found = []
        for i in range(len(stream)):
            found += parser.feed(stream[i : i + 1])
        assert [e.raw for e in found] == [
            b'data: {"a":1}\n\n',
            b"event: x\ndata: 2\r\n\r\n",
            b": comment\n\n",
            b"data: [DONE]\n\n",
        ]
        assert found[1].event == "x" and found[1].data == "2"
        assert found[3].is_done and parser.pending() == b""

    def test_an_unfinished_event_stays_pending(self) -> None:
        parser = SSEParser()
        assert parser.feed(b"data: 1\n\ndata: par")[0].data == "1"
        assert parser.pending() == b"data: par"

    def test_only_sse_line_breaks_split_lines(self) -> None:
        # JSON text may hold U+2028 or a form feed unescaped: they are data.
        for raw in ('data: {"t":"a\u2028b\x0cc"}\n\n', "event: e\ndata: a\u2028b\r\n\r\n"):
            event = parse_event(raw.encode())
            assert "a\u2028b" in event.data and not event.is_comment
        assert parse_event(b'data: {"t":"b\x0cc"}\n\n').data == '{"t":"b\x0cc"}'

    def test_the_one_data_line_path_agrees_with_the_general_one(self) -> None:
        lines = ["data: x", "data:x", "data:  x", "data: é ü", "data: \u2028", "data:"]
        for line in lines:
            fast = parse_event(f"{line}\n\n".encode())
            general = parse_event(f"{line}\r\n\r\n".encode())  # CR: the general loop
            assert (fast.event, fast.data) == (general.event, general.data), line
        assert parse_event(b"data: \xff\n\n").data == "\ufffd"


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["data", "event", "", "id", "data "]),
            st.text(
                st.characters(exclude_characters="\r\n", exclude_categories=["Cs"]), max_size=12
            ),
        ),
        min_size=1,
        max_size=4,
    ),
    st.integers(min_value=1, max_value=7),
)
def test_any_chunking_of_lf_lines_gives_what_the_general_loop_finds(
    fields: list[tuple[str, str]], size: int
) -> None:
    """
    LF lines fed in chunks of any size (the fast path) give the events that
    the same lines with CRLF, fed whole (the general loop), give.
    """

    def stream(newline: str) -> bytes:
        lines = [f"{name}:{value}" if name else f":{value}" for name, value in fields]
        return ((newline.join(lines) + newline * 2) * 3).encode()

    parser = SSEParser()
    fast = []
    lf = stream("\n")
    for i in range(0, len(lf), size):
        fast += parser.feed(lf[i : i + size])
    general = SSEParser().feed(stream("\r\n"))
    assert [(e.event, e.data) for e in fast] == [(e.event, e.data) for e in general]
    assert b"".join(e.raw for e in fast) == lf and len(fast) == 3
    assert parser.pending() == b""
