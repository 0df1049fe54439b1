"""A stored answer, serialised to bytes so every backend stores the same thing."""

from __future__ import annotations

import json

import attrs


@attrs.frozen
class Entry:
    status: int
    content_type: str
    body: bytes
    stream: bool
    upstream: str

    def encode(self) -> bytes:
        head = {
            "v": 1,
            "status": self.status,
            "content_type": self.content_type,
            "stream": self.stream,
            "upstream": self.upstream,
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
        )
