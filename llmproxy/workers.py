"""
``--workers N``: one port, every core.

The parent (:class:`Supervisor`) binds each ``--listen`` endpoint once, before
it drops privileges, stops accepting on it, and starts N worker processes,
each a ``twistd -n llmproxy --worker I --inherit FD:FAMILY`` that adopts the
listening sockets with ``reactor.adoptStreamPort`` and serves them.  The
kernel hands each new connection to whichever worker accepts first.

Why inherited sockets rather than ``SO_REUSEPORT``: the port stays bound while
a worker restarts (no connection is refused in between), it works for every
stream endpoint Twisted can listen on (TCP, IPv6, UNIX sockets, port 0), and
no other process of the same user can join the port and take a share of the
traffic, which ``SO_REUSEPORT`` allows.

The parent then supervises:

* a worker that dies is restarted, with a back-off that doubles up to 30 s
  (and starts again from 0.5 s once a worker has run for a minute);
* SIGTERM and SIGINT stop the parent's tree: every worker gets SIGTERM and
  drains; the parent exits 0 once all have exited (SIGKILL after the drain
  deadline, and then the parent dies of the signal it got, as twistd does);
* SIGHUP (reload) and SIGUSR1 (reopen the access log) are passed on to every
  worker.

A worker reads its stdin, a pipe from the parent: when the parent is gone
(even by SIGKILL) the pipe closes and the worker drains and exits, so no
orphan keeps serving.  The workers write their metrics into one
``PROMETHEUS_MULTIPROC_DIR`` the parent creates (and removes), so any worker
answers ``/metrics`` for the whole fleet.

:class:`ListeningPort` is one process's own listening endpoint (a proxy without
``--workers``, the parent's bind, the mock upstream); it lives here, with the
helpers it shares with the supervisor, so that the mock need not import the
gateway to listen.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

import attrs
from twisted.application.service import Service
from twisted.internet import endpoints
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred
from twisted.internet.error import ProcessDone, ProcessExitedAlready
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Factory, ProcessProtocol, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from llmproxy.flushing import flush_at_end_of_turn
from llmproxy.signals import exit_cleanly

#: Back-off before restarting a worker that died: first, and at most.
RESTART_FIRST = 0.5
RESTART_MAX = 30.0
#: A worker that ran this long before it died starts the back-off afresh.
RESTART_RESET_AFTER = 60.0

FAMILIES = {"INET": socket.AF_INET, "INET6": socket.AF_INET6, "UNIX": socket.AF_UNIX}


@attrs.frozen
class Inherited:
    """A listening socket a worker got from its parent: ``FD:FAMILY``."""

    fd: int
    family: str

    @classmethod
    def parse(cls, text: str) -> Inherited:
        fd, _, family = text.partition(":")
        if not fd.isdigit() or family not in FAMILIES:
            raise ValueError(f"expected FD:INET|INET6|UNIX, got '{text}'")
        return cls(int(fd), family)

    def __str__(self) -> str:
        return f"{self.fd}:{self.family}"


def worker_count(text: str) -> int:
    """``--workers``: a positive number, or ``auto`` for the CPUs this process may use."""
    if text == "auto":
        try:
            return max(1, len(os.sched_getaffinity(0)))
        except AttributeError:  # not Linux
            return max(1, os.cpu_count() or 1)
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"expected a positive number or 'auto', got '{text}'")
    return int(text)


def _family(port: IListeningPort) -> str:
    host = port.getHost()
    if isinstance(host, IPv6Address):
        return "INET6"
    if isinstance(host, IPv4Address):
        return "INET"
    if isinstance(host, UNIXAddress):
        return "UNIX"
    raise ValueError(f"cannot hand a {type(host).__name__} socket to workers")


def listen_now(reactor: Any, description: str, factory: Any) -> IListeningPort:
    """
    Listen on the endpoint ``description`` now, before the reactor runs (every
    stream endpoint that can be shared listens at once), or raise why not.
    """
    listening: list[Any] = []
    endpoints.serverFromString(reactor, description).listen(factory).addBoth(listening.append)
    if not listening:
        raise ValueError("this kind of endpoint does not listen at once")
    if isinstance(listening[0], Failure):
        listening[0].raiseException()
    port: IListeningPort = listening[0]
    return port


def address(port: IListeningPort) -> str:
    """Where ``port`` listens, as an operator (or a test) reads it: ``127.0.0.1:8080``."""
    host = port.getHost()
    if isinstance(host, IPv6Address):
        return f"[{host.host}]:{host.port}"
    if isinstance(host, IPv4Address):
        return f"{host.host}:{host.port}"
    if isinstance(host, UNIXAddress):
        name = host.name.decode(errors="replace") if isinstance(host.name, bytes) else host.name
        return f"unix:{name}"
    return str(host)


class PortService(Service):
    """
    A listening port as a service: :meth:`open` makes it in
    ``privilegedStartService`` (before twistd drops privileges), and it stops
    listening when the service stops.
    """

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        self.port: Any = None

    def open(self) -> IListeningPort:
        """The listening port, made now."""
        raise NotImplementedError

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        if self.port is None:
            self.port = self.open()
            flush_at_end_of_turn(self.port)

    def startService(self) -> None:
        # A port added to a parent that is already running gets no
        # privilegedStartService: it opens here (once).
        super().startService()
        self.privilegedStartService()

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        if self.port is None:
            return None
        port, self.port = self.port, None
        return maybeDeferred(port.stopListening)


class ListeningPort(PortService):
    """
    One ``--listen`` endpoint; it logs the address it got (``llmproxy listening
    on 127.0.0.1:PORT``: with port 0, the port the kernel chose).
    """

    log = Logger()

    def __init__(self, reactor: Any, description: str, factory: Any, what: str) -> None:
        super().__init__(reactor)
        self.description = description
        self.factory = factory
        self.what = what

    def open(self) -> IListeningPort:
        port = listen_now(self.reactor, self.description, self.factory)
        self.log.info(
            "{what} listening on {address} ({description})",
            what=self.what,
            address=address(port),
            description=self.description,
        )
        return port


def bind(reactor: Any, description: str) -> IListeningPort:
    """Listen on ``description`` in this process, but accept nothing: the workers will."""
    port = listen_now(reactor, description, Factory.forProtocol(Protocol))
    port.stopReading()  # type: ignore[attr-defined]
    # The workers share this socket: closing the parent's copy must not shut it
    # down (shutdown(2) acts on the socket itself, and their accept() would fail
    # with EINVAL: the asyncio reactor logs each).
    port._shouldShutdown = False  # type: ignore[attr-defined]
    return port


class _Worker(ProcessProtocol):
    """One worker process, as its parent sees it."""

    def __init__(self, supervisor: Supervisor, index: int, started: float) -> None:
        self.supervisor = supervisor
        self.index = index
        self.started = started
        self.pid: int | None = None
        self.ended: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.pid = self.transport.pid

    def processEnded(self, reason: Failure) -> None:
        self.ended.callback(None)
        self.supervisor.ended(self, reason)

    def signal(self, sig: int) -> None:
        try:
            if self.transport is not None:
                self.transport.signalProcess(sig)
        except (ProcessExitedAlready, OSError):
            pass


class Supervisor(Service):
    """The parent of ``--workers N``: binds, starts, restarts, signals and outlives them."""

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        count: int,
        listen: Sequence[str],
        worker_args: Callable[[int, Sequence[Inherited]], list[str]],
        drain_seconds: float,
    ) -> None:
        self.reactor = reactor
        self.count = count
        self.listen = tuple(listen)
        self.worker_args = worker_args
        self.drain_seconds = drain_seconds
        self.ports: list[IListeningPort] = []
        self.inherited: list[Inherited] = []
        self.workers: dict[int, _Worker] = {}
        self._backoff: dict[int, float] = {}
        self._restarts: dict[int, Any] = {}
        self.metrics_dir = ""
        self._stopping = False

    def privilegedStartService(self) -> None:
        """Bind every endpoint before twistd drops privileges; fail the start if one cannot be."""
        super().privilegedStartService()
        for description in self.listen:
            try:
                port = bind(self.reactor, description)
                family = _family(port)
            except Exception as e:  # noqa: BLE001 - any reason not to listen ends the start
                raise SystemExit(f"llmproxy: cannot listen on {description}: {e}") from None
            self.ports.append(port)
            self.inherited.append(Inherited(port.fileno(), family))  # type: ignore[attr-defined]
            self.log.info(
                "llmproxy listening on {address} ({description})",
                address=address(port),
                description=description,
            )

    def startService(self) -> None:
        super().startService()
        self.metrics_dir = tempfile.mkdtemp(prefix="llmproxy-metrics-")
        self.log.info("starting {count} workers", count=self.count)
        for index in range(self.count):
            self._spawn(index)

    def _spawn(self, index: int) -> None:
        self._restarts.pop(index, None)
        worker = _Worker(self, index, self.reactor.seconds())
        fds: dict[int, Any] = {0: "w", 1: 1, 2: 2}
        for inherited in self.inherited:
            fds[inherited.fd] = inherited.fd
        env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=self.metrics_dir)
        args = self.worker_args(index, self.inherited)
        self.reactor.spawnProcess(worker, args[0], args, env=env, childFDs=fds)
        self.workers[index] = worker
        self.log.info("worker {index} started (pid {pid})", index=index, pid=worker.pid)

    def ended(self, worker: _Worker, reason: Failure) -> None:
        """A worker exited: restart it, unless the fleet is stopping."""
        if self.workers.get(worker.index) is worker:
            del self.workers[worker.index]
        if worker.pid is not None:
            _forget_metrics(worker.pid, self.metrics_dir)
        if self._stopping:
            return
        ran = self.reactor.seconds() - worker.started
        delay = self._backoff.get(worker.index, 0.0)
        delay = RESTART_FIRST if ran >= RESTART_RESET_AFTER or not delay else delay * 2
        delay = min(delay, RESTART_MAX)
        self._backoff[worker.index] = delay
        status = getattr(reason.value, "exitCode", None)
        killed = getattr(reason.value, "signal", None)
        if isinstance(reason.value, ProcessDone):
            how = "exited"
        elif killed is not None:
            how = f"was killed by signal {killed}"
        else:
            how = f"exited with status {status}"
        self.log.warn(
            "worker {index} (pid {pid}) {how} after {ran:.1f}s; restarting in {delay:.1f}s",
            index=worker.index,
            pid=worker.pid,
            how=how,
            ran=ran,
            delay=delay,
        )
        self._restarts[worker.index] = self.reactor.callLater(delay, self._spawn, worker.index)

    def signal_all(self, sig: int) -> None:
        """Pass a signal on to every worker (SIGHUP: reload; SIGUSR1: reopen logs)."""
        self.log.info(
            "passing {signal} to {count} workers",
            signal=signal.Signals(sig).name,
            count=len(self.workers),
        )
        for worker in self.workers.values():
            worker.signal(sig)

    def pids(self) -> dict[int, int | None]:
        """Each running worker's pid, by index."""
        return {index: worker.pid for index, worker in sorted(self.workers.items())}

    def stopService(self) -> Deferred[None]:
        super().stopService()
        self._stopping = True
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        for pending in self._restarts.values():
            if pending.active():
                pending.cancel()
        self._restarts.clear()
        # Nobody accepts on the parent's copy; closing it lets the port go once
        # the workers have closed theirs.
        await DeferredList([maybeDeferred(port.stopListening) for port in self.ports])
        running = list(self.workers.values())
        for worker in running:
            worker.signal(signal.SIGTERM)
        waiting = DeferredList([w.ended for w in running])
        deadline = self.reactor.callLater(self.drain_seconds + 5.0, self._kill, running)
        await waiting
        drained = deadline.active()
        if drained:
            deadline.cancel()
        shutil.rmtree(self.metrics_dir, ignore_errors=True)
        self.log.info("all workers have exited")
        if drained:
            exit_cleanly(self.reactor)

    def _kill(self, workers: Sequence[_Worker]) -> None:
        for worker in workers:
            if not worker.ended.called:
                self.log.warn("worker {index} did not drain in time: killed", index=worker.index)
                worker.signal(signal.SIGKILL)


