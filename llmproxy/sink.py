"""
Where an answer goes.  The relay writes to a :class:`ClientSink`:
:class:`RequestSink` adapts a twisted.web request to it, and a single-flight
:class:`~llmproxy.cache.flight.Flight` is one too, fanning out to the
RequestSinks that follow it.
"""

from __future__ import annotations

from collections.abc import Mapping
from http import HTTPStatus
from typing import Protocol

from twisted.internet.interfaces import IPushProducer
from twisted.python.failure import Failure
from twisted.web.server import Request


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


class DroppableSink(ClientSink, Protocol):
    """One client's connection, which can be dropped (a flight drops a stuck follower)."""

    def abort(self) -> None:
        """Drop the client's connection now, without flushing what is buffered."""


def set_status(request: Request, status: int) -> None:
    """Set the status with its standard reason phrase (twisted.web lacks some, e.g. 429)."""
    try:
        phrase = HTTPStatus(status).phrase.encode("ascii")
    except ValueError:
        phrase = None  # a non-standard upstream status, e.g. 529: twisted.web's default
    request.setResponseCode(status, phrase)


class RequestSink:
    """A :class:`ClientSink` over a twisted.web request."""

    def __init__(self, request: Request) -> None:
        self.request = request
        self._gone = False
        request.notifyFinish().addErrback(self._lost)

    def _lost(self, reason: Failure) -> None:
        self._gone = True

    @property
    def gone(self) -> bool:
        return self._gone

    def header(self, name: str, value: str) -> None:
        self.request.setHeader(name, value)

    def start(self, status: int, headers: Mapping[str, str]) -> None:
        set_status(self.request, status)
        for name, value in headers.items():
            self.request.setHeader(name, value)

    def write(self, data: bytes) -> None:
        if not self._gone:
            self.request.write(data)

    def register_producer(self, producer: IPushProducer) -> None:
        if not self._gone:
            self.request.registerProducer(producer, True)

    def unregister_producer(self) -> None:
        if not self._gone:
            self.request.unregisterProducer()

    def abort(self) -> None:
        transport = self.request.channel.transport if self.request.channel else None
        if transport is not None and not self._gone:
            transport.abortConnection()  # type: ignore[attr-defined]
