"""
Routing: which target serves a public model, in which order targets are tried,
and what the proxy remembers about each target's health.

The pipeline asks the router for a :class:`Plan` per request and reports every
attempt back to it (``started`` / ``succeeded`` / ``failed``); all balancing and
passive-health rules live behind that seam.  Responses API affinity (which
target made a response id) is remembered here too, so follow-ups reach the one
backend that knows the response.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable

import attrs
from twisted.internet.interfaces import IReactorTime

from llmproxy.config import Config, Model, Routing, Target
from llmproxy.forwarder import UpstreamFailure


@attrs.define
class TargetState:
    """What the router knows about one target."""

    inflight: int = 0
    failures: int = 0
    cooldown_until: float = 0.0
    ttfb: float | None = None

    def usable(self, now: float) -> bool:
        return now >= self.cooldown_until


class Plan:
    """
    The attempts of one request: each call to :meth:`next` gives a target not yet
    tried, until ``1 + retries`` attempts were made or no usable target is left.
    Positive-weight targets come first; weight 0 is the fallback tier.
    """

    def __init__(self, router: Router, model: Model, pinned: Target | None = None) -> None:
        self.router = router
        self.model = model
        self.tried: list[Target] = []
        self.pinned = pinned
        self.attempts_left = 1 + router.routing.retries

    def next(self) -> Target | None:
        if self.attempts_left <= 0:
            return None
        if self.pinned is not None:
            candidates: Iterable[Target] = [self.pinned] if not self.tried else []
        else:
            candidates = self.router.order(self.model, exclude=self.tried)
        for target in candidates:
            self.attempts_left -= 1
            self.tried.append(target)
            return target
        return None

    def started(self, target: Target) -> None:
        self.router.state(target).inflight += 1

    def succeeded(self, target: Target, ttfb: float) -> None:
        self.router.record_success(target, ttfb)

    def failed(self, target: Target, failure: UpstreamFailure) -> None:
        self.router.record_failure(target, failure)

    def finished(self, target: Target) -> None:
        state = self.router.state(target)
        state.inflight = max(0, state.inflight - 1)

    def retryable(self, failure: UpstreamFailure) -> bool:
        return self.router.retryable(failure)


class Router:
    """Model -> ordered targets; health per target; response-id affinity."""

    AFFINITY_TTL = 24 * 3600.0
    AFFINITY_MAX = 100_000

    def __init__(self, config: Config, reactor: IReactorTime) -> None:
        self.models = config.models
        self.routing: Routing = config.routing
        self.reactor = reactor
        self._states: dict[str, TargetState] = {}
        self._affinity: OrderedDict[str, tuple[Target, float]] = OrderedDict()

    def model(self, name: str) -> Model | None:
        return self.models.get(name)

    def state(self, target: Target) -> TargetState:
        found = self._states.get(target.id)
        if found is None:
            found = self._states[target.id] = TargetState()
        return found

    def plan(self, model: Model, pinned: Target | None = None) -> Plan:
        return Plan(self, model, pinned)

    def usable(self, target: Target) -> bool:
        return self.state(target).usable(self.reactor.seconds())

    def order(self, model: Model, exclude: list[Target]) -> list[Target]:
        """Usable targets not yet tried, best first; the fallback tier last."""
        left = [t for t in model.targets if t not in exclude and self.usable(t)]
        primary = [t for t in left if t.weight > 0]
        return primary or [t for t in left if t.weight == 0]

    def retryable(self, failure: UpstreamFailure) -> bool:
        retry_on = self.routing.retry_on
        if failure.kind == "http":
            return failure.status in retry_on
        if failure.kind == "timeout":
            return "timeout" in retry_on
        return "connect" in retry_on

    def record_success(self, target: Target, ttfb: float) -> None:
        state = self.state(target)
        state.failures = 0
        state.cooldown_until = 0.0
        state.ttfb = ttfb if state.ttfb is None else 0.7 * state.ttfb + 0.3 * ttfb

    def record_failure(self, target: Target, failure: UpstreamFailure) -> None:
        if failure.kind == "http" and failure.status not in (429,) and (failure.status or 0) < 500:
            return  # a client error says nothing about the target's health
        state = self.state(target)
        state.failures += 1
        cooldown = self.routing.cooldown
        now = self.reactor.seconds()
        if failure.status == 429 and failure.retry_after is not None:
            state.cooldown_until = now + min(failure.retry_after, cooldown.max_seconds)
        elif state.failures >= cooldown.failures:
            excess = state.failures - cooldown.failures
            seconds = min(cooldown.seconds * (2**excess), cooldown.max_seconds)
            state.cooldown_until = now + seconds

    # -- Responses API affinity ------------------------------------------------------

    def remember(self, response_id: str, target: Target) -> None:
        self._affinity[response_id] = (target, self.reactor.seconds() + self.AFFINITY_TTL)
        self._affinity.move_to_end(response_id)
        while len(self._affinity) > self.AFFINITY_MAX:
            self._affinity.popitem(last=False)

    def recall(self, response_id: str) -> Target | None:
        found = self._affinity.get(response_id)
        if found is None:
            return None
        target, expires = found
        if expires < self.reactor.seconds():
            del self._affinity[response_id]
            return None
        return target

    def health(self) -> dict[str, object]:
        now = self.reactor.seconds()
        report: dict[str, object] = {}
        for model in self.models.values():
            for target in model.targets:
                state = self.state(target)
                report[target.id] = {
                    "upstream": target.upstream,
                    "state": "healthy" if state.usable(now) else "cooling_down",
                    "cooldown_remaining": max(0.0, round(state.cooldown_until - now, 3)),
                    "inflight": state.inflight,
                    "consecutive_failures": state.failures,
                    "ttfb_ewma": state.ttfb,
                }
        return report
