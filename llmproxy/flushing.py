"""
Client connections that send what they were written once per turn of the
reactor, without asking epoll each time.

Twisted's TCP transport buffers each write and registers its socket for
writability (``reactor.addWriter``, an ``epoll_ctl``); on the next turn the
reactor finds it writable, dispatches the event, sends, and unregisters the
socket (a second ``epoll_ctl``).  The gateway writes once per relayed stream
event and once per answer, to a socket that nearly always has room, so the
two calls and the dispatch are overhead paid per event (measured in
``docs/performance.rst``).

:func:`flush_at_end_of_turn` gives a listening port connections that instead
queue their writes and send them from one ``callLater(0)`` shared by every
connection written to in that turn: it runs right after the turn's I/O, so
what a turn wrote still leaves in one ``send`` per connection, as it does
with Twisted's own path.  (What a timed call writes, a keep-alive comment,
now waits for the next poll's I/O to be handled first.)  What the socket does
not take (a slow reader), a write to a connection the reactor is already
watching, a connection that is closing and one after ``startTLS`` all go
Twisted's own way: registered with the reactor until drained, with the
producer paused and resumed as before.

Like every Twisted timer, the flush runs on the wall clock: should the clock
step back while one is pending, the next write to any connection of the port
brings it forward (:meth:`_Turn.add`); with no next write, that turn's bytes
wait until the clock catches up.
"""

from __future__ import annotations

from typing import Any

from twisted.logger import Logger


class _Turn:
    """The connections of one port waiting for the end of this turn."""

    log = Logger()

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        self.waiting: list[FlushAtEndOfTurn] = []
        self._call: Any = None

    def add(self, connection: FlushAtEndOfTurn) -> None:
        if not self.waiting:
            self._call = self.reactor.callLater(0, self.flush)
        elif self._call.getTime() > self.reactor.seconds():
            # Twisted's timers run on the wall clock: stepped back since the
            # call was made, it would wait for the clock to catch up.
            self._call.reset(0)
        self.waiting.append(connection)

    def flush(self) -> None:
        waiting, self.waiting = self.waiting, []
        for connection in waiting:
            try:
                connection.flush()
            except Exception:  # noqa: BLE001 - one connection's mishap must not strand the rest
                # A producer's resumeProducing raised.  The reactor would log
                # it and drop the connection; so do we, and the others flush.
                self.log.failure("flushing a connection (it is closed)")
                connection.abortConnection()  # type: ignore[attr-defined]


class FlushAtEndOfTurn:
    """
    Mixed in before a Twisted server transport (``tcp.Server``,
    ``unix.Server``): its ``write`` and ``writeSequence`` queue as Twisted's
    do, but leave the sending to the port's :class:`_Turn`.
    """

    _turn: _Turn
    _watched = False  # registered with the reactor for writability
    _queued = False  # in the turn's list

    # These are FileDescriptor's, re-declared for the type checker.
    connected: int
    TLS = False  # as Twisted's own, until a startTLS
    _writeDisconnected: bool  # noqa: N815
    _tempDataBuffer: list[bytes]  # noqa: N815
    _tempDataLen: int  # noqa: N815

    def startWriting(self) -> None:
        self._watched = True
        super().startWriting()  # type: ignore[misc]

    def stopWriting(self) -> None:
        # Only startWriting registers us: unwatched, there is nothing to undo.
        if self._watched:
            self._watched = False
            super().stopWriting()  # type: ignore[misc]

    def _theirs(self) -> bool:
        """Whether a write goes Twisted's own way (``TLS``: after a ``startTLS``)."""
        return self._watched or not self.connected or self._writeDisconnected or self.TLS

    def write(self, data: bytes) -> None:
        if not data or self._theirs():
            super().write(data)  # type: ignore[misc]
            return
        if not isinstance(data, bytes):
            raise TypeError(f"Data must be bytes, not {type(data).__name__}")
        self._tempDataBuffer.append(data)
        self._tempDataLen += len(data)
        self._queue()

    def writeSequence(self, iovec: list[bytes]) -> None:
        if not iovec or self._theirs():
            super().writeSequence(iovec)  # type: ignore[misc]
            return
        for data in iovec:
            if not isinstance(data, bytes):
                raise TypeError(f"Data must be bytes, not {type(data).__name__}")
        self._tempDataBuffer.extend(iovec)
        self._tempDataLen += sum(map(len, iovec))
        self._queue()

    def _queue(self) -> None:
        self._maybePauseProducer()  # type: ignore[attr-defined]
        if not self._queued:
            self._queued = True
            self._turn.add(self)

    def flush(self) -> None:
        """Send what is queued; leave the rest, and any ending, to the reactor."""
        self._queued = False
        if self._watched or not self.connected:
            return  # already the reactor's (a close, a backed-up socket), or gone
        # doWrite sends what fits; when all went, it unwatches (a no-op here)
        # and resumes a paused producer.  Anything else it returns (the
        # connection lost) is the reactor's to act on, on its next turn.
        if self.doWrite() is not None or self._tempDataLen or self.dataBuffer:  # type: ignore[attr-defined]
            self.startWriting()


def flush_at_end_of_turn(port: Any) -> None:
    """Give ``port``'s next connections :class:`FlushAtEndOfTurn` (a TCP or UNIX port)."""
    base = getattr(port, "transport", None)
    if not isinstance(base, type) or not hasattr(base, "doWrite"):
        return  # not a port of Twisted's own kind: leave it be
    if issubclass(base, FlushAtEndOfTurn):
        return
    turn = _Turn(port.reactor)
    port.transport = type(
        f"FlushAtEndOfTurn{base.__name__}", (FlushAtEndOfTurn, base), {"_turn": turn}
    )
