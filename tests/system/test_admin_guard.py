"""
The operator's endpoints behind nginx (the shipped site config), with client
keys: without admin keys, nginx on the proxy's own host forwards, so what comes
through it is refused, while a call straight to the proxy's loopback port is
answered; with admin keys, one opens them through nginx too.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from llmproxy.testing.processes import Mock, Proxy, Reply, http_call
from tests.system.harness import Nginx, StartProxy, cache_config, chat, post


@pytest.fixture
def behind_nginx(tmp_path: Path) -> Iterator[Callable[[Proxy], Nginx]]:
    """Put nginx in front of a proxy (``behind_nginx(proxy)``); all stopped at the end."""
    started: list[Nginx] = []

    def make(proxy: Proxy) -> Nginx:
        server = Nginx(tmp_path / f"nginx-{len(started)}", proxy.port)
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()


def cache_verdict(proxy: Proxy, text: str) -> str:
    """What the cache did for one chat completion of ``text`` (as team-a)."""
    return post(proxy, chat(text))[1]["x-llmproxy-cache"]


def assert_refused(reply: Reply) -> None:
    """The proxy's own 403 (nginx passed it on untouched)."""
    assert reply.status == 403, reply.body
    error = reply.json()["error"]
    assert error["code"] == "admin_key_required"
    assert "auth.admin_keys" in error["message"]


def test_without_admin_keys_nginx_is_refused_and_loopback_is_answered(
    start: StartProxy, fresh_mock: Mock, behind_nginx: Callable[[Proxy], Nginx]
) -> None:
    proxy = start(cache_config(fresh_mock, "memory", None))
    nginx = behind_nginx(proxy)
    assert cache_verdict(proxy, "keep me") == "miss"
    assert cache_verdict(proxy, "keep me") == "hit"

    # Through nginx, with or without a client key: refused, and nothing purged.
    assert_refused(http_call(nginx.port, "DELETE", "/cache"))
    assert_refused(
        http_call(nginx.port, "DELETE", "/cache", headers={"Authorization": "Bearer key-a"})
    )
    assert cache_verdict(proxy, "keep me") == "hit"
    assert_refused(http_call(nginx.port, "GET", "/stats"))
    assert_refused(http_call(nginx.port, "GET", "/metrics"))
    assert_refused(http_call(nginx.port, "POST", "/admin/reload"))
    # The probes stay open through nginx.
    assert http_call(nginx.port, "GET", "/health/live").status == 200

    # Straight to the proxy's loopback port: answered.
    stats = http_call(proxy.port, "GET", "/stats")
    assert stats.status == 200 and stats.json()["cache"]["entries"] == 1
    purged = http_call(proxy.port, "DELETE", "/cache")
    assert (purged.status, purged.json()) == (200, {"purged": 1})
    assert cache_verdict(proxy, "keep me") == "miss"


def test_with_admin_keys_one_opens_them_through_nginx(
    start: StartProxy, fresh_mock: Mock, behind_nginx: Callable[[Proxy], Nginx]
) -> None:
    text = cache_config(fresh_mock, "memory", None).replace(
        "auth:\n", "auth:\n  admin_keys: [admin-secret]\n", 1
    )
    proxy = start(text)
    nginx = behind_nginx(proxy)
    assert cache_verdict(proxy, "purge me") == "miss"
    for port in (proxy.port, nginx.port):
        missing = http_call(port, "DELETE", "/cache")
        assert missing.status == 401 and missing.json()["error"]["code"] == "invalid_api_key"
    assert cache_verdict(proxy, "purge me") == "hit"
    admin = {"Authorization": "Bearer admin-secret"}
    assert http_call(nginx.port, "GET", "/stats", headers=admin).status == 200
    purged = http_call(nginx.port, "DELETE", "/cache", headers=admin)
    assert (purged.status, purged.json()) == (200, {"purged": 1})
    assert cache_verdict(proxy, "purge me") == "miss"
