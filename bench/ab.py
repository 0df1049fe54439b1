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
import re
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
CELL = re.compile(r"(chat|responses|hit|stream)([1-9][0-9]*)")


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


def _this_build() -> str:
    """This checkout's commit, and whether its files differ from it."""
    head = (
        subprocess.run(
            ["git", "-C", str(CHECKOUT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
        or "?"
    )
    dirty = subprocess.run(
        ["git", "-C", str(CHECKOUT), "status", "--porcelain", "--untracked-files=no"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    return f"{head} with uncommitted changes" if dirty else head


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
    found = CELL.fullmatch(cell)
    assert found is not None  # checked by main
    kind, n = found.group(1), int(found.group(2))
    if kind == "stream":
        s = load.stream_cell(target.name, target.port, target.headers, n, seconds, target.cpu)
        if not s.streams:
            raise RuntimeError(f"{cell} against {target.name}: no stream ({s.first_error})")
        f = s.figures()
        return (
            s.cpu_ms_per_stream * 1000,
            f"{s.streams} streams, TTFB p50 {f['ttfb_p50_ms']:.2f} ms",
        )
    api = "responses" if kind == "responses" else "chat"
    c = load.wrk_cell(
        run.workdir,
        target.name,
        target.port,
        api,
        target.headers,
        n,
        seconds,
        run.plan.warmup,
        target.cpu,
        run.load_cpus,
        kind="memory-hit" if kind == "hit" else "miss",
    )
    if c.failure or not c.requests:
        raise RuntimeError(f"{cell} against {target.name}: {c.failure or 'no request'}")
    return c.cpu_us_per_request, f"{c.rps:.0f} req/s, p50 {c.p50_ms:.3f} ms"


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
    unknown = [c for c in cells if CELL.fullmatch(c) is None]
    if unknown or not cells:
        raise SystemExit(f"bench ab: cells are chatN, responsesN, hitN, streamN; got {unknown}")
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
            f"`python -m bench ab --base {args.base}`: this checkout (new: {_this_build()})"
            f" against {args.base}"
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
