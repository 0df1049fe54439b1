"""
What every test session shares: bytecode caching that survives
``PYTHONDONTWRITEBYTECODE``.

Many machines set ``PYTHONDONTWRITEBYTECODE=1`` (most Python container images
do) to keep ``__pycache__`` out of the source tree.  Under it pytest cannot
cache the assertion rewriting of the test modules, so every session (and
every ``-n auto`` worker) rewrites and compiles them all again: some 5 s of
CPU each, measured.  Here the bytecode goes to a cache outside the checkout
instead (``sys.pycache_prefix``), so the tree stays as clean as that setting
asks and the rewriting is done once.  ``PYTHONPYCACHEPREFIX``, when set, is
honoured as it is.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

if sys.dont_write_bytecode:
    if not sys.pycache_prefix:
        sys.pycache_prefix = str(Path(tempfile.gettempdir()) / "llmproxy-tests-pycache")
    sys.dont_write_bytecode = False
