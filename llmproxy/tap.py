"""
``twistd llmproxy``: command-line options and the service tree.

``Options.postOptions`` loads and validates the configuration, so a bad file
makes twistd exit 1 with one line naming the file (no usage text, no
traceback); ``--check-config`` stops there, after printing the start-up
summary (:mod:`llmproxy.summary`), with status 0.  ``makeService`` logs that
summary and only assembles the named services (see :mod:`llmproxy.service`):
a proxy's, or with ``--workers N`` (N > 1) the parent's, whose workers are
this same command with ``--worker I --inherit FD:FAMILY`` (see
:mod:`llmproxy.workers`).
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Sequence
from types import FrameType
from typing import TYPE_CHECKING, Any

from twisted.logger import Logger
from twisted.python import usage

from llmproxy.config import Config, ConfigError, find_config, load_config
from llmproxy.summary import config_origin, summary
from llmproxy.tuning import tune_gc

if TYPE_CHECKING:
    from twisted.application.service import IService

    from llmproxy.workers import Inherited

# What twistd imports for `twistd llmproxy` stays light (the endpoints and the
# workers come in later): a Ctrl-C while it loads is a traceback of twistd's.

log = Logger(namespace="llmproxy")

#: A SIGINT (Ctrl-C) that came before the reactor ran, to be acted on once it runs.
_early: list[int] = []


def _hold(sig: int, frame: FrameType | None) -> None:
    _early.append(sig)


def hold_early_interrupts() -> None:
    """
    Until the reactor installs its own handlers, a Ctrl-C is remembered
    instead of raising KeyboardInterrupt wherever start-up happens to be (a
    traceback); :func:`stop_if_interrupted` then stops the reactor as soon as
    it runs, the way its own SIGINT handler (``reactor.sigInt``) would have.
    """
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _hold)


def stop_if_interrupted(reactor: Any) -> None:
    """
    Once the reactor runs: Ctrl-C is its (it installs its SIGINT handler only
    over Python's own, so this puts it in place of ours), and a Ctrl-C that
    came during start-up stops it now.
    """
    if signal.getsignal(signal.SIGINT) is _hold:
        signal.signal(signal.SIGINT, reactor.sigInt)
    if _early:
        reactor.sigInt(_early[0], None)


def ignore_further_stops(reactor: Any) -> None:
    """
    Once the process is stopping (draining), a second SIGTERM or SIGINT (the
    parent's SIGTERM after a Ctrl-C that reached every worker) is logged and
    ignored, instead of asking a stopping reactor to stop (a traceback).
    """

    def again(sig: int, frame: FrameType | None) -> None:
        reactor.callFromThread(
            log.info, "got {signal} again: already stopping", signal=signal.Signals(sig).name
        )

    def install() -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, again)

    reactor.addSystemEventTrigger("before", "shutdown", install)


def save_coverage_at_shutdown(reactor: Any) -> None:
    """
    Under coverage (the test suite's ``COVERAGE_PROCESS_START``), save the data
    once the reactor has stopped: twistd ends a process that a signal stopped
    by sending it that signal again, and then no ``atexit`` handler runs.
    """
    coverage = sys.modules.get("coverage")
    current = coverage.Coverage.current() if coverage is not None else None
    if current is not None:
        reactor.addSystemEventTrigger("after", "shutdown", current.save)


def own_the_process(reactor: Any) -> None:
    """
    What twistd's process needs around the service: clean signals, coverage
    saved, and the garbage collector tuned once start-up is over.
    """
    save_coverage_at_shutdown(reactor)
    reactor.callWhenRunning(stop_if_interrupted, reactor)
    reactor.callWhenRunning(tune_gc)
    ignore_further_stops(reactor)


def config_failed(path: str | None, error: ConfigError) -> SystemExit:
    """The one line a config error prints (twistd prints a SystemExit's message alone)."""
    message = str(error)
    if path and path not in message:
        message = f"{path}: {message}"
    return SystemExit(f"llmproxy: {message}")


class Options(usage.Options):
    synopsis = "[--config PATH] [--listen ENDPOINT ...] [--workers N|auto]"
    longdesc = (
        "Run llmproxy, an OpenAI-compatible gateway. The config is --config, else "
        "$LLMPROXY_CONFIG, else ./etc/llmproxy.yaml, else the default shipped in the package."
    )
    optParameters = [
        ["config", "c", None, "Path of the YAML configuration file."],
        ["workers", "w", "1", "Worker processes serving the same port: a number, or auto (CPUs)."],
        ["worker", None, None, "(internal) This is worker number N of a --workers parent."],
    ]
    optFlags = [
        [
            "check-config",
            None,
            "Validate the config, print what it defines, exit 0 (valid) or 1; bind nothing.",
        ],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []
        self["inherit"] = []
        self.config: Config | None = None
        self.origin = ""

    def opt_inherit(self, socket_: str) -> None:
        """(internal) A listening socket inherited from the parent, FD:FAMILY (repeatable)."""
        from llmproxy.workers import Inherited

        try:
            self["inherit"].append(Inherited.parse(socket_))
        except ValueError as e:
            raise usage.UsageError(f"--inherit: {e}") from None

    def opt_listen(self, description: str) -> None:
        """
        Twisted endpoint to listen on, e.g. tcp:8080:interface=127.0.0.1
        (repeatable; overrides the config's listen).
        """
        self["listen"].append(description)

    opt_l = opt_listen

    def postOptions(self) -> None:
        if self.under_twistd:
            hold_early_interrupts()
        from llmproxy.workers import worker_count

        try:
            self["workers"] = worker_count(str(self["workers"]))
        except ValueError as e:
            raise usage.UsageError(f"--workers: {e}") from None
        if self["worker"] is not None and (not self["worker"].isdigit() or not self["inherit"]):
            raise usage.UsageError("--worker N is for the parent of --workers, with --inherit")
        path = find_config(self["config"])
        try:
            self.config = load_config(self["config"])
            for description in self["listen"] or self.config.listen:
                check_endpoint(description)
        except ConfigError as e:
            raise config_failed(path, e) from None
        self.origin = config_origin(self["config"])
        if self["check-config"]:
            for line in self.summary():
                print(line)
            print(f"llmproxy: {f'config {path}' if path else 'the built-in config'} is valid")
            raise SystemExit(0)

    @property
    def under_twistd(self) -> bool:
        """Parsed by twistd (its subcommand), so the process's signals are ours."""
        return getattr(self, "parent", None) is not None

    def summary(self) -> list[str]:
        assert self.config is not None
        return summary(self.config, self.origin, tuple(self["listen"]), self["workers"])


def check_endpoint(description: str) -> None:
    """A listen description Twisted can parse (no reactor needed; nothing listens)."""
    from twisted.internet import endpoints

    try:
        endpoints.serverFromString(None, description)
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError("listen", f"bad endpoint '{description}': {e}") from None


def makeService(options: Options) -> IService:
    from twisted.internet import reactor

    from llmproxy.service import Role, build_service, build_supervisor
    from llmproxy.workers import reactor_name, worker_command

    config = options.config
    assert config is not None
    listen = tuple(options["listen"]) or config.listen
    if options.under_twistd:
        own_the_process(reactor)
    if options["worker"] is not None:
        role = Role(int(options["worker"]), tuple(options["inherit"]))
        return build_service(config, reactor, listen, role)
    for line in options.summary():
        log.info("{summary}", summary=line)
    if options["workers"] > 1:
        path = find_config(options["config"])
        chosen = reactor_name(reactor)

        def command(index: int, inherited: Sequence[Inherited]) -> list[str]:
            return worker_command(path, index, inherited, chosen)

        return build_supervisor(config, reactor, listen, options["workers"], command)
    return build_service(config, reactor, listen)
