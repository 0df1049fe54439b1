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
from twisted.internet.task import deferLater
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure

from llmproxy.flushing import FlushAtEndOfTurn, flush_at_end_of_turn

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

    def __init__(self, server: Server, client: Client, port: Any, watched: list[Any]) -> None:
        self.server, self.client, self.port, self.watched = server, client, port, watched

    @property
    def transport(self) -> Any:
        return self.server.transport


@pytest.fixture
def watched(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Every selectable the reactor is asked to watch for writability."""
    calls: list[Any] = []
    add_writer = reactor.addWriter

    def spy(selectable: Any) -> None:
        calls.append(selectable)
        add_writer(selectable)

    monkeypatch.setattr(reactor, "addWriter", spy)
    return calls


async def connected(watched: list[Any]) -> Pair:
    made: Deferred[Server] = Deferred()
    port = reactor.listenTCP(0, Factory.forProtocol(lambda: Server(made)), interface="127.0.0.1")
    flush_at_end_of_turn(port)
    client = Client()
    factory = ClientFactory.forProtocol(lambda: client)
    reactor.connectTCP("127.0.0.1", port.getHost().port, factory)
    server = await made.addTimeout(30, reactor)
    await client.made.addTimeout(30, reactor)
    return Pair(server, client, port, watched)


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
async def test_a_turns_writes_leave_in_one_send_without_the_reactor(watched: list[Any]) -> None:
    pair = await connected(watched)
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
async def test_what_the_socket_does_not_take_waits_for_the_reactor(watched: list[Any]) -> None:
    pair = await connected(watched)
    transport = pair.transport
    pair.client.transport.pauseProducing()  # type: ignore[union-attr]
    data = bytes(range(256)) * 65536  # 16 MiB: more than loopback's socket buffers hold
    transport.write(data[: len(data) // 2])
    transport.writeSequence([data[len(data) // 2 :]])
    # Poll until the flush has run and left the rest to the reactor.
    for _ in range(1000):
        if transport in watched:
            break
        await deferLater(reactor, 0.001, lambda: None)
    assert transport in watched and transport._watched
    transport.write(b"after")  # a write while the reactor has the connection queues behind
    pair.client.transport.resumeProducing()  # type: ignore[union-attr]
    await pair.client.wait_for(len(data) + 5)
    assert bytes(pair.client.received) == data + b"after"
    # Drained: the reactor let go, and the next write is the turn's again.
    for _ in range(1000):
        if not transport._watched:
            break
        await deferLater(reactor, 0.001, lambda: None)
    assert not transport._watched
    del watched[:]
    transport.write(b"!")
    await pair.client.wait_for(len(data) + 6)
    assert transport not in watched
    await closed(pair)


@pytest_twisted.ensureDeferred
async def test_written_then_closed_in_one_turn_arrives_whole_then_closes(
    watched: list[Any],
) -> None:
    pair = await connected(watched)
    pair.transport.write(b"last words")
    pair.transport.loseConnection()
    await pair.client.lost
    assert pair.client.reason is not None and pair.client.reason.check(ConnectionDone)
    assert bytes(pair.client.received) == b"last words"
    await pair.port.stopListening()


@pytest_twisted.ensureDeferred
async def test_a_connection_aborted_before_its_flush_is_skipped(watched: list[Any]) -> None:
    pair = await connected(watched)
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
    watched: list[Any],
) -> None:
    pair = await connected(watched)
    transport = pair.transport
    producer = Producer()
    transport.bufferSize = 1000
    transport.registerProducer(producer, True)
    transport.write(b"x" * 600)
    assert producer.events == []
    transport.writeSequence([b"y" * 600])
    assert producer.events == ["pause"]  # at once, as Twisted's own write does
    await pair.client.wait_for(1200)
    for _ in range(1000):
        if "resume" in producer.events:
            break
        await deferLater(reactor, 0.001, lambda: None)
    assert producer.events == ["pause", "resume"]
    assert bytes(pair.client.received) == b"x" * 600 + b"y" * 600
    transport.unregisterProducer()
    await closed(pair)


class Raising(Producer):
    def resumeProducing(self) -> None:
        super().resumeProducing()
        raise RuntimeError("a producer's mishap")


@pytest_twisted.ensureDeferred
async def test_a_producers_mishap_is_logged_and_strands_no_other_connection(
    watched: list[Any],
) -> None:
    made: list[Server] = []

    def server() -> Server:
        d: Deferred[Server] = Deferred()
        d.addCallback(made.append)
        return Server(d)

    port = reactor.listenTCP(0, Factory.forProtocol(server), interface="127.0.0.1")
    flush_at_end_of_turn(port)
    clients = [Client(), Client()]
    for client in clients:
        factory: Any = ClientFactory.forProtocol(Protocol)
        factory.buildProtocol = lambda _, c=client: c
        reactor.connectTCP("127.0.0.1", port.getHost().port, factory)
        await client.made.addTimeout(30, reactor)
    for _ in range(1000):
        if len(made) == 2:
            break
        await deferLater(reactor, 0.001, lambda: None)
    first: Any = made[0].transport
    second: Any = made[1].transport
    assert first is not None and second is not None
    failures: list[Any] = []
    observer: Any = failures.append
    globalLogPublisher.addObserver(observer)
    try:
        producer = Raising()
        first.bufferSize = 10
        first.registerProducer(producer, True)
        first.write(b"over the buffer")  # pauses the producer; resuming it raises
        second.write(b"still sent")
        for client, expected in ((clients[0], b"over the buffer"), (clients[1], b"still sent")):
            await client.wait_for(len(expected))
    finally:
        globalLogPublisher.removeObserver(observer)
    assert producer.events == ["pause", "resume"]
    assert [bytes(c.received) for c in clients] == [b"over the buffer", b"still sent"]
    assert any("flushing a connection" in str(e.get("log_format")) for e in failures)
    first.unregisterProducer()
    first.loseConnection()
    second.loseConnection()
    for client in clients:
        await client.lost
    await port.stopListening()


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
