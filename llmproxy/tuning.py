"""
The process's garbage-collector settings, applied once at start-up.

CPython's default thresholds (700, 10, 10) run a young collection every 700
allocations.  Under load each request leaves cycles behind (Deferreds,
failures, the request and its channel), and with tens of requests in flight
every young collection walks all of them: profiled at 64 connections, the
collector took ~15% of the proxy's CPU, and its full collections paused the
reactor for up to ~40 ms, which is the tail of the latency.  With a young
threshold of 20,000 the collector cost fell to about a third and the pauses
to a few milliseconds (measured with the older generations at 50 and 100;
figures in docs/performance.rst).  Objects made during start-up (modules,
config, routes) live as long as the process: :func:`gc.freeze` moves them out
of the collector's sight, so no collection walks them again.

The older generations keep CPython's thresholds (10, 10).  A request's
objects survive the young collections that run while it is in flight, and
become garbage cycles later, in the middle generation: collected only every
50 young collections (as first tuned), they held about 60 MiB more at 256
concurrent streams, for no measurable CPU.
"""

from __future__ import annotations

import gc

#: Young, middle and old generation thresholds.
THRESHOLDS = (20_000, 10, 10)


def tune_gc() -> None:
    """Freeze what start-up made, and collect less often (see the module docstring)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*THRESHOLDS)
