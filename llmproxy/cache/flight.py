"""
Single-flight: identical requests in flight at once share one upstream call.

:class:`Flights` keeps the flights in progress by cache key: the first request
leads one, identical ones join it.  A :class:`Flight` is the
:class:`~llmproxy.sink.ClientSink` its one upstream exchange writes to.  It
fans every byte out to the clients following it and keeps what it has sent, so
a client that joins late first receives what was already sent (status,
headers, events so far) and then the rest live.

The exchange belongs to the flight, not to any one client: when the first
client hangs up the others are still served, and the upstream is cancelled only
when nobody is listening any more.

Backpressure: the upstream is paused only while every follower's connection
is backed up, so the fastest client sets the pace.  A follower that stays
backed up while the others read falls behind; once more than
``max_backlog`` bytes have been written for it meanwhile it is dropped, so one
stuck client can neither stall the others nor make the proxy buffer for it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer
from twisted.python.failure import Failure
from zope.interface import implementer

from llmproxy.sink import COST_HEADER, DroppableSink


@implementer(IPushProducer)
class _Follower:
    """One client of a flight; also the producer registered on its response."""

    def __init__(self, flight: Flight, sink: DroppableSink) -> None:
        self.flight = flight
        self.sink = sink
        self.done: Deferred[None] = Deferred(lambda d: flight.leave(self))
        self.producing = False
        self.backlog = 0  # bytes written for it while its connection was backed up

    def pauseProducing(self) -> None:
        self.flight.pause(self)

    def resumeProducing(self) -> None:
        self.flight.resume(self)

    def stopProducing(self) -> None:
        self.flight.leave(self)


#: Bytes a backed-up follower may fall behind the others before it is dropped.
MAX_BACKLOG = 4 * 1024 * 1024


class Flight:
    def __init__(self, key: str, max_record: int, max_backlog: int = MAX_BACKLOG) -> None:
        self.key = key
        self.max_record = max_record
        self.max_backlog = max_backlog
        self.status: int | None = None
        self.headers: dict[str, str] = {}
        self.sent: list[bytes] = []
        self.size = 0
        self.joinable = True
        self.followers: list[_Follower] = []
        self.upstream: IPushProducer | None = None
        self.paused_by: set[_Follower] = set()
        self.upstream_paused = False
        self.task: Deferred[Any] | None = None
        self.finished = False
        self.result: Failure | None = None
        #: The client whose request makes the upstream call (the first to follow).
        self.leader: DroppableSink | None = None

    # -- clients -------------------------------------------------------------------

    def follow(self, sink: DroppableSink) -> Deferred[None]:
        """Attach a client; fires when the flight's answer has been fully written."""
        follower = _Follower(self, sink)
        self.followers.append(follower)
        if self.leader is None:
            self.leader = sink
        if self.status is not None:
            sink.start(self.status, self._headers_for(sink))
            for chunk in self.sent:
                sink.write(chunk)
        if self.upstream is not None:
            follower.producing = True
            sink.register_producer(follower)
        if self.finished:
            self._settle(follower)
        else:
            self._pace()  # everybody else may be paused: this one is not (yet)
        return follower.done

    def leave(self, follower: _Follower) -> None:
        if follower not in self.followers:
            return
        self.followers.remove(follower)
        if follower.producing:
            follower.producing = False
            if not follower.sink.gone:
                follower.sink.unregister_producer()
        self.paused_by.discard(follower)
        if not self.followers and not self.finished and self.task is not None:
            self.task.cancel()  # nobody is listening: close the upstream
        else:
            self._pace()

    def pause(self, follower: _Follower) -> None:
        self.paused_by.add(follower)
        self._pace()

    def resume(self, follower: _Follower) -> None:
        self.paused_by.discard(follower)
        follower.backlog = 0
        self._pace()

    def _pace(self) -> None:
        """Pause the upstream while every follower is backed up; resume otherwise."""
        if self.upstream is None:
            return
        stalled = bool(self.followers) and all(f in self.paused_by for f in self.followers)
        if stalled and not self.upstream_paused:
            self.upstream_paused = True
            self.upstream.pauseProducing()
        elif not stalled and self.upstream_paused:
            self.upstream_paused = False
            self.upstream.resumeProducing()

    def finish(self, result: object) -> None:
        """The exchange is over: release every follower (with its error, if any)."""
        self.finished = True
        self.result = result if isinstance(result, Failure) else None
        for follower in list(self.followers):
            self._settle(follower)

    def _settle(self, follower: _Follower) -> None:
        if follower.done.called:
            return
        if follower in self.followers:
            self.followers.remove(follower)
        if self.result is not None:
            if self.status is None:
                # Nothing was sent: this follower's error answer still says
                # what the flight knew (the upstream tried, the cache verdict).
                for name, value in self.headers.items():
                    follower.sink.header(name, value)
            follower.done.errback(self.result)
        else:
            follower.done.callback(None)

    # -- the sink the upstream exchange writes to ------------------------------------

    @property
    def gone(self) -> bool:
        return not self.followers

    def header(self, name: str, value: str) -> None:
        self.headers[name] = value

    def start(self, status: int, headers: Mapping[str, str]) -> None:
        self.status = status
        self.headers.update(headers)
        for follower in self.followers:
            follower.sink.start(status, self._headers_for(follower.sink))

    def _headers_for(self, sink: DroppableSink) -> Mapping[str, str]:
        """The answer's headers, less the leader's cost for everyone else."""
        if sink is self.leader or COST_HEADER not in self.headers:
            return self.headers
        return {k: v for k, v in self.headers.items() if k != COST_HEADER}

    def write(self, data: bytes) -> None:
        if self.joinable:
            self.size += len(data)
            if self.size > self.max_record:
                # Too big to replay to late joiners: they make their own call.
                self.joinable = False
                self.sent = []
            else:
                self.sent.append(data)
        for follower in list(self.followers):
            if follower in self.paused_by:
                follower.backlog += len(data)
                if follower.backlog > self.max_backlog:
                    # Stuck while the others read on: let it go.
                    self.leave(follower)
                    follower.sink.abort()
                    continue
            follower.sink.write(data)

    def abort(self) -> None:
        """An answer that cannot end cleanly: every client's connection is dropped."""
        self.joinable = False
        for follower in list(self.followers):
            follower.sink.abort()

    def register_producer(self, producer: IPushProducer) -> None:
        self.upstream = producer
        for follower in self.followers:
            follower.producing = True
            follower.sink.register_producer(follower)

    def unregister_producer(self) -> None:
        self.upstream = None
        self.upstream_paused = False
        self.paused_by.clear()
        for follower in self.followers:
            if follower.producing:
                follower.producing = False
                if not follower.sink.gone:
                    follower.sink.unregister_producer()


