"""
Per-key limits: requests per minute and tokens per minute.

A sliding window of two fixed one-minute buckets (the estimate nginx and
Cloudflare use): cheap, smooth at the minute boundary, and exact enough for
quotas.  Time comes from the injected reactor, so a Clock drives the tests.
Tokens are charged after an answer, from its ``usage``; a key over its tpm is
refused until the window slides.
"""

from __future__ import annotations

from typing import Protocol

from twisted.internet.interfaces import IReactorTime

from llmproxy import errors
from llmproxy.auth import Principal

WINDOW = 60.0


class Limiter(Protocol):
    def check(self, principal: Principal) -> None:
        """Raise a 429 APIError when the principal is over a limit; else count one request."""

    def charge_tokens(self, principal: Principal, tokens: int) -> None: ...


class _Window:
    """Counts in the current and previous minute."""

    __slots__ = ("start", "current", "previous")

    def __init__(self, now: float) -> None:
        self.start = now - now % WINDOW
        self.current = 0.0
        self.previous = 0.0

    def _roll(self, now: float) -> None:
        start = now - now % WINDOW
        if start != self.start:
            self.previous = self.current if start - self.start == WINDOW else 0.0
            self.current = 0.0
            self.start = start

    def estimate(self, now: float) -> float:
        self._roll(now)
        weight = 1.0 - (now - self.start) / WINDOW
        return self.previous * weight + self.current

    def add(self, now: float, amount: float) -> None:
        self._roll(now)
        self.current += amount

    def retry_after(self, now: float, limit: float) -> float:
        """Seconds until the estimate falls below the limit again."""
        self._roll(now)
        if self.current >= limit:
            return self.start + WINDOW - now
        if self.previous <= 0:
            return 1.0
        # previous * (1 - t/W) + current < limit  =>  t > W * (1 - (limit-current)/previous)
        t = WINDOW * (1 - (limit - self.current) / self.previous)
        return max(1.0, self.start + t - now)


class MemoryLimiter:
    def __init__(self, reactor: IReactorTime) -> None:
        self.reactor = reactor
        self._requests: dict[str, _Window] = {}
        self._tokens: dict[str, _Window] = {}

    def _window(self, table: dict[str, _Window], name: str) -> _Window:
        window = table.get(name)
        if window is None:
            window = table[name] = _Window(self.reactor.seconds())
        return window

    def check(self, principal: Principal) -> None:
        key = principal.key
        if key is None:
            return
        now = self.reactor.seconds()
        if key.tpm is not None:
            tokens = self._window(self._tokens, key.name)
            if tokens.estimate(now) >= key.tpm:
                raise errors.rate_limited(
                    f"Rate limit reached for key '{key.name}': {key.tpm} tokens per minute.",
                    tokens.retry_after(now, key.tpm),
                )
        if key.rpm is not None:
            requests = self._window(self._requests, key.name)
            if requests.estimate(now) + 1 > key.rpm:
                raise errors.rate_limited(
                    f"Rate limit reached for key '{key.name}': {key.rpm} requests per minute.",
                    requests.retry_after(now, key.rpm),
                )
            requests.add(now, 1)

    def charge_tokens(self, principal: Principal, tokens: int) -> None:
        if principal.key is not None and principal.key.tpm is not None and tokens > 0:
            self._window(self._tokens, principal.key.name).add(self.reactor.seconds(), tokens)
