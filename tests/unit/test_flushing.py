"""
The end-of-turn flush of client connections (:mod:`llmproxy.flushing`), on
real loopback sockets and the real reactor: what a turn wrote leaves in one
send without registering with the reactor; what the socket does not take, a
close, and a paused producer go Twisted's own way, and every byte arrives in
order.
"""

from __future__ import annotations

from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import ClientFactory, Factory, Protocol
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure

from llmproxy.flushing import FlushAtEndOfTurn, _Turn, flush_at_end_of_turn

reactor: Any = _reactor


class Server(Protocol):
    def __init__(self, made: Deferred[Server]) -> None:
        self.made = made

    def connectionMade(self) -> None:
        self.made.callback(self)


class Client(Protocol):
    def __init__(self) -> None:
        self.received = bytearray()
        self.lost: Deferred[None] = Deferred()
        self.reason: Failure | None = None
        self.waiting: tuple[int, Deferred[None]] | None = None
        self.made: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        self.made.callback(None)

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if self.waiting is not None and len(self.received) >= self.waiting[0]:
            _, done = self.waiting
            self.waiting = None
            done.callback(None)

    def connectionLost(self, reason: Failure = ConnectionDone) -> None:  # type: ignore[assignment]
        self.reason = reason
        self.lost.callback(None)

    def wait_for(self, count: int) -> Deferred[None]:
        done: Deferred[None] = Deferred()
        if len(self.received) >= count:
            done.callback(None)
        else:
            self.waiting = (count, done)
        return done.addTimeout(30, reactor)


class Pair:
    """A flushing listening port, and one connection to it from each side."""

    def __init__(self, server: Server, client: Client, port: Any) -> None:
        self.server, self.client, self.port = server, client, port

    @property
    def transport(self) -> Any:
        return self.server.transport


class Watched:
    """Every selectable the reactor is asked to watch for writability."""

    def __init__(self) -> None:
        self.calls: list[Any] = []
        self._waiting: list[tuple[Any, Deferred[None]]] = []

    def __contains__(self, selectable: Any) -> bool:
        return selectable in self.calls

    def clear(self) -> None:
        self.calls.clear()

    def saw(self, selectable: Any) -> None:
        self.calls.append(selectable)
        for waiting in [w for w in self._waiting if w[0] is selectable]:
            self._waiting.remove(waiting)
            waiting[1].callback(None)

    def wait(self, selectable: Any) -> Deferred[None]:
        """Fires once the reactor has been asked to watch ``selectable``."""
        done: Deferred[None] = Deferred()
        if selectable in self.calls:
            done.callback(None)
        else:
            self._waiting.append((selectable, done))
        return done.addTimeout(30, reactor)


@pytest.fixture
def watched(monkeypatch: pytest.MonkeyPatch) -> Watched:
    spy = Watched()
    add_writer = reactor.addWriter

    def watching(selectable: Any) -> None:
        spy.saw(selectable)
        add_writer(selectable)

    monkeypatch.setattr(reactor, "addWriter", watching)
    return spy


async def connected() -> Pair:
    made: Deferred[Server] = Deferred()
    port = reactor.listenTCP(0, Factory.forProtocol(lambda: Server(made)), interface="127.0.0.1")
    flush_at_end_of_turn(port)
    client = Client()
    factory = ClientFactory.forProtocol(lambda: client)
    reactor.connectTCP("127.0.0.1", port.getHost().port, factory)
    server = await made.addTimeout(30, reactor)
    await client.made.addTimeout(30, reactor)
    return Pair(server, client, port)


async def closed(pair: Pair) -> None:
    pair.transport.loseConnection()
    await pair.client.lost
    await pair.port.stopListening()


def count_sends(transport: Any) -> list[int]:
    sizes: list[int] = []
    send = transport.writeSomeData

    def counted(data: Any) -> Any:
        sent = send(data)
        sizes.append(sent)
        return sent

    transport.writeSomeData = counted
    return sizes


