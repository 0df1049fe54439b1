"""
``python -m bench ab --base REV``: what a change is worth, measured side by side.

On a shared machine, cells run one after the other move by ±15% from round to
round, more than most changes are worth.  So this runs two llmproxy builds at
the same time, both on the proxy CPU, under the same load: this checkout
("new") and ``REV`` of its repository ("base", exported with ``git archive``
and put first on the base process's ``PYTHONPATH``).  Each round runs every
cell against both at once (two wrk, or two stream clients, on the load CPU)
and takes the ratio of their CPU per request or per stream, new over base;
the report is each cell's median ratio over the rounds.  Below 1: the change
is cheaper.  Both builds get the benchmark's configuration (every feature on
the hot path), and the same mock upstream.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from bench import load, targets
from bench.harness import RESULTS, choose_mock, start_mock, started
from bench.procs import raise_fd_limit

CHECKOUT = Path(__file__).resolve().parent.parent
#: Cell names: chatN / responsesN (misses at N connections), hitN (memory-cache
#: hits), streamN (N concurrent streams).
DEFAULT_CELLS = "chat64,chat1,stream16,hit1"


def export(rev: str, into: Path) -> Path:
    """``rev`` of this checkout's repository, as files in ``into``."""
    into.mkdir(parents=True)
    archive = subprocess.run(
        ["git", "-C", str(CHECKOUT), "archive", rev], capture_output=True, check=False
    )
    if archive.returncode != 0:
        raise SystemExit(f"bench ab: git archive {rev}: {archive.stderr.decode().strip()}")
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return into


def _imports_from(env: dict[str, str], cwd: Path) -> str:
    """Where ``import llmproxy`` finds it with ``env`` (to check the base is the base)."""
    found = subprocess.run(
        [sys.executable, "-c", "import llmproxy; print(llmproxy.__file__)"],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        check=True,
    )
    return found.stdout.strip()


def measure(cell: str, target: targets.Target, run: Any) -> tuple[float, str]:
    """One cell against one target: its CPU cost (µs per request or stream), and a summary."""
    seconds = run.plan.seconds
    if cell.startswith("stream"):
        s = load.stream_cell(
            target.name, target.port, target.headers, int(cell[6:]), seconds, target.cpu
        )
        f = s.figures()
        return (
            s.cpu_ms_per_stream * 1000,
            f"{s.streams} streams, TTFB p50 {f['ttfb_p50_ms']:.2f} ms",
        )
    for prefix, api, kind in (
        ("chat", "chat", "miss"),
        ("responses", "responses", "miss"),
        ("hit", "chat", "memory-hit"),
    ):
        if cell.startswith(prefix) and cell[len(prefix) :].isdigit():
            c = load.wrk_cell(
                run.workdir,
                target.name,
                target.port,
                api,
                target.headers,
                int(cell[len(prefix) :]),
                seconds,
                run.plan.warmup,
                target.cpu,
                run.load_cpus,
                kind=kind,
            )
            if c.failure:
                raise RuntimeError(f"{cell} against {target.name}: {c.failure}")
            return c.cpu_us_per_request, f"{c.rps:.0f} req/s, p50 {c.p50_ms:.3f} ms"
    raise SystemExit(f"bench ab: unknown cell '{cell}' (chatN, responsesN, hitN, streamN)")


def side_by_side(
    cell: str, both: tuple[targets.Target, ...], run: Any
) -> dict[str, tuple[float, str]]:
    """``cell`` against each target at once, one thread each: {name: (cost, summary)}."""
    got: dict[str, tuple[float, str]] = {}
    failed: list[BaseException] = []

    def one(target: targets.Target) -> None:
        try:
            got[target.name] = measure(cell, target, run)
        except BaseException as e:  # noqa: BLE001 - raised again below, in the caller
            failed.append(e)

    threads = [threading.Thread(target=one, args=(t,)) for t in both]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failed:
        raise failed[0]
    return got


def main(args: argparse.Namespace) -> int:
    raise_fd_limit(65536)
    cells = [c.strip() for c in args.cells.split(",") if c.strip()]
    began = time.time()
    with started(args) as run:
        base_dir = export(args.base, run.workdir / "base")
        env = dict(os.environ, PYTHONPATH=str(base_dir))
        where = _imports_from(env, run.workdir)  # where twistd runs too
        if not where.startswith(str(base_dir)):
            raise SystemExit(f"bench ab: the base build would import llmproxy from {where}")
        mock = start_mock(run, choose_mock(args))
        run.targets.append(mock)
        run.say(f"base {args.base} from {base_dir}; new: {CHECKOUT}")
        base = targets.llmproxy(run.workdir, "base", mock.port, run.proxy_cpus, env=env)
        new = targets.llmproxy(run.workdir, "new", mock.port, run.proxy_cpus)
        run.targets += [base, new]
        ratios: dict[str, list[float]] = {cell: [] for cell in cells}
        for round_ in range(args.rounds):
            for cell in cells:
                got = side_by_side(cell, (base, new), run)
                ratio = got["new"][0] / got["base"][0]
                ratios[cell].append(ratio)
                run.say(
                    f"round {round_ + 1} {cell:10} base {got['base'][0]:8.1f} ({got['base'][1]})"
                    f"  new {got['new'][0]:8.1f} ({got['new'][1]})  new/base {ratio:.3f}"
                )
        lines = [
            f"# llmproxy A/B, {time.strftime('%Y-%m-%dT%H:%M:%S%z', time.localtime(began))}",
            "",
            f"`python -m bench ab --base {args.base}`: this checkout (new) against {args.base}"
            f" (base), both on CPU {run.proxy_cpus or 'any'} at once, under the same load;"
            f" {args.rounds} rounds of {run.plan.seconds:g} s per cell.",
            "",
            "| cell | CPU new/base, median | each round |",
            "|---|---|---|",
        ]
        for cell, values in ratios.items():
            each = ", ".join(f"{v:.3f}" for v in values)
            lines.append(f"| {cell} | {statistics.median(values):.3f} | {each} |")
        text = "\n".join(lines) + "\n"
        out = Path(args.output) if args.output else RESULTS
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"ab-{time.strftime('%Y%m%d-%H%M%S', time.localtime(began))}.md"
        path.write_text(text)
        run.say(f"wrote {path}")
        print(text)
    return 0
