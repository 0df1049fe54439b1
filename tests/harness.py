"""
The in-memory harness: the real gateway, served by its real ``GatewaySite``,
in front of real mock upstreams, all wired through in-memory transports and
driven by one ``Clock``.  No sockets, no sleeps.

Also what several unit test files share: config builders, request bodies, a
client that hangs up, and :func:`run` for code that completes synchronously.
"""

from __future__ import annotations

import json
import random
from collections.abc import Coroutine
from typing import Any, TypeVar

import treq
from treq.client import HTTPClient
from treq.testing import RequestTraversalAgent
from twisted.internet import error as ierror
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.interfaces import IProtocol, IStreamClientEndpoint
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.test import iosim
from twisted.web.client import URI, Agent
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IAgentEndpointFactory, IBodyProducer, IResponse
from twisted.web.server import Site
from zope.interface import implementer

from llmproxy.assembly import build_gateway
from llmproxy.config import Config, parse_yaml
from llmproxy.redisclient import SharedRedis
from llmproxy.routing.router import Router
from llmproxy.testing.mock import MockUpstream
from llmproxy.upstream.client import AgentClient, UpstreamClient, upstream_client

T = TypeVar("T")

BASE = """
upstreams:
{upstreams}
models:
  m1:
    targets:
      - upstream: a
        model: upstream-m1
  m2:
    targets:
      - upstream: a
"""


def config_text(
    upstreams: dict[str, str] | None = None,
    extra: str = "",
    models: str | None = None,
    timeouts: str = "",
) -> str:
    """Upstreams ``a``... at ``http://{name}.test/v1`` with the given keys, models m1 and m2."""
    upstreams = upstreams or {"a": "sk-upstream-a-secret"}
    lines = []
    for name, key in upstreams.items():
        lines.append(f"  {name}:\n    base_url: http://{name}.test/v1\n    api_key: {key}")
        if timeouts:
            lines.append(f"    timeouts: {timeouts}")
    text = BASE.format(upstreams="\n".join(lines))
    if models is not None:
        text = text.split("models:")[0] + "models:\n" + models
    return text + extra


def three(
    strategy: str = "round_robin", weights: tuple[int, int, int] = (1, 1, 1), extra: str = ""
) -> str:
    """Upstreams a, b and c behind one model ``m1`` (targets ``{n}/up-{n}``)."""
    ups = "".join(f"  {n}:\n    base_url: http://{n}.test/v1\n    api_key: k{n}\n" for n in "abc")
    targets = "".join(
        f"      - upstream: {n}\n        model: up-{n}\n        weight: {w}\n"
        for n, w in zip("abc", weights, strict=True)
    )
    return (
        f"upstreams:\n{ups}models:\n  m1:\n    strategy: {strategy}\n    targets:\n{targets}"
        + extra
    )


def run(work: Deferred[T] | Coroutine[Any, Any, T]) -> T:
    """The result of a Deferred or coroutine that completes synchronously (else fail)."""
    d = work if isinstance(work, Deferred) else Deferred.fromCoroutine(work)
    results: list[T | Failure] = []
    d.addBoth(results.append)
    assert results, "did not complete synchronously"
    outcome = results[0]
    if isinstance(outcome, Failure):
        outcome.raiseException()
    return outcome


def router(text: str, clock: Clock | None = None, seed: int = 1) -> Router:
    """A Router over a config text, on ``clock``, with a seeded random source."""
    return Router(parse_yaml(text, "t", {}), clock or Clock(), rng=random.Random(seed))


@implementer(IAgentEndpointFactory)
class _Loopback:
    def __init__(self, reactor: MemoryReactorClock) -> None:
        self.reactor = reactor

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        return TCP4ClientEndpoint(self.reactor, "127.0.0.1", uri.port)


@implementer(IAgent)
class SiteAgent:
    """
    An agent whose every request is served, in memory, by ``site``: treq's
    ``RequestTraversalAgent``, but for a whole Site rather than a resource, so
    that the gateway's own Site and Request classes handle what they handle
    (request ids, body limits, in-flight counts).  Call :meth:`flush` to move
    the bytes.
    """

    def __init__(self, site: Site) -> None:
        self._reactor = MemoryReactorClock()
        self._agent = Agent.usingEndpointFactory(self._reactor, _Loopback(self._reactor))
        self._site = site
        self._pumps: list[iosim.IOPump] = []

    def request(
        self,
        method: bytes,
        uri: bytes,
        headers: Headers | None = None,
        bodyProducer: IBodyProducer | None = None,
    ) -> Deferred[IResponse]:
        d = self._agent.request(method, uri, headers, bodyProducer)
        if not self._reactor.tcpClients:
            return d  # failed before connecting
        _, port, factory, _, _ = self._reactor.tcpClients.pop()
        client = IPv4Address("TCP", "127.0.0.1", 31337)
        server = IPv4Address("TCP", "127.0.0.1", port)
        server_protocol: IProtocol = self._site.buildProtocol(client)
        client_protocol = factory.buildProtocol(server)
        pump = iosim.connect(
            server_protocol,
            iosim.FakeTransport(
                server_protocol, isServer=True, hostAddress=server, peerAddress=client
            ),
            client_protocol,
            iosim.FakeTransport(
                client_protocol, isServer=False, hostAddress=client, peerAddress=server
            ),
        )
        self._pumps.append(pump)
        return d

    def flush(self) -> None:
        for pump in list(self._pumps):
            pump.flush()
            if pump.clientIO.disconnected and pump.serverIO.disconnected:
                self._pumps.remove(pump)


