"""
What happened, for /metrics (Prometheus text format) and /stats (JSON).

One :class:`Metrics` per gateway, with its own ``CollectorRegistry`` so tests
and several gateways in one process never share counters.  Every number is
kept once, in Prometheus's collectors; /stats is read back from them.
Gauges of state that lives elsewhere (the cache's counters, the targets) are
read from their owners when the registry is scraped.

With ``--workers``, each worker writes its numbers into the directory the
parent made (prometheus_client's multiprocess mode, chosen by the
``PROMETHEUS_MULTIPROC_DIR`` the parent sets): any worker's ``/metrics`` then
merges the whole fleet, so one scrape of the shared port sees every worker.
Counters and histograms add up; in-flight gauges are summed over live
workers, and the per-target gauges carry a ``pid`` label.  Every worker also
refreshes its gauges each second (:meth:`Metrics.refresh`), so the merge is
never more than a second behind.  ``/stats`` stays one worker's view.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Literal

from prometheus_client import (
    CollectorRegistry,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client import Counter as PromCounter
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.samples import Sample

# A ``_created`` series beside every counter and histogram doubles what is
# scraped and stored, for a timestamp no dashboard of ours reads.
disable_created_metrics()

if TYPE_CHECKING:
    from llmproxy.answers import Usage

#: The kinds of token a usage is split into (``llmproxy_tokens_total{kind}``).
USAGE_KINDS = ("input", "cached_input", "output", "reasoning")

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
#: The proxy's own time is expected well under a millisecond to a few.
OVERHEAD_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1)
GaugeMode = Literal["liveall", "livesum"]


def _samples(collector: MetricWrapperBase, suffix: str) -> Iterator[Sample]:
    """The samples of one family whose name ends with ``suffix`` (``_total``, ``_sum``...)."""
    for family in collector.collect():
        for sample in family.samples:
            if sample.name.endswith(suffix):
                yield sample


class Metrics:
    def __init__(self, multiprocess_dir: str | None = None) -> None:
        #: Where the fleet's workers write their numbers (``--workers``), if anywhere.
        self.multiprocess_dir = multiprocess_dir
        self.registry = CollectorRegistry()
        self._requests = PromCounter(
            "llmproxy_requests",
            "Client requests answered (key and model are names; empty when not known)",
            ["endpoint", "key", "model", "status"],
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
        self.accounts = Accounts(self.registry)
        self._duration = Histogram(
            "llmproxy_request_duration_seconds",
            "Client requests, from arrival to their last byte",
            ["endpoint", "model"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._client_ttfb = Histogram(
            "llmproxy_client_ttfb_seconds",
            "Client requests, from arrival to their first byte",
            ["endpoint", "model"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._overhead = Histogram(
            "llmproxy_overhead_seconds",
            "The proxy's own time before a model call's first byte (total minus upstream waits)",
            ["endpoint"],
            buckets=OVERHEAD_BUCKETS,
            registry=self.registry,
        )
        self._collectors: list[Callable[[], None]] = []

    def request(
        self, endpoint: str, status: int, key: str | None = None, model: str | None = None
    ) -> None:
        self._requests.labels(endpoint, key or "", model or "", str(status)).inc()

    def finished(
        self,
        endpoint: str,
        model: str | None,
        duration: float,
        ttfb: float,
        overhead: float | None,
    ) -> None:
        """
        A request's timings.  ``model`` is a configured public name or None,
        so the label sets stay as bounded as the config.
        """
        label = model or ""
        self._duration.labels(endpoint, label).observe(duration)
        self._client_ttfb.labels(endpoint, label).observe(ttfb)
        if overhead is not None:
            self._overhead.labels(endpoint).observe(overhead)

    def attempt(self, upstream: str, outcome: str, ttfb: float | None = None) -> None:
        """One upstream attempt: ``ok`` (with its time to headers) or a failure's label."""
        self._attempts.labels(upstream, outcome).inc()
        if ttfb is not None:
            self._ttfb.labels(upstream).observe(ttfb)

    def usage(self, key: str, model: str, usage: Usage, cost: Decimal | None) -> None:
        self.accounts.usage(key, model, usage, cost)

    def saved(self, key: str, model: str, cost: Decimal) -> None:
        self.accounts.saved(key, model, cost)

    def add_gauge(self, name: str, doc: str, read: Callable[[], float]) -> None:
        """Expose a live number (summed over a fleet's workers)."""
        gauge = Gauge(name, doc, registry=self.registry, multiprocess_mode="livesum")
        self._collectors.append(lambda: gauge.set(read()))

    def add_gauges(
        self,
        name: str,
        doc: str,
        read: Callable[[], Mapping[str, float]],
        label: str = "name",
        mode: GaugeMode = "liveall",
    ) -> None:
        """Expose a live mapping (e.g. cache counters) as a labelled gauge family."""
        gauge = Gauge(name, doc, [label], registry=self.registry, multiprocess_mode=mode)

        def collect() -> None:
            for label, value in read().items():
                gauge.labels(label).set(value)

        self._collectors.append(collect)

    def refresh(self) -> None:
        """Read every gauge from its owner (a worker does so every second)."""
        for collect in self._collectors:
            collect()

    def exposition(self) -> bytes:
        """The text exposition: this process's, or the whole fleet's (``--workers``)."""
        self.refresh()
        if self.multiprocess_dir is None:
            return generate_latest(self.registry)
        from prometheus_client import multiprocess

        fleet = CollectorRegistry()
        multiprocess.MultiProcessCollector(fleet, path=self.multiprocess_dir)
        return generate_latest(fleet)

    def snapshot(self) -> dict[str, object]:
        """The counters' part of /stats, read back from the collectors."""
        by_status: Counter[str] = Counter()
        for sample in _samples(self._requests, "_total"):
            by_status[sample.labels["status"]] += int(sample.value)
        attempts = {
            f"{s.labels['upstream']}:{s.labels['outcome']}": int(s.value)
            for s in _samples(self._attempts, "_total")
        }
        ttfb_sum = {s.labels["upstream"]: s.value for s in _samples(self._ttfb, "_sum")}
        ttfb_avg = {
            s.labels["upstream"]: round(ttfb_sum[s.labels["upstream"]] / s.value, 6)
            for s in _samples(self._ttfb, "_count")
            if s.value
        }
        return {
            "requests": {"total": sum(by_status.values()), "by_status": dict(by_status)},
            "upstream_attempts": attempts,
            "ttfb_avg_seconds": ttfb_avg,
            "tokens": self.accounts.total_tokens(),
            "keys": self.accounts.by_key(self._requests),
        }


