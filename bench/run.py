#!/usr/bin/env python3
"""
llmproxy benchmark: what the proxy adds on top of an upstream.

It starts two processes on free loopback ports (with
:mod:`llmproxy.testing.processes`, as the system tests do), each with a
deadline on its readiness:

    twistd -n llmproxy-mock --listen tcp:PORT:interface=127.0.0.1
    twistd -n llmproxy --config <generated yaml> --listen tcp:PORT:interface=127.0.0.1

The generated config has one upstream (the mock), one model, and
``cache.backend: "off"``, so every request is forwarded.  A load generator
written with Twisted and treq then measures, against the mock directly and
through the proxy:

* non-streamed chat completions: a fixed number of requests per concurrency
  level (closed loop), giving requests per second and latency p50/p90/p99;
* a streamed chat completion, one at a time: time to the first body byte and
  to the end of the stream;
* the proxy's resident memory (VmRSS, VmHWM) before and after, and its CPU time
  per proxied request, both from /proc.

Every run is bounded in count and in time.  The processes are stopped at exit
(SIGTERM, then SIGKILL).  Run it in an environment where llmproxy is installed:

    python bench/run.py
    python bench/run.py --requests 5000 --concurrency 1,8,64 --stream-runs 50
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import treq
import yaml
from treq.client import HTTPClient
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.task import react
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool, ResponseDone
from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse

import twisted
from llmproxy.testing.processes import Mock, Proxy, children, cpu_seconds, proc_status

MODEL = "gpt-4o-mini"
HEADERS = Headers({b"Content-Type": [b"application/json"]})
PROMPT = "Benchmark prompt: say something short."


# -- processes -----------------------------------------------------------------------


def proxy_config(mock_port: int) -> dict[str, Any]:
    return {
        "server": {"drain_seconds": 2},
        "upstreams": {
            "mock": {
                "base_url": f"http://127.0.0.1:{mock_port}/v1",
                "max_connections": 256,
            }
        },
        "models": {MODEL: {"targets": [{"upstream": "mock"}]}},
        "cache": {"backend": "off"},
    }


# -- load ----------------------------------------------------------------------------


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile of ``values`` (sorted or not); NaN when empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


@dataclass
class LoadResult:
    path: str
    concurrency: int
    done: int = 0
    errors: int = 0
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list, repr=False)
    cpu_seconds: float | None = None
    first_error: str | None = None

    @property
    def rps(self) -> float:
        return self.done / self.seconds if self.seconds else math.nan

    def ms(self, p: float) -> float:
        return percentile(self.latencies, p) * 1000

    def summary(self) -> dict[str, Any]:
        data = {k: v for k, v in asdict(self).items() if k != "latencies"}
        data.update(rps=self.rps, p50_ms=self.ms(50), p90_ms=self.ms(90), p99_ms=self.ms(99))
        return data


@dataclass
class StreamResult:
    path: str
    ttfb: list[float] = field(default_factory=list)
    total: list[float] = field(default_factory=list)
    events: int = 0
    errors: int = 0
    first_error: str | None = None

    def summary(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "runs": len(self.total),
            "errors": self.errors,
            "events_per_stream": self.events,
            "ttfb_p50_ms": percentile(self.ttfb, 50) * 1000,
            "ttfb_p90_ms": percentile(self.ttfb, 90) * 1000,
            "total_p50_ms": percentile(self.total, 50) * 1000,
            "total_p90_ms": percentile(self.total, 90) * 1000,
        }


class _StreamReader(Protocol):
    """Collects a response body, noting when its first byte arrived."""

    def __init__(self) -> None:
        self.first: float | None = None
        self.chunks: list[bytes] = []
        self.done: Deferred[bytes] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        if self.first is None:
            self.first = time.perf_counter()
        self.chunks.append(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if reason.check(ResponseDone):
            self.done.callback(b"".join(self.chunks))
        else:
            self.done.errback(reason)


@dataclass
class Outcome:
    """One non-streamed request: its status and body, or why it failed."""

    status: int = 0
    body: bytes = b""
    response: IResponse | None = None
    error: str | None = None


def _describe(failure: Failure) -> str:
    return f"{failure.type.__name__}: {failure.getErrorMessage()}"


class Bench:
    def __init__(self, reactor: Any, args: argparse.Namespace) -> None:
        self.reactor = reactor
        self.args = args
        self.stopping = False
        reactor.addSystemEventTrigger("before", "shutdown", self._stop)
        pool = HTTPConnectionPool(reactor, persistent=True)
        pool.maxPersistentPerHost = max(args.concurrency)
        self.pool = pool
        self.client = HTTPClient(Agent(reactor, pool=pool, connectTimeout=5))
        self.chat = json.dumps(
            {"model": MODEL, "messages": [{"role": "user", "content": PROMPT}]}
        ).encode()
        self.stream = json.dumps(
            {
                "model": MODEL,
                "stream": True,
                "messages": [{"role": "user", "content": PROMPT}],
                # Passed through by the proxy; shapes the mock's stream.
                "mock": {"words": args.stream_words, "interval": args.stream_interval},
            }
        ).encode()

    def _stop(self) -> None:
        self.stopping = True

    async def _post(self, url: str) -> Outcome:
        response = await self.client.post(url, data=self.chat, headers=HEADERS)
        body = await treq.content(response)
        return Outcome(response.code, body, response)

    def post(self, url: str) -> Deferred[Outcome]:
        """One request, bounded in time; a failure comes back as ``Outcome.error``."""
        d = Deferred.fromCoroutine(self._post(url))
        d.addTimeout(self.args.request_timeout, self.reactor)
        return d.addErrback(lambda failure: Outcome(error=_describe(failure)))

    async def check(self, url: str, proxied: bool) -> None:
        """One request first: fail loudly if the path does not work as expected."""
        outcome = await self.post(url)
        if outcome.error is not None or outcome.response is None:
            raise SystemExit(f"bench: {url}: {outcome.error}")
        if outcome.status != 200:
            raise SystemExit(f"bench: {url}: HTTP {outcome.status}: {outcome.body[:300]!r}")
        if proxied:
            headers = outcome.response.headers
            cache = (headers.getRawHeaders(b"x-llmproxy-cache") or [b"?"])[0]
            upstream = (headers.getRawHeaders(b"x-llmproxy-upstream") or [b"?"])[0]
            if cache != b"off" or upstream != b"mock":
                raise SystemExit(
                    f"bench: unexpected proxy headers: x-llmproxy-cache={cache!r} "
                    f"x-llmproxy-upstream={upstream!r}"
                )

    async def load(
        self, path: str, url: str, concurrency: int, count: int, cpu: Callable[[], float] | None
    ) -> LoadResult:
        """``count`` requests, ``concurrency`` at a time (closed loop), within the time limit."""
        result = LoadResult(path, concurrency)
        issued = 0
        deadline = time.perf_counter() + self.args.time_limit

        async def worker() -> None:
            nonlocal issued
            while issued < count and time.perf_counter() < deadline and not self.stopping:
                issued += 1
                started = time.perf_counter()
                outcome = await self.post(url)
                if outcome.error is not None or outcome.status != 200:
                    result.errors += 1
                    if result.first_error is None:
                        result.first_error = outcome.error or (
                            f"HTTP {outcome.status}: {outcome.body[:200]!r}"
                        )
                    continue
                result.latencies.append(time.perf_counter() - started)
                result.done += 1

        cpu_before = cpu() if cpu else 0.0
        started = time.perf_counter()
        workers = [Deferred.fromCoroutine(worker()) for _ in range(concurrency)]
        for d in workers:
            await d
        result.seconds = time.perf_counter() - started
        if cpu:
            result.cpu_seconds = cpu() - cpu_before
        return result

    async def streamed(self, path: str, url: str, runs: int) -> StreamResult:
        result = StreamResult(path)
        deadline = time.perf_counter() + self.args.time_limit
        for _ in range(runs):
            if time.perf_counter() >= deadline or self.stopping:
                break
            d = self._one_stream(url)
            d.addTimeout(self.args.request_timeout, self.reactor)
            outcome = await d.addErrback(lambda failure: _describe(failure))
            if isinstance(outcome, str):
                result.errors += 1
                result.first_error = result.first_error or outcome
                continue
            ttfb, total, events = outcome
            result.ttfb.append(ttfb)
            result.total.append(total)
            result.events = events
        return result

    def _one_stream(self, url: str) -> Deferred[tuple[float, float, int] | str]:
        """Time to the first body byte, time to the end, and the number of events."""

        async def run() -> tuple[float, float, int] | str:
            started = time.perf_counter()
            response = await self.client.post(
                url, data=self.stream, headers=HEADERS, unbuffered=True
            )
            if response.code != 200:
                body = await treq.content(response)
                return f"HTTP {response.code}: {body[:200]!r}"
            reader = _StreamReader()
            response.deliverBody(reader)
            body = await reader.done
            ended = time.perf_counter()
            if not body.rstrip().endswith(b"data: [DONE]"):
                return f"stream did not end with [DONE]: {body[-200:]!r}"
            assert reader.first is not None
            return reader.first - started, ended - started, body.count(b"data: ")

        return Deferred.fromCoroutine(run())

    async def close(self) -> None:
        await self.pool.closeCachedConnections()


# -- report --------------------------------------------------------------------------


def _mib(kib: int | None) -> str:
    return "?" if kib is None else f"{kib / 1024:.1f} MiB"


def report(
    header: str,
    loads: list[LoadResult],
    streams: list[StreamResult],
    memory: dict[str, dict[str, int]],
    args: argparse.Namespace,
) -> str:
    out = [header, ""]
    out.append(
        f"non-streamed chat completions ({args.requests} requests per row after "
        f"{args.warmup} warm-up, closed loop)"
    )
    out.append(
        f"  {'path':<8}{'conc':>5}{'ok':>7}{'err':>5}{'req/s':>9}"
        f"{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}{'+p50 ms':>9}{'cpu us/req':>12}"
    )
    direct = {r.concurrency: r for r in loads if r.path == "direct"}
    for r in loads:
        added = ""
        cpu = ""
        if r.path == "proxied":
            base = direct.get(r.concurrency)
            if base is not None:
                added = f"{r.ms(50) - base.ms(50):+.2f}"
            if r.cpu_seconds is not None and r.done:
                cpu = f"{r.cpu_seconds / (r.done + r.errors) * 1e6:.0f}"
        out.append(
            f"  {r.path:<8}{r.concurrency:>5}{r.done:>7}{r.errors:>5}{r.rps:>9.0f}"
            f"{r.ms(50):>9.2f}{r.ms(90):>9.2f}{r.ms(99):>9.2f}{added:>9}{cpu:>12}"
        )
        if r.first_error:
            out.append(f"      first error: {r.first_error}")
    out.append("")
    events = max((s.events for s in streams), default=0)
    out.append(
        f"streamed chat completion ({args.stream_runs} runs, one at a time; {events} events, "
        f"{args.stream_interval * 1000:g} ms apart at the mock)"
    )
    out.append(
        f"  {'path':<8}{'runs':>5}{'err':>5}{'ttfb p50':>10}{'ttfb p90':>10}"
        f"{'total p50':>11}{'total p90':>11}   (ms)"
    )
    for s in streams:
        sm = s.summary()
        out.append(
            f"  {s.path:<8}{sm['runs']:>5}{s.errors:>5}{sm['ttfb_p50_ms']:>10.2f}"
            f"{sm['ttfb_p90_ms']:>10.2f}{sm['total_p50_ms']:>11.2f}{sm['total_p90_ms']:>11.2f}"
        )
        if s.first_error:
            out.append(f"      first error: {s.first_error}")
    out.append("")
    before, after = memory.get("before", {}), memory.get("after", {})
    out.append(
        f"proxy memory: VmRSS {_mib(before.get('VmRSS'))} before, "
        f"{_mib(after.get('VmRSS'))} after; peak VmHWM {_mib(after.get('VmHWM'))}"
    )
    return "\n".join(line.rstrip() for line in out)


# -- main ----------------------------------------------------------------------------


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmark llmproxy against its mock upstream, on loopback."
    )
    parser.add_argument(
        "--requests", type=int, default=2000, help="requests per load row (default 2000)"
    )
    parser.add_argument(
        "--concurrency",
        type=lambda s: [int(c) for c in s.split(",") if c.strip()],
        default=[1, 32],
        help="comma-separated concurrency levels (default 1,32)",
    )
    parser.add_argument("--warmup", type=int, default=100, help="warm-up requests per row")
    parser.add_argument("--stream-runs", type=int, default=50, help="streamed requests per path")
    parser.add_argument("--stream-words", type=int, default=32, help="content events per stream")
    parser.add_argument(
        "--stream-interval", type=float, default=0.002, help="seconds between stream events"
    )
    parser.add_argument(
        "--time-limit", type=float, default=60.0, help="upper bound of each row, seconds"
    )
    parser.add_argument(
        "--request-timeout", type=float, default=30.0, help="deadline of one request, seconds"
    )
    parser.add_argument(
        "--startup-timeout", type=float, default=30.0, help="deadline for each process to start"
    )
    parser.add_argument("--workers", type=int, default=1, help="the proxy's --workers (default 1)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON here")
    parser.add_argument(
        "--keep", action="store_true", help="keep the temporary directory (config and logs)"
    )
    args = parser.parse_args(argv)
    if not args.concurrency or min(args.concurrency) < 1 or args.requests < 1:
        parser.error("--concurrency and --requests must be positive")
    return args


def fleet_cpu(pid: int) -> float:
    """CPU seconds of the proxy and, with --workers, of its workers."""
    return cpu_seconds(pid) + sum(cpu_seconds(child) for child in children(pid))


def fleet_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (KiB) of the proxy and its workers, summed."""
    total: dict[str, int] = {}
    for each in [pid, *children(pid)]:
        for key, value in proc_status(each).items():
            total[key] = total.get(key, 0) + value
    return total


