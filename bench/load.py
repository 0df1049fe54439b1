"""
The load generators.

- :func:`wrk_cell`: ``wrk`` (one thread, N connections, closed loop) with a
  generated Lua script that POSTs a ~1 KB request; with ``unique`` every prompt
  carries a counter (and a nonce per run), so no two requests are alike and a
  cache lookup always misses.  The script's ``done()`` prints the figures as one
  JSON line.
- :func:`stream_cell`: an asyncio client (raw streams, uvloop when installed)
  holding N concurrent streams, each connection kept alive and reused, timing
  each stream's first body byte (TTFB) and last byte (TTLB).
- :func:`idle_cell`: many streams that the mock holds open after one event,
  and the target's resident memory while they are open.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import secrets
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.procs import pinned
from bench.stats import percentile
from bench.upstream import IDLE_MODEL, MODEL

FILLER = (
    "You are a helpful assistant for a benchmark. Answer briefly and precisely; "
    "this system prompt is here so that the request weighs about one kilobyte, "
    "like a short real conversation with some instructions. "
) * 4
MARK = "@@ID@@"


def request_body(api: str, stream: bool = False, model: str = MODEL) -> dict[str, Any]:
    """A ~1 KB request for ``api`` (``chat`` or ``responses``); MARK is where the id goes."""
    question = f"Question {MARK}: what is the capital of France, in one word?"
    if api == "chat":
        body: dict[str, Any] = {
            "model": model,
            "messages": [
                {"role": "system", "content": FILLER},
                {"role": "user", "content": question},
            ],
            "temperature": 0,
            "max_tokens": 64,
        }
        if stream:
            body["stream"] = True
        return body
    return {
        "model": model,
        "instructions": FILLER,
        "input": [{"role": "user", "content": question}],
        "temperature": 0,
        "max_output_tokens": 64,
        "store": False,
    }


PATHS = {"chat": "/v1/chat/completions", "responses": "/v1/responses"}


def _lua(text: str) -> str:
    assert "]====]" not in text
    return f"[====[{text}]====]"


def wrk_script(api: str, headers: dict[str, str], unique: bool) -> str:
    """The Lua script for one wrk run (a fresh nonce each time)."""
    prefix, suffix = json.dumps(request_body(api)).split(MARK)
    all_headers = {"Content-Type": "application/json", **headers}
    lua_headers = ", ".join(f"[ {_lua(k)} ] = {_lua(v)}" for k, v in all_headers.items())
    nonce = secrets.token_hex(6)
    return f"""
local prefix = {_lua(prefix)}
local suffix = {_lua(suffix)}
local fixed = prefix .. "fixed" .. suffix
local unique = {"true" if unique else "false"}
local headers = {{{lua_headers}}}
local path = {_lua(PATHS[api])}
local made = 0
local n = 0

function setup(thread)
    made = made + 1
    thread:set("tid", made)
end

function request()
    n = n + 1
    local body = fixed
    if unique then
        body = prefix .. "{nonce}-" .. tid .. "-" .. n .. suffix
    end
    return wrk.format("POST", path, headers, body)
end

function done(summary, latency, requests)
    local e = summary.errors
    io.write(string.format(
        'BENCH_JSON {{"requests":%d,"duration_us":%d,"connect":%d,"read":%d,"write":%d,' ..
        '"status":%d,"timeout":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,"mean_us":%.1f,' ..
        '"max_us":%d}}\\n',
        summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
        latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.mean,
        latency.max))
