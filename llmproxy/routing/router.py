"""
The router: which targets serve a public model, which one a request tries
next, and what the proxy knows about each (health, in-flight count, latency).

Failover rules: a plan hands out targets not yet tried by this request, up to
``1 + routing.retries`` of them.  Positive-weight targets come first, chosen by
the model's strategy; the weight-0 fallback tier is used, in config order, only
when no positive-weight target is usable, including within one request whose
weighted targets all just failed.  A cooled-down target gets exactly one probe
request; its outcome decides the target.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence

import attrs
from twisted.internet.interfaces import IReactorTime

from llmproxy.config import Config, Model, Routing, Target
from llmproxy.failures import UpstreamFailure
from llmproxy.routing.balancing import Strategy, make_strategy
from llmproxy.routing.breaker import BreakerState
from llmproxy.routing.health import Health, HealthStore, LocalHealth
from llmproxy.routing.plan import Plan

#: Weight of the newest time-to-first-byte in a target's moving average.
EWMA_ALPHA = 0.3


@attrs.frozen
class TargetStatus:
    """What the proxy knows of one target, at one moment."""

    target: Target
    state: BreakerState
    #: When its cooldown ends (while cooling down).
    cooling_until: float | None
    cooldown_remaining: float
    inflight: int
    consecutive_failures: int
    ttfb_ewma: float | None
    #: The last failure that counted against it (``http: HTTP 500``), and when.
    last_error: str | None = None
    last_error_at: float | None = None

    @property
    def available(self) -> bool:
        """It takes requests: healthy, or ready for its probe."""
        return self.state in (BreakerState.HEALTHY, BreakerState.HALF_OPEN)

    def as_json(self) -> dict[str, object]:
        """The target's entry in /health and /stats."""
        return {
            "upstream": self.target.upstream,
            "model": self.target.model,
            "weight": self.target.weight,
            "state": self.state.value,
            "cooling_until": self.cooling_until,
            "cooldown_remaining": self.cooldown_remaining,
            "inflight": self.inflight,
            "consecutive_failures": self.consecutive_failures,
            "ttfb_ewma": self.ttfb_ewma,
            "last_error": self.last_error,
            "last_error_at": self.last_error_at,
        }


