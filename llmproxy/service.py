"""
Assembly and lifecycle: the services ``makeService`` puts in its MultiService.

* ``upstreams`` owns the HTTP connection pools (closed on stop);
* ``cache`` owns the cache backend's connections, when it has any;
* ``http`` listens on the configured endpoints and, on stop, stops listening
  and lets in-flight requests finish for up to ``server.drain_seconds``.
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import MultiService, Service
from twisted.internet import endpoints
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred
from twisted.internet.defer import TimeoutError as DeferTimeoutError
from twisted.internet.interfaces import IListeningPort, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from llmproxy.affinity import AffinityStore, MemoryAffinity, RedisAffinity
from llmproxy.app import Gateway
from llmproxy.auth import Authenticator
from llmproxy.cache import MemoryBackend, ResponseCache
from llmproxy.cache.redis import RedisBackend
from llmproxy.cache.store import CacheBackend
from llmproxy.config import Config
from llmproxy.health import ActiveChecker, HealthStore, LocalHealth, RedisHealth
from llmproxy.limits import Limiter, MemoryLimiter, RedisLimiter
from llmproxy.metrics import Metrics
from llmproxy.pipeline import Pipeline
from llmproxy.redact import Redactor
from llmproxy.redisclient import SharedRedis
from llmproxy.router import Router
from llmproxy.site import GatewaySite
from llmproxy.upstream.client import UpstreamClient, UpstreamPools
from llmproxy.upstream.forwarder import Forwarder


class GatewayService(MultiService):
    """
    The top of the tree.  It stops its children one after the other, the last
    added first, rather than all at once as MultiService does: the HTTP service
    must finish draining while Redis and the upstream pools are still there.
    """

    def stopService(self) -> Deferred[None]:
        Service.stopService(self)
        return Deferred.fromCoroutine(self._stop_in_order())

    async def _stop_in_order(self) -> None:
        for service in reversed(list(self)):
            await maybeDeferred(service.stopService)


class HTTPService(Service):
    log = Logger()

    def __init__(
        self,
        reactor: IReactorTime,
        listen: tuple[str, ...],
        site: GatewaySite,
        gateway: Gateway,
        drain_seconds: float,
    ) -> None:
        self.reactor = reactor
        self.listen = listen
        self.site = site
        self.gateway = gateway
        self.drain_seconds = drain_seconds
        self.ports: list[IListeningPort] = []

    def privilegedStartService(self) -> None:
        """
        Listen before the reactor runs (and before twistd drops privileges), so
        that a port that cannot be had stops twistd at once with a clear message
        and a non-zero status, instead of a process that runs and serves nothing.
        """
        super().privilegedStartService()
        for description in self.listen:
            endpoint = endpoints.serverFromString(self.reactor, description)
            outcome: list[Any] = []
            endpoint.listen(self.site).addBoth(outcome.append)
            if not outcome:
                raise SystemExit(f"llmproxy: listening on {description} did not complete")
            if isinstance(outcome[0], Failure):
                raise SystemExit(
                    f"llmproxy: cannot listen on {description}: {outcome[0].getErrorMessage()}"
                )
            port: IListeningPort = outcome[0]
            self.ports.append(port)
            address = port.getHost()
            self.log.info(
                "llmproxy listening on {host}:{port}",
                host=getattr(address, "host", "?"),
                port=getattr(address, "port", "?"),
            )

    async def _stop(self) -> None:
        await DeferredList([maybeDeferred(p.stopListening) for p in self.ports])
        self.ports = []
        if self.gateway.inflight:
            self.log.info(
                "draining {count} in-flight requests (up to {seconds}s)",
                count=self.gateway.inflight,
                seconds=self.drain_seconds,
            )
            try:
                await self.gateway.idle().addTimeout(self.drain_seconds, self.reactor)
            except DeferTimeoutError:
                self.log.warn(
                    "drain timed out with {count} requests in flight", count=self.gateway.inflight
                )
        # Let the last bytes written reach the clients before the reactor stops.
        try:
            await self.site.close_connections().addTimeout(2.0, self.reactor)
        except DeferTimeoutError:
            self.log.warn("some client connections did not close in time")

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return Deferred.fromCoroutine(self._stop())


def cache_backend(
    config: Config, reactor: IReactorTime, redis: SharedRedis | None
) -> CacheBackend | None:
    if config.cache.backend == "memory":
        return MemoryBackend(reactor, config.cache.max_bytes)
    if config.cache.backend == "redis":
        assert redis is not None, "config validation requires a redis section"
        return RedisBackend(redis, config.cache.namespace)
    return None


class RedisService(Service):
    """Owns the process's Redis connection pool."""

    def __init__(self, redis: SharedRedis) -> None:
        self.redis = redis

    def startService(self) -> None:
        super().startService()
        self.redis.start()

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return Deferred.fromCoroutine(self.redis.stop())


