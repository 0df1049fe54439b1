"""
The operator's view of a running proxy: ``/health`` (open to all), and
``/stats``, ``/metrics`` and the cache purge, guarded by the admin keys when
there are any.  It reads the router, the cache and the metrics; it changes
nothing but the cache it is asked to purge.
"""

from __future__ import annotations

from collections.abc import Mapping

from llmproxy.auth import Authenticator, bearer_token
from llmproxy.cache.store import ResponseCache
from llmproxy.metrics import Metrics
from llmproxy.routing.breaker import BreakerState
from llmproxy.routing.router import Router
from llmproxy.site import InFlight


class Operations:
    def __init__(
        self,
        router: Router,
        cache: ResponseCache,
        metrics: Metrics,
        auth: Authenticator,
        inflight: InFlight,
    ) -> None:
        self.router = router
        self.cache = cache
        self.metrics = metrics
        self.auth = auth
        self.inflight = inflight

    async def health(self) -> tuple[bool, dict[str, object]]:
        """Whether any target is not cooling down (or none is configured), and every target."""
        await self.router.refresh()
        targets = self.router.status()
        ok = not targets or any(t.state is not BreakerState.COOLING_DOWN for t in targets.values())
        return ok, {
            "status": "ok" if ok else "unavailable",
            "targets": {name: t.as_json() for name, t in targets.items()},
        }

    async def stats(self, headers: Mapping[str, str]) -> dict[str, object]:
        """The /stats document: requests, attempts, latency, tokens, cache and targets."""
        self.auth.check_admin(bearer_token(headers))
        payload = dict(self.metrics.snapshot())
        payload["inflight"] = self.inflight.count
        payload["cache"] = self.cache.snapshot()
        await self.router.refresh()
        payload["targets"] = {name: t.as_json() for name, t in self.router.status().items()}
        return payload

    def exposition(self, headers: Mapping[str, str]) -> bytes:
        """The Prometheus text exposition."""
        self.auth.check_admin(bearer_token(headers))
        return self.metrics.exposition()

    async def purge(self, headers: Mapping[str, str]) -> int:
        """Empty this namespace's cache; how many entries went."""
        self.auth.check_admin(bearer_token(headers))
        return await self.cache.purge()
