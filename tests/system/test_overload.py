"""
Overload and stuck clients (issue 14, defects 6 and 7), against real processes:
a real proxy in front of the mock upstream as a process.

* With the upstream hung and its connections taken, the excess is answered 503
  ``overloaded`` (``Retry-After: 1``) by ``queue_timeout``, not after
  ``first_byte``: first_byte is 600 s, so an answer within the test's deadline
  at all proves the bound.
* Past ``server.max_inflight`` requests in progress, the next is refused at
  once, counted in /metrics, while /health, /stats and /metrics still answer.
* A client that never reads an endless stream of big events is dropped at
  ``server.send_timeout`` and the upstream sees the disconnect.
"""

from __future__ import annotations

import http.client
import json
import socket
from collections.abc import Iterator
from contextlib import contextmanager

from llmproxy.testing.processes import Mock, Proxy, upstream_block, wait_for
from tests.system.harness import (
    CACHE_MODELS,
    UPSTREAM_KEY,
    StartProxy,
    chat,
    events_arrived,
    raw_post,
    read_until,
)

#: Seconds a refused request may take at most; far below first_byte (600 s).
DEADLINE = 30


def config(mock: Mock, upstream: str, server: str = "") -> str:
    """One model ``m`` on ``mock`` with ``upstream`` settings, no cache, two client keys."""
    text = upstream_block([mock], api_key=UPSTREAM_KEY, extra=upstream) + CACHE_MODELS
    text += "cache: {backend: off}\n"
    return text + (f"server: {server}\n" if server else "")


def ask(
    proxy: Proxy, method: str, path: str, body: object = None
) -> tuple[int, dict[str, str], bytes]:
    """Any request (not only a 200): status, lower-cased headers, body."""
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=DEADLINE)
    headers = {"Authorization": "Bearer key-a", "Content-Type": "application/json"}
    conn.request(method, path, json.dumps(body) if body is not None else None, headers)
    response = conn.getresponse()
    data = response.read()
    conn.close()
    return response.status, {k.lower(): v for k, v in response.getheaders()}, data


def assert_overloaded(answer: tuple[int, dict[str, str], bytes]) -> None:
    status, headers, body = answer
    assert status == 503, body
    assert headers["retry-after"] == "1"
    error = json.loads(body)["error"]
    assert error["code"] == "overloaded" and error["type"] == "server_error"


@contextmanager
def held(proxy: Proxy, mock: Mock, count: int) -> Iterator[list[socket.socket]]:
    """``count`` requests the hung upstream has received and holds (closed afterwards)."""
    mock.configure(hang=True)
    socks = [
        raw_post(proxy.port, chat(f"held {i}"), headers={"Authorization": "Bearer key-a"})
        for i in range(count)
    ]
    try:
        wait_for(lambda: mock.stats()["requests"] == count, what="the held requests upstream")
        yield socks
    finally:
        for sock in socks:
            sock.close()
        mock.reset()


def test_the_excess_is_answered_by_queue_timeout_not_first_byte(
    start: StartProxy, fresh_mock: Mock
) -> None:
    upstream = "    max_connections: 2\n    queue_timeout: 0.5\n    timeouts: {first_byte: 600}"
    proxy = start(config(fresh_mock, upstream))
    with held(proxy, fresh_mock, 2):
        for i in range(5):
            assert_overloaded(ask(proxy, "POST", "/v1/chat/completions", chat(f"excess {i}")))
        assert fresh_mock.stats()["requests"] == 2  # the excess never reached it
        metrics = ask(proxy, "GET", "/metrics")[2].decode()
        assert 'llmproxy_upstream_attempts_total{outcome="queue",upstream="main"} 5.0' in metrics
        # Waiting in the queue is not the target's fault.
        assert ask(proxy, "GET", "/health")[0] == 200


def test_past_max_inflight_the_excess_is_refused_at_once(
    start: StartProxy, fresh_mock: Mock
) -> None:
    upstream = "    queue_timeout: 600\n    timeouts: {first_byte: 600}"
    proxy = start(config(fresh_mock, upstream, "{max_inflight: 2}"))
    with held(proxy, fresh_mock, 2):
        for i in range(3):
            assert_overloaded(ask(proxy, "POST", "/v1/chat/completions", chat(f"excess {i}")))
        assert fresh_mock.stats()["requests"] == 2
        for path in ("/health", "/health/live", "/stats", "/metrics"):
            assert ask(proxy, "GET", path)[0] == 200, path
        metrics = ask(proxy, "GET", "/metrics")[2].decode()
        assert (
            'llmproxy_requests_total{endpoint="overloaded",key="",model="",status="503"} 3.0'
            in metrics
        )
    # Once they are gone, requests are admitted again.
    wait_for(lambda: json.loads(ask(proxy, "GET", "/stats")[2])["inflight"] == 1, what="drained")
    assert ask(proxy, "POST", "/v1/chat/completions", chat("admitted"))[0] == 200


def test_a_client_that_never_reads_is_dropped_at_send_timeout(
    start: StartProxy, fresh_mock: Mock
) -> None:
    upstream = "    max_connections: 1\n    queue_timeout: 600"
    proxy = start(config(fresh_mock, upstream, "{send_timeout: 1}"))
    body = chat("never read", stream=True, mock={"infinite": True, "chunk_bytes": 262144})
    sock = raw_post(proxy.port, body, headers={"Authorization": "Bearer key-a"})
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    try:
        read_until(sock, events_arrived(1), "the first event")
        # From here on nothing is read: the proxy's writes back up, the upstream is paused.
        wait_for(lambda: fresh_mock.stats()["pauses"] >= 1, what="backpressure upstream")
        wait_for(
            lambda: fresh_mock.stats()["disconnects"] == 1,
            timeout=DEADLINE,
            what="the upstream closed at send_timeout",
        )
        assert fresh_mock.stats()["active_streams"] == 0
        # The one connection slot is free again.
        fresh_mock.reset()
        assert ask(proxy, "POST", "/v1/chat/completions", chat("next"))[0] == 200
    finally:
        sock.close()
