#!/usr/bin/env python3
"""
llmproxy scenario benchmarks, on loopback, bounded in count and time.

``failover``: three mock upstreams behind one proxy (round robin).  For each
fault in turn (one backend refusing connections, one answering 500, one
hanging) it sends a fixed number of requests from a few concurrent clients,
reports how many were answered, by whom, and how fast, then lifts the fault
and measures how long until the backend gets traffic again.

``streams``: how long after a client hangs up the upstream connection is
closed, and what a client that stops reading does to the upstream and to the
proxy's memory.

``cache``: a proxy with the memory cache and one with the Redis cache (a
private redis-server on a free port), each in front of the same mock.  It
measures the latency of a miss (a new prompt every time) and of a hit (the same
prompt again), for plain and streamed chat completions.

    python bench/scenarios.py failover
    python bench/scenarios.py cache --requests 500
    python bench/scenarios.py streams

Both start their own processes (twistd, redis-server) on free ports and stop
them at exit.
"""

from __future__ import annotations

import argparse
import http.client
import json
import shutil
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.stats import percentile  # noqa: E402
from llmproxy.testing.processes import Mock, Proxy, RedisServer, proc_status  # noqa: E402

MODEL = "m"


class Stoppable(Protocol):
    def stop(self) -> object: ...


def call(
    port: int, method: str, path: str, body: Any = None, timeout: float = 30
) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    data = json.dumps(body) if body is not None else None
    conn.request(method, path, data, {"Content-Type": "application/json"})
    response = conn.getresponse()
    payload = response.read()
    conn.close()
    return response.status, {k.lower(): v for k, v in response.getheaders()}, payload