async def run_bench(
    reactor: Any, args: argparse.Namespace, mock: Mock, proxy: Proxy
) -> dict[str, Any]:
    bench = Bench(reactor, args)
    pid = proxy.process.pid
    direct_url = mock.base_url + "/chat/completions"
    proxied_url = proxy.base_url + "/chat/completions"
    paths = [("direct", direct_url, None), ("proxied", proxied_url, lambda: fleet_cpu(pid))]
    try:
        await bench.check(direct_url, proxied=False)
        await bench.check(proxied_url, proxied=True)
        memory = {"before": fleet_status(pid)}
        loads: list[LoadResult] = []
        for concurrency in args.concurrency:
            for path, url, cpu in paths:
                if args.warmup:
                    await bench.load(path, url, concurrency, args.warmup, None)
                loads.append(await bench.load(path, url, concurrency, args.requests, cpu))
        streams = []
        for path, url, _ in paths:
            await bench.streamed(path, url, 3)  # warm-up
            streams.append(await bench.streamed(path, url, args.stream_runs))
        memory["after"] = fleet_status(pid)
    finally:
        await bench.close()
    return {"loads": loads, "streams": streams, "memory": memory, "interrupted": bench.stopping}


def main(argv: Sequence[str]) -> None:
    args = parse_args(argv)
    # Before the reactor runs, SIGTERM must still unwind through the finally below.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    workdir = Path(tempfile.mkdtemp(prefix="llmproxy-bench-"))
    servers: list[Mock | Proxy] = []
    try:
        mock = Mock(workdir, "mock", timeout=args.startup_timeout)
        servers.append(mock)
        config = yaml.safe_dump(proxy_config(mock.port), sort_keys=False)
        proxy = Proxy(workdir, config, timeout=args.startup_timeout, workers=args.workers)
        servers.append(proxy)

        header = (
            f"llmproxy benchmark: Python {platform.python_version()}, "
            f"Twisted {twisted.__version__}, {os.cpu_count()} CPUs, "
            f"mock 127.0.0.1:{mock.port}, proxy 127.0.0.1:{proxy.port} (pid {proxy.process.pid}), "
            f"cache off, {args.workers} worker(s)"
        )

        async def go(reactor: Any) -> None:
            results = await run_bench(reactor, args, mock, proxy)
            interrupted = results.pop("interrupted")
            note = "\nINTERRUPTED: partial results" if interrupted else ""
            print(report(header + note, args=args, **results), flush=True)
            if args.json:
                payload = {
                    "loads": [r.summary() for r in results["loads"]],
                    "streams": [s.summary() for s in results["streams"]],
                    "memory_kib": results["memory"],
                }
                Path(args.json).write_text(json.dumps(payload, indent=2) + "\n")
            if interrupted:
                raise SystemExit(1)

        react(lambda reactor: Deferred.fromCoroutine(go(reactor)))
    finally:
        for server in reversed(servers):
            server.stop()
        if args.keep:
            print(f"bench: config and logs kept in {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main(sys.argv[1:])
