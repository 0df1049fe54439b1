"""
In-memory harness: the real Klein gateway and real mock upstreams, wired with
``StubTreq`` both ways and driven by one ``Clock``.  No sockets, no sleeps.
"""

from __future__ import annotations

import json
from typing import Any

from treq.testing import StubTreq
from twisted.internet.task import Clock

from llmproxy.config import Config, parse_yaml
from llmproxy.forwarder import upstream_client
from llmproxy.service import build_gateway
from llmproxy.testing.mock import MockUpstream

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


class Answer:
    def __init__(self, response: Any, body: bytes) -> None:
        self.response = response
        self.code: int = response.code
        self.body = body

    def header(self, name: str) -> str | None:
        values = self.response.headers.getRawHeaders(name)
        return (
            values[0].decode()
            if values and isinstance(values[0], bytes)
            else (values[0] if values else None)
        )

    def json(self) -> Any:
        return json.loads(self.body)


class Harness:
    def __init__(
        self,
        text: str | None = None,
        mocks: tuple[str, ...] = ("a",),
        environ: dict[str, str] | None = None,
        clients: dict[str, Any] | None = None,
    ) -> None:
        self.clock = Clock()
        self.config: Config = parse_yaml(text or config_text(), "test", environ or {})
        self.mocks = {name: MockUpstream(self.clock, name=name) for name in mocks}
        self.upstreams = {name: StubTreq(m.app.resource()) for name, m in self.mocks.items()}
        # The proxy's real client (no cookie jar) over each stub's in-memory agent.
        wired = {name: upstream_client(stub._agent) for name, stub in self.upstreams.items()}
        self.gateway = build_gateway(self.config, self.clock, {**wired, **(clients or {})})
        self.client = StubTreq(self.gateway.app.resource())

    def pump(self, rounds: int = 50) -> None:
        for _ in range(rounds):
            self.clock.advance(0)
            for stub in self.upstreams.values():
                stub.flush()
            self.client.flush()

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
    ) -> Any:
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        d = self.client.request(
            method, "http://proxy.test" + path, data=data, headers=headers or {}, unbuffered=True
        )
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
        d = self.start(method, path, body, headers, raw)
        response = self.result(d)
        collected: list[bytes] = []
        done = response.collect(collected.append)
        self.pump()
        self.result(done)
        return Answer(response, b"".join(collected))

    def result(self, d: Any) -> Any:
        results: list[Any] = []
        d.addBoth(results.append)
        self.pump()
        assert results, "no result: the exchange is still waiting"
        if hasattr(results[0], "raiseException"):
            results[0].raiseException()
        return results[0]

    def seen(self, name: str = "a") -> list[dict[str, Any]]:
        return self.mocks[name].received


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
    """The client of ``response`` (a StubTreq response) disconnects."""
    response.original.deliverBody(_HangUp())
