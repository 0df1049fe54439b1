"""
The benchmark's report: every figure as one JSON document (:func:`figures`)
and a Markdown rendering of it (:func:`markdown`) with ratios to nginx and to
LiteLLM measured in the same run, and issue 13's goals, each met or not.

``python -m bench report results/report-X.json`` renders a saved JSON again.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from bench.stats import ratio

if TYPE_CHECKING:
    from bench.harness import Run

Figures = dict[str, Any]


def _clean(value: Any) -> Any:
    """NaN becomes None, so that the JSON is standard."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


class Lookup:
    """The cells of one run, found by target and parameters."""

    def __init__(self, data: Figures) -> None:
        self.data = data

    def load(self, target: str, api: str, conns: int, kind: str = "miss") -> Figures | None:
        return next(
            (
                c
                for c in self.data["loads"]
                if c["target"] == target
                and c["api"] == api
                and c["conns"] == conns
                and c["kind"] == kind
                and not c.get("failure")
                and c["requests"]
            ),
            None,
        )

    def stream(self, target: str, concurrency: int) -> Figures | None:
        return next(
            (
                c
                for c in self.data["streams"]
                if c["target"] == target and c["concurrency"] == concurrency and c["streams"]
            ),
            None,
        )

    def idle(self, target: str) -> Figures | None:
        return next((c for c in self.data["idle"] if c["target"] == target), None)


def _get(cell: Figures | None, key: str) -> float | None:
    if cell is None:
        return None
    value = cell.get(key)
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


def goals(data: Figures) -> list[Figures]:
    """Issue 13's goals, each with its figure and whether it is met (None: not measured)."""
    at = Lookup(data)
    found: list[Figures] = []

    def goal(name: str, limit: str, value: float | None, met: bool | None, figure: str) -> None:
        found.append({"goal": name, "limit": limit, "value": value, "met": met, "figure": figure})

    def check(value: float | None, ok: bool) -> bool | None:
        return None if value is None else ok

    proxy64 = at.load("llmproxy", "chat", 64)
    cpu = ratio(
        _get(proxy64, "cpu_us_per_request"),
        _get(at.load("nginx", "chat", 64), "cpu_us_per_request"),
    )
    goal(
        "CPU per non-streamed request (chat @64)",
        "≤ 20× nginx",
        cpu,
        check(cpu, cpu is not None and cpu <= 20),
        f"{_f(cpu, 1)}× nginx ({_f(_get(proxy64, 'cpu_us_per_request'), 0)} µs vs "
        f"{_f(_get(at.load('nginx', 'chat', 64), 'cpu_us_per_request'), 0)} µs)",
    )
    litellm64 = at.load("litellm", "chat", 64)
    rps = ratio(_get(proxy64, "rps"), _get(litellm64, "rps"))
    goal(
        "req/s per core (chat @64, both on one core)",
        "≥ 30× LiteLLM",
        rps,
        check(rps, rps is not None and rps >= 30),
        f"{_f(rps, 1)}× LiteLLM ({_f(_get(proxy64, 'rps'), 0)} vs "
        f"{_f(_get(litellm64, 'rps'), 1)} req/s)",
    )
    tail = _get(proxy64, "p99_over_p50")
    goal(
        "tail at 64 connections (chat)",
        "p99 ≤ 3× p50",
        tail,
        check(tail, tail is not None and tail <= 3),
        f"p99/p50 = {_f(tail, 2)} ({_f(_get(proxy64, 'p99_ms'), 1)} / "
        f"{_f(_get(proxy64, 'p50_ms'), 1)} ms)",
    )
    s16, n16 = at.stream("llmproxy", 16), at.stream("nginx", 16)
    stream = ratio(_get(s16, "cpu_ms_per_stream"), _get(n16, "cpu_ms_per_stream"))
    goal(
        "CPU per 50-chunk stream (@16)",
        "≤ 3× nginx",
        stream,
        check(stream, stream is not None and stream <= 3),
        f"{_f(stream, 1)}× nginx ({_f(_get(s16, 'cpu_ms_per_stream'), 2)} vs "
        f"{_f(_get(n16, 'cpu_ms_per_stream'), 2)} ms)",
    )
    p1, d1 = (
        _get(at.stream("llmproxy", 1), "ttfb_p50_ms"),
        _get(at.stream("direct", 1), "ttfb_p50_ms"),
    )
    added = None if p1 is None or d1 is None else p1 - d1
    goal(
        "added time to first byte, one stream (p50)",
        "≤ 1 ms",
        added,
        check(added, added is not None and added <= 1),
        f"+{_f(added, 2)} ms ({_f(p1, 2)} vs direct {_f(d1, 2)} ms)",
    )
    hit, n1 = at.load("llmproxy", "chat", 1, "memory-hit"), at.load("nginx", "chat", 1)
    hit_ratio = ratio(_get(hit, "p50_ms"), _get(n1, "p50_ms"))
    goal(
        "memory-cache hit latency (p50 @1 conn)",
        "≤ 2× nginx's",
        hit_ratio,
        check(hit_ratio, hit_ratio is not None and hit_ratio <= 2),
        f"{_f(hit_ratio, 2)}× nginx ({_f(_get(hit, 'p50_ms'), 3)} vs "
        f"{_f(_get(n1, 'p50_ms'), 3)} ms)",
    )
    idle = at.idle("llmproxy")
    rss = _get(idle, "rss_open_mib")
    complete = idle is not None and idle["opened"] == idle["wanted"]
    enough = idle is not None and idle["wanted"] >= 1000
    goal(
        "1,000 concurrent open streams",
        "≤ 150 MB resident",
        rss,
        check(rss if enough else None, rss is not None and complete and rss * 1.048576 <= 150),
        f"{_f(rss, 1)} MiB VmRSS with {idle['opened'] if idle else '–'} open"
        + ("" if complete or idle is None else " (not all opened: not met)")
        + ("" if enough or idle is None else " (fewer than 1,000 asked for)"),
    )
    w2_cell = at.load("llmproxy-w2", "chat", 64)
    w2 = ratio(_get(w2_cell, "rps"), _get(proxy64, "rps"))
    split = (w2_cell or {}).get("cpu_by_process") or {}
    total = sum(split.values())
    shares = "/".join(f"{v / total:.0%}" for v in split.values()) if total else ""
    goal(
        "--workers 2 (chat @64)",
        "≥ 1.8× one worker",
        w2,
        check(w2, w2 is not None and w2 >= 1.8),
        f"{_f(w2, 2)}× ({_f(_get(w2_cell, 'rps'), 0)} vs {_f(_get(proxy64, 'rps'), 0)} req/s; "
        f"CPU split parent/workers {shares or '–'}; CPU 0 shared with the mock and wrk)",
    )
    return found


