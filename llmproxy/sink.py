"""
Where an answer goes: the protocols the relay and single-flight write to.
:class:`~llmproxy.site.RequestSink` adapts a twisted.web request to them, and
a single-flight :class:`~llmproxy.cache.flight.Flight` is a sink too, fanning
out to the request sinks that follow it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

from twisted.internet.interfaces import IPushProducer

#: The cost of a non-streamed answer, in USD, when its target has a price: the
#: request that made the upstream call's alone (a flight's other clients paid nothing).
COST_HEADER = "x-llmproxy-cost-usd"


class ClientSink(Protocol):
    @property
    def gone(self) -> bool:
        """The client (every client, for a flight) has gone away."""

    def header(self, name: str, value: str) -> None:
        """Set a response header before the answer starts."""

    def start(self, status: int, headers: Mapping[str, str]) -> None: ...

    def write(self, data: bytes) -> None: ...

    def register_producer(self, producer: IPushProducer) -> None: ...

    def unregister_producer(self) -> None: ...

    def abort(self) -> None:
        """Drop the client's connection now, without flushing what is buffered."""


class DroppableSink(ClientSink, Protocol):
    """One client's connection (a flight drops a stuck follower by :meth:`abort`)."""
