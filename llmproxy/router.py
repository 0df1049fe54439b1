"""
Routing: which target serves a public model, in which order targets are tried,
and what the proxy knows about each target's health.

The pipeline asks for a :class:`Plan` per request and reports every attempt
back to it; balancing (:mod:`llmproxy.balancing`), passive health
(:mod:`llmproxy.health`) and Responses API affinity (:mod:`llmproxy.affinity`)
all live behind that seam.

Failover rules: a plan hands out targets not yet tried by this request, up to
``1 + routing.retries`` of them.  Positive-weight targets come first, chosen by
the model's strategy; the weight-0 fallback tier is used, in config order, only
when no positive-weight target is usable, including within one request whose
weighted targets all just failed.
"""

from __future__ import annotations

import random
from collections.abc import Mapping

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from llmproxy.affinity import AffinityStore, MemoryAffinity, Pin
from llmproxy.balancing import Strategy, make_strategy
from llmproxy.config import Config, Model, Routing, Target
from llmproxy.failures import Kind, UpstreamFailure
from llmproxy.health import Breaker, HealthStore, LocalHealth

EWMA_ALPHA = 0.3


class Plan:
    """The attempts of one request."""

    def __init__(self, router: Router, model: Model, pinned: Target | None = None) -> None:
        self.router = router
        self.model = model
        self.pinned = pinned
        self.tried: list[Target] = []
        self.attempts_left = 1 + router.routing.retries
        #: The target this request holds the half-open probe of, if any: only
        #: this request's outcome may decide it.
        self.probe: Target | None = None

    async def next(self) -> Target | None:
        if self.attempts_left <= 0:
            return None
        if self.pinned is not None:
            if self.tried:
                return None
            target: Target | None = self.pinned
        else:
            target, probe = await self.router.choose(self.model, self.tried)
            if probe:
                self.probe = target
        if target is not None:
            self.attempts_left -= 1
            self.tried.append(target)
            self.router.inflight[target.id] = self.router.inflight.get(target.id, 0) + 1
        return target

    def _holds_probe(self, target: Target) -> bool:
        held = self.probe == target
        if held:
            self.probe = None  # decided (or abandoned) once
        return held

    async def answered(self, target: Target) -> None:
        """Its 2xx headers arrived: if it was the probe, the target is healthy again."""
        if self._holds_probe(target):
            await self.router.probe_passed(target)

    async def succeeded(self, target: Target, ttfb: float) -> None:
        """The whole answer arrived (``ttfb``: the time to its headers)."""
        await self.router.succeeded(target, ttfb)

    async def failed(self, target: Target, failure: UpstreamFailure) -> None:
        """The attempt failed before any byte reached the client."""
        probe = self._holds_probe(target)
        self.router.done(target)
        await self.router.failed(target, failure, probe)

    async def broke(self, target: Target, failure: UpstreamFailure) -> None:
        """The answer was cut or stalled after its headers (the exchange is still open)."""
        await self.router.failed(target, failure, probe=False)

    def finished(self, target: Target) -> None:
        """The exchange is over (whatever happened)."""
        self.router.done(target)
        if self._holds_probe(target):
            # The probe ended with no verdict (the client left): let another try.
            self.router.release_probe(target)

    def retryable(self, failure: UpstreamFailure) -> bool:
        return self.router.retryable(failure)


