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
from typing import Literal

from prometheus_client import CollectorRegistry, Gauge, Histogram, generate_latest
from prometheus_client import Counter as PromCounter
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.samples import Sample

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

    def request(self, endpoint: str, status: int) -> None:
        self._requests.labels(endpoint, str(status)).inc()

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

    def tokens(self, model: str, key: str, count: int) -> None:
        if count > 0:
            self._tokens.labels(model, key).inc(count)

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
            "tokens": int(sum(s.value for s in _samples(self._tokens, "_total"))),
        }