class Flights:
    """The flights in progress, by cache key."""

    def __init__(self, max_record: int) -> None:
        self.max_record = max_record
        #: Requests that joined a flight instead of making their own call.
        self.coalesced = 0
        self._flights: dict[str, Flight] = {}

    def joinable(self, key: str) -> Flight | None:
        """A flight for ``key`` that a new client can still join from its start."""
        flight = self._flights.get(key)
        return flight if flight is not None and flight.joinable else None

    def join(self, flight: Flight, sink: DroppableSink) -> Deferred[None]:
        """Follow ``flight``; fires when its answer has been written to ``sink``."""
        self.coalesced += 1
        return flight.follow(sink)

    def lead(
        self, key: str, sink: DroppableSink, run: Callable[[Flight], Awaitable[None]]
    ) -> Deferred[None]:
        """
        Start a flight for ``key`` with ``sink`` as its first client: ``run`` makes
        the one upstream call, writing to the flight.  Fires like :meth:`join`.
        """
        flight = self._flights[key] = Flight(key, self.max_record)
        done = flight.follow(sink)
        flight.task = Deferred.fromCoroutine(self._fly(flight, run))
        flight.task.addBoth(flight.finish)
        return done

    async def _fly(self, flight: Flight, run: Callable[[Flight], Awaitable[None]]) -> None:
        """The upstream call of a flight, owned by no single client."""
        try:
            await run(flight)
        finally:
            if self._flights.get(flight.key) is flight:
                del self._flights[flight.key]
