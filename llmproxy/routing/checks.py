"""
Active health checks (``routing.health_checks``): ``GET {base_url}/models`` on
every upstream each ``interval`` seconds, as a Twisted ``TimerService``.  A
failure counts against all of the upstream's targets; a success lets a cooling
target be probed at once instead of waiting out its cooldown.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

from twisted.application.internet import TimerService
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from llmproxy.routing.router import Router


class Prober(Protocol):
    """What a check needs of the upstream side (the Forwarder)."""

    async def probe(self, name: str, path: str, timeout: float) -> bool: ...


class ActiveChecks:
    log = Logger()

    def __init__(
        self, router: Router, prober: Prober, upstreams: Iterable[str], timeout: float
    ) -> None:
        self.router = router
        self.prober = prober
        self.upstreams = tuple(upstreams)
        self.timeout = timeout
        self._round: Deferred[None] | None = None

    def run(self) -> Deferred[None]:
        """One round of checks, which :meth:`cancel` can cut short."""
        self._round = Deferred.fromCoroutine(self.check_all())
        return self._round.addErrback(_cut_short)

    def cancel(self) -> None:
        """Stop the round under way: shutting down need not wait for its timeouts."""
        if self._round is not None and not self._round.called:
            self._round.cancel()

    async def check_all(self) -> None:
        """Check every upstream once, one after the other."""
        for name in self.upstreams:
            try:
                ok = await self.prober.probe(name, "/models", self.timeout)
            except CancelledError:
                raise
            except Exception:  # noqa: BLE001 - a check must never stop the loop
                self.log.failure("health check of {upstream} failed", upstream=name)
                ok = False
            await self.router.checked(name, ok)


def _cut_short(failure: Failure) -> None:
    failure.trap(CancelledError)


class CheckService(TimerService):
    """The checks every ``interval`` seconds, the first as the service starts."""

    def __init__(self, reactor: IReactorTime, checks: ActiveChecks, interval: float) -> None:
        super().__init__(interval, checks.run)
        self.clock = reactor
        self.checks = checks

    def stopService(self) -> Deferred[None]:
        # TimerService waits for the round under way; cut it short first.
        self.checks.cancel()
        return super().stopService()
