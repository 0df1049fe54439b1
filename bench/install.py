"""
``python -m bench setup``: install what the benchmark needs.

- apt: ``wrk``, ``nginx`` and ``libnginx-mod-http-lua`` (the mock upstream and the
  reference proxy), ``redis-server`` (the Redis-cache cells);
- pip, into the interpreter that runs the benchmark: ``uvloop`` and ``httptools``
  (the stream client and the asyncio mock);
- with ``--litellm``: LiteLLM in a venv of its own (``/tmp/litellm-venv`` by
  default), never in llmproxy's;
- with ``--pypy``: Debian's ``pypy3``, and a check that it is new enough for
  llmproxy (Python 3.11).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

APT = ["wrk", "nginx", "libnginx-mod-http-lua", "redis-server"]
PIP = ["uvloop", "httptools"]


def _run(args: list[str]) -> int:
    print("+", " ".join(args), flush=True)
    return subprocess.call(args)


def _sudo() -> list[str]:
    return [] if os.geteuid() == 0 else ["sudo"]


def main(args: argparse.Namespace) -> int:
    status = 0
    if shutil.which("apt-get") is None:
        print(f"no apt-get here: install {' '.join(APT)} with your package manager")
    else:
        missing = [p for p in ("wrk", "nginx", "redis-server") if shutil.which(p) is None]
        if missing or not Path("/usr/lib/nginx/modules/ngx_http_lua_module.so").exists():
            status |= _run([*_sudo(), "apt-get", "install", "-y", *APT])
    status |= _run([sys.executable, "-m", "pip", "install", *PIP])
    if args.litellm:
        venv = Path(args.litellm_venv)
        if not (venv / "bin" / "python").exists():
            status |= _run([sys.executable, "-m", "venv", str(venv)])
        status |= _run([str(venv / "bin" / "pip"), "install", f"litellm[proxy]{args.litellm_spec}"])
    if args.pypy:
        if shutil.which("pypy3") is None and shutil.which("apt-get") is not None:
            _run([*_sudo(), "apt-get", "install", "-y", "pypy3", "pypy3-venv"])
        pypy = shutil.which("pypy3")
        if pypy is None:
            print("no pypy3: the PyPy cells will be skipped")
        else:
            done = subprocess.run(
                [pypy, "-c", "import sys; print(sys.version_info >= (3, 11))"],
                capture_output=True,
                text=True,
            )
            if done.stdout.strip() != "True":
                print(
                    f"{pypy} is older than Python 3.11, which llmproxy needs: install a "
                    "PyPy 3.11 (pypy.org), `pypy3 -m pip install .` in this checkout, and "
                    "pass `--pypy /path/to/pypy3` to `python -m bench run`"
                )
            else:
                print(
                    f"now `{pypy} -m pip install .` here, then `python -m bench run --pypy {pypy}`"
                )
    return status
