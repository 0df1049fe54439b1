"""The garbage collector's settings, applied at start-up."""

from __future__ import annotations

import gc
import weakref

from twisted.trial.unittest import SynchronousTestCase

from llmproxy.tuning import THRESHOLDS, tune_gc


class TuningTests(SynchronousTestCase):
    def test_start_up_objects_are_frozen_and_collections_are_rarer(self) -> None:
        before = gc.get_threshold()
        self.addCleanup(gc.set_threshold, *before)
        self.addCleanup(gc.unfreeze)
        tune_gc()
        assert gc.get_threshold() == THRESHOLDS
        assert gc.get_freeze_count() > 0
        assert THRESHOLDS[0] > before[0]

    def test_a_cycle_that_outlived_a_young_collection_is_soon_reclaimed(self) -> None:
        """
        An in-flight request's objects survive young collections, and die as
        cycles later: they must be reclaimed within a dozen young collections'
        worth of allocations (at 50 young collections per middle one, 256
        streams at a time held some 60 MB more: docs/performance.rst).
        """
        before = gc.get_threshold()
        self.addCleanup(gc.set_threshold, *before)
        self.addCleanup(gc.unfreeze)
        tune_gc()

        class Node:
            pass

        node = Node()
        node.itself = node  # type: ignore[attr-defined]
        alive = weakref.ref(node)
        gc.collect(0)  # it was in flight: now in the middle generation
        del node
        # A dozen young collections' worth of allocations (at 20,000 each),
        # kept until the end: a few hundred requests under load.
        kept: list[list[object]] = [[] for _ in range(240_000)]
        assert alive() is None
        del kept
