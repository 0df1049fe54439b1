"""
A target's circuit breaker, as a pure state machine on numbers it is given
(the time, the cooldown settings); nothing here does I/O.

    healthy --(failures in a row >= cooldown.failures, or a 429 Retry-After)--> cooling
    cooling --(time passes)--> half-open: exactly one probe request is let through
    probe succeeds --> healthy;  probe fails --> cooling again, twice as long (capped)

The :class:`Breaker` is the only writer of its state: callers tell it what
happened, through its methods.  The Redis store runs the same machine in Lua
(:mod:`llmproxy.routing.health`), and a test holds the two to one table of
events.
"""

from __future__ import annotations

import enum

import attrs

from llmproxy.config import Cooldown


class BreakerState(enum.Enum):
    """Where a breaker stands.  The values are what /health shows."""

    HEALTHY = "healthy"
    COOLING_DOWN = "cooling_down"
    #: Cooled down: the next request is let through as the probe.
    HALF_OPEN = "half_open"
    #: Its probe is under way: nobody else is let through meanwhile.
    PROBING = "probing"


@attrs.frozen
class SharedState:
    """What a fleet shares of a breaker (the probe claim is shared apart from it)."""

    failures: int = 0
    trips: int = 0
    open_until: float = 0.0
    #: The failures in a row that tripped it last (1 for a Retry-After or a probe).
    tripped_by: int = 0


@attrs.define
class Breaker:
    _failures: int = 0
    _trips: int = 0
    _open_until: float = 0.0
    _probing: bool = False
    _tripped_by: int = 0

    @property
    def failures(self) -> int:
        """Failures in a row, since the last success or trip."""
        return self._failures

    @property
    def tripped_by(self) -> int:
        """The failures in a row that tripped it last (0 while it never has, or recovered)."""
        return self._tripped_by

    @property
    def open_until(self) -> float:
        """When the cooldown ends; 0 when the breaker never tripped or has recovered."""
        return self._open_until

    @property
    def shared(self) -> SharedState:
        return SharedState(self._failures, self._trips, self._open_until, self._tripped_by)

    def state(self, now: float) -> BreakerState:
        if self._open_until == 0.0:
            return BreakerState.HEALTHY
        if now < self._open_until:
            return BreakerState.COOLING_DOWN
        return BreakerState.PROBING if self._probing else BreakerState.HALF_OPEN

    def available(self, now: float) -> bool:
        """May a request be sent: healthy, or cooled down and waiting for its probe."""
        return self.state(now) in (BreakerState.HEALTHY, BreakerState.HALF_OPEN)

    def claim_probe(self) -> None:
        self._probing = True

    def release_probe(self) -> None:
        """The probe ended without a verdict (or its claim failed): another may try."""
        self._probing = False

    def recovered(self) -> None:
        """The probe passed (or another process closed the breaker): healthy again."""
        self._failures = self._trips = self._tripped_by = 0
        self._open_until = 0.0
        self._probing = False

    def succeeded(self) -> bool:
        """
        A success.  In a row of failures it starts the count again, and says so;
        a trip is ended by its probe alone, not by a request begun before it.
        """
        if self._failures and not self._open_until:
            self._failures = 0
            return True
        return False

    def fail(
        self, now: float, cooldown: Cooldown, retry_after: float | None, probe: bool = False
    ) -> None:
        """A failure; ``probe`` when it was the half-open probe's own."""
        if probe:
            self._probing = False
        if now < self._open_until and retry_after is None:
            # Attempts that started before the trip and fail now say nothing new.
            return
        if retry_after is not None:
            self._open_until = now + min(retry_after, cooldown.max_seconds)
            self._tripped_by = self._failures + 1
            self._failures = 0
            return
        self._failures += 1
        if probe or self._failures >= cooldown.failures:
            self._trips += 1
            seconds = min(cooldown.seconds * 2 ** (self._trips - 1), cooldown.max_seconds)
            self._open_until = now + seconds
            self._tripped_by = self._failures
            self._failures = 0

    def end_cooldown(self, now: float) -> bool:
        """An active check passed: a cooling target may be probed now.  True if it was cooling."""
        if self.state(now) is BreakerState.COOLING_DOWN:
            self._open_until = now
            return True
        return False

    def adopt(self, shared: SharedState | None) -> None:
        """
        The fleet's view, read from the shared store; ``None`` when the store
        holds nothing for this target, i.e. another process closed it.
        """
        if shared is None:
            if self._open_until and not self._probing:
                self.recovered()
            return
        self._failures = shared.failures
        self._trips = shared.trips
        self._open_until = shared.open_until
        self._tripped_by = shared.tripped_by