def _forget_metrics(pid: int, path: str) -> None:
    """A dead worker's live gauges must not count any more."""
    if not path or not os.path.isdir(path):
        return
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid, path)


class ParentWatch:
    """
    In a worker: stdin is a pipe from the parent, and its end means the parent
    is gone.  Then the worker stops (and drains) instead of serving on as an
    orphan.
    """

    log = Logger()

    def __init__(self, reactor: Any, gone: Callable[[], object], fd: int = 0) -> None:
        self.reactor = reactor
        self.gone = gone
        self.fd = fd

    def start(self) -> None:
        os.set_blocking(self.fd, False)
        self.reactor.addReader(self)

    def stop(self) -> None:
        self.reactor.removeReader(self)

    def fileno(self) -> int:
        return self.fd

    def doRead(self) -> None:
        try:
            data = os.read(self.fd, 4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.stop()
            self.log.warn("the parent process is gone; stopping")
            self.gone()

    def connectionLost(self, reason: Failure) -> None:
        pass

    def logPrefix(self) -> str:
        return "parent-watch"


def reactor_name(reactor: object) -> str | None:
    """The ``--reactor`` short name of the reactor running here (workers get the same)."""
    from twisted.application.reactors import getReactorTypes

    module = type(reactor).__module__
    for installable in getReactorTypes():
        if getattr(installable, "moduleName", None) == module:
            return str(installable.shortName)
    return None


def worker_command(
    config_path: str | None,
    index: int,
    inherited: Sequence[Inherited],
    reactor: str | None = None,
) -> list[str]:
    """
    The command line of worker ``index``: this interpreter's twistd, in the
    foreground, on the parent's reactor (``reactor``, a ``--reactor`` name).
    """
    # twistd itself, whatever its script is called here (`python -m twisted` is `twist`).
    twistd = "from twisted.scripts.twistd import run; run()"
    chosen = [f"--reactor={reactor}"] if reactor else []
    args = [sys.executable, "-c", twistd, "--pidfile=", *chosen, "-n", "llmproxy"]
    if config_path is not None:
        args += ["--config", os.path.abspath(config_path)]
    args += ["--worker", str(index)]
    for socket_ in inherited:
        args += ["--inherit", str(socket_)]
    return args
