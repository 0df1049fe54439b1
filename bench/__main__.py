"""
The benchmark's command line::

    python -m bench setup [--litellm] [--pypy]   # install wrk, nginx + Lua, uvloop, ...
    python -m bench run --quick                  # a few seconds per cell
    python -m bench run                          # the full run, about ten minutes
    python -m bench mocks                        # which mock upstream is faster here
    python -m bench report bench/results/report-X.json   # render a saved run again

``run`` writes ``bench/results/report-<timestamp>.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from bench.targets import LITELLM


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    sub = top.add_subparsers(dest="command", required=True)

    setup = sub.add_parser("setup", help="install what the benchmark needs (apt, pip)")
    setup.add_argument("--litellm", action="store_true", help="also LiteLLM, in its own venv")
    setup.add_argument("--litellm-venv", default=str(LITELLM.parent.parent))
    setup.add_argument("--litellm-spec", default="", help="a version spec, e.g. '==1.108.7'")
    setup.add_argument("--pypy", action="store_true", help="also pypy3 (Debian's), and check it")

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--quick", action="store_true", help="a short run: 3 s per cell")
        p.add_argument("--seconds", type=float, default=None, help="seconds per cell")
        p.add_argument("--warmup", type=float, default=None, help="warm-up seconds per cell")
        p.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
        p.add_argument("--keep", action="store_true", help="keep the work directory (logs)")

    run = sub.add_parser("run", help="run every cell against every target, write the report")
    common(run)
    run.add_argument(
        "--mock",
        choices=("auto", "nginx", "asyncio"),
        default="auto",
        help="the mock upstream (auto: nginx + Lua when installed)",
    )
    run.add_argument("--litellm", default=str(LITELLM), help="the litellm script of its venv")
    run.add_argument("--no-litellm", action="store_true", help="leave LiteLLM out")
    run.add_argument("--no-redis", action="store_true", help="leave the Redis-cache cells out")
    run.add_argument(
        "--pypy",
        default=None,
        metavar="PATH",
        help="also llmproxy under this PyPy (with llmproxy installed in it)",
    )
    run.add_argument("--idle-streams", type=int, default=1000, help="idle open streams")
    run.add_argument("--chunks", type=int, default=50, help="events per stream")
    run.add_argument(
        "--chunk-interval-ms", type=float, default=1.0, help="ms between a stream's events"
    )
    run.add_argument("--output", default=None, help="directory of the report (bench/results)")

    mocks = sub.add_parser("mocks", help="measure the two mock upstreams")
    common(mocks)
    mocks.set_defaults(
        mock="auto", idle_streams=0, chunks=50, chunk_interval_ms=1.0, no_redis=True, pypy=None
    )

    ab = sub.add_parser(
        "ab", help="a change side by side: this checkout against --base REV, both under one load"
    )
    common(ab)
    ab.add_argument("--base", required=True, help="the git revision to compare with")
    ab.add_argument(
        "--cells",
        default="chat64,chat1,stream16,hit1",
        help="chatN, responsesN (misses), hitN (memory-cache hits), streamN",
    )
    ab.add_argument("--rounds", type=int, default=4)
    ab.add_argument("--output", default=None, help="directory of the report (bench/results)")
    ab.set_defaults(
        mock="auto", seconds=4.0, warmup=0.5, idle_streams=0, chunks=50, chunk_interval_ms=1.0
    )

    rep = sub.add_parser("report", help="render a saved JSON report as Markdown")
    rep.add_argument("json", type=Path)
    return top


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command == "setup":
        from bench import install

        return install.main(args)
    if args.command == "report":
        from bench.report import markdown, refresh

        print(markdown(refresh(json.loads(args.json.read_text()))))
        return 0
    from bench import harness

    if args.command == "mocks":
        return harness.compare_mocks(args)
    if args.command == "ab":
        from bench import ab

        return ab.main(args)
    return harness.main(args)


if __name__ == "__main__":
    sys.exit(main())
