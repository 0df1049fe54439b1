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

The processes the system tests start (``twistd`` proxies and mocks) inherit
the same through the environment: otherwise every one of them compiles
llmproxy from source again.  Measured, four starts of ``twistd -n llmproxy``
each: 0.74-1.08 s of CPU to the ready line without the cache, 0.64-0.76 s
with it.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

if sys.dont_write_bytecode:
    if not sys.pycache_prefix:
        sys.pycache_prefix = str(Path(tempfile.gettempdir()) / "llmproxy-tests-pycache")
    sys.dont_write_bytecode = False
    os.environ["PYTHONPYCACHEPREFIX"] = sys.pycache_prefix
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