class Accounts:
    """
    What model calls used and cost, per key name and model: tokens by kind
    (exact, and estimated apart), cost, and the cost cache hits saved.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self._tokens = PromCounter(
            "llmproxy_tokens",
            "Tokens reported by upstream usage, by kind (disjoint: they add up to the total)",
            ["key", "model", "kind"],
            registry=registry,
        )
        self._estimated_tokens = PromCounter(
            "llmproxy_estimated_tokens",
            "Tokens the proxy estimated for answers that reported no usage",
            ["key", "model", "kind"],
            registry=registry,
        )
        self._cost = PromCounter(
            "llmproxy_cost_usd",
            "What the reported tokens cost, in USD, at the configured prices",
            ["key", "model"],
            registry=registry,
        )
        self._estimated_cost = PromCounter(
            "llmproxy_estimated_cost_usd",
            "What the estimated tokens cost, in USD, at the configured prices",
            ["key", "model"],
            registry=registry,
        )
        self._saved = PromCounter(
            "llmproxy_saved_cost_usd",
            "What cache hits would have cost, in USD, at the configured prices",
            ["key", "model"],
            registry=registry,
        )

    def usage(self, key: str, model: str, usage: Usage, cost: Decimal | None) -> None:
        """A charged answer: its tokens by kind and their cost, exact and estimated apart."""
        tokens = self._estimated_tokens if usage.estimated else self._tokens
        for kind, count in usage.kinds().items():
            if count > 0 or not usage.estimated:
                tokens.labels(key, model, kind).inc(count)
        if cost is not None:
            (self._estimated_cost if usage.estimated else self._cost).labels(key, model).inc(
                float(cost)
            )

    def saved(self, key: str, model: str, cost: Decimal) -> None:
        """A cache hit, and what its answer would have cost."""
        self._saved.labels(key, model).inc(float(cost))

    def total_tokens(self) -> int:
        """Every reported token (never an estimate)."""
        return int(sum(s.value for s in _samples(self._tokens, "_total")))

    def by_key(self, requests: PromCounter) -> dict[str, dict[str, dict[str, Any]]]:
        """
        Per key name and model: requests, tokens by kind (exact, and estimated
        apart), cost and saved cost.  Only model calls (those with a model).
        """
        found: dict[str, dict[str, dict[str, Any]]] = {}

        def row(labels: Mapping[str, str]) -> dict[str, Any] | None:
            if not labels["model"]:
                return None
            models = found.setdefault(labels["key"], {})
            if labels["model"] not in models:
                models[labels["model"]] = {
                    "requests": 0,
                    "tokens": dict.fromkeys(USAGE_KINDS, 0),
                    "estimated_tokens": {"input": 0, "output": 0},
                    "cost_usd": 0.0,
                    "estimated_cost_usd": 0.0,
                    "saved_usd": 0.0,
                }
            return models[labels["model"]]

        for sample in _samples(requests, "_total"):
            if (r := row(sample.labels)) is not None:
                r["requests"] += int(sample.value)
        for family, field in (
            (self._tokens, "tokens"),
            (self._estimated_tokens, "estimated_tokens"),
        ):
            for sample in _samples(family, "_total"):
                if (r := row(sample.labels)) is not None:
                    r[field][sample.labels["kind"]] = int(sample.value)
        for family, field in (
            (self._cost, "cost_usd"),
            (self._estimated_cost, "estimated_cost_usd"),
            (self._saved, "saved_usd"),
        ):
            for sample in _samples(family, "_total"):
                if (r := row(sample.labels)) is not None:
                    r[field] = sample.value
        return found
