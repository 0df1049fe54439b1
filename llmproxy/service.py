"""
Lifecycle: the named services ``makeService`` returns around a gateway
(:class:`~llmproxy.assembly.LiveGateway`): :func:`build_service`, or
:func:`build_supervisor` for the parent of ``--workers``:

* ``redis`` (when configured): the process's Redis connection pool;
* ``upstreams``: the HTTP connection pools (closed on stop);
* ``health`` (when ``routing.health_checks`` is set): the active checks;
* ``access-log`` (when ``access_log`` is set): the request log's writer;
* ``metrics`` (a worker of ``--workers``): refreshes its gauges every second;
* ``signals``: SIGHUP reloads, SIGUSR1 reopens the access log;
* ``parent`` (a worker): stops the worker when its parent is gone;
* ``http``: one listening port per ``--listen`` endpoint (or per socket the
  parent handed down); on stop it stops listening, then lets in-flight
  requests finish for up to ``server.drain_seconds``.

The tree stops one child at a time, the last added first, so the drain
finishes while Redis, the pools and the access log are still there.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Sequence
from typing import Any

import attrs
from twisted.application.internet import TimerService
from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred
from twisted.internet.defer import TimeoutError as DeferTimeoutError
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger

from llmproxy import config as config_module
from llmproxy import errors
from llmproxy.accesslog import AccessLog
from llmproxy.assembly import LiveGateway
from llmproxy.config import Config
from llmproxy.operations import Worker
from llmproxy.redisclient import SharedRedis
from llmproxy.requestlog import RequestLog
from llmproxy.signals import SignalHandlers, exit_cleanly
from llmproxy.site import GatewaySite
from llmproxy.upstream.client import UpstreamPools
from llmproxy.workers import (
    FAMILIES,
    Inherited,
    ListeningPort,
    ParentWatch,
    PortService,
    Supervisor,
)


class GatewayService(MultiService):
    """The top of the tree: it stops its children one after the other, newest first."""

    def stopService(self) -> Deferred[None]:
        Service.stopService(self)
        return Deferred.fromCoroutine(self._stop_in_order())

    async def _stop_in_order(self) -> None:
        for service in reversed(list(self)):
            await maybeDeferred(service.stopService)


class AdoptedPort(PortService):
    """A listening socket inherited from the parent of ``--workers``, served here."""

    def __init__(self, reactor: Any, inherited: Inherited, site: GatewaySite) -> None:
        super().__init__(reactor)
        self.inherited = inherited
        self.site = site

    def open(self) -> IListeningPort:
        fd, family = self.inherited.fd, FAMILIES[self.inherited.family]
        # adoptStreamPort works on a duplicate; the inherited descriptor is ours to close.
        port = self.reactor.adoptStreamPort(fd, family, self.site)
        os.close(fd)
        return port


class HTTPService(MultiService):
    """
    One listening port per endpoint description (or per socket inherited from
    the parent of ``--workers``), and the drain when it stops.
    """

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        listen: tuple[str, ...],
        site: GatewaySite,
        drain_seconds: float,
        inherited: Sequence[Inherited] = (),
    ) -> None:
        super().__init__()
        # Any: the ports need IReactorCore and the drain IReactorTime, at once.
        self.reactor = reactor
        self.listen = listen
        self.site = site
        self.drain_seconds = drain_seconds
        self.inherited = tuple(inherited)
        if self.inherited:
            for socket_ in self.inherited:
                AdoptedPort(reactor, socket_, site).setServiceParent(self)
        else:
            for description in listen:
                ListeningPort(reactor, description, site, "llmproxy").setServiceParent(self)

    def privilegedStartService(self) -> None:
        """
        Listen before the reactor runs (and before twistd drops privileges), so
        that a port that cannot be had stops twistd at once with a clear message
        and a non-zero status, instead of a process that runs and serves nothing.
        """
        Service.privilegedStartService(self)
        if self.inherited:
            for port in self:
                port.privilegedStartService()
            return
        for description, port in zip(self.listen, self, strict=True):
            try:
                port.privilegedStartService()  # a failed listen raises here
            except Exception as e:  # noqa: BLE001 - any reason not to listen ends the start
                raise SystemExit(f"llmproxy: cannot listen on {description}: {e}") from None

    def stopService(self) -> Deferred[None]:
        Service.stopService(self)
        self.site.draining = True
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        await DeferredList([maybeDeferred(port.stopService) for port in self])
        inflight = self.site.inflight
        drained = True
        if inflight.count:
            self.log.info(
                "draining {count} in-flight requests (up to {seconds}s)",
                count=inflight.count,
                seconds=self.drain_seconds,
            )
            try:
                await inflight.idle().addTimeout(self.drain_seconds, self.reactor)
            except DeferTimeoutError:
                drained = False
                self.log.warn(
                    "drain timed out with {count} requests in flight", count=inflight.count
                )
                # A stream cut here says so, like any other cut stream.
                self.site.interrupt_streams(errors.shutting_down())
        if drained:
            exit_cleanly(self.reactor)
        # Let the last bytes written reach the clients before the reactor stops.
        try:
            await self.site.close_connections().addTimeout(2.0, self.reactor)
        except DeferTimeoutError:
            self.log.warn("some client connections did not close in time")


@attrs.frozen
class Role:
    """Which process this is: alone (index 0), or worker ``index`` of ``--workers``."""

    index: int = 0
    #: The parent's listening sockets, for a worker.
    inherited: tuple[Inherited, ...] = ()

    @property
    def worker(self) -> bool:
        return bool(self.inherited)


def build_service(
    config: Config, reactor: Any, listen: tuple[str, ...], role: Role | None = None
) -> MultiService:
    """The named tree of a proxy process (``reactor``: the global one, from makeService)."""
    role = role or Role()
    top = GatewayService()
    redis = None
    if config.redis is not None:
        redis = SharedRedis(reactor, config.redis)
        redis.setName("redis")
        redis.setServiceParent(top)
    pools = UpstreamPools(reactor, config.upstreams)
    pools.setName("upstreams")
    pools.setServiceParent(top)
    metrics_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR") if role.worker else None
    gateway = LiveGateway(
        config, reactor, pools, redis, Worker(role.index, os.getpid()), metrics_dir or None
    )
    logs = AccessLogs(reactor, top, gateway.requests, gateway.site)
    logs.configure(config.access_log)
    _attach_checks(top, gateway.checks)
    # The checks first: they cannot fail, and must follow the new router.
    gateway.applied.append(lambda old, new: _attach_checks(top, gateway.checks))
    gateway.applied.append(lambda old, new: logs.configure(new.access_log))
    if metrics_dir:
        refresh = TimerService(1.0, gateway.metrics.refresh)
        refresh.clock = reactor
        refresh.setName("metrics")
        refresh.setServiceParent(top)
    actions: dict[int, Callable[[], object]] = {
        signal.SIGHUP: gateway.reload_now,
        signal.SIGUSR1: logs.reopen,
    }
    signals = SignalHandlers(reactor, actions)
    signals.setName("signals")
    signals.setServiceParent(top)
    if role.worker:
        gateway.fleet_reload = lambda: os.kill(os.getppid(), signal.SIGHUP)
        watch = ParentWatchService(ParentWatch(reactor, reactor.stop))
        watch.setName("parent")
        watch.setServiceParent(top)
    http = HTTPService(reactor, listen, gateway.site, config.server.drain_seconds, role.inherited)
    http.setName("http")
    http.setServiceParent(top)
    return top


def _attach_checks(top: MultiService, checks: TimerService | None) -> None:
    """Put the active checks of the config in force into the tree (replacing the old)."""
    try:
        old = top.getServiceNamed("health")
    except KeyError:
        old = None
    if old is not None:
        old.disownServiceParent()
    if checks is not None:
        checks.setName("health")
        # Before "http", so that the checks stop after the drain.
        top.addService(checks)
        _before_http(top, checks)


def _before_http(top: MultiService, service: Service) -> None:
    """Move ``service`` in front of the http service in the stop order."""
    children = top.services
    if service in children and any(s.name == "http" for s in children):
        children.remove(service)
        at = next(i for i, s in enumerate(children) if s.name == "http")
        children.insert(at, service)


class ParentWatchService(Service):
    """A worker's :class:`~llmproxy.workers.ParentWatch`, for as long as it runs."""

    def __init__(self, watch: ParentWatch) -> None:
        self.watch = watch

    def startService(self) -> None:
        super().startService()
        self.watch.start()

    def stopService(self) -> None:
        super().stopService()
        self.watch.stop()


