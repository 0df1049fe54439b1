"""
``python -m bench run``: start the mock upstream and every target, then run the
cells interleaved (each cell for every target in turn, so that a noisy minute
on a shared machine hits all of them alike), and write the report.

Pinning, on a machine with at least two CPUs: this process, the mock upstream,
wrk, the stream client and redis-server on CPU 0; nginx, llmproxy (1 worker)
and LiteLLM each alone on CPU 1 (only one of them is under load at a time);
``llmproxy --workers 2`` on CPUs 0 and 1, since there is no third core.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import load, report, targets
from bench.procs import Child, cpu_count, free_port, raise_fd_limit, wait_until
from bench.targets import Target
from bench.upstream import Canned, nginx_available, nginx_mock_conf

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass
class Plan:
    """How long and how hard each cell runs."""

    seconds: float
    warmup: float
    conns: tuple[int, ...] = (1, 16, 64)
    stream_concurrency: tuple[int, ...] = (1, 16, 256)
    hit_conns: tuple[int, ...] = (1, 16)
    idle_streams: int = 1000
    idle_timeout: float = 60
    chunks: int = 50
    chunk_interval: float = 0.001

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Plan:
        quick = args.quick
        return cls(
            seconds=args.seconds or (3.0 if quick else 8.0),
            warmup=args.warmup if args.warmup is not None else (1.0 if quick else 2.0),
            idle_streams=args.idle_streams,
            idle_timeout=20 if quick else 60,
            chunks=args.chunks,
            chunk_interval=args.chunk_interval_ms / 1000,
        )


@dataclass
class Run:
    """Everything one run started and measured."""

    workdir: Path
    plan: Plan
    load_cpus: str | None
    proxy_cpus: str | None
    all_cpus: str | None
    mock: Child | None = None
    mock_kind: str = ""
    targets: list[Target] = field(default_factory=list)
    extra: list[Child | Any] = field(default_factory=list)
    loads: list[load.LoadCell] = field(default_factory=list)
    streams: list[load.StreamCell] = field(default_factory=list)
    idle: list[load.IdleCell] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    versions: dict[str, str] = field(default_factory=dict)

    def say(self, text: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)

    def target(self, name: str) -> Target | None:
        return next((t for t in self.targets if t.name == name), None)


def start_mock(run: Run, kind: str, cpus: str | None = None) -> Target:
    """The mock upstream (on the load CPU by default): nginx + Lua, or the asyncio server."""
    port = free_port()
    plan = run.plan
    if kind == "nginx":
        conf = run.workdir / "mock-nginx.conf"
        conf.write_text(
            nginx_mock_conf(run.workdir, port, Canned.build(plan.chunks), plan.chunk_interval, 900)
        )
        args = ["nginx", "-p", str(run.workdir), "-c", str(conf), "-e", "stderr"]
    else:
        args = [sys.executable, "-m", "bench.upstream", "--port", str(port)]
        args += ["--chunks", str(plan.chunks), "--interval", str(plan.chunk_interval)]
    cwd = Path(__file__).resolve().parent.parent
    child = Child(
        f"mock-{kind}", args, run.workdir / f"mock-{kind}.log", cpus or run.load_cpus, cwd=cwd
    )
    run.mock, run.mock_kind = child, kind
    target = Target("direct", "direct", port, child, notes=f"the mock alone ({kind})")
    wait_until(lambda: targets.get(port, "/v1/models", {})[0] == 200, 15, f"mock ({kind})", child)
    return target


def _versions(run: Run, args: argparse.Namespace) -> None:
    import llmproxy

    def command(*cmd: str) -> str:
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return "?"
        return (done.stdout + done.stderr).strip().splitlines()[0]

    cpu_model = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    run.versions = {
        "python": platform.python_version(),
        "llmproxy": llmproxy.__version__,
        "nginx": command("nginx", "-v"),
        "wrk": command("wrk", "--version").split(" [")[0],
        "litellm": targets.litellm_version(Path(args.litellm)) or "not installed",
        "kernel": platform.release(),
        "cpu": cpu_model,
        "cpus": str(os.cpu_count()),
        "load_average": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }


def start_targets(run: Run, args: argparse.Namespace, mock_port: int) -> None:
    w = run.workdir
    run.say("starting nginx (reference proxy)")
    run.targets.append(targets.nginx_proxy(w, mock_port, run.proxy_cpus))
    run.say("starting llmproxy, 1 worker")
    run.targets.append(targets.llmproxy(w, "llmproxy", mock_port, run.proxy_cpus))
    run.say("starting llmproxy --workers 2")
    run.targets.append(targets.llmproxy(w, "llmproxy-w2", mock_port, run.all_cpus, workers=2))
    if args.pypy:
        run.say(f"starting llmproxy under PyPy ({args.pypy})")
        try:
            run.targets.append(
                targets.llmproxy(w, "llmproxy-pypy", mock_port, run.proxy_cpus, python=args.pypy)
            )
        except RuntimeError as e:
            run.skipped.append(f"llmproxy under PyPy: did not start ({str(e)[-2000:]})")
    if not args.no_redis:
        try:
            from llmproxy.testing.processes import RedisServer

            redis = RedisServer(w)
            run.extra.append(redis)
            run.say("starting llmproxy with the Redis cache")
            run.targets.append(
                targets.llmproxy(
                    w, "llmproxy-redis", mock_port, run.proxy_cpus, redis_url=redis.url
                )
            )
        except (AssertionError, RuntimeError, ImportError) as e:
            run.skipped.append(f"Redis-cache hits: {str(e)[-2000:]}")
    litellm = Path(args.litellm)
    if args.no_litellm:
        run.skipped.append("LiteLLM: --no-litellm")
    elif not targets.litellm_available(litellm):
        run.skipped.append(f"LiteLLM: not installed at {litellm} (python -m bench setup --litellm)")
    else:
        run.say("starting LiteLLM (slow to import)")
        try:
            run.targets.append(targets.litellm(w, mock_port, run.proxy_cpus, litellm))
        except RuntimeError as e:
            run.skipped.append(f"LiteLLM: did not start ({str(e)[-2000:]})")
    for t in run.targets:
        if t.kind == "llmproxy":
            targets.check_llmproxy(t)


def _cell_targets(run: Run) -> list[Target]:
    """The targets of the proxied cells (the Redis variant only does the hit cells)."""
    return [t for t in run.targets if t.name != "llmproxy-redis"]


def run_cells(run: Run) -> None:
    plan = run.plan
    cells = _cell_targets(run)
    w, cpus = run.workdir, run.load_cpus
    for api in ("chat", "responses"):
        for conns in plan.conns:
            for t in cells:
                cell = load.wrk_cell(
                    w,
                    t.name,
                    t.port,
                    api,
                    t.headers,
                    conns,
                    plan.seconds,
                    plan.warmup,
                    t.cpu,
                    cpus,
                    split=t.cpu_by_process,
                )
                run.loads.append(cell)
                run.say(
                    f"{api:9} c={conns:<3} {t.name:14} {cell.rps:9.0f} req/s  p50 "
                    f"{cell.p50_ms:7.2f} ms  p99 {cell.p99_ms:7.2f} ms  "
                    f"cpu {cell.cpu_us_per_request:8.0f} us/req  err {cell.errors}"
                    + (f"  FAILED {cell.failure}" if cell.failure else "")
                )
    for concurrency in plan.stream_concurrency:
        for t in cells:
            s = load.stream_cell(t.name, t.port, t.headers, concurrency, plan.seconds, t.cpu)
            run.streams.append(s)
            f = s.figures()
            run.say(
                f"stream    c={concurrency:<3} {t.name:14} {s.streams:6} streams  ttfb p50 "
                f"{f['ttfb_p50_ms']:7.2f} ms  ttlb p50 {f['ttlb_p50_ms']:7.2f} ms  "
                f"cpu {s.cpu_ms_per_stream:7.2f} ms/stream  err {s.errors}"
                + (f" ({s.first_error})" if s.first_error else "")
            )
    hits = [("memory-hit", run.target("llmproxy")), ("redis-hit", run.target("llmproxy-redis"))]
    for conns in plan.hit_conns:
        for kind, hit_target in hits:
            if hit_target is None:
                continue
            t = hit_target
            cell = load.wrk_cell(
                w,
                t.name,
                t.port,
                "chat",
                t.headers,
                conns,
                plan.seconds,
                plan.warmup,
                t.cpu,
                cpus,
                kind=kind,
            )
            run.loads.append(cell)
            run.say(
                f"{kind:10} c={conns:<3} {t.name:14} {cell.rps:9.0f} req/s  p50 "
                f"{cell.p50_ms:7.2f} ms  p99 {cell.p99_ms:7.2f} ms  "
                f"cpu {cell.cpu_us_per_request:8.0f} us/req  err {cell.errors}"
            )
    for t in cells:
        if t.kind == "direct" or plan.idle_streams <= 0:
            continue
        i = load.idle_cell(
            t.name, t.port, t.headers, plan.idle_streams, t.rss_kib, plan.idle_timeout
        )
        run.idle.append(i)
        run.say(
            f"idle      n={plan.idle_streams} {t.name:14} opened {i.opened} in "
            f"{i.open_seconds:.1f}s  rss {i.rss_before_kib / 1024:.1f} -> "
            f"{i.rss_open_kib / 1024:.1f} MiB  err {i.errors}"
            + (f" ({i.first_error})" if i.first_error else "")
        )
        time.sleep(1.0)  # let the closed streams drain before the next target


@contextmanager
def started(args: argparse.Namespace) -> Iterator[Run]:
    """The run's processes, stopped on the way out whatever happens."""
    workdir = Path(tempfile.mkdtemp(prefix="llmproxy-bench-"))
    workdir.chmod(0o755)
    two = cpu_count() >= 2 and not args.no_pin
    if two:
        os.sched_setaffinity(0, {0})  # this process: the stream client, with wrk and the mock
    run = Run(
        workdir,
        Plan.from_args(args),
        load_cpus="0" if two else None,
        proxy_cpus="1" if two else None,
        all_cpus="0,1" if two else None,
    )
    try:
        yield run
    finally:
        for t in reversed(run.targets):
            t.stop()
        for extra in reversed(run.extra):
            extra.stop()
        if run.mock is not None:
            run.mock.stop()
        if args.keep:
            print(f"bench: configs and logs kept in {workdir}", file=sys.stderr)
        else:
            import shutil

            shutil.rmtree(workdir, ignore_errors=True)