class Refused:
    """An upstream client whose every connection is refused."""

    def request(self, method: str, url: str, **kwargs: Any) -> Deferred[Any]:
        return fail(ierror.ConnectionRefusedError("refused"))


class Answer:
    """A whole response: status, headers, body."""

    def __init__(self, response: IResponse, body: bytes) -> None:
        self.response = response
        self.code: int = response.code
        self.body = body

    def header(self, name: str) -> str | None:
        values = self.response.headers.getRawHeaders(name)
        return values[0] if values else None

    def json(self) -> Any:
        return json.loads(self.body)


class Harness:
    """The gateway of a config text, with a mock upstream per name in ``mocks``."""

    def __init__(
        self,
        text: str | None = None,
        mocks: tuple[str, ...] = ("a",),
        environ: dict[str, str] | None = None,
        clients: dict[str, UpstreamClient] | None = None,
        redis: SharedRedis | None = None,
        source: str = "test",
    ) -> None:
        self.clock = Clock()
        self.config: Config = parse_yaml(text or config_text(), source, environ or {})
        self.mocks = {name: MockUpstream(self.clock, name=name) for name in mocks}
        self.upstreams = {
            name: RequestTraversalAgent(m.app.resource()) for name, m in self.mocks.items()
        }
        # The proxy's real client (no cookie jar) over each mock's in-memory agent.
        wired: dict[str, UpstreamClient] = {
            name: AgentClient(agent) for name, agent in self.upstreams.items()
        }
        clients = {**wired, **(clients or {})}
        assembly = build_gateway(self.config, self.clock, clients, redis)
        self.site = assembly.site
        #: The active health checks, when the config has them (not started).
        self.checks = assembly.checks
        #: The gateway, to apply another config to (a reload).
        self.gateway = assembly.gateway
        self.agent = SiteAgent(self.site)
        self.client: HTTPClient = upstream_client(self.agent)

    def pump(self, rounds: int = 50) -> None:
        """Deliver everything that can be delivered without time passing."""
        for _ in range(rounds):
            self.clock.advance(0)
            for agent in self.upstreams.values():
                agent.flush()
            self.agent.flush()

    def tick(self, step: float, times: int = 1) -> None:
        """Let ``times`` steps of ``step`` seconds pass, delivering what they bring."""
        for _ in range(times):
            self.clock.advance(step)
            self.pump()

    def start(
        self,
        method: str,
        path: str,
        body: Any = None,
        headers: dict[str, str] | None = None,
        raw: bytes | None = None,
    ) -> Deferred[IResponse]:
        """Send a request; the Deferred fires with the response once its headers are in."""
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        sent = Headers({name: [value] for name, value in (headers or {}).items()})
        d = self.client.request(
            method, "http://proxy.test" + path, data=data, headers=sent, unbuffered=True
        ).addCallback(_response)
        self.pump()
        return d

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        headers: dict[str, str] | None = None,
        raw: bytes | None = None,
    ) -> Answer:
        """A whole exchange, which must complete without time passing."""
        return self.finish(self.start(method, path, body, headers, raw))

    def finish(self, pending: Deferred[IResponse]) -> Answer:
        """Read the whole answer of a request started earlier."""
        response = self.result(pending)
        collected: list[bytes] = []
        self.result(treq.collect(response, collected.append))
        return Answer(response, b"".join(collected))

    def result(self, d: Deferred[T]) -> T:
        """``d``'s result once pending bytes are delivered (fails if it is still waiting)."""
        self.pump()
        return run(d)

    def seen(self, name: str = "a") -> list[dict[str, Any]]:
        """The requests upstream ``name`` received."""
        return self.mocks[name].received

    def target(self, target_id: str) -> dict[str, Any]:
        """What /health says of one target."""
        found: dict[str, Any] = self.request("GET", "/health").json()["targets"][target_id]
        return found


def _response(response: IResponse) -> IResponse:
    """treq's response, seen as the IResponse it is."""
    return response


def chat(content: str = "hello", **extra: Any) -> dict[str, Any]:
    return {"model": "m1", "messages": [{"role": "user", "content": content}], **extra}


def events(body: bytes) -> list[str]:
    """The SSE events of a body, as text blocks."""
    return [e for e in body.decode().split("\n\n") if e.strip()]


class _HangUp:
    """A client that reads nothing and drops the connection at once."""

    def makeConnection(self, transport: Any) -> None:
        transport.stopProducing()

    def dataReceived(self, data: bytes) -> None:
        pass

    def connectionLost(self, reason: Any) -> None:
        pass


def hang_up(response: Any) -> None:
    """The client of ``response`` (a treq response) disconnects."""
    response.original.deliverBody(_HangUp())
