"""
A stored answer, serialised to bytes so every backend stores the same thing;
the :class:`Recording` an answer is kept in while it is relayed; and why an
answer was not stored (:class:`Uncacheable`).

What comes back from a backend is not trusted: :meth:`Entry.decode` gives an
entry only for bytes that decode, and whose entry could have been stored (a
200, headers that are safe to send, a non-stream body that is a JSON object,
a stream body of whole SSE events ending with the terminal event of a
finished answer).  Anything else is corrupt, and the cache treats it as a miss.
"""

from __future__ import annotations

import enum
import json

import attrs

from llmproxy.sse import SSEParser

#: The typed last events of a finished stream, and so of every stream that is
#: stored: the Responses API's completion, the Messages API's stop (a chat
#: stream's is ``data: [DONE]``).
FINISHED = frozenset({"response.completed", "message_stop"})


class Uncacheable(enum.Enum):
    """Why an answer was not stored.  The values are the keys of ``/stats`` cache.skipped."""

    #: An error status, or an answer that did not complete (no terminal event).
    INCOMPLETE = "incomplete_or_error"
    #: A stream that carried an error event.
    ERROR_EVENT = "error_event"
    #: Cut short by the token limit (``finish_reason: length``).
    TRUNCATED = "truncated"
    #: Larger than what is recorded for the cache.
    TOO_LARGE = "too_large"
    #: Nobody was there to receive the end of it.
    CLIENT_GONE = "client_gone"


@attrs.frozen
class Entry:
    status: int
    content_type: str
    body: bytes
    stream: bool
    upstream: str
    #: The upstream's model name (entries stored before it was kept have none).
    model: str | None = None
    #: The tokens the answer reported (input, cached input, output, reasoning),
    #: kept for the cost a hit saves: a stream's usage chunk may not be in the body.
    usage: tuple[int, int, int, int] | None = None

    def encode(self) -> bytes:
        head = {
            "v": 1,
            "status": self.status,
            "content_type": self.content_type,
            "stream": self.stream,
            "upstream": self.upstream,
            "model": self.model,
            "usage": self.usage,
        }
        return json.dumps(head).encode() + b"\n" + self.body

    @classmethod
    def decode(cls, data: bytes) -> Entry | None:
        """The entry in ``data``; None when it does not decode or is no answer we store."""
        head_raw, sep, body = data.partition(b"\n")
        try:
            head = json.loads(head_raw) if sep else None
        except (ValueError, RecursionError):
            head = None
        if not isinstance(head, dict) or head.get("v") != 1:
            return None
        status, content_type = head.get("status"), head.get("content_type")
        stream, upstream, model = head.get("stream"), head.get("upstream"), head.get("model")
        usage = head.get("usage")
        if (
            type(status) is not int
            or not isinstance(content_type, str)
            or not isinstance(stream, bool)
            or not isinstance(upstream, str)
            or not (model is None or isinstance(model, str))
            or not (usage is None or _counts(usage))
        ):
            return None
        counts = (usage[0], usage[1], usage[2], usage[3]) if usage is not None else None
        entry = cls(status, content_type, body, stream, upstream, model, counts)
        return entry if entry.valid() else None

    def valid(self) -> bool:
        """Could this entry have been stored?  Only then is it replayed."""
        if self.status != 200 or not all(
            _header_value(v) for v in (self.content_type, self.upstream, self.model or "-")
        ):
            return False
        if not self.stream:
            return self.body.lstrip()[:1] == b"{"
        parser = SSEParser()
        events = parser.feed(self.body)
        if not events or parser.pending():
            return False
        last = events[-1]
        return last.is_done or (last.event in FINISHED and bool(last.data))


def _counts(value: object) -> bool:
    """Four non-negative integers: a usage as an entry keeps it."""
    return (
        isinstance(value, list)
        and len(value) == 4
        and all(type(v) is int and v >= 0 for v in value)
    )


def _header_value(value: str) -> bool:
    """Non-empty and printable (no CR, LF or other control): safe in a response header."""
    return bool(value) and value.isprintable()


class Recording:
    """
    The bytes of an answer as its client gets them, kept for the cache.  Past
    ``max_bytes`` nothing more is held (and what was is let go): a long stream
    is never held whole for an entry it could not be.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.too_large = False
        self._chunks: list[bytes] = []
        self._size = 0

    def add(self, data: bytes) -> None:
        if self.too_large:
            return
        self._size += len(data)
        if self._size > self.max_bytes:
            self.too_large = True
            self._chunks.clear()
        else:
            self._chunks.append(data)

    def body(self) -> bytes:
        return b"".join(self._chunks)
