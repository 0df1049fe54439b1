"""
``twistd llmproxy``: command-line options and the service tree.

``Options.postOptions`` loads and validates the configuration, so a bad file
makes twistd exit non-zero with the path-named message and no traceback.
``makeService`` only assembles the named services (see :mod:`llmproxy.service`).
"""

from __future__ import annotations

from twisted.application.service import IService
from twisted.internet import endpoints
from twisted.python import usage

from llmproxy.config import Config, ConfigError, load_config


class Options(usage.Options):
    synopsis = "[--config PATH] [--listen ENDPOINT ...]"
    longdesc = (
        "Run llmproxy, an OpenAI-compatible gateway. The config is --config, else "
        "$LLMPROXY_CONFIG, else ./etc/llmproxy.yaml, else the default shipped in the package."
    )
    optParameters = [
        ["config", "c", None, "Path of the YAML configuration file."],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []
        self.config: Config | None = None

    def opt_listen(self, description: str) -> None:
        """
        Twisted endpoint to listen on, e.g. tcp:8080:interface=127.0.0.1
        (repeatable; overrides the config's listen).
        """
        self["listen"].append(description)

    opt_l = opt_listen

    def postOptions(self) -> None:
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

    from llmproxy.service import build_service

    assert options.config is not None
    listen = tuple(options["listen"]) or options.config.listen
    return build_service(options.config, reactor, listen)
