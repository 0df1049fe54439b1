"""
The parent of ``--workers``, in memory: restarts with back-off, signals passed
on, the stop; and a retired upstream pool, which keeps no connection.
"""

from __future__ import annotations

import signal
from collections.abc import Sequence
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from llmproxy.upstream.client import UpstreamPool
from llmproxy.workers import (
    RESTART_FIRST,
    RESTART_MAX,
    Inherited,
    Supervisor,
    worker_command,
    worker_count,
)


class FakeTransport:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.signals: list[int] = []

    def signalProcess(self, sig: int) -> None:  # noqa: N802 - Twisted's name
        self.signals.append(sig)


class Spawning(MemoryReactorClock):
    """A clock that records the processes it is asked to start."""

    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[tuple[Any, list[str], dict[int, Any]]] = []

    def spawnProcess(self, protocol: Any, executable: Any, args: Any = (), **kw: Any) -> Any:  # noqa: N802
        transport = FakeTransport(1000 + len(self.spawned))
        protocol.makeConnection(transport)
        self.spawned.append((protocol, list(args), kw["childFDs"]))
        return transport


def command(index: int, inherited: Sequence[Inherited]) -> list[str]:
    return worker_command("/etc/llmproxy.yaml", index, inherited)


def supervisor(count: int = 2) -> tuple[Supervisor, Spawning]:
    reactor = Spawning()
    sup = Supervisor(reactor, count, ["tcp:0:interface=127.0.0.1"], command, drain_seconds=5)
    sup.inherited = [Inherited(7, "INET")]
    sup.startService()
    return sup, reactor


def die(protocol: Any, code: int = 1) -> None:
    protocol.processEnded(Failure(ProcessTerminated(exitCode=code)))


class SupervisorTests(SynchronousTestCase):
    def test_workers_get_the_socket_and_their_index(self) -> None:
        sup, reactor = supervisor()
        self.addCleanup(sup.stopService)
        assert len(reactor.spawned) == 2
        _, args, fds = reactor.spawned[1]
        assert args[args.index("--worker") + 1] == "1"
        assert args[args.index("--inherit") + 1] == "7:INET"
        assert fds[7] == 7 and fds[0] == "w"
        assert sup.pids() == {0: 1000, 1: 1001}

    def test_a_dead_worker_is_restarted_with_a_growing_back_off(self) -> None:
        sup, reactor = supervisor(1)
        self.addCleanup(sup.stopService)
        die(reactor.spawned[0][0])
        assert sup.pids() == {}
        reactor.advance(RESTART_FIRST - 0.01)
        assert len(reactor.spawned) == 1
        reactor.advance(0.01)
        assert len(reactor.spawned) == 2
        die(reactor.spawned[1][0])
        reactor.advance(RESTART_FIRST)
        assert len(reactor.spawned) == 2  # twice as long this time
        reactor.advance(RESTART_FIRST)
        assert len(reactor.spawned) == 3
        for _ in range(10):
            die(reactor.spawned[-1][0])
            reactor.advance(RESTART_MAX)
        assert sup._backoff[0] == RESTART_MAX
        # One that ran a long time starts the back-off afresh.
        reactor.advance(120)
        die(reactor.spawned[-1][0])
        before = len(reactor.spawned)
        reactor.advance(RESTART_FIRST)
        assert len(reactor.spawned) == before + 1

    def test_signals_are_passed_on_and_stop_waits_for_every_worker(self) -> None:
        sup, reactor = supervisor()
        sup.signal_all(signal.SIGHUP)
        transports = [p.transport for p, _, _ in reactor.spawned]
        assert [t.signals for t in transports] == [[signal.SIGHUP], [signal.SIGHUP]]
        stopped = sup.stopService()
        assert [t.signals[-1] for t in transports] == [signal.SIGTERM, signal.SIGTERM]
        self.assertNoResult(stopped)
        for protocol, _, _ in reactor.spawned:
            protocol.processEnded(Failure(ProcessDone(0)))
        self.successResultOf(stopped)
        reactor.advance(60)
        assert len(reactor.spawned) == 2  # nothing restarted while stopping

    def test_a_worker_that_does_not_drain_is_killed(self) -> None:
        sup, reactor = supervisor(1)
        stopped = sup.stopService()
        reactor.advance(5 + 5)
        transport = reactor.spawned[0][0].transport
        assert transport.signals == [signal.SIGTERM, signal.SIGKILL]
        die(reactor.spawned[0][0], -9)
        self.successResultOf(stopped)


class OptionTests(SynchronousTestCase):
    def test_worker_count(self) -> None:
        assert worker_count("3") == 3
        assert worker_count("auto") >= 1
        for bad in ("0", "-1", "many"):
            with self.assertRaises(ValueError):
                worker_count(bad)

    def test_inherited_sockets_parse(self) -> None:
        assert Inherited.parse("5:INET6") == Inherited(5, "INET6")
        for bad in ("x:INET", "5:IPX", "5"):
            with self.assertRaises(ValueError):
                Inherited.parse(bad)


class Closable:
    def __init__(self) -> None:
        self.closed = False
        self.transport = self
        self.state = "QUIESCENT"

    def loseConnection(self) -> None:  # noqa: N802 - Twisted's name
        self.closed = True

    def abort(self) -> Deferred[None]:
        self.closed = True
        return succeed(None)


class RetiredPoolTests(SynchronousTestCase):
    def test_a_retired_pool_closes_each_connection_given_back(self) -> None:
        pool = UpstreamPool(MemoryReactorClock(), persistent=True)
        kept = Closable()
        pool._putConnection(("http", b"a", 80), kept)
        assert not kept.closed
        pool.retire()
        assert kept.closed  # idle: closed at once
        busy = Closable()
        pool._putConnection(("http", b"a", 80), busy)  # its answer just ended
        assert busy.closed
        assert not any(pool._connections.values())
