"""
A stored answer, serialised to bytes so every backend stores the same thing;
the :class:`Recording` an answer is kept in while it is relayed; and why an
answer was not stored (:class:`Uncacheable`).
"""

from __future__ import annotations

import enum
import json

import attrs


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

    def encode(self) -> bytes:
        head = {
            "v": 1,
            "status": self.status,
            "content_type": self.content_type,
            "stream": self.stream,
            "upstream": self.upstream,
            "model": self.model,
        }
        return json.dumps(head).encode() + b"\n" + self.body

    @classmethod
    def decode(cls, data: bytes) -> Entry | None:
        head_raw, sep, body = data.partition(b"\n")
        try:
            head = json.loads(head_raw) if sep else None
        except ValueError:
            head = None
        if not isinstance(head, dict) or head.get("v") != 1:
            return None
        return cls(
            status=int(head["status"]),
            content_type=str(head["content_type"]),
            body=body,
            stream=bool(head["stream"]),
            upstream=str(head["upstream"]),
            model=str(head["model"]) if isinstance(head.get("model"), str) else None,
        )


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
