"""
The operator's view of a running proxy: ``/health``, ``/health/live`` and
``/health/ready`` (open to all), and ``/stats``, ``/metrics``, the cache purge
and ``/admin/reload``, which are closed by default:

* with ``auth.admin_keys``, they need one of them (401 without), from anywhere;
* with client keys but no admin keys, they answer only callers on the proxy's
  own host that are not forwarded (403 ``admin_key_required`` to anyone else,
  nginx on the same host included);
* with no keys at all (an open proxy), they are open, as the model endpoints are.

See :meth:`~llmproxy.auth.Authenticator.check_admin`.  It reads the router,
the cache and the metrics; it changes nothing but the cache it is asked to
purge and, on reload, the configuration.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping

import attrs

from llmproxy.auth import Authenticator, bearer_token
from llmproxy.cache.store import ResponseCache
from llmproxy.limits import Limiter
from llmproxy.metrics import Metrics
from llmproxy.redisclient import RedisUnavailable, SharedRedis
from llmproxy.routing.breaker import BreakerState
from llmproxy.routing.router import Router
from llmproxy.site import GatewaySite


@attrs.frozen
class Worker:
    """Which process answered: its index among ``--workers`` (0 when alone) and pid."""

    index: int
    pid: int

    def as_json(self) -> dict[str, int]:
        return {"index": self.index, "pid": self.pid}


@attrs.frozen
class Caller:
    """Who asks for an operator's endpoint."""

    headers: Mapping[str, str]
    #: Sent on the proxy's host, straight to it (not forwarded by a proxy).
    local: bool


@attrs.frozen
class Process:
    """What the operator's endpoints know of the process, beyond one config."""

    site: GatewaySite
    worker: Worker
    redis: SharedRedis | None
    #: Re-read the config file and apply it (the JSON answer), or raise why not.
    reload: Callable[[], Awaitable[dict[str, object]]]
    #: The config file in force ("" for the built-in default), for the status page.
    config_source: str = ""


class Operations:
    def __init__(
        self,
        router: Router,
        cache: ResponseCache,
        metrics: Metrics,
        auth: Authenticator,
        process: Process,
        limiter: Limiter,
    ) -> None:
        self.router = router
        self.cache = cache
        self.metrics = metrics
        self.auth = auth
        self.process = process
        self.limiter = limiter

    async def health(self) -> tuple[bool, dict[str, object]]:
        """Whether any target is not cooling down (or none is configured), and every target."""
        await self.router.refresh()
        targets = self.router.status()
        ok = not targets or any(t.state is not BreakerState.COOLING_DOWN for t in targets.values())
        return ok, {
            "status": "ok" if ok else "unavailable",
            "worker": self.process.worker.as_json(),
            "targets": {name: t.as_json() for name, t in targets.items()},
        }

    def live(self) -> dict[str, object]:
        """The process runs (for a liveness probe: it answers, so it does)."""
        return {"status": "ok", "worker": self.process.worker.as_json()}

    async def ready(self) -> tuple[bool, dict[str, object]]:
        """
        Whether this process should get traffic: not draining, every model
        with a usable target, and Redis (when configured) answering.
        """
        reasons = []
        if self.process.site.draining:
            reasons.append("draining")
        await self.router.refresh()
        targets = self.router.status()
        for name, model in self.router.models.items():
            if not any(targets[t.id].available for t in model.targets):
                reasons.append(f"model {name} has no usable target")
        redis = self.process.redis
        if redis is not None:
            try:
                await redis.call("ping")
            except RedisUnavailable as e:
                reasons.append(f"redis unavailable ({e})")
        payload: dict[str, object] = {
            "status": "ready" if not reasons else "not ready",
            "worker": self.process.worker.as_json(),
        }
        if reasons:
            payload["reasons"] = reasons
        return not reasons, payload

    def _guard(self, caller: Caller) -> None:
        """Refuse ``caller`` unless it may use the operator's endpoints."""
        self.auth.check_admin(bearer_token(caller.headers), local=caller.local)

    async def reload(self, caller: Caller) -> dict[str, object]:
        """Re-read and apply the config file."""
        self._guard(caller)
        return await self.process.reload()

    async def stats(self, caller: Caller) -> dict[str, object]:
        """The /stats document: requests, attempts, latency, tokens, cache and targets."""
        self._guard(caller)
        payload = dict(self.metrics.snapshot())
        payload["worker"] = self.process.worker.as_json()
        payload["inflight"] = self.process.site.inflight.count
        payload["cache"] = self.cache.snapshot()
        await self.router.refresh()
        payload["targets"] = {name: t.as_json() for name, t in self.router.status().items()}
        budgets = {}
        for key in self.auth.keys:
            state = await self.limiter.budget_state(key)
            if state is not None:
                budgets[key.name] = state
        payload["budgets"] = budgets
        return payload

    def exposition(self, caller: Caller) -> bytes:
        """The Prometheus text exposition."""
        self._guard(caller)
        return self.metrics.exposition()

    async def purge(self, caller: Caller) -> int:
        """Empty this namespace's cache; how many entries went."""
        self._guard(caller)
        return await self.cache.purge()
