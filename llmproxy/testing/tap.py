"""
``twistd -n llmproxy-mock``: run the mock OpenAI upstream as a server, so the
proxy can be tried (and system-tested) with no API key.
"""

from __future__ import annotations

from twisted.application.service import IService, MultiService
from twisted.python import usage
from twisted.web.server import Site


class Options(usage.Options):
    optParameters = [
        ["listen", "l", "tcp:8001:interface=127.0.0.1", "Twisted endpoint to listen on."],
        ["name", "n", "mock", "Name shown in replies (tells tests which upstream answered)."],
        ["api-key", "k", None, "Require this bearer key (default: accept any)."],
    ]


def makeService(options: Options) -> IService:
    from twisted.internet import reactor

    from llmproxy.tap import save_coverage_at_shutdown
    from llmproxy.testing.mock import MockUpstream
    from llmproxy.workers import ListeningPort

    mock = MockUpstream(reactor, name=options["name"], api_key=options["api-key"])
    site = Site(mock.app.resource())
    site.displayTracebacks = False
    save_coverage_at_shutdown(reactor)
    top = MultiService()
    # It logs "llmproxy-mock listening on 127.0.0.1:PORT": tests start it on port 0.
    server = ListeningPort(reactor, options["listen"], site, "llmproxy-mock")
    server.setName("http")
    server.setServiceParent(top)
    return top