end
"""


@dataclass
class LoadCell:
    """One non-streamed cell: one target, one API, one number of connections."""

    target: str
    api: str
    conns: int
    kind: str = "miss"  # miss | memory-hit | redis-hit
    requests: int = 0
    seconds: float = 0.0
    errors: int = 0
    p50_ms: float = math.nan
    p90_ms: float = math.nan
    p99_ms: float = math.nan
    max_ms: float = math.nan
    cpu_s: float = 0.0
    #: CPU seconds of each process of the target in the cell (the workers of --workers).
    cpu_by_process: dict[int, float] = field(default_factory=dict)
    failure: str | None = None

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else math.nan

    @property
    def cpu_us_per_request(self) -> float:
        return self.cpu_s / self.requests * 1e6 if self.requests else math.nan

    def figures(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "rps": self.rps,
            "cpu_us_per_request": self.cpu_us_per_request,
            "p99_over_p50": self.p99_ms / self.p50_ms if self.p50_ms else math.nan,
        }


def run_wrk(
    workdir: Path,
    port: int,
    api: str,
    headers: dict[str, str],
    conns: int,
    seconds: float,
    unique: bool,
    cpus: str | None,
) -> dict[str, Any]:
    """One wrk run; its ``done()`` figures."""
    script = workdir / f"wrk-{secrets.token_hex(4)}.lua"
    script.write_text(wrk_script(api, headers, unique))
    args = ["wrk", "-t1", f"-c{conns}", f"-d{max(1, round(seconds))}s", "--timeout", "30s"]
    args += ["-s", str(script), f"http://127.0.0.1:{port}"]
    done = subprocess.run(pinned(args, cpus), capture_output=True, text=True, timeout=seconds + 120)
    script.unlink()
    found = re.search(r"BENCH_JSON (\{.*\})", done.stdout)
    if found is None:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stdout} {done.stderr}")
    figures: dict[str, Any] = json.loads(found.group(1))
    return figures


def wrk_cell(
    workdir: Path,
    target: str,
    port: int,
    api: str,
    headers: dict[str, str],
    conns: int,
    seconds: float,
    warmup: float,
    cpu: Callable[[], float],
    cpus: str | None,
    kind: str = "miss",
    split: Callable[[], dict[int, float]] | None = None,
) -> LoadCell:
    """A warm-up run, then the measured run with the target's CPU time around it."""
    cell = LoadCell(target, api, conns, kind)
    unique = kind == "miss"
    try:
        if warmup > 0:
            run_wrk(workdir, port, api, headers, conns, warmup, unique, cpus)
        before, each = cpu(), split() if split else {}
        figures = run_wrk(workdir, port, api, headers, conns, seconds, unique, cpus)
        cell.cpu_s = cpu() - before
        if split:
            cell.cpu_by_process = {p: s - each.get(p, 0.0) for p, s in split().items()}
    except (RuntimeError, subprocess.TimeoutExpired) as e:
        cell.failure = str(e)[:500]
        return cell
    errors = sum(figures[k] for k in ("connect", "read", "write", "status", "timeout"))
    cell.requests = figures["requests"] - figures["status"]
    cell.errors = errors
    cell.seconds = figures["duration_us"] / 1e6
    cell.p50_ms = figures["p50_us"] / 1000
    cell.p90_ms = figures["p90_us"] / 1000
    cell.p99_ms = figures["p99_us"] / 1000
    cell.max_ms = figures["max_us"] / 1000
    return cell


# -- streams ----------------------------------------------------------------------------


def _http_request(path: str, body: bytes, headers: dict[str, str]) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", "Content-Type: application/json"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


class StreamError(Exception):
    """A stream that did not end as it should."""


async def _read_stream(
    reader: asyncio.StreamReader, started: float, hold: bool = False
) -> tuple[float, float, int, bool]:
    """
    Read one response: (TTFB, TTLB, events, keep-alive).  With ``hold``, stop
    after the first body chunk (the idle streams).
    """
    head = await reader.readuntil(b"\r\n\r\n")
    status_line, _, rest = head.partition(b"\r\n")
    status = int(status_line.split()[1])
    headers = rest.lower()
    chunked = b"transfer-encoding: chunked" in headers
    keep = b"connection: close" not in headers
    length_match = re.search(rb"content-length:\s*(\d+)", headers)
    if status != 200:
        if length_match:
            await reader.readexactly(int(length_match.group(1)))
        raise StreamError(f"HTTP {status}")
    first = 0.0
    events = 0
    tail = b""
    if chunked:
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if not first:
                first = time.perf_counter()
            if size == 0:
                await reader.readuntil(b"\r\n")
                break
            data = await reader.readexactly(size + 2)
            events += data.count(b"data: ")
            tail = (tail + data)[-64:]
            if hold:
                return first - started, 0.0, events, keep
    elif length_match:
        data = await reader.readexactly(int(length_match.group(1)))
        first = time.perf_counter()
        events, tail = data.count(b"data: "), data[-64:]
    else:
        keep = False
        while data := await reader.read(65536):
            if not first:
                first = time.perf_counter()
            events += data.count(b"data: ")
            tail = (tail + data)[-64:]
            if hold:
                return first - started, 0.0, events, keep
    ended = time.perf_counter()
    if b"[DONE]" not in tail:
        raise StreamError(f"no [DONE] at the end: {tail!r}")
    return first - started, ended - started, events, keep


@dataclass
class StreamCell:
    """One streamed cell: one target, N concurrent streams."""

    target: str
    concurrency: int
    streams: int = 0
    errors: int = 0
    seconds: float = 0.0
    events_per_stream: int = 0
    cpu_s: float = 0.0
    ttfb: list[float] = field(default_factory=list, repr=False)
    ttlb: list[float] = field(default_factory=list, repr=False)
    first_error: str | None = None

    def ms(self, values: list[float], p: float) -> float:
        return percentile(values, p) * 1000

    @property
    def spread(self) -> list[float]:
        """TTLB − TTFB of each stream: how long its body took to arrive."""
        return [b - a for a, b in zip(self.ttfb, self.ttlb, strict=True)]

    @property
    def cpu_ms_per_stream(self) -> float:
        return self.cpu_s / self.streams * 1000 if self.streams else math.nan

    def figures(self) -> dict[str, Any]:
        data = {k: v for k, v in asdict(self).items() if k not in ("ttfb", "ttlb")}
        for name, values in (("ttfb", self.ttfb), ("ttlb", self.ttlb), ("spread", self.spread)):
            for p in (50, 90, 99):
                data[f"{name}_p{p}_ms"] = self.ms(values, p)
        data["cpu_ms_per_stream"] = self.cpu_ms_per_stream
        data["streams_per_second"] = self.streams / self.seconds if self.seconds else math.nan
        return data