def chat(text: str, **extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": text}], **extra}


def fmt(values: list[float]) -> str:
    if not values:
        return "-"
    ms = [v * 1000 for v in values]
    return f"p50 {percentile(ms, 50):7.2f}  p99 {percentile(ms, 99):8.2f}  max {max(ms):8.2f} ms"


@contextmanager
def processes() -> Iterator[tuple[list[Stoppable], Path]]:
    started: list[Stoppable] = []
    workdir = Path(tempfile.mkdtemp(prefix="llmproxy-bench-"))
    try:
        yield started, workdir
    finally:
        for server in reversed(started):
            server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


# -- failover ---------------------------------------------------------------------------


def load(port: int, count: int, clients: int, tag: str) -> tuple[Counter[str], list[float], int]:
    """``count`` requests from ``clients`` threads: who answered, latencies, failures."""
    served: Counter[str] = Counter()
    latencies: list[float] = []
    failures = [0]
    lock = threading.Lock()
    per_client = count // clients

    def worker(n: int) -> None:
        for i in range(per_client):
            started = time.monotonic()
            status, headers, _ = call(port, "POST", "/v1/chat/completions", chat(f"{tag} {n} {i}"))
            elapsed = time.monotonic() - started
            with lock:
                latencies.append(elapsed)
                if status == 200:
                    served[headers.get("x-llmproxy-upstream", "?")] += 1
                else:
                    failures[0] += 1

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return served, latencies, failures[0]


def recovery(port: int, name: str, deadline: float = 120) -> float:
    """Seconds from now until ``name`` answers a request again."""
    started = time.monotonic()
    i = 0
    while time.monotonic() - started < deadline:
        status, headers, _ = call(port, "POST", "/v1/chat/completions", chat(f"recover {i}"))
        i += 1
        if status == 200 and headers.get("x-llmproxy-upstream") == name:
            return time.monotonic() - started
        time.sleep(0.02)
    return float("nan")


def failover(args: argparse.Namespace) -> None:
    with processes() as (started, workdir):
        mocks = {}
        for name in "abc":
            mocks[name] = Mock(workdir, name, timeout=30)
            started.append(mocks[name])
        timeouts = "{connect: 1, first_byte: 2, idle: 5, total: 30}"
        ups = "".join(
            f"  {n}:\n    base_url: http://127.0.0.1:{m.port}/v1\n    timeouts: {timeouts}\n"
            for n, m in mocks.items()
        )
        targets = "".join(f"      - upstream: {n}\n" for n in mocks)
        config = (
            f"upstreams:\n{ups}models:\n  {MODEL}:\n    strategy: round_robin\n"
            f"    targets:\n{targets}"
            f"routing: {{retries: 2, cooldown: {{failures: 3, seconds: {args.cooldown}, "
            "max_seconds: 60}}\ncache: {backend: off}\n"
        )
        gateway = Proxy(workdir, config, timeout=30)
        started.append(gateway)

        print(
            f"failover: {args.requests} requests per phase from {args.clients} clients; "
            f"cooldown {args.cooldown}s after 3 failures; first_byte timeout 2s"
        )
        served, lat, failed = load(gateway.port, args.requests, args.clients, "healthy")
        print(
            f"  all healthy      served {dict(sorted(served.items()))}  failed {failed}  {fmt(lat)}"
        )

        # a refuses connections: stop its process.
        mocks["a"].stop()
        served, lat, failed = load(gateway.port, args.requests, args.clients, "refusing")
        print(
            f"  a refusing       served {dict(sorted(served.items()))}  failed {failed}  {fmt(lat)}"
        )
        restarted = Mock(workdir, "a", port=mocks["a"].port, timeout=30)
        started.append(restarted)
        mocks["a"] = restarted
        print(f"  a back           first answered by a after {recovery(gateway.port, 'a'):.2f}s")

        mocks["b"].configure(status=500)
        served, lat, failed = load(gateway.port, args.requests, args.clients, "erroring")
        print(
            f"  b answering 500  served {dict(sorted(served.items()))}  failed {failed}  {fmt(lat)}"
        )
        mocks["b"].configure()
        print(f"  b back           first answered by b after {recovery(gateway.port, 'b'):.2f}s")

        mocks["c"].configure(hang=True)
        served, lat, failed = load(gateway.port, args.requests, args.clients, "hanging")
        print(
            f"  c hanging        served {dict(sorted(served.items()))}  failed {failed}  {fmt(lat)}"
        )
        mocks["c"].configure()
        print(f"  c back           first answered by c after {recovery(gateway.port, 'c'):.2f}s")

        served, lat, failed = load(gateway.port, args.requests, args.clients, "after")
        print(
            f"  all healthy      served {dict(sorted(served.items()))}  failed {failed}  {fmt(lat)}"
        )


# -- cache ------------------------------------------------------------------------------


def cache(args: argparse.Namespace) -> None:
    with processes() as (started, workdir):
        upstream = Mock(workdir, "main", timeout=30)
        started.append(upstream)
        try:
            redis = RedisServer(workdir)
        except AssertionError as e:
            raise SystemExit(f"bench: {e}") from None
        started.append(redis)
        base = (
            f"upstreams:\n  main: {{base_url: '{upstream.base_url}'}}\n"
            f"models:\n  {MODEL}: {{targets: [{{upstream: main}}]}}\n"
        )
        memory = Proxy(workdir, base + "cache: {backend: memory}\n", "memory", timeout=30)
        started.append(memory)
        shared = Proxy(
            workdir,
            base + f"redis: {{url: '{redis.url}'}}\ncache: {{backend: redis}}\n",
            "redis",
            timeout=30,
        )
        started.append(shared)
        print(
            f"cache: {args.requests} sequential requests per row; the mock answers at once,"
            " so a miss is the proxy plus the mock"
        )
        for label, server in (("memory", memory), ("redis", shared)):
            for stream in (False, True):
                kind = "stream" if stream else "plain"
                misses, hits = [], []
                for i in range(args.requests):
                    body = chat(f"{label} {kind} miss {i}", stream=stream)
                    started_at = time.monotonic()
                    status, headers, _ = call(server.port, "POST", "/v1/chat/completions", body)
                    misses.append(time.monotonic() - started_at)
                    assert status == 200 and headers["x-llmproxy-cache"] == "miss", headers
                hit_body = chat(f"{label} {kind} hit", stream=stream)
                call(server.port, "POST", "/v1/chat/completions", hit_body)
                for _ in range(args.requests):
                    started_at = time.monotonic()
                    status, headers, _ = call(server.port, "POST", "/v1/chat/completions", hit_body)
                    hits.append(time.monotonic() - started_at)
                    assert status == 200 and headers["x-llmproxy-cache"] == "hit", headers
                print(f"  {label:6} {kind:6} miss {fmt(misses)}")
                print(f"  {label:6} {kind:6} hit  {fmt(hits)}")


# -- streams: disconnects and backpressure ----------------------------------------------


def rss_mib(pid: int) -> float:
    rss = proc_status(pid).get("VmRSS")
    return rss / 1024 if rss is not None else float("nan")


def open_stream(port: int, knobs: dict[str, Any]) -> Any:
    import socket

    data = json.dumps(chat("stream", stream=True, mock=knobs)).encode()
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: "
        + str(len(data)).encode()
        + b"\r\n\r\n"
        + data
    )
    return sock


