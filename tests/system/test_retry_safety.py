"""
Retries that cannot bill twice, against real processes: a real ``twistd -n
llmproxy`` in front of real mock upstreams on loopback sockets.

* An upstream that reads a request and then resets the connection may be
  generating the answer still: the request is not sent to another target,
  unless ``routing.retry_on`` has ``reset``.
* An upstream that closes idle keep-alive connections races the proxy's next
  request on a pooled connection; the proxy sends that request again on a new
  connection, and the client never sees the race.
"""

from __future__ import annotations

import http.client
import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from llmproxy.testing.processes import Mock, Proxy
from tests.system.harness import StartProxy

#: The idle keep-alive timeout of the closing upstream, in seconds.  The race
#: is in the milliseconds around it, whatever its length: with the proxy's
#: resend taken out, 0.3 gave 9-11 failed requests a run and 0.1 gave 4-9.
IDLE_CLOSE = 0.1
#: Clients of the idle race at once, each asking its own model, whose upstream
#: entry (all on the same mock) has its own pool: one connection, reused by
#: each request after about ``IDLE_CLOSE`` idle.
CLIENTS = 4
ROUNDS = 25


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Mock]]:
    """Two mock upstreams, ``r1`` and ``r2``."""
    workdir = tmp_path_factory.mktemp("retry-safety")
    mocks = [Mock(workdir, "r1"), Mock(workdir, "r2")]
    yield mocks
    for mock in mocks:
        mock.stop()


@pytest.fixture
def fresh_pair(pair: list[Mock]) -> list[Mock]:
    for mock in pair:
        mock.reset()
    return pair


def config(mocks: list[Mock], extra: str = "") -> str:
    """One model ``m`` over ``mocks`` in turn; breakers that never open (every try counts)."""
    lines = ["upstreams:"]
    for mock in mocks:
        lines.append(f"  {mock.name}:\n    base_url: {mock.base_url}")
        lines.append("    timeouts: {connect: 2, first_byte: 5, idle: 5, total: 10}")
    lines.append("models:\n  m:\n    strategy: round_robin\n    targets:")
    lines += [f"      - upstream: {mock.name}" for mock in mocks]
    lines.append("cache: {backend: off}")
    lines.append("routing:\n  retries: 1\n  cooldown: {failures: 1000}" + extra)
    return "\n".join(lines) + "\n"


def idle_config(mock: Mock) -> str:
    """Models ``m0``... each on its own upstream entry ``u0``..., all of them ``mock``."""
    lines = ["upstreams:"]
    for n in range(CLIENTS):
        lines.append(f"  u{n}:\n    base_url: {mock.base_url}")
    lines.append("models:")
    lines += [f"  m{n}:\n    targets:\n      - upstream: u{n}" for n in range(CLIENTS)]
    lines.append("cache: {backend: off}")
    return "\n".join(lines) + "\n"


def send(conn: http.client.HTTPConnection, text: str, model: str = "m") -> tuple[int, bytes]:
    """One chat completion on a kept-alive client connection: (status, body)."""
    body = {"model": model, "messages": [{"role": "user", "content": text}]}
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Authorization": "Bearer x"})
    response = conn.getresponse()
    return response.status, response.read()


def reached(mocks: list[Mock], text: str) -> list[str]:
    """The upstream of each call that carried ``text`` (a name per call)."""
    return [
        mock.name
        for mock in mocks
        for seen in mock.requests()
        if seen["path"].endswith("/chat/completions")
        and json.loads(seen["body"])["messages"][0]["content"] == text
    ]


def client(proxy: Proxy) -> http.client.HTTPConnection:
    return http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=30)


def test_a_request_reset_after_it_was_read_reaches_one_upstream(
    start: StartProxy, fresh_pair: list[Mock]
) -> None:
    for mock in fresh_pair:
        mock.configure(reset=True)
    proxy = start(config(fresh_pair))
    conn = client(proxy)
    answers = [send(conn, f"reset {i}") for i in range(20)]
    conn.close()
    calls = {f"reset {i}": reached(fresh_pair, f"reset {i}") for i in range(20)}
    duplicates = {text: names for text, names in calls.items() if len(names) != 1}
    assert duplicates == {}  # each request reached exactly one upstream, once
    assert [status for status, _ in answers] == [502] * 20
    assert all(b"connection lost after the request was sent" in body for _, body in answers)
    assert sum(mock.stats()["resets"] for mock in fresh_pair) == 20


def test_an_operator_may_opt_in_to_retrying_a_reset(
    start: StartProxy, fresh_pair: list[Mock]
) -> None:
    fresh_pair[0].configure(reset=True)
    proxy = start(config(fresh_pair, "\n  retry_on: [connect, timeout, reset]"))
    conn = client(proxy)
    answers = [send(conn, f"opt-in {i}") for i in range(4)]
    conn.close()
    assert [status for status, _ in answers] == [200] * 4
    # r1 is tried first every other time: those requests reached both upstreams.
    assert sorted(len(reached(fresh_pair, f"opt-in {i}")) for i in range(4)) == [1, 1, 2, 2]


def idle_client(proxy: Proxy, number: int) -> list[tuple[str, int, bytes]]:
    """One client's rounds of the idle race; the answers that were not 200."""
    conn = client(proxy)
    failed = []
    for i in range(ROUNDS):
        status, body = send(conn, f"idle {number}.{i}", f"m{number}")
        if status != 200:
            failed.append((f"idle {number}.{i}", status, body))
        # About the upstream's keep-alive timeout, give or take a few
        # milliseconds: its close and the next request cross on the wire.
        time.sleep(IDLE_CLOSE + (i % 9 - 4) * 0.001)  # the spacing is the scenario
    conn.close()
    return failed


def test_an_upstream_closing_idle_connections_causes_no_errors(
    start: StartProxy, tmp_path: Path
) -> None:
    upstream = Mock(tmp_path, "idle")
    try:
        upstream.configure(idle_close=IDLE_CLOSE)
        proxy = start(idle_config(upstream))
        with ThreadPoolExecutor(CLIENTS) as pool:
            runs = list(pool.map(lambda n: idle_client(proxy, n), range(CLIENTS)))
        assert [failure for run in runs for failure in run] == []
        assert len(upstream.requests()) >= CLIENTS * ROUNDS  # a race may be sent twice
        assert len(reached([upstream], "idle 0.0")) == 1
    finally:
        upstream.stop()
