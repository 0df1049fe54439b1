"""
One request's attempts.

A :class:`Plan` hands out targets not yet tried by the request, up to
``1 + routing.retries`` of them, each as an :class:`Attempt`.  The attempt
holds what routing lent it, an in-flight count and perhaps the target's
half-open probe, and gives them back exactly once when it is released (use it
as a context manager).  In between, its owner says how it went:

* :meth:`Attempt.answered`: 2xx headers arrived.  A probe is judged by its
  headers, so that a long answer does not keep the target closed to everybody
  else meanwhile;
* :meth:`Attempt.failed`: it failed before any byte reached the client;
* :meth:`Attempt.ended`: its answer is over, whole, or cut after its headers
  (which counts against the target too).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Collection, Sequence
from typing import Protocol

from twisted.internet.interfaces import IReactorTime

from llmproxy.config import Target
from llmproxy.failures import UpstreamFailure

#: Chooses the next target among those not tried yet: (target or None, holds its probe).
Pick = Callable[[Sequence[Target]], Awaitable[tuple[Target | None, bool]]]


class Verdicts(Protocol):
    """What an attempt reports to (the router)."""

    def started(self, target: Target) -> None: ...

    def ended(self, target: Target) -> None: ...

    async def probe_passed(self, target: Target) -> None: ...

    async def succeeded(self, target: Target, ttfb: float) -> None: ...

    async def failed(self, target: Target, failure: UpstreamFailure, probe: bool) -> None: ...

    def release_probe(self, target: Target) -> None: ...


class Plan:
    """The attempts of one request."""

    def __init__(
        self,
        clock: IReactorTime,
        verdicts: Verdicts,
        model: str,
        pick: Pick,
        attempts: int,
        retry_on: Collection[str | int],
    ) -> None:
        #: The model asked for (for messages).
        self.model = model
        self._clock = clock
        self._verdicts = verdicts
        self._pick = pick
        self._left = attempts
        self._retry_on = retry_on
        #: The targets handed out, in order.
        self.tried: list[Target] = []

    async def next(self) -> Attempt | None:
        """The next attempt, or None when the plan is spent (or no target is usable)."""
        if self._left <= 0:
            return None
        target, probe = await self._pick(self.tried)
        if target is None:
            return None
        self._left -= 1
        self.tried.append(target)
        return Attempt(self._clock, self._verdicts, target, probe)

    def retryable(self, failure: UpstreamFailure) -> bool:
        """May another target be tried after this failure (``routing.retry_on``)?"""
        return failure.retry_reason() in self._retry_on


class Attempt:
    """One try of one target; release it (``with attempt:``) when it is over."""

    def __init__(
        self, clock: IReactorTime, verdicts: Verdicts, target: Target, probe: bool
    ) -> None:
        self.target = target
        self._clock = clock
        self._verdicts = verdicts
        #: This attempt holds the target's half-open probe: only its outcome may decide it.
        self._probe = probe
        self._started = clock.seconds()
        self._released = False
        #: Seconds from the start of the attempt to its response headers.
        self.ttfb: float | None = None
        verdicts.started(target)

    def __enter__(self) -> Attempt:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()

    def _take_probe(self) -> bool:
        probe, self._probe = self._probe, False
        return probe

    async def answered(self) -> None:
        """Its 2xx headers arrived: if it was the probe, the target is healthy again."""
        self.ttfb = self._clock.seconds() - self._started
        if self._take_probe():
            await self._verdicts.probe_passed(self.target)

    async def failed(self, failure: UpstreamFailure) -> None:
        """It failed before any byte reached the client; it is over."""
        probe = self._take_probe()
        self.release()
        await self._verdicts.failed(self.target, failure, probe)

    async def ended(self, broke: UpstreamFailure | None) -> None:
        """Its answer is over: whole (``broke`` is None), or cut or stalled after its headers."""
        if broke is not None:
            await self._verdicts.failed(self.target, broke, probe=False)
        elif self.ttfb is not None:
            await self._verdicts.succeeded(self.target, self.ttfb)

    def release(self) -> None:
        """Give back the in-flight count, and a probe nobody decided; once."""
        if self._released:
            return
        self._released = True
        self._verdicts.ended(self.target)
        if self._take_probe():
            # The probe ended with no verdict (the client left): let another try.
            self._verdicts.release_probe(self.target)