class Requests:
    """Raw HTTP requests, each with a prompt of its own: no cache hit, no coalescing."""

    def __init__(self, path: str, body: dict[str, Any], headers: dict[str, str]) -> None:
        self.path = path
        self.prefix, self.suffix = json.dumps(body).split(MARK)
        self.headers = headers
        self.nonce = secrets.token_hex(6)
        self.count = 0

    def next(self) -> bytes:
        self.count += 1
        body = f"{self.prefix}{self.nonce}-{self.count}{self.suffix}".encode()
        return _http_request(self.path, body, self.headers)


async def _stream_worker(
    port: int, requests: Requests, deadline: float, timeout: float, cell: StreamCell
) -> None:
    reader: asyncio.StreamReader | None = None
    writer: asyncio.StreamWriter | None = None
    try:
        while time.perf_counter() < deadline:
            try:
                if writer is None:
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
                assert reader is not None
                request = requests.next()
                started = time.perf_counter()
                writer.write(request)
                ttfb, ttlb, events, keep = await asyncio.wait_for(
                    _read_stream(reader, started), timeout
                )
            except (OSError, asyncio.IncompleteReadError, StreamError, TimeoutError) as e:
                cell.errors += 1
                cell.first_error = cell.first_error or f"{type(e).__name__}: {e}"
                if writer is not None:
                    writer.close()
                reader = writer = None
                await asyncio.sleep(0.01)
                continue
            cell.streams += 1
            cell.ttfb.append(ttfb)
            cell.ttlb.append(ttlb)
            cell.events_per_stream = events
            if not keep:
                writer.close()
                reader = writer = None
    finally:
        if writer is not None:
            writer.close()


def _event_loop() -> Callable[[Any], Any]:
    """``asyncio.run``, with uvloop when it is installed."""
    try:
        import uvloop

        return uvloop.run
    except ImportError:
        return asyncio.run


def stream_cell(
    target: str,
    port: int,
    headers: dict[str, str],
    concurrency: int,
    seconds: float,
    cpu: Callable[[], float],
    timeout: float = 60,
) -> StreamCell:
    """``concurrency`` clients each streaming again and again for ``seconds``."""
    cell = StreamCell(target, concurrency)
    requests = Requests(PATHS["chat"], request_body("chat", stream=True), headers)

    async def main() -> None:
        before = cpu()
        started = time.perf_counter()
        deadline = started + seconds
        workers = [
            asyncio.ensure_future(_stream_worker(port, requests, deadline, timeout, cell))
            for _ in range(concurrency)
        ]
        await asyncio.wait(workers, timeout=seconds + timeout + 5)
        for w in workers:
            w.cancel()
        cell.seconds = time.perf_counter() - started
        cell.cpu_s = cpu() - before

    _event_loop()(main())
    return cell


# -- idle open streams ------------------------------------------------------------------


@dataclass
class IdleCell:
    """Many streams held open by the mock, and the target's memory meanwhile."""

    target: str
    wanted: int
    opened: int = 0
    errors: int = 0
    open_seconds: float = 0.0
    rss_before_kib: int = 0
    rss_open_kib: int = 0
    first_error: str | None = None

    def figures(self) -> dict[str, Any]:
        data = asdict(self)
        data["rss_open_mib"] = self.rss_open_kib / 1024
        data["kib_per_stream"] = (
            (self.rss_open_kib - self.rss_before_kib) / self.opened if self.opened else math.nan
        )
        return data


def idle_cell(
    target: str,
    port: int,
    headers: dict[str, str],
    count: int,
    rss: Callable[[], int],
    open_timeout: float,
    parallel: int = 50,
) -> IdleCell:
    """Open ``count`` idle streams (``parallel`` at a time), read each first event, measure."""
    cell = IdleCell(target, count)
    requests = Requests(PATHS["chat"], request_body("chat", stream=True, model=IDLE_MODEL), headers)
    writers: list[asyncio.StreamWriter] = []

    async def one(gate: asyncio.Semaphore) -> None:
        async with gate:
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writers.append(writer)
                writer.write(requests.next())
                await asyncio.wait_for(_read_stream(reader, time.perf_counter(), hold=True), 30)
                cell.opened += 1
            except (OSError, asyncio.IncompleteReadError, StreamError, TimeoutError) as e:
                cell.errors += 1
                cell.first_error = cell.first_error or f"{type(e).__name__}: {e}"

    async def main() -> None:
        cell.rss_before_kib = rss()
        gate = asyncio.Semaphore(parallel)
        started = time.perf_counter()
        tasks = [asyncio.ensure_future(one(gate)) for _ in range(count)]
        await asyncio.wait(tasks, timeout=open_timeout)
        cell.open_seconds = time.perf_counter() - started
        for t in tasks:
            t.cancel()
        await asyncio.sleep(1.0)  # let the target settle before the sample
        cell.rss_open_kib = rss()
        for w in writers:
            w.close()
        await asyncio.sleep(0.5)

    _event_loop()(main())
    return cell
