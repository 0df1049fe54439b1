"""
Wiring: a gateway's collaborators made from a config (:class:`LiveGateway`),
and made again from the next config on a live reload.

What lasts for the process: the site (and its in-flight count), the metrics,
the cache (its counters and flights), the upstream pools of upstreams that
did not change, and the stores unless their settings changed.  What each
config makes anew: the router (inheriting the state of unchanged targets),
keys, forwarding and the Klein resource.  A request holds the objects it
began with, so it finishes on them.  The service tree around a gateway is
:mod:`llmproxy.service`'s.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Protocol

import attrs
from twisted.application.internet import TimerService
from twisted.internet.defer import Deferred, DeferredSemaphore
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.resource import Resource

from llmproxy.accounting import Accountant
from llmproxy.app import Gateway
from llmproxy.attempts import Attempts
from llmproxy.auth import Authenticator
from llmproxy.cache.memory import MemoryBackend
from llmproxy.cache.redis import RedisBackend
from llmproxy.cache.store import CacheBackend, ResponseCache
from llmproxy.config import Config, Upstream
from llmproxy.errors import APIError
from llmproxy.files import Files
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
from llmproxy.site import GatewaySite, InFlight
from llmproxy.upstream.client import UpstreamClient
from llmproxy.upstream.forwarder import Forwarder, connection_slots


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


def restock(old: Stores, before: Config, after: Config, fresh: Callable[[], Stores]) -> Stores:
    """
    The stores for ``after``: each kept unless what it is made from changed,
    so a reload keeps the memory cache, the rate-limit windows and the pins.
    """
    ns = before.cache.namespace == after.cache.namespace
    keep_cache = ns and before.cache.max_bytes == after.cache.max_bytes
    keep_health = ns and before.routing.cooldown == after.routing.cooldown
    keep_affinity = ns and before.routing.affinity_ttl == after.routing.affinity_ttl
    if keep_cache and keep_health and keep_affinity and ns:
        return old
    new = fresh()
    return Stores(
        health=old.health if keep_health else new.health,
        affinity=old.affinity if keep_affinity else new.affinity,
        limiter=old.limiter if ns else new.limiter,
        cache=old.cache if keep_cache else new.cache,
    )


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
        self._slots: dict[str, tuple[Upstream, DeferredSemaphore]] = {}
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
        if previous is not None:
            self.shared = restock(
                self.shared, self.config, config, lambda: stores(config, reactor, self.redis)
            )
        shared = self.shared
        self.cache.configure(shared.cache, config.cache)
        router = Router(config, reactor, health=shared.health)
        if previous is not None:
            router.inherit(previous)
        auth = Authenticator(config.auth)
        clients = self.clients.update(config.upstreams)
        forwarder = Forwarder(
            reactor,
            config.upstreams,
            clients,
            Redactor(config.secrets()),
            config.server.max_response_bytes,
            self._slots_for(config),
        )
        relay = Relay(shared.affinity, self.cache.max_record, reactor, config.server.sse_keepalive)
        attempts = Attempts(forwarder, relay, self.metrics, reactor)
        responses = Responses(shared.affinity, auth, router, attempts)
        accountant = Accountant(shared.limiter, self.metrics)
        pipeline = Pipeline(
            auth,
            shared.limiter,
            router,
            responses,
            self.cache,
            attempts,
            accountant,
            config.routing.stream_usage,
        )
        process = Process(self.site, self.worker, self.redis, self.reload_fleet, config.source)
        operations = Operations(router, self.cache, self.metrics, auth, process, shared.limiter)
        site = self.site
        files = Files(responses, auth, router, attempts, config.files_upstream)
        site.resource = Gateway(pipeline, responses, operations, files).app.resource()
        site.max_body_bytes = config.server.max_body_bytes
        site.max_inflight = config.server.max_inflight
        site.send_timeout = config.server.send_timeout
        site.header_timeout = config.server.header_timeout
        site.trusted_proxies = frozenset(config.server.trusted_proxies)
        site.secrets = config.secrets()
        site.default_headers = self.cache.default_verdict.headers()
        self.checks = None
        if config.routing.health_checks is not None:
            settings = config.routing.health_checks
            active = ActiveChecks(router, forwarder, config.upstreams, settings.timeout)
            self.checks = CheckService(reactor, active, settings.interval)
        return router

    def _slots_for(self, config: Config) -> dict[str, DeferredSemaphore]:
        """
        The connection slots of ``config``'s upstreams: an unchanged upstream
        keeps its semaphore, so requests of the old config and the new share
        one ``max_connections``.
        """
        kept = {
            name: slot
            for name, (upstream, slot) in self._slots.items()
            if config.upstreams.get(name) == upstream
        }
        fresh = connection_slots({n: u for n, u in config.upstreams.items() if n not in kept})
        self._slots = {
            n: (config.upstreams[n], kept[n] if n in kept else fresh[n]) for n in config.upstreams
        }
        return {name: slot for name, (_, slot) in self._slots.items()}

    def apply(self, config: Config) -> Changes:
        """Serve ``config`` from the next request on; what it changed."""
        old = self.config
        self.router = self._install(config, self.router)
        self.config = config
        for hook in self.applied:
            hook(old, config)
        return diff(old, config)

    def _read_again(self) -> Config:
        """The config file, read and checked again; a refusal is logged and raised as a 400."""
        try:
            return read_again(self.config)
        except ReloadRefused as e:
            self.log.error("reload refused: {reason}", reason=str(e))
            raise e.api_error() from None

    async def reload(self) -> dict[str, object]:
        """Re-read the config file and apply it (the answer of /admin/reload)."""
        config = self._read_again()
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
        """
        /admin/reload.  A worker of ``--workers`` checks the file and answers
        what it changes, and has its parent signal every worker (itself
        included) to apply it, so each reads and applies the file once.
        """
        if self.fleet_reload is None:
            return await self.reload()
        config = self._read_again()
        self.fleet_reload()
        return diff(self.config, config).as_json()

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