def choose_mock(args: argparse.Namespace) -> str:
    if args.mock != "auto":
        return str(args.mock)
    return "nginx" if nginx_available() else "asyncio"


def main(args: argparse.Namespace) -> int:
    raise_fd_limit(65536)
    began = time.time()
    with started(args) as run:
        _versions(run, args)
        run.say(
            f"work directory {run.workdir}; pinning: load {run.load_cpus}, proxy {run.proxy_cpus}"
        )
        direct = start_mock(run, choose_mock(args))
        run.targets.append(direct)
        start_targets(run, args, direct.port)
        run_cells(run)
        stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(began))
        out = Path(args.output) if args.output else RESULTS
        out.mkdir(parents=True, exist_ok=True)
        data = report.figures(run, args, began)
        (out / f"report-{stamp}.json").write_text(
            json.dumps(data, indent=2, default=_json_default) + "\n"
        )
        (out / f"report-{stamp}.md").write_text(report.markdown(data))
        run.say(f"wrote {out / f'report-{stamp}.md'} and .json")
        print(report.markdown(data))
    return 0


def _json_default(value: object) -> object:
    if isinstance(value, float) and math.isnan(value):
        return None
    return str(value)


def compare_mocks(args: argparse.Namespace) -> int:
    """
    ``python -m bench mocks``: each mock alone on the proxy CPU, wrk and the
    stream client on the other: its req/s at 64 connections and its streams/s.
    """
    raise_fd_limit(65536)
    args.no_litellm = True
    with started(args) as run:
        for kind in ("nginx", "asyncio"):
            if kind == "nginx" and not nginx_available():
                print("nginx + Lua: not installed")
                continue
            mock = start_mock(run, kind, run.proxy_cpus)
            for api in ("chat", "responses"):
                cell = load.wrk_cell(
                    run.workdir,
                    kind,
                    mock.port,
                    api,
                    {},
                    64,
                    run.plan.seconds,
                    1,
                    mock.cpu,
                    run.load_cpus,
                )
                print(
                    f"{kind:8} {api:9} {cell.rps:9.0f} req/s  p50 {cell.p50_ms:.2f} ms  "
                    f"mock cpu {cell.cpu_us_per_request:.1f} us/req"
                )
            s = load.stream_cell(kind, mock.port, {}, 16, run.plan.seconds, mock.cpu)
            print(
                f"{kind:8} stream@16 {s.streams / s.seconds:9.0f} streams/s  mock cpu "
                f"{s.cpu_ms_per_stream:.3f} ms/stream"
            )
            mock.stop()
            run.mock = None
    return 0