class AccessLogs:
    """The access log of the config in force: started, retargeted or stopped on reload."""

    def __init__(
        self, reactor: Any, top: MultiService, requests: RequestLog, site: GatewaySite
    ) -> None:
        self.reactor = reactor
        self.top = top
        self.requests = requests
        self.site = site
        self.log: AccessLog | None = None
        self.settings: config_module.AccessLog | None = None

    def configure(self, settings: config_module.AccessLog | None) -> None:
        if settings == self.settings:
            return
        if settings is None:
            assert self.log is not None
            self.requests.access_log = None
            self.site.combined_log = True
            self.log.disownServiceParent()
            self.log = None
        elif self.log is None:
            self.log = AccessLog(self.reactor, settings.path, settings.format, settings.flush)
            self.log.setName("access-log")
            self.top.addService(self.log)
            _before_http(self.top, self.log)
            self.requests.access_log = self.log
            self.site.combined_log = False
        else:
            self.log.retarget(settings.path, settings.format, settings.flush)
        self.settings = settings

    def reopen(self) -> None:
        """SIGUSR1: reopen the file (after logrotate moved it)."""
        if self.log is not None:
            self.log.reopen()


def build_supervisor(
    config: Config,
    reactor: Any,
    listen: tuple[str, ...],
    count: int,
    worker_args: Callable[[int, Sequence[Inherited]], list[str]],
) -> MultiService:
    """The tree of the parent of ``--workers``: the supervisor and its signals."""
    top = MultiService()
    supervisor = Supervisor(reactor, count, listen, worker_args, config.server.drain_seconds)
    supervisor.setName("workers")
    supervisor.setServiceParent(top)
    actions: dict[int, Callable[[], object]] = {
        signal.SIGHUP: lambda: supervisor.signal_all(signal.SIGHUP),
        signal.SIGUSR1: lambda: supervisor.signal_all(signal.SIGUSR1),
    }
    SignalHandlers(reactor, actions).setServiceParent(top)
    return top
