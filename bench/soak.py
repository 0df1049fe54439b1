"""
A soak run: many clients for a long time, with a fault every minute, while
the proxy's memory and file descriptors are sampled.  Run it by hand (it is
not a test)::

    python bench/soak.py                       # 30 minutes, 50 clients
    python bench/soak.py --minutes 2 --clients 10

Half of the clients stream, half do not; a tenth of the prompts repeat, so
the memory cache and single-flight are exercised too.  Every ``--fault-every``
seconds one fault starts, in turn, for ``--fault-seconds``: an upstream that
answers 500, an upstream that hangs before its headers, an upstream that
resets the connection after reading the request, and a burst of clients that
hang up mid-stream.  The proxy fails over between two mock upstreams.

It prints one line per sample (RSS, VmHWM, open descriptors, requests so far)
and a summary: the first sample after the warm-up against the last one.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from llmproxy.testing.processes import Mock, Proxy, proc_status, upstream_block

FAULTS = ("status_500", "hang", "reset", "hang_ups")


class Counts:
    """Requests by outcome, shared by the client threads."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.by: dict[str, int] = {}

    def add(self, outcome: str) -> None:
        with self.lock:
            self.by[outcome] = self.by.get(outcome, 0) + 1


def fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1


def client(
    port: int, stream: bool, stop: threading.Event, counts: Counts, hang_up: threading.Event
) -> None:
    """One client in a loop until ``stop``: a chat request, streamed or not."""
    rng = random.Random()
    while not stop.is_set():
        prompt = f"soak {rng.randrange(20)}" if rng.random() < 0.1 else f"soak {rng.random()}"
        body = {"model": "m", "messages": [{"role": "user", "content": prompt}], "stream": stream}
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        try:
            conn.request(
                "POST",
                "/v1/chat/completions",
                json.dumps(body),
                {"Content-Type": "application/json"},
            )
            answer = conn.getresponse()
            if stream and hang_up.is_set():
                answer.read(64)
                counts.add("hung_up")
                continue
            answer.read()
            counts.add(str(answer.status))
        except (OSError, http.client.HTTPException) as e:
            counts.add(type(e).__name__)
        finally:
            conn.close()


def fault(name: str, mocks: list[Mock], hang_up: threading.Event) -> None:
    """Start fault ``name`` on the first mock (the other keeps serving)."""
    if name == "hang_ups":
        hang_up.set()
        return
    every: dict[str, dict[str, Any]] = {
        "status_500": {"status": 500},
        "hang": {"hang": True},
        "reset": {"reset": True},
    }
    knobs = every[name]
    mocks[0].configure(**knobs)


def clear(mocks: list[Mock], hang_up: threading.Event) -> None:
    hang_up.clear()
    for mock in mocks:
        mock.reset()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=30)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--fault-every", type=float, default=60)
    parser.add_argument("--fault-seconds", type=float, default=15)
    parser.add_argument("--sample-every", type=float, default=30)
    parser.add_argument(
        "--warmup", type=float, default=120, help="seconds before the baseline sample"
    )
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="llmproxy-soak-"))
    mocks = [Mock(workdir, "u1"), Mock(workdir, "u2")]
    config = upstream_block(mocks, extra="    timeouts: {first_byte: 5, idle: 5}") + (
        "models:\n  m: {targets: [{upstream: u1}, {upstream: u2}]}\n"
        "routing: {retries: 1, cooldown: {failures: 3, seconds: 5, max_seconds: 20}}\n"
        "cache: {backend: memory, max_bytes: 33554432}\n"
    )
    proxy = Proxy(workdir, config)
    pid = proxy.process.pid
    stop, hang_up, counts = threading.Event(), threading.Event(), Counts()
    threads = [
        threading.Thread(
            target=client, args=(proxy.port, i % 2 == 0, stop, counts, hang_up), daemon=True
        )
        for i in range(args.clients)
    ]
    for t in threads:
        t.start()
    started = time.monotonic()
    end = started + args.minutes * 60
    next_fault, next_sample, turn, fault_ends = started + args.fault_every, started, 0, 0.0
    samples: list[tuple[float, int, int, int, int]] = []
    print(
        f"soak: pid {pid}, {args.clients} clients, {args.minutes} min, workdir {workdir}",
        flush=True,
    )
    try:
        while (now := time.monotonic()) < end:
            if now >= next_fault:
                name = FAULTS[turn % len(FAULTS)]
                fault(name, mocks, hang_up)
                print(f"{now - started:7.0f}s fault {name}", flush=True)
                turn, next_fault, fault_ends = (
                    turn + 1,
                    now + args.fault_every,
                    now + args.fault_seconds,
                )
            if fault_ends and now >= fault_ends:
                clear(mocks, hang_up)
                fault_ends = 0.0
            if now >= next_sample:
                status = proc_status(pid)
                total = sum(counts.by.values())
                sample = (
                    now - started,
                    status.get("VmRSS", 0),
                    status.get("VmHWM", 0),
                    fds(pid),
                    total,
                )
                samples.append(sample)
                print(
                    f"{sample[0]:7.0f}s rss {sample[1]} KiB hwm {sample[2]} KiB "
                    f"fds {sample[3]} requests {total}",
                    flush=True,
                )
                next_sample = now + args.sample_every
            time.sleep(0.2)  # a script's pacing, not a test's wait
    finally:
        stop.set()
        for t in threads:
            t.join(35)
        print("outcomes:", dict(sorted(counts.by.items())), flush=True)
        base = next((s for s in samples if s[0] >= args.warmup), samples[0] if samples else None)
        if base is not None and samples:
            last = samples[-1]
            print(
                f"after warm-up ({base[0]:.0f}s): rss {base[1]} KiB, fds {base[3]}; "
                f"end ({last[0]:.0f}s): rss {last[1]} KiB, fds {last[3]}; "
                f"max rss {max(s[1] for s in samples)} KiB, max fds {max(s[3] for s in samples)}",
                flush=True,
            )
        proxy.stop()
        for mock in mocks:
            mock.stop()


if __name__ == "__main__":
    main()