class Router:
    """Plans attempts over the targets of a model, and keeps what they report."""

    def __init__(
        self,
        config: Config,
        reactor: IReactorTime,
        health: HealthStore | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.models: Mapping[str, Model] = config.models
        self.routing: Routing = config.routing
        self.upstreams = config.upstreams
        self.reactor = reactor
        self.health = Health(reactor, config.routing.cooldown, health or LocalHealth())
        self._inflight: dict[str, int] = {}
        self._ttfb: dict[str, float] = {}
        #: The last failure that counted against each target, and when (in this process).
        self._errors: dict[str, tuple[str, float]] = {}
        rng = rng or random.Random()
        self._strategies: dict[str, Strategy] = {
            name: make_strategy(
                model.strategy,
                lambda t: self._inflight.get(t.id, 0),
                lambda t: self._ttfb.get(t.id),
                rng,
            )
            for name, model in self.models.items()
        }

    def inherit(self, previous: Router) -> None:
        """
        Carry over what ``previous`` (the router of the config before a
        reload) knows of the targets that did not change (same upstream
        settings, same model): breaker and latency.  In-flight counts are
        shared, since requests that began under the old config end there.
        """
        self._inflight = previous._inflight
        for target in self.targets():
            before = previous.upstreams.get(target.upstream)
            if before is None or before != self.upstreams[target.upstream]:
                continue
            self.health.inherit(previous.health, target)
            if target.id in previous._ttfb:
                self._ttfb[target.id] = previous._ttfb[target.id]
            if target.id in previous._errors:
                self._errors[target.id] = previous._errors[target.id]

    def model(self, name: str) -> Model | None:
        return self.models.get(name)

    async def plan(self, model: Model) -> Plan:
        """The attempts of a request for ``model``, on the fleet's latest view of its targets."""
        await self.health.pull(model.targets)

        async def pick(tried: Sequence[Target]) -> tuple[Target | None, bool]:
            return await self._choose(model, tried)

        attempts = 1 + self.routing.retries
        return Plan(self.reactor, self, model.name, pick, attempts, self.routing.retry_on)

    async def single(self, target: Target) -> Plan:
        """One attempt at ``target`` and no other (a response id's owner, say)."""
        await self.health.pull([target])

        async def pick(tried: Sequence[Target]) -> tuple[Target | None, bool]:
            return (None, False) if tried else (target, False)

        return Plan(self.reactor, self, target.model, pick, 1, self.routing.retry_on)

    async def _choose(self, model: Model, exclude: Sequence[Target]) -> tuple[Target | None, bool]:
        """The next target, and whether this request holds its half-open probe."""
        skipped: list[Target] = []
        while True:
            now = self.reactor.seconds()
            left = [
                t
                for t in model.targets
                if t not in exclude and t not in skipped and self.health.breaker(t).available(now)
            ]
            primary = [t for t in left if t.weight > 0]
            if primary:
                target = self._strategies[model.name].pick(primary)
            elif left:
                target = left[0]  # the fallback tier, in config order
            else:
                return None, False
            if self.health.breaker(target).state(now) is not BreakerState.HALF_OPEN:
                return target, False
            # The probe is decided by its headers: hold the claim that long.
            # (It may first wait up to first_byte for a free connection.)
            timeouts = self.upstreams[target.upstream].timeouts
            if await self.health.claim_probe(target, timeouts.connect + 2 * timeouts.first_byte):
                return target, True
            skipped.append(target)

    async def usable_now(self, target: Target) -> bool:
        """Does ``target`` take requests, on the fleet's latest view?"""
        await self.health.pull([target])
        return self.health.breaker(target).available(self.reactor.seconds())

    # -- what attempts report (llmproxy.routing.plan.Verdicts) ------------------------

    def started(self, target: Target) -> None:
        self._inflight[target.id] = self._inflight.get(target.id, 0) + 1

    def ended(self, target: Target) -> None:
        self._inflight[target.id] -= 1

    async def probe_passed(self, target: Target) -> None:
        await self.health.probe_passed(target)

    async def succeeded(self, target: Target, ttfb: float) -> None:
        old = self._ttfb.get(target.id)
        self._ttfb[target.id] = ttfb if old is None else (1 - EWMA_ALPHA) * old + EWMA_ALPHA * ttfb
        await self.health.succeeded(target)

    async def failed(self, target: Target, failure: UpstreamFailure, probe: bool) -> None:
        if failure.counts_against():
            self._errors[target.id] = (str(failure), self.reactor.seconds())
        await self.health.failed(target, failure, probe)

    def release_probe(self, target: Target) -> None:
        self.health.release_probe(target)

    # -- the view of every target -----------------------------------------------------

    def targets(self) -> list[Target]:
        """Every configured target, once, in config order."""
        seen: dict[str, Target] = {}
        for model in self.models.values():
            for target in model.targets:
                seen.setdefault(target.id, target)
        return list(seen.values())

    async def checked(self, upstream: str, ok: bool) -> None:
        """The verdict of an active health check on an upstream."""
        await self.health.checked([t for t in self.targets() if t.upstream == upstream], ok)

    async def refresh(self) -> None:
        """Read the shared state of every target (for /health and /stats)."""
        await self.health.pull(self.targets())

    def status(self) -> dict[str, TargetStatus]:
        """Every target's status, by target id."""
        now = self.reactor.seconds()
        found = {}
        for target in self.targets():
            breaker = self.health.breaker(target)
            state = breaker.state(now)
            cooling = state is BreakerState.COOLING_DOWN
            error, error_at = self._errors.get(target.id, (None, None))
            found[target.id] = TargetStatus(
                target=target,
                state=state,
                cooling_until=breaker.open_until if cooling else None,
                cooldown_remaining=round(max(0.0, breaker.open_until - now), 3) if cooling else 0.0,
                inflight=self._inflight.get(target.id, 0),
                # A tripped target shows the failures that tripped it.
                consecutive_failures=breaker.failures
                if state is BreakerState.HEALTHY
                else max(breaker.failures, breaker.tripped_by),
                ttfb_ewma=self._ttfb.get(target.id),
                last_error=error,
                last_error_at=error_at,
            )
        return found
