"""
Assembly and lifecycle: the collaborators of a gateway wired together
(:class:`LiveGateway`, which a reload rewires), and the named services
``makeService`` returns (:func:`build_service`, or :func:`build_supervisor`
for the parent of ``--workers``):

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
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import attrs
from twisted.application import strports
from twisted.application.internet import TimerService
from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred
from twisted.internet.defer import TimeoutError as DeferTimeoutError
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.resource import Resource

from llmproxy import config as config_module
from llmproxy.accesslog import AccessLog
from llmproxy.accounting import Accountant
from llmproxy.app import Gateway
from llmproxy.attempts import Attempts
from llmproxy.auth import Authenticator
from llmproxy.cache.memory import MemoryBackend
from llmproxy.cache.redis import RedisBackend
from llmproxy.cache.store import CacheBackend, ResponseCache
from llmproxy.config import Config, Upstream
from llmproxy.errors import APIError
from llmproxy.limits import Limiter, MemoryLimiter, RedisLimiter
from llmproxy.metrics import Metrics
from llmproxy.operations import Operations, Process, Worker
from llmproxy.pipeline import Pipeline
from llmproxy.redact import Redactor
from llmproxy.redisclient import SharedRedis
from llmproxy.relay import Relay
from llmproxy.reload import Changes, ReloadRefused, diff, read_again
from llmproxy.requestlog import RequestLog
from llmproxy.responses import Responses
from llmproxy.routing.affinity import AffinityStore, MemoryAffinity, RedisAffinity
from llmproxy.routing.checks import ActiveChecks, CheckService
from llmproxy.routing.health import HealthStore, LocalHealth, RedisHealth
from llmproxy.routing.router import Router
from llmproxy.signals import SignalHandlers
from llmproxy.site import GatewaySite, InFlight
from llmproxy.upstream.client import UpstreamClient, UpstreamPools
from llmproxy.upstream.forwarder import Forwarder
from llmproxy.workers import FAMILIES, Inherited, ParentWatch, Supervisor


@attrs.frozen
class Stores:
    """Where a process keeps what a fleet may share: in memory, or in Redis."""

    health: HealthStore
    affinity: AffinityStore
    limiter: Limiter
    cache: CacheBackend | None


def stores(config: Config, reactor: IReactorTime, redis: SharedRedis | None) -> Stores:
    """Each Redis store falls back to its memory twin while Redis is away."""
    cache: CacheBackend | None = None
    if config.cache.backend == "memory":
        cache = MemoryBackend(reactor, config.cache.max_bytes)
    affinity = MemoryAffinity(reactor, config.routing.affinity_ttl)
    if redis is None:
        return Stores(LocalHealth(), affinity, MemoryLimiter(reactor), cache)
    namespace = config.cache.namespace
    if config.cache.backend == "redis":
        cache = RedisBackend(redis, namespace)
    return Stores(
        RedisHealth(redis, namespace, config.routing.cooldown),
        RedisAffinity(redis, namespace, affinity),
        RedisLimiter(redis, namespace, MemoryLimiter(reactor)),
        cache,
    )


@attrs.frozen
class Assembly:
    """A gateway, wired: what the service tree serves (and in-memory tests drive)."""

    site: GatewaySite
    #: The active health checks, when configured (a service to start).
    checks: TimerService | None
    #: The gateway itself, to reload.
    gateway: LiveGateway


class Clients(Protocol):
    """The upstream clients of a config (real pools, or in-memory ones in tests)."""

    def update(self, upstreams: Mapping[str, Upstream]) -> Mapping[str, UpstreamClient]: ...


@attrs.frozen
class FixedClients:
    """Clients that never change, by upstream name (in-memory tests)."""

    clients: Mapping[str, UpstreamClient]

    def update(self, upstreams: Mapping[str, Upstream]) -> Mapping[str, UpstreamClient]:
        return self.clients


def _store_settings(config: Config) -> tuple[object, ...]:
    """What the stores are made from: a reload that keeps these keeps the stores."""
    return (config.cache.namespace, config.cache.max_bytes, config.routing)


class LiveGateway:
    """
    A gateway whose configuration can be replaced while it serves.

    What lasts for the process: the site (and its in-flight count), the
    metrics, the cache (its counters and flights), the upstream pools of
    upstreams that did not change, and the stores (unless their settings
    changed).  What each config makes anew: the router (inheriting the state
    of unchanged targets), keys, forwarding, and the Klein resource.  A
    request holds the objects it began with, so it finishes on them.
    """

    log = Logger()

    def __init__(
        self,
        config: Config,
        reactor: IReactorTime,
        clients: Clients,
        redis: SharedRedis | None = None,
        worker: Worker | None = None,
        metrics_dir: str | None = None,
    ) -> None:
        self.reactor = reactor
        self.clients = clients
        self.redis = redis
        self.worker = worker or Worker(0, os.getpid())
        self.metrics = Metrics(metrics_dir)
        self.requests = RequestLog(self.metrics)
        self.shared = stores(config, reactor, redis)
        self.cache = ResponseCache(self.shared.cache, config.cache)
        self.site = GatewaySite(
            Resource(),
            max_body_bytes=config.server.max_body_bytes,
            trusted_proxies=config.server.trusted_proxies,
            observer=self.requests,
            default_headers=self.cache.default_verdict.headers(),
            reactor=reactor,
        )
        self.config = config
        self.checks: TimerService | None = None
        #: Told of every config applied after the first (the tree's own parts).
        self.applied: list[Callable[[Config, Config], object]] = []
        #: A worker of ``--workers`` asks its parent to reload every worker.
        self.fleet_reload: Callable[[], object] | None = None
        self.router = self._install(config, None)
        gauges(self.metrics, lambda: self.router, self.cache, self.site.inflight)

    def _install(self, config: Config, previous: Router | None) -> Router:
        """Wire ``config`` and make it what the site serves; the new router."""
        reactor = self.reactor
        if previous is not None and _store_settings(config) != _store_settings(self.config):
            self.shared = stores(config, reactor, self.redis)
        shared = self.shared
        self.cache.configure(shared.cache, config.cache)
        router = Router(config, reactor, health=shared.health)
        if previous is not None:
            router.inherit(previous)
        auth = Authenticator(config.auth)
        clients = self.clients.update(config.upstreams)
        forwarder = Forwarder(reactor, config.upstreams, clients, Redactor(config.secrets()))
        relay = Relay(shared.affinity, self.cache.max_record, reactor, config.server.sse_keepalive)
        attempts = Attempts(forwarder, relay, self.metrics, reactor)
        responses = Responses(shared.affinity, auth, router, attempts)
        accountant = Accountant(shared.limiter, self.metrics)
        pipeline = Pipeline(
            auth, shared.limiter, router, responses, self.cache, attempts, accountant
        )
        process = Process(self.site, self.worker, self.redis, self.reload_fleet)
        operations = Operations(router, self.cache, self.metrics, auth, process)
        site = self.site
        site.resource = Gateway(pipeline, responses, operations).app.resource()
        site.max_body_bytes = config.server.max_body_bytes
        site.trusted_proxies = frozenset(config.server.trusted_proxies)
        site.default_headers = self.cache.default_verdict.headers()
        self.checks = None
        if config.routing.health_checks is not None:
            settings = config.routing.health_checks
            active = ActiveChecks(router, forwarder, config.upstreams, settings.timeout)
            self.checks = CheckService(reactor, active, settings.interval)
        return router

    def apply(self, config: Config) -> Changes:
        """Serve ``config`` from the next request on; what it changed."""
        old = self.config
        self.router = self._install(config, self.router)
        self.config = config
        for hook in self.applied:
            hook(old, config)
        return diff(old, config)

    async def reload(self) -> dict[str, object]:
        """Re-read the config file and apply it (the answer of /admin/reload)."""
        try:
            config = read_again(self.config)
        except ReloadRefused as e:
            self.log.error("reload refused: {reason}", reason=str(e))
            raise e.api_error() from None
        changes = self.apply(config)
        self.log.info(
            "reloaded {source}: added {added}, removed {removed}, changed {changed}",
            source=config.source,
            added=list(changes.added),
            removed=list(changes.removed),
            changed=list(changes.changed),
        )
        return changes.as_json()

    async def reload_fleet(self) -> dict[str, object]:
        """/admin/reload: reload here, then have the parent of ``--workers`` reload them all."""
        answer = await self.reload()
        if self.fleet_reload is not None:
            self.fleet_reload()
        return answer

    def reload_now(self) -> Deferred[object]:
        """Reload, from a signal: a refusal is logged, never raised."""
        return Deferred.fromCoroutine(self.reload()).addErrback(lambda f: f.trap(APIError))


def build_gateway(
    config: Config,
    reactor: IReactorTime,
    clients: Mapping[str, UpstreamClient] | Clients,
    redis: SharedRedis | None = None,
) -> Assembly:
    """Wire a gateway over upstream ``clients`` (real pools, or in-memory ones in tests)."""
    source = FixedClients(clients) if isinstance(clients, Mapping) else clients
    gateway = LiveGateway(config, reactor, source, redis)
    return Assembly(gateway.site, gateway.checks, gateway)


def gauges(
    metrics: Metrics, router: Callable[[], Router], cache: ResponseCache, inflight: InFlight
) -> None:
    """The gauges /metrics reads from their owners (the router of the config in force)."""
    metrics.add_gauge(
        "llmproxy_inflight_requests", "Client requests in progress", lambda: inflight.count
    )
    metrics.add_gauges(
        "llmproxy_cache_events",
        "Cache lookups and stores by outcome",
        cache.counts,
        mode="livesum",
    )
    metrics.add_gauges(
        "llmproxy_target_available",
        "1 when a target takes requests (healthy or ready for its probe), 0 when cooling",
        lambda: {t: float(s.available) for t, s in router().status().items()},
        label="target",
    )
    metrics.add_gauges(
        "llmproxy_target_inflight",
        "Requests in flight to each target",
        lambda: {t: float(s.inflight) for t, s in router().status().items()},
        label="target",
        mode="livesum",
    )


class GatewayService(MultiService):
    """The top of the tree: it stops its children one after the other, newest first."""

    def stopService(self) -> Deferred[None]:
        Service.stopService(self)
        return Deferred.fromCoroutine(self._stop_in_order())

    async def _stop_in_order(self) -> None:
        for service in reversed(list(self)):
            await maybeDeferred(service.stopService)


class AdoptedPort(Service):
    """A listening socket inherited from the parent of ``--workers``, served here."""

    def __init__(self, reactor: Any, inherited: Inherited, site: GatewaySite) -> None:
        self.reactor = reactor
        self.inherited = inherited
        self.site = site
        self.port: Any = None

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        fd, family = self.inherited.fd, FAMILIES[self.inherited.family]
        # adoptStreamPort works on a duplicate; the inherited descriptor is ours to close.
        self.port = self.reactor.adoptStreamPort(fd, family, self.site)
        os.close(fd)

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        if self.port is None:
            return None
        port, self.port = self.port, None
        return maybeDeferred(port.stopListening)


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
                strports.service(description, site, reactor).setServiceParent(self)

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
                port.privilegedStartService()  # strports: a failed listen raises here
            except Exception as e:  # noqa: BLE001 - any reason not to listen ends the start
                raise SystemExit(f"llmproxy: cannot listen on {description}: {e}") from None
            self.log.info("llmproxy listening on {description}", description=description)

    def stopService(self) -> Deferred[None]:
        Service.stopService(self)
        self.site.draining = True
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        await DeferredList([maybeDeferred(port.stopService) for port in self])
        inflight = self.site.inflight
        if inflight.count:
            self.log.info(
                "draining {count} in-flight requests (up to {seconds}s)",
                count=inflight.count,
                seconds=self.drain_seconds,
            )
            try:
                await inflight.idle().addTimeout(self.drain_seconds, self.reactor)
            except DeferTimeoutError:
                self.log.warn(
                    "drain timed out with {count} requests in flight", count=inflight.count
                )
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
    gateway.applied.append(lambda old, new: logs.configure(new.access_log))
    gateway.applied.append(lambda old, new: _attach_checks(top, gateway.checks))
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
            self.log = AccessLog(self.reactor, settings.path, settings.format)
            self.log.setName("access-log")
            self.top.addService(self.log)
            _before_http(self.top, self.log)
            self.requests.access_log = self.log
            self.site.combined_log = False
        else:
            self.log.retarget(settings.path, settings.format)
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