def figures(run: Run, args: argparse.Namespace, began: float) -> Figures:
    """Every figure of ``run`` as plain data."""
    data: Figures = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(began)),
        "duration_s": time.time() - began,
        "command": " ".join(["python", "-m", "bench", *sys.argv[1:]]),
        "quick": bool(args.quick),
        "machine": run.versions,
        "pinning": {"load": run.load_cpus, "proxy": run.proxy_cpus, "workers_2": run.all_cpus},
        "mock": run.mock_kind,
        "plan": asdict(run.plan),
        "targets": [{"name": t.name, "kind": t.kind, "notes": t.notes} for t in run.targets],
        "loads": [c.figures() for c in run.loads],
        "streams": [c.figures() for c in run.streams],
        "idle": [c.figures() for c in run.idle],
        "skipped": run.skipped,
    }
    data = _clean(data)
    data["goals"] = _clean(goals(data))
    return data


def refresh(data: Figures) -> Figures:
    """``data`` with its goals computed again (by this version of the rules)."""
    return {**data, "goals": _clean(goals(data))}


# -- Markdown ---------------------------------------------------------------------------


def _f(value: float | None, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if digits == 0:
        return f"{value:,.0f}"
    return f"{value:,.{digits}f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines + [""]


def _one_line(text: str) -> str:
    """A multi-line reason (a log's traceback) as its first line and its last one."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip(") ")]
    if len(lines) <= 1:
        return text.strip()
    return f"{lines[0]} … {lines[-1]}"


def _x(value: float | None, digits: int = 1) -> str:
    return "–" if value is None else f"{value:,.{digits}f}×"


def markdown(data: Figures) -> str:
    at = Lookup(data)
    m = data["machine"]
    names = [t["name"] for t in data["targets"] if t["name"] != "llmproxy-redis"]
    out = [
        f"# llmproxy benchmark, {data['started']}",
        "",
        f"`{data['command']}`: {'quick' if data['quick'] else 'full'} run, "
        f"{data['plan']['seconds']:g} s per cell after {data['plan']['warmup']:g} s of warm-up, "
        f"{data['duration_s'] / 60:.1f} min in all.",
        "",
        f"Machine: {m.get('cpus')} CPUs ({m.get('cpu')}), Linux {m.get('kernel')}, "
        f"load average {m.get('load_average')} at the start; Python {m.get('python')}, "
        f"llmproxy {m.get('llmproxy')}, {m.get('nginx')}, {m.get('wrk')}, "
        f"LiteLLM {m.get('litellm')}.",
        "",
        f"Pinning: mock ({data['mock']}), wrk and the stream client on CPU "
        f"{data['pinning']['load']}; each proxy alone on CPU {data['pinning']['proxy']} "
        f"(`--workers 2` on {data['pinning']['workers_2']}). CPU time is user + system "
        "from /proc/PID/task/*/schedstat (ns), summed over each target's processes. The machine "
        "is shared: absolute figures are noisy, ratios within this run are what count.",
        "",
        "Targets:",
        "",
    ]
    out += [f"- **{t['name']}**: {t['notes']}" for t in data["targets"]]
    out += [""]

    out += ["## Goals (issue 13)", ""]
    rows = []
    for g in data["goals"]:
        met = {True: "**met**", False: "not met", None: "not measured"}[g["met"]]
        rows.append([g["goal"], g["limit"], g["figure"], met])
    out += _table(["goal", "limit", "figure", "status"], rows)

    out += ["## Summary (the issue's table)", ""]
    rows = []
    d1 = _get(at.stream("direct", 1), "ttfb_p50_ms")
    n64 = _get(at.load("nginx", "chat", 64), "cpu_us_per_request")
    l64 = _get(at.load("litellm", "chat", 64), "rps")
    n16 = _get(at.stream("nginx", 16), "cpu_ms_per_stream")
    for name in names:
        c = at.load(name, "chat", 64)
        s16, s1 = at.stream(name, 16), at.stream(name, 1)
        cpu = _get(c, "cpu_us_per_request")
        rps = _get(c, "rps")
        ttfb = _get(s1, "ttfb_p50_ms")
        added = None if ttfb is None or d1 is None else ttfb - d1
        rows.append(
            [
                name,
                f"{_f(cpu, 0)} ({_x(ratio(cpu, n64))} nginx)" if name != "direct" else _f(cpu, 0),
                f"{_f(rps, 0)} ({_x(ratio(rps, l64))} LiteLLM)",
                _f(_get(c, "p99_over_p50"), 1),
                f"{_f(_get(s16, 'cpu_ms_per_stream'), 2)} "
                f"({_x(ratio(_get(s16, 'cpu_ms_per_stream'), n16))} nginx)",
                "–" if name == "direct" else f"+{_f(added, 2)} ms",
            ]
        )
    out += _table(
        [
            "chat completions",
            "CPU µs per request @64",
            "req/s @64",
            "p99/p50 @64",
            "CPU ms per 50-chunk stream @16",
            "+TTFB p50, one stream",
        ],
        rows,
    )
    out.append("For *direct*, CPU is the mock's, and req/s is bound by wrk on the same core.\n")

    for api in ("chat", "responses"):
        title = "POST /v1/chat/completions" if api == "chat" else "POST /v1/responses"
        out += [f"## Non-streamed: {title} (cache lookup misses)", ""]
        rows = []
        for conns in data["plan"]["conns"]:
            nginx = _get(at.load("nginx", api, conns), "cpu_us_per_request")
            litellm = _get(at.load("litellm", api, conns), "rps")
            for name in names:
                c = next(
                    (
                        x
                        for x in data["loads"]
                        if x["target"] == name
                        and x["api"] == api
                        and x["conns"] == conns
                        and x["kind"] == "miss"
                    ),
                    None,
                )
                if c is None:
                    continue
                cpu, rps = _get(c, "cpu_us_per_request"), _get(c, "rps")
                rows.append(
                    [
                        name,
                        str(conns),
                        _f(rps, 0),
                        _f(_get(c, "p50_ms"), 2),
                        _f(_get(c, "p99_ms"), 2),
                        _f(_get(c, "p99_over_p50"), 1),
                        _f(cpu, 0),
                        _x(ratio(cpu, nginx)) if name != "direct" else "–",
                        _x(ratio(rps, litellm)),
                        str(c["errors"]) + (" (failed)" if c.get("failure") else ""),
                    ]
                )
        out += _table(
            [
                "target",
                "conns",
                "req/s",
                "p50 ms",
                "p99 ms",
                "p99/p50",
                "CPU µs/req",
                "CPU × nginx",
                "req/s × LiteLLM",
                "errors",
            ],
            rows,
        )

    out += [
        f"## Streams: {data['plan']['chunks']} chunks, "
        f"{data['plan']['chunk_interval'] * 1000:g} ms apart at the mock",
        "",
        "TTFB: request sent to first body byte; TTLB: to the last byte; spread: TTLB − TTFB "
        "of each stream (near zero when a proxy buffers the stream).",
        "",
    ]
    rows = []
    for conc in data["plan"]["stream_concurrency"]:
        nginx = _get(at.stream("nginx", conc), "cpu_ms_per_stream")
        for name in names:
            s = next(
                (x for x in data["streams"] if x["target"] == name and x["concurrency"] == conc),
                None,
            )
            if s is None:
                continue
            cpu = _get(s, "cpu_ms_per_stream")
            rows.append(
                [
                    name,
                    str(conc),
                    str(s["streams"]),
                    _f(_get(s, "ttfb_p50_ms"), 2),
                    _f(_get(s, "ttfb_p99_ms"), 2),
                    _f(_get(s, "ttlb_p50_ms"), 2),
                    _f(_get(s, "ttlb_p99_ms"), 2),
                    _f(_get(s, "spread_p50_ms"), 2),
                    _f(_get(s, "spread_p99_ms"), 2),
                    _f(cpu, 2),
                    _x(ratio(cpu, nginx)) if name != "direct" else "–",
                    str(s["errors"]),
                ]
            )
    out += _table(
        [
            "target",
            "concurrent",
            "streams",
            "TTFB p50",
            "TTFB p99",
            "TTLB p50",
            "TTLB p99",
            "spread p50",
            "spread p99",
            "CPU ms/stream",
            "CPU × nginx",
            "errors",
        ],
        rows,
    )

    out += ["## Cache hits (llmproxy only; the same prompt again and again)", ""]
    rows = []
    for c in data["loads"]:
        if c["kind"] == "miss":
            continue
        nginx = _get(at.load("nginx", "chat", c["conns"]), "p50_ms")
        rows.append(
            [
                c["target"],
                c["kind"],
                str(c["conns"]),
                _f(_get(c, "rps"), 0),
                _f(_get(c, "p50_ms"), 3),
                _f(_get(c, "p99_ms"), 3),
                _f(_get(c, "cpu_us_per_request"), 0),
                _x(ratio(_get(c, "p50_ms"), nginx), 2),
                str(c["errors"]),
            ]
        )
    out += _table(
        [
            "target",
            "cache",
            "conns",
            "req/s",
            "p50 ms",
            "p99 ms",
            "CPU µs/req",
            "p50 × nginx proxied p50",
            "errors",
        ],
        rows,
    )

    out += [f"## {data['plan']['idle_streams']:,} idle open streams (resident memory)", ""]
    rows = []
    for i in data["idle"]:
        rows.append(
            [
                i["target"],
                f"{i['opened']}/{i['wanted']}",
                _f(i["open_seconds"], 1),
                _f(i["rss_before_kib"] / 1024, 1),
                _f(i["rss_open_kib"] / 1024, 1),
                _f(_get(i, "kib_per_stream"), 1),
                str(i["errors"]) + (f" ({i['first_error']})" if i.get("first_error") else ""),
            ]
        )
    out += _table(
        [
            "target",
            "open",
            "seconds to open",
            "VmRSS before MiB",
            "VmRSS open MiB",
            "KiB per stream",
            "errors",
        ],
        rows,
    )

    if data["skipped"]:
        out += ["## Not measured", ""]
        out += [f"- {_one_line(s)}" for s in data["skipped"]]
        out.append("")
    failures = [c for c in data["loads"] if c.get("failure")]
    if failures:
        out += ["## Failed cells", ""]
        out += [f"- {c['target']} {c['api']} @{c['conns']}: {c['failure']}" for c in failures]
        out.append("")
    return "\n".join(out)