class HealthCheckService(Service):
    def __init__(self, checker: ActiveChecker) -> None:
        self.checker = checker

    def startService(self) -> None:
        super().startService()
        self.checker.start()

    def stopService(self) -> None:
        super().stopService()
        self.checker.stop()


def build_gateway(
    config: Config,
    reactor: IReactorTime,
    clients: dict[str, UpstreamClient],
    redis: SharedRedis | None = None,
) -> Gateway:
    """Wire the collaborators (also used by in-memory tests with StubTreq clients)."""
    metrics = Metrics()
    namespace = config.cache.namespace
    health: HealthStore = LocalHealth()
    affinity: AffinityStore = MemoryAffinity(reactor, config.routing.affinity_ttl)
    if redis is not None:
        health = RedisHealth(redis, namespace, config.routing.cooldown)
        affinity = RedisAffinity(
            redis, namespace, MemoryAffinity(reactor, config.routing.affinity_ttl)
        )
    router = Router(config, reactor, health=health, affinity=affinity)
    limiter: Limiter = MemoryLimiter(reactor)
    if redis is not None:
        limiter = RedisLimiter(redis, namespace, MemoryLimiter(reactor))
    auth = Authenticator(config.auth)
    forwarder = Forwarder(reactor, config.upstreams, clients, Redactor(config.secrets()))
    cache = ResponseCache(
        cache_backend(config, reactor, redis), config.cache.ttl, config.cache.scope
    )
    metrics.add_gauges(
        "llmproxy_cache_events",
        "Cache lookups and stores by outcome",
        lambda: dict(cache.counters),
    )
    metrics.add_gauges(
        "llmproxy_target_available",
        "1 when a target takes requests (healthy or ready for its probe), 0 when cooling",
        lambda: {
            t: float(r["state"] in ("healthy", "half_open"))
            for t, r in router.health_report().items()
        },
        label="target",
    )
    metrics.add_gauges(
        "llmproxy_target_inflight",
        "Requests in flight to each target",
        lambda: {t: float(r["inflight"]) for t, r in router.health_report().items()},  # type: ignore[arg-type]
        label="target",
    )
    pipeline = Pipeline(
        reactor,
        auth,
        limiter,
        router,
        forwarder,
        cache,
        namespace,
        metrics,
    )
    return Gateway(config, pipeline, router, auth, cache, metrics)


def build_site(config: Config, gateway: Gateway, reactor: IReactorTime) -> GatewaySite:
    site = GatewaySite(
        gateway.app.resource(),
        max_body_bytes=config.server.max_body_bytes,
        trusted_proxies=config.server.trusted_proxies,
        reactor=reactor,
    )
    site.rejected = lambda status: gateway.metrics.request("rejected", status)
    return site


def build_service(config: Config, reactor: Any, listen: tuple[str, ...]) -> MultiService:
    top = GatewayService()
    redis = None
    if config.redis is not None:
        redis = SharedRedis(reactor, config.redis.url, config.redis.timeout)
        redis_service = RedisService(redis)
        redis_service.setName("redis")
        redis_service.setServiceParent(top)
    upstreams = UpstreamPools(reactor, config.upstreams)
    upstreams.setName("upstreams")
    upstreams.setServiceParent(top)
    gateway = build_gateway(config, reactor, upstreams.clients, redis)
    checks = config.routing.health_checks
    if checks is not None:
        checker = ActiveChecker(
            reactor, gateway.router, gateway.pipeline.forwarder, checks.interval, checks.timeout
        )
        health = HealthCheckService(checker)
        health.setName("health")
        health.setServiceParent(top)
    http = HTTPService(
        reactor, listen, build_site(config, gateway, reactor), gateway, config.server.drain_seconds
    )
    http.setName("http")
    http.setServiceParent(top)
    return top