def streams(args: argparse.Namespace) -> None:
    with processes() as (started, workdir):
        upstream = Mock(workdir, "main", timeout=30)
        started.append(upstream)
        config = (
            f"upstreams:\n  main: {{base_url: 'http://127.0.0.1:{upstream.port}/v1'}}\n"
            f"models:\n  {MODEL}: {{targets: [{{upstream: main}}]}}\n"
            "cache: {backend: off}\n"
        )
        gateway = Proxy(workdir, config, timeout=30)
        started.append(gateway)
        mock_stats = upstream.stats

        # How long from a client hanging up to the upstream seeing its connection closed.
        delays = []
        for _ in range(args.runs):
            before = mock_stats()["disconnects"]
            sock = open_stream(
                gateway.port, {"infinite": True, "interval": 0.01, "chunk_bytes": 100}
            )
            received = b""
            while b"data: " not in received:
                received += sock.recv(65536)
            hung_up = time.monotonic()
            sock.close()
            while mock_stats()["disconnects"] == before:
                if time.monotonic() - hung_up > 5:
                    raise SystemExit("bench: the upstream never saw the disconnect")
            delays.append(time.monotonic() - hung_up)
        print(
            f"client disconnect -> upstream closed ({args.runs} runs, polled over HTTP): "
            f"{fmt(delays)}"
        )

        # A client that stops reading: the upstream must be paused, memory flat.
        rss_before = rss_mib(gateway.process.pid)
        sock = open_stream(gateway.port, {"infinite": True, "chunk_bytes": 65536})
        samples = []
        for second in range(args.stall_seconds + 1):
            stats = mock_stats()
            samples.append(
                (
                    second,
                    stats["bytes_streamed"] / 2**20,
                    stats["pauses"],
                    rss_mib(gateway.process.pid),
                )
            )
            time.sleep(1)
        sock.close()
        print(
            f"client not reading for {args.stall_seconds}s (proxy RSS {rss_before:.1f} MiB before):"
        )
        for second, produced, pauses, rss in samples:
            print(
                f"  t={second}s  upstream produced {produced:7.1f} MiB  "
                f"upstream paused {pauses}x  proxy RSS {rss:.1f} MiB"
            )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="scenario", required=True)
    f = sub.add_parser("failover", help="faults on one of three backends, and recovery")
    f.add_argument("--requests", type=int, default=300)
    f.add_argument("--clients", type=int, default=6)
    f.add_argument("--cooldown", type=float, default=5.0)
    c = sub.add_parser("cache", help="hit and miss latency, memory and Redis")
    c.add_argument("--requests", type=int, default=300)
    st = sub.add_parser("streams", help="disconnect propagation and backpressure")
    st.add_argument("--runs", type=int, default=20)
    st.add_argument("--stall-seconds", type=int, default=5)
    args = parser.parse_args()
    {"failover": failover, "cache": cache, "streams": streams}[args.scenario](args)


if __name__ == "__main__":
    main()
