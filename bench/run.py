#!/usr/bin/env python3
"""
``python bench/run.py [ARGS]``: the same as ``python -m bench run [ARGS]`` (kept
for the commands in older notes).  See ``python -m bench --help``.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.__main__ import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
