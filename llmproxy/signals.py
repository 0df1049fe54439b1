"""
The operator's signals, as a service: SIGHUP reloads the configuration and
SIGUSR1 reopens the access log (for logrotate); the parent of ``--workers``
passes both on.  (SIGTERM and SIGINT are twistd's: they stop the tree, which
drains.)

A Python signal handler runs between two bytecodes of whatever the reactor is
doing, so it only schedules the work with ``callFromThread``, which also
wakes the reactor.  A handler installed before ours (twistd's own SIGUSR1 log
rotation, when it logs to a file) is still called.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Mapping
from types import FrameType
from typing import Any

from twisted.application.service import Service
from twisted.logger import Logger


class SignalHandlers(Service):
    """Run ``actions[signal]`` in the reactor thread when the process gets that signal."""

    log = Logger()

    def __init__(self, reactor: Any, actions: Mapping[int, Callable[[], object]]) -> None:
        self.reactor = reactor
        self.actions = dict(actions)
        self._previous: dict[int, Any] = {}

    def startService(self) -> None:
        super().startService()
        for sig in self.actions:
            self._previous[sig] = signal.signal(sig, self._received)

    def stopService(self) -> None:
        super().stopService()
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def _received(self, sig: int, frame: FrameType | None) -> None:
        previous = self._previous.get(sig)
        if callable(previous):
            previous(sig, frame)
        self.reactor.callFromThread(self._run, sig)

    def _run(self, sig: int) -> None:
        self.log.info("got {signal}", signal=signal.Signals(sig).name)
        try:
            self.actions[sig]()
        except Exception:  # noqa: BLE001 - a failed action must not end the process
            self.log.failure("handling {signal} failed", signal=signal.Signals(sig).name)


def exit_cleanly(reactor: Any) -> None:
    """
    Let twistd exit 0 after a stop that went as planned (a drain that ended in
    time).  twistd ends a process stopped by SIGTERM by killing itself with
    that signal again, which a service manager counts as a failure; the
    signal it remembers is the reactor's ``_exitSignal``.
    """
    if hasattr(reactor, "_exitSignal"):
        reactor._exitSignal = None