@pytest_twisted.ensureDeferred
async def test_a_turns_writes_leave_in_one_send_without_the_reactor(watched: Watched) -> None:
    pair = await connected()
    transport = pair.transport
    assert isinstance(transport, FlushAtEndOfTurn)
    sends = count_sends(transport)
    transport.write(b"head ")
    transport.writeSequence([b"one ", b"two ", b"three"])
    assert pair.client.received == b""  # nothing leaves before the turn ends
    await pair.client.wait_for(len(b"head one two three"))
    assert bytes(pair.client.received) == b"head one two three"
    assert sends == [len(b"head one two three")]
    assert transport not in watched
    # The next turn's write goes the same way.
    transport.write(b"!")
    await pair.client.wait_for(len(b"head one two three!"))
    assert len(sends) == 2 and transport not in watched
    # Only bytes, as Twisted's own write says, and nothing half-queued.
    with pytest.raises(TypeError):
        transport.write("text")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        transport.writeSequence([b"ok", "text"])  # type: ignore[list-item]
    assert transport._tempDataLen == 0 and not transport._tempDataBuffer
    await closed(pair)


@pytest_twisted.ensureDeferred
async def test_what_the_socket_does_not_take_waits_for_the_reactor(watched: Watched) -> None:
    pair = await connected()
    transport = pair.transport
    pair.client.transport.pauseProducing()  # type: ignore[union-attr]
    data = bytes(range(256)) * 65536  # 16 MiB: more than loopback's socket buffers hold
    transport.write(data[: len(data) // 2])
    transport.writeSequence([data[len(data) // 2 :]])
    await watched.wait(transport)  # the flush sent what fit and left the rest to the reactor
    assert transport._watched
    transport.write(b"after")  # a write while the reactor has the connection queues behind
    pair.client.transport.resumeProducing()  # type: ignore[union-attr]
    await pair.client.wait_for(len(data) + 5)
    assert bytes(pair.client.received) == data + b"after"
    # Drained (the reactor let go in the doWrite that sent the last bytes),
    # and the next write is the turn's again.
    assert not transport._watched
    watched.clear()
    transport.write(b"!")
    await pair.client.wait_for(len(data) + 6)
    assert transport not in watched
    await closed(pair)


@pytest_twisted.ensureDeferred
async def test_written_then_closed_in_one_turn_arrives_whole_then_closes(
    watched: Watched,
) -> None:
    pair = await connected()
    pair.transport.write(b"last words")
    pair.transport.loseConnection()
    await pair.client.lost
    assert pair.client.reason is not None and pair.client.reason.check(ConnectionDone)
    assert bytes(pair.client.received) == b"last words"
    await pair.port.stopListening()


@pytest_twisted.ensureDeferred
async def test_what_was_queued_for_a_connection_then_aborted_is_dropped(watched: Watched) -> None:
    pair = await connected()
    pair.transport.write(b"never sent")
    pair.transport.abortConnection()
    await pair.client.lost
    assert bytes(pair.client.received) == b""
    await pair.port.stopListening()


class Producer:
    def __init__(self) -> None:
        self.events: list[str] = []

    def pauseProducing(self) -> None:
        self.events.append("pause")

    def resumeProducing(self) -> None:
        self.events.append("resume")

    def stopProducing(self) -> None:
        self.events.append("stop")


@pytest_twisted.ensureDeferred
async def test_a_streaming_producer_is_paused_over_the_buffer_and_resumed(
    watched: Watched,
) -> None:
    pair = await connected()
    transport = pair.transport
    producer = Producer()
    transport.bufferSize = 1000
    transport.registerProducer(producer, True)
    transport.write(b"x" * 600)
    assert producer.events == []
    transport.writeSequence([b"y" * 600])
    assert producer.events == ["pause"]  # at once, as Twisted's own write does
    await pair.client.wait_for(1200)
    # Resumed in the doWrite that sent the last bytes, before they arrived.
    assert producer.events == ["pause", "resume"]
    assert bytes(pair.client.received) == b"x" * 600 + b"y" * 600
    transport.unregisterProducer()
    await closed(pair)


class Raising(Producer):
    def resumeProducing(self) -> None:
        super().resumeProducing()
        raise RuntimeError("a producer's mishap")


@pytest_twisted.ensureDeferred
async def test_a_producers_mishap_is_logged_and_closes_only_its_connection(
    watched: Watched,
) -> None:
    ready: list[Deferred[Server]] = [Deferred(), Deferred()]
    pending = list(ready)
    port = reactor.listenTCP(
        0, Factory.forProtocol(lambda: Server(pending.pop(0))), interface="127.0.0.1"
    )
    flush_at_end_of_turn(port)
    clients = [Client(), Client()]
    servers = []
    for client, made in zip(clients, ready, strict=True):  # one after the other: in order
        factory: Any = ClientFactory.forProtocol(Protocol)
        factory.buildProtocol = lambda _, c=client: c
        reactor.connectTCP("127.0.0.1", port.getHost().port, factory)
        servers.append(await made.addTimeout(30, reactor))
        await client.made.addTimeout(30, reactor)
    first: Any = servers[0].transport
    second: Any = servers[1].transport
    failures: list[Any] = []
    observer: Any = failures.append
    globalLogPublisher.addObserver(observer)
    try:
        producer = Raising()
        first.bufferSize = 10
        first.registerProducer(producer, True)
        first.write(b"over the buffer")  # pauses the producer; resuming it raises
        second.write(b"still sent")  # flushed in the same turn, after the first
        await clients[0].lost.addTimeout(
            30, reactor
        )  # dropped, as the reactor drops one whose doWrite raised
        await clients[1].wait_for(len(b"still sent"))
    finally:
        globalLogPublisher.removeObserver(observer)
    assert producer.events[:2] == ["pause", "resume"]
    assert bytes(clients[1].received) == b"still sent"
    assert any("flushing a connection" in str(e.get("log_format")) for e in failures)
    second.loseConnection()
    await clients[1].lost
    await port.stopListening()


class Connection:
    def __init__(self, flushed: list[str], name: str) -> None:
        self.flushed, self.name = flushed, name

    def flush(self) -> None:
        self.flushed.append(self.name)


def test_a_pending_flush_is_brought_forward_when_the_clock_steps_back() -> None:
    clock = Clock()
    clock.advance(100)
    turn = _Turn(clock)
    flushed: list[str] = []
    turn.add(Connection(flushed, "a"))  # type: ignore[arg-type]
    clock.rightNow = 95.0  # the wall clock stepped back 5 s before the turn ended
    turn.add(Connection(flushed, "b"))  # type: ignore[arg-type]
    clock.advance(0)
    assert flushed == ["a", "b"]
    # Without a step, a second write in the turn schedules nothing more.
    turn.add(Connection(flushed, "c"))  # type: ignore[arg-type]
    turn.add(Connection(flushed, "d"))  # type: ignore[arg-type]
    assert len(clock.getDelayedCalls()) == 1
    clock.advance(0)
    assert flushed == ["a", "b", "c", "d"]


def test_it_leaves_ports_of_other_kinds_and_applies_once() -> None:
    class Other:
        transport = None

    other = Other()
    flush_at_end_of_turn(other)
    assert other.transport is None

    port: Any = reactor.listenTCP(0, Factory.forProtocol(Protocol), interface="127.0.0.1")
    try:
        flush_at_end_of_turn(port)
        first = port.transport
        flush_at_end_of_turn(port)
        assert port.transport is first and issubclass(first, FlushAtEndOfTurn)
    finally:
        port.stopListening()


@pytest_twisted.ensureDeferred
async def test_the_gateways_listening_ports_flush_at_the_end_of_the_turn() -> None:
    from llmproxy.workers import ListeningPort

    service = ListeningPort(
        reactor, "tcp:0:interface=127.0.0.1", Factory.forProtocol(Protocol), "t"
    )
    service.privilegedStartService()
    try:
        assert issubclass(service.port.transport, FlushAtEndOfTurn)
    finally:
        stopped: Any = service.stopService()
        await stopped
