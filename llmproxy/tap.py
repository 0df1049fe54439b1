"""
``twistd llmproxy``: command-line options and the service tree.

``Options.postOptions`` loads and validates the configuration, so a bad file
makes twistd exit non-zero with the path-named message and no traceback.
``makeService`` only assembles the named services (see :mod:`llmproxy.service`):
a proxy's, or with ``--workers N`` (N > 1) the parent's, whose workers are
this same command with ``--worker I --inherit FD:FAMILY`` (see
:mod:`llmproxy.workers`).
"""

from __future__ import annotations

from collections.abc import Sequence

from twisted.application.service import IService
from twisted.internet import endpoints
from twisted.python import usage

from llmproxy.config import Config, ConfigError, find_config, load_config
from llmproxy.workers import Inherited, worker_command, worker_count


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

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []
        self["inherit"] = []
        self.config: Config | None = None

    def opt_inherit(self, socket_: str) -> None:
        """(internal) A listening socket inherited from the parent, FD:FAMILY (repeatable)."""
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
        try:
            self["workers"] = worker_count(str(self["workers"]))
        except ValueError as e:
            raise usage.UsageError(f"--workers: {e}") from None
        if self["worker"] is not None and (not self["worker"].isdigit() or not self["inherit"]):
            raise usage.UsageError("--worker N is for the parent of --workers, with --inherit")
        try:
            self.config = load_config(self["config"])
        except ConfigError as e:
            raise usage.UsageError(str(e)) from None
        for description in self["listen"] or self.config.listen:
            try:
                # No reactor is needed to parse a description; nothing listens yet.
                endpoints.serverFromString(None, description)
            except (ValueError, KeyError, TypeError) as e:
                raise usage.UsageError(f"listen: bad endpoint '{description}': {e}") from None


def makeService(options: Options) -> IService:
    from twisted.internet import reactor

    from llmproxy.service import Role, build_service, build_supervisor

    config = options.config
    assert config is not None
    listen = tuple(options["listen"]) or config.listen
    if options["worker"] is not None:
        role = Role(int(options["worker"]), tuple(options["inherit"]))
        return build_service(config, reactor, listen, role)
    if options["workers"] > 1:
        path = find_config(options["config"])

        def command(index: int, inherited: Sequence[Inherited]) -> list[str]:
            return worker_command(path, index, inherited)

        return build_supervisor(config, reactor, listen, options["workers"], command)
    return build_service(config, reactor, listen)