class Router:
    log = Logger()

    def __init__(
        self,
        config: Config,
        reactor: IReactorTime,
        health: HealthStore | None = None,
        affinity: AffinityStore | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.models: Mapping[str, Model] = config.models
        self.routing: Routing = config.routing
        self.upstreams = config.upstreams
        self.reactor = reactor
        self.health: HealthStore = health or LocalHealth()
        self.affinity: AffinityStore = affinity or MemoryAffinity(
            reactor, config.routing.affinity_ttl
        )
        self.rng = rng or random.Random()
        self.breakers: dict[str, Breaker] = {}
        self.inflight: dict[str, int] = {}
        self.ttfb: dict[str, float] = {}
        self.strategies: dict[str, Strategy] = {
            name: make_strategy(
                model.strategy,
                lambda t: self.inflight.get(t.id, 0),
                lambda t: self.ttfb.get(t.id),
                self.rng,
            )
            for name, model in self.models.items()
        }
        for model in self.models.values():
            for target in model.targets:
                self.breakers.setdefault(target.id, Breaker())

    def model(self, name: str) -> Model | None:
        return self.models.get(name)

    def breaker(self, target: Target) -> Breaker:
        return self.breakers.setdefault(target.id, Breaker())

    def usable(self, target: Target) -> bool:
        return self.breaker(target).available(self.reactor.seconds())

    async def refresh(self) -> None:
        """Read the shared state of every target (for /health and /stats)."""
        targets = {t.id: t for m in self.models.values() for t in m.targets}
        await self.health.pull(list(targets.values()), self.breakers)

    async def usable_now(self, target: Target) -> bool:
        """Like :meth:`usable`, after reading the shared state."""
        await self.health.pull([target], {target.id: self.breaker(target)})
        return self.usable(target)

    async def plan(self, model: Model, pinned: Target | None = None) -> Plan:
        targets = [pinned] if pinned is not None else list(model.targets)
        for target in targets:
            self.breaker(target)
        await self.health.pull(targets, self.breakers)
        return Plan(self, model, pinned)

    async def choose(self, model: Model, exclude: list[Target]) -> tuple[Target | None, bool]:
        """The next target, and whether this request holds its half-open probe."""
        skipped: list[Target] = []
        while True:
            now = self.reactor.seconds()
            left = [
                t
                for t in model.targets
                if t not in exclude and t not in skipped and self.breaker(t).available(now)
            ]
            primary = [t for t in left if t.weight > 0]
            if primary:
                target = self.strategies[model.name].pick(primary)
            elif left:
                target = left[0]  # the fallback tier, in config order
            else:
                return None, False
            breaker = self.breaker(target)
            if not breaker.half_open(now):
                return target, False
            # Half-open: exactly one probe, claimed fleet-wide when shared.
            breaker.probing = True
            # The probe is decided by its headers: hold the claim that long.
            # (It may first wait up to first_byte for a free connection.)
            timeouts = self.upstreams[target.upstream].timeouts
            ttl = timeouts.connect + 2 * timeouts.first_byte
            try:
                claimed = await self.health.claim_probe(target, ttl)
            except BaseException:
                breaker.probing = False  # e.g. the client left: the probe is free again
                raise
            if claimed:
                return target, True
            breaker.probing = False
            skipped.append(target)

    def done(self, target: Target) -> None:
        self.inflight[target.id] = max(0, self.inflight.get(target.id, 0) - 1)

    def release_probe(self, target: Target) -> None:
        self.breaker(target).probing = False
        Deferred.fromCoroutine(self.health.release_probe(target))

    def retryable(self, failure: UpstreamFailure) -> bool:
        return failure.retry_reason() in self.routing.retry_on

    async def probe_passed(self, target: Target) -> None:
        """The half-open probe got its 2xx: the target is healthy again."""
        self.log.info("{target} is healthy again", target=target.id)
        self.breaker(target).succeed()
        await self.health.succeeded(target)

    async def succeeded(self, target: Target, ttfb: float) -> None:
        old = self.ttfb.get(target.id)
        self.ttfb[target.id] = ttfb if old is None else (1 - EWMA_ALPHA) * old + EWMA_ALPHA * ttfb
        breaker = self.breaker(target)
        if breaker.failures and not breaker.open_until:
            # A success in a row of failures: the count starts again.  (A trip
            # is ended by its probe alone, not by a request that began before.)
            breaker.failures = 0
            await self.health.succeeded(target)

    async def failed(self, target: Target, failure: UpstreamFailure, probe: bool) -> None:
        if not failure.counts_against():
            if probe:
                self.release_probe(target)
            return
        breaker = self.breaker(target)
        now = self.reactor.seconds()
        retry_after = failure.retry_after if failure.status == 429 else None
        breaker.fail(now, self.routing.cooldown, retry_after, probe)
        await self.health.failed(target, breaker, now, retry_after, probe)
        if probe:
            await self.health.release_probe(target)
        if breaker.open_until > now:
            self.log.warn(
                "{target} cooling down for {seconds:.1f}s after {failure}",
                target=target.id,
                seconds=breaker.open_until - now,
                failure=str(failure),
            )

    async def checked(self, upstream: str, ok: bool) -> None:
        """The verdict of an active health check on an upstream."""
        now = self.reactor.seconds()
        for target in self.targets_of(upstream):
            breaker = self.breaker(target)
            if ok:
                if breaker.state(now) == "cooling_down":
                    breaker.open_until = now  # probe it now rather than later
                    await self.health.end_cooldown(target, now)
            else:
                await self.failed(
                    target, UpstreamFailure(Kind.CONNECT, "active health check"), False
                )

    def targets_of(self, upstream: str) -> list[Target]:
        seen: dict[str, Target] = {}
        for model in self.models.values():
            for target in model.targets:
                if target.upstream == upstream:
                    seen.setdefault(target.id, target)
        return list(seen.values())

    # -- Responses API affinity ------------------------------------------------------

    async def remember(self, response_id: str, target: Target, owner: str) -> None:
        await self.affinity.remember(response_id, Pin(target, owner))

    async def recall(self, response_id: str) -> Pin | None:
        return await self.affinity.recall(response_id)

    def health_report(self) -> dict[str, dict[str, object]]:
        now = self.reactor.seconds()
        report: dict[str, dict[str, object]] = {}
        for model in self.models.values():
            for target in model.targets:
                breaker = self.breaker(target)
                state = breaker.state(now)
                report[target.id] = {
                    "upstream": target.upstream,
                    "model": target.model,
                    "weight": target.weight,
                    "state": state,
                    "cooling_until": breaker.open_until if state == "cooling_down" else None,
                    "cooldown_remaining": round(max(0.0, breaker.open_until - now), 3)
                    if state == "cooling_down"
                    else 0.0,
                    "inflight": self.inflight.get(target.id, 0),
                    "consecutive_failures": breaker.failures,
                    "ttfb_ewma": self.ttfb.get(target.id),
                }
        return report
