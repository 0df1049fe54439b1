"""
Where an answer goes.  The pipeline writes to a :class:`ClientSink`: the HTTP
layer adapts a twisted.web request to it, and a single-flight
:class:`~llmproxy.cache.flight.Flight` is one too (fanning out to its followers).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

from twisted.internet.interfaces import IPushProducer


class ClientSink(Protocol):
    @property
    def gone(self) -> bool:
        """The client (every client, for a flight) has gone away."""

    def header(self, name: str, value: str) -> None: ...

    def start(self, status: int, headers: Mapping[str, str]) -> None: ...

    def write(self, data: bytes) -> None: ...

    def register_producer(self, producer: IPushProducer) -> None: ...

    def unregister_producer(self) -> None: ...

    def abort(self) -> None:
        """Drop the client's connection now, without flushing what is buffered."""
