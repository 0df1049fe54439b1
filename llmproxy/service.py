"""
Assembly and lifecycle: the collaborators of a gateway wired together
(:func:`build_gateway`), and the named services ``makeService`` returns
(:func:`build_service`):

* ``redis`` (when configured): the process's Redis connection pool;
* ``upstreams``: the HTTP connection pools (closed on stop);
* ``health`` (when ``routing.health_checks`` is set): the active checks;
* ``http``: one listening port per ``--listen`` endpoint; on stop it stops
  listening, then lets in-flight requests finish for up to
  ``server.drain_seconds``.

The tree stops one child at a time, the last added first, so the drain
finishes while Redis and the upstream pools are still there.
"""

from __future__ import annotations

from typing import Any

import attrs
from twisted.application import strports
from twisted.application.internet import TimerService
from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred
from twisted.internet.defer import TimeoutError as DeferTimeoutError
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from llmproxy.accounting import Accountant
from llmproxy.app import Gateway
from llmproxy.attempts import Attempts
from llmproxy.auth import Authenticator
from llmproxy.cache.memory import MemoryBackend
from llmproxy.cache.redis import RedisBackend
from llmproxy.cache.store import CacheBackend, ResponseCache
from llmproxy.config import Config
from llmproxy.limits import Limiter, MemoryLimiter, RedisLimiter
from llmproxy.metrics import Metrics
from llmproxy.operations import Operations
from llmproxy.pipeline import Pipeline
from llmproxy.redact import Redactor
from llmproxy.redisclient import SharedRedis
from llmproxy.relay import Relay
from llmproxy.responses import Responses
from llmproxy.routing.affinity import AffinityStore, MemoryAffinity, RedisAffinity
from llmproxy.routing.checks import ActiveChecks, CheckService
from llmproxy.routing.health import HealthStore, LocalHealth, RedisHealth
from llmproxy.routing.router import Router
from llmproxy.site import GatewaySite, InFlight
from llmproxy.upstream.client import UpstreamClient, UpstreamPools
from llmproxy.upstream.forwarder import Forwarder


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


def build_gateway(
    config: Config,
    reactor: IReactorTime,
    clients: dict[str, UpstreamClient],
    redis: SharedRedis | None = None,
) -> Assembly:
    """Wire a gateway over upstream ``clients`` (real pools, or in-memory ones in tests)."""
    shared = stores(config, reactor, redis)
    metrics = Metrics()
    router = Router(config, reactor, health=shared.health)
    auth = Authenticator(config.auth)
    forwarder = Forwarder(reactor, config.upstreams, clients, Redactor(config.secrets()))
    cache = ResponseCache(shared.cache, config.cache)
    attempts = Attempts(forwarder, Relay(shared.affinity, cache.max_record), metrics)
    responses = Responses(shared.affinity, auth, router, attempts)
    accountant = Accountant(shared.limiter, metrics)
    pipeline = Pipeline(auth, shared.limiter, router, responses, cache, attempts, accountant)
    inflight = InFlight()
    operations = Operations(router, cache, metrics, auth, inflight)
    site = GatewaySite(
        Gateway(pipeline, responses, operations).app.resource(),
        max_body_bytes=config.server.max_body_bytes,
        trusted_proxies=config.server.trusted_proxies,
        counter=metrics,
        inflight=inflight,
        default_headers=cache.default_verdict.headers(),
        reactor=reactor,
    )
    gauges(metrics, router, cache, inflight)
    checks = None
    if config.routing.health_checks is not None:
        settings = config.routing.health_checks
        active = ActiveChecks(router, forwarder, config.upstreams, settings.timeout)
        checks = CheckService(reactor, active, settings.interval)
    return Assembly(site, checks)


def gauges(metrics: Metrics, router: Router, cache: ResponseCache, inflight: InFlight) -> None:
    """The gauges /metrics reads from their owners when it is scraped."""
    metrics.inflight.set_function(lambda: inflight.count)
    metrics.add_gauges("llmproxy_cache_events", "Cache lookups and stores by outcome", cache.counts)
    metrics.add_gauges(
        "llmproxy_target_available",
        "1 when a target takes requests (healthy or ready for its probe), 0 when cooling",
        lambda: {t: float(s.available) for t, s in router.status().items()},
        label="target",
    )
    metrics.add_gauges(
        "llmproxy_target_inflight",
        "Requests in flight to each target",
        lambda: {t: float(s.inflight) for t, s in router.status().items()},
        label="target",
    )


class GatewayService(MultiService):
    """The top of the tree: it stops its children one after the other, newest first."""

    def stopService(self) -> Deferred[None]:
        Service.stopService(self)
        return Deferred.fromCoroutine(self._stop_in_order())

    async def _stop_in_order(self) -> None:
        for service in reversed(list(self)):
            await maybeDeferred(service.stopService)


class HTTPService(MultiService):
    """One listening port per endpoint description, and the drain when it stops."""

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        listen: tuple[str, ...],
        site: GatewaySite,
        drain_seconds: float,
    ) -> None:
        super().__init__()
        # Any: the ports need IReactorCore and the drain IReactorTime, at once.
        self.reactor = reactor
        self.listen = listen
        self.site = site
        self.drain_seconds = drain_seconds
        for description in listen:
            strports.service(description, site, reactor).setServiceParent(self)

    def privilegedStartService(self) -> None:
        """
        Listen before the reactor runs (and before twistd drops privileges), so
        that a port that cannot be had stops twistd at once with a clear message
        and a non-zero status, instead of a process that runs and serves nothing.
        """
        Service.privilegedStartService(self)
        for description, port in zip(self.listen, self, strict=True):
            try:
                port.privilegedStartService()  # strports: a failed listen raises here
            except Exception as e:  # noqa: BLE001 - any reason not to listen ends the start
                raise SystemExit(f"llmproxy: cannot listen on {description}: {e}") from None
            self.log.info("llmproxy listening on {description}", description=description)

    def stopService(self) -> Deferred[None]:
        Service.stopService(self)
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


def build_service(config: Config, reactor: Any, listen: tuple[str, ...]) -> MultiService:
    """The named tree of a proxy process (``reactor``: the global one, from makeService)."""
    top = GatewayService()
    redis = None
    if config.redis is not None:
        redis = SharedRedis(reactor, config.redis.url, config.redis.timeout)
        redis.setName("redis")
        redis.setServiceParent(top)
    pools = UpstreamPools(reactor, config.upstreams)
    pools.setName("upstreams")
    pools.setServiceParent(top)
    assembly = build_gateway(config, reactor, pools.clients, redis)
    if assembly.checks is not None:
        assembly.checks.setName("health")
        assembly.checks.setServiceParent(top)
    http = HTTPService(reactor, listen, assembly.site, config.server.drain_seconds)
    http.setName("http")
    http.setServiceParent(top)
    return top
