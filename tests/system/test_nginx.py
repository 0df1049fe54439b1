"""llmproxy behind nginx with the shipped site config: streams stay streams."""

from __future__ import annotations

import http.client
from collections.abc import Iterator

import openai
import pytest

from llmproxy.testing.processes import Mock, Proxy, wait_for
from tests.system.harness import Nginx, events_arrived, raw_post, read_until


@pytest.fixture(scope="module")
def nginx(proxy: Proxy, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Nginx]:
    server = Nginx(tmp_path_factory.mktemp("nginx"), proxy.port)
    yield server
    server.stop()


def test_sdk_through_nginx(nginx: Nginx, fresh_mock: Mock) -> None:
    client = openai.OpenAI(base_url=nginx.base_url, api_key="x", max_retries=0)
    answer = client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "via nginx"}]
    )
    assert answer.choices[0].message.content == "Hello from main! You said: via nginx"
    chunks = list(
        client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "streamed"}], stream=True
        )
    )
    assert (
        "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        == "Hello from main! You said: streamed"
    )


def test_events_pass_nginx_unbuffered(nginx: Nginx, proxy: Proxy, fresh_mock: Mock) -> None:
    body = {
        "model": "gpt-4o-mini",
        "stream": True,
        "messages": [{"role": "user", "content": "x"}],
        "mock": {"stall_after_headers": True, "stall_after": 2},
    }
    sock = raw_post(nginx.port, body, headers={"X-Request-Id": "trace-42"})
    # The upstream stalls after two events: they can only arrive if nobody buffers.
    received = read_until(sock, events_arrived(2), "two events through nginx")
    head = received.split(b"\r\n\r\n", 1)[0].decode().lower()
    assert "x-request-id: trace-42" in head
    assert "content-type: text/event-stream" in head
    sock.close()
    wait_for(lambda: fresh_mock.stats()["disconnects"] == 1, what="upstream closed")


def test_client_address_forwarded_by_nginx_is_trusted(
    nginx: Nginx, proxy: Proxy, fresh_mock: Mock
) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", nginx.port, timeout=10)
    conn.request("GET", "/v1/models", headers={"X-Forwarded-For": "203.0.113.7"})
    assert conn.getresponse().status == 200
    # nginx (on loopback, a trusted proxy) appended the peer it saw; the proxy's
    # access log names the client, not nginx.
    wait_for(lambda: '"203.0.113.7" - - ' in proxy.process.log(), what="forwarded client")
