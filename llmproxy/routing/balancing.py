"""
Balancing strategies: given the usable targets of a model that a request has
not tried yet, which one goes next.

* ``round_robin``: smooth weighted round-robin, nginx's algorithm: deterministic,
  and evenly interleaved (weights 5/1/1 give a a b a c a a).
* ``least_busy``: fewest in-flight requests per unit of weight; ties broken
  round-robin so equal targets share the load.
* ``latency``: power of two choices on the EWMA of time-to-first-byte, with a
  little exploration so a target that recovered (or was never measured) is
  seen again.
* ``random``: weighted random.
* ``priority``: the first in config order.

A strategy only ever sees positive-weight targets; the weight-0 fallback tier
is the router's business.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Protocol

from llmproxy.config import Target

#: Reads a target's in-flight count and latency estimate from the router.
InflightOf = Callable[[Target], int]
LatencyOf = Callable[[Target], float | None]


class Strategy(Protocol):
    def pick(self, candidates: Sequence[Target]) -> Target: ...


class RoundRobin:
    def __init__(self) -> None:
        self.current: dict[str, float] = {}

    def pick(self, candidates: Sequence[Target]) -> Target:
        total = 0.0
        best: Target | None = None
        for target in candidates:
            weight = target.weight
            self.current[target.id] = self.current.get(target.id, 0.0) + weight
            total += weight
            if best is None or self.current[target.id] > self.current[best.id]:
                best = target
        assert best is not None
        self.current[best.id] -= total
        return best


class LeastBusy:
    def __init__(self, inflight: InflightOf) -> None:
        self.inflight = inflight
        self.turn = 0

    def pick(self, candidates: Sequence[Target]) -> Target:
        scores = [self.inflight(t) / t.weight for t in candidates]
        low = min(scores)
        tied = [t for t, s in zip(candidates, scores, strict=True) if s == low]
        self.turn += 1
        return tied[(self.turn - 1) % len(tied)]


def weighted_choice(rng: random.Random, candidates: Sequence[Target]) -> Target:
    return rng.choices(list(candidates), weights=[t.weight for t in candidates])[0]


class Latency:
    EXPLORE = 0.05

    def __init__(self, latency: LatencyOf, rng: random.Random) -> None:
        self.latency = latency
        self.rng = rng

    def pick(self, candidates: Sequence[Target]) -> Target:
        if len(candidates) == 1:
            return candidates[0]
        if self.rng.random() < self.EXPLORE:
            return weighted_choice(self.rng, candidates)
        first = weighted_choice(self.rng, candidates)
        rest = [t for t in candidates if t != first]
        second = weighted_choice(self.rng, rest)
        # Never measured counts as fastest: new and recovered targets get traffic.
        a, b = self.latency(first), self.latency(second)
        if a is None:
            return first
        if b is None:
            return second
        return first if a <= b else second


class Random:
    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def pick(self, candidates: Sequence[Target]) -> Target:
        return weighted_choice(self.rng, candidates)


class Priority:
    def pick(self, candidates: Sequence[Target]) -> Target:
        return candidates[0]


def make_strategy(
    name: str, inflight: InflightOf, latency: LatencyOf, rng: random.Random
) -> Strategy:
    if name == "round_robin":
        return RoundRobin()
    if name == "least_busy":
        return LeastBusy(inflight)
    if name == "latency":
        return Latency(latency, rng)
    if name == "random":
        return Random(rng)
    if name == "priority":
        return Priority()
    raise ValueError(f"unknown strategy {name!r}")
