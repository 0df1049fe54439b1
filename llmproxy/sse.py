"""
Incremental server-sent-events parser.

The relay forwards streams one whole event at a time (so an error event appended
after a cut never lands inside a half-written one) and keeps each event's raw
bytes, so what a client or the cache receives is exactly what the upstream sent.
"""

from __future__ import annotations

import attrs

_TERMINATORS = (b"\r\n\r\n", b"\n\n", b"\r\r")


@attrs.frozen
class Event:
    raw: bytes
    event: str | None
    data: str

    @property
    def is_done(self) -> bool:
        """The chat/completions terminator, ``data: [DONE]``."""
        return self.data.strip() == "[DONE]"

    @property
    def is_comment(self) -> bool:
        """
        Comment lines only (``: PROCESSING``, a keep-alive): nothing a client
        dispatches, and nothing the cache keeps.
        """
        if self.event is not None or self.data:
            return False
        lines = [line for line in self.raw.decode("utf-8", "replace").splitlines() if line]
        return bool(lines) and all(line.startswith(":") for line in lines)


def parse_event(raw: bytes) -> Event:
    name: str | None = None
    data: list[str] = []
    for line in raw.decode("utf-8", "replace").splitlines():
        if not line or line.startswith(":"):
            continue
        field, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if field == "event":
            name = value
        elif field == "data":
            data.append(value)
    return Event(raw=raw, event=name, data="\n".join(data))


class SSEParser:
    """Feed bytes as they arrive; get back each event once it is complete."""

    def __init__(self) -> None:
        self._buffer = b""
        self._scanned = 0

    def feed(self, data: bytes) -> list[Event]:
        self._buffer += data
        events: list[Event] = []
        while True:
            # Resume the search a little before the old end: a terminator can
            # straddle two chunks.
            start = max(0, self._scanned - 3)
            ends = [(i + len(t)) for t in _TERMINATORS if (i := self._buffer.find(t, start)) >= 0]
            if not ends:
                self._scanned = len(self._buffer)
                return events
            end = min(ends)
            raw, self._buffer = self._buffer[:end], self._buffer[end:]
            self._scanned = 0
            events.append(parse_event(raw))

    def pending(self) -> bytes:
        """Bytes of an event not yet terminated."""
        return self._buffer
