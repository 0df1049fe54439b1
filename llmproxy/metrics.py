"""
What happened, for /stats (JSON) and /metrics (Prometheus text format).

One :class:`Metrics` per gateway, with its own ``CollectorRegistry`` so tests
and several gateways in one process never share counters.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping

from prometheus_client import CollectorRegistry, Gauge, Histogram, generate_latest
from prometheus_client import Counter as PromCounter

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._requests = PromCounter(
            "llmproxy_requests",
            "Client requests answered",
            ["endpoint", "status"],
            registry=self.registry,
        )
        self._attempts = PromCounter(
            "llmproxy_upstream_attempts",
            "Upstream attempts by outcome",
            ["upstream", "outcome"],
            registry=self.registry,
        )
        self._ttfb = Histogram(
            "llmproxy_upstream_ttfb_seconds",
            "Time to upstream response headers",
            ["upstream"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._tokens = PromCounter(
            "llmproxy_tokens",
            "Tokens reported by upstream usage",
            ["model", "key"],
            registry=self.registry,
        )
        self.inflight = Gauge(
            "llmproxy_inflight_requests", "Client requests in progress", registry=self.registry
        )
        self.requests: Counter[str] = Counter()
        self.attempts: Counter[str] = Counter()
        self.tokens_total = 0
        self.ttfb_sum: dict[str, float] = {}
        self.ttfb_count: Counter[str] = Counter()
        self._collectors: list[Callable[[], None]] = []

    def request(self, endpoint: str, status: int) -> None:
        self._requests.labels(endpoint, str(status)).inc()
        self.requests[str(status)] += 1

    def attempt(self, upstream: str, outcome: str, ttfb: float | None = None) -> None:
        """One upstream attempt: ``ok`` (with its time to headers) or a failure's label."""
        self._attempts.labels(upstream, outcome).inc()
        self.attempts[f"{upstream}:{outcome}"] += 1
        if ttfb is not None:
            self._ttfb.labels(upstream).observe(ttfb)
            self.ttfb_sum[upstream] = self.ttfb_sum.get(upstream, 0.0) + ttfb
            self.ttfb_count[upstream] += 1

    def tokens(self, model: str, key: str, count: int) -> None:
        if count > 0:
            self._tokens.labels(model, key).inc(count)
            self.tokens_total += count

    def add_gauges(
        self, name: str, doc: str, read: Callable[[], Mapping[str, float]], label: str = "name"
    ) -> None:
        """Expose a live mapping (e.g. cache counters) as a labelled gauge family."""
        gauge = Gauge(name, doc, [label], registry=self.registry)

        def collect() -> None:
            for label, value in read().items():
                gauge.labels(label).set(value)

        self._collectors.append(collect)

    def exposition(self) -> bytes:
        for collect in self._collectors:
            collect()
        return generate_latest(self.registry)

    def snapshot(self) -> dict[str, object]:
        return {
            "requests": {"total": sum(self.requests.values()), "by_status": dict(self.requests)},
            "upstream_attempts": dict(self.attempts),
            "ttfb_avg_seconds": {
                u: round(self.ttfb_sum[u] / n, 6) for u, n in self.ttfb_count.items() if n
            },
            "tokens": self.tokens_total,
        }
