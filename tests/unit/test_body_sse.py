"""Body rewriting keeps every other byte; the SSE parser cuts whole events."""

from __future__ import annotations

import json

import pytest

from llmproxy.body import check_fields, parse_body, rewrite_body
from llmproxy.errors import APIError
from llmproxy.sse import SSEParser
from tests.trial import trial_case


def test_rewrite_changes_only_model_and_cache() -> None:
    raw = b'{ "temperature" : 0.70, "model":"public",\n "cache": {"ttl": 5},"x":"\\u00e9" }'
    out = rewrite_body(raw, "private/name")
    assert out == b'{ "temperature" : 0.70, "model":"private/name","x":"\\u00e9" }'
    assert json.loads(out) == {"temperature": 0.7, "model": "private/name", "x": "\u00e9"}


def test_rewrite_untouched_body_is_identical() -> None:
    raw = b'{"input": "a",   "n": 1e3}'
    assert rewrite_body(raw, None) is raw


@pytest.mark.parametrize(
    "raw",
    [b'{"cache":{}}', b'{"cache":{},"a":1}', b'{"a":1,"cache":{}}', b'{"a":1, "cache":{} ,"b":2}'],
)
def test_rewrite_removes_cache_anywhere(raw: bytes) -> None:
    out = json.loads(rewrite_body(raw, None))
    assert "cache" not in out and out == {k: v for k, v in json.loads(raw).items() if k != "cache"}


def test_duplicate_model_members_are_all_rewritten() -> None:
    out = rewrite_body(b'{"model":"a","model":"b"}', "t")
    assert out == b'{"model":"t","model":"t"}'


@pytest.mark.parametrize(
    ("raw", "param"),
    [
        (b"{not json", None),
        (b"[1, 2]", None),
        (b'{"messages": []}', "model"),
        (b'{"model": 5}', "model"),
        (b'{"model": ""}', "model"),
        (b'{"model": "m", "stream": "yes"}', "stream"),
        (b'{"model": "m", "messages": "hi"}', "messages"),
        (b'{"model": "m", "stream_options": []}', "stream_options"),
    ],
)
def test_bad_bodies_are_400(raw: bytes, param: str | None) -> None:
    with pytest.raises(APIError) as info:
        check_fields(parse_body(raw))
    assert info.value.status == 400 and info.value.param == param


def test_sse_events_split_across_chunks() -> None:
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


def test_sse_keeps_an_unfinished_event_pending() -> None:
    parser = SSEParser()
    assert parser.feed(b"data: 1\n\ndata: par")[0].data == "1"
    assert parser.pending() == b"data: par"


TrialTests = trial_case(globals())
