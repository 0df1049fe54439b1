"""
``twistd -n llmproxy-mock``: run the mock OpenAI upstream as a server, so the
proxy can be tried (and system-tested) with no API key.
"""

from __future__ import annotations

from twisted.application import strports
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

    from llmproxy.testing.mock import MockUpstream

    mock = MockUpstream(reactor, name=options["name"], api_key=options["api-key"])
    site = Site(mock.app.resource())
    site.displayTracebacks = False
    top = MultiService()
    server = strports.service(options["listen"], site)
    server.setName("http")
    server.setServiceParent(top)
    return top
