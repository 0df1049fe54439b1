"""The garbage collector's settings, applied at start-up."""

from __future__ import annotations

import gc

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
