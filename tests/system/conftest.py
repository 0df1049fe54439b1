"""
The system tests' fixtures.  Under ``pytest -n auto`` (pytest-xdist) every
worker is a pytest session of its own: the session fixtures here (the mocks,
the shared proxy), ``tmp_path_factory`` and so every log and config file are
private to the worker, and the processes listen on port 0 (redis-server and
nginx on ports from a block of the worker's own; see
:mod:`llmproxy.testing.processes`), so workers never meet.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from llmproxy.testing.processes import Mock, Proxy, RedisServer, upstream_block
from tests.system.harness import CORE_MODELS, UPSTREAM_KEY, StartProxy, cache_config


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/system/" in str(item.fspath):
            item.add_marker(pytest.mark.system)


@pytest.fixture(scope="session")
def tmp_session(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("system")


@pytest.fixture(scope="session")
def mock(tmp_session: Path) -> Iterator[Mock]:
    """One mock upstream that insists on the upstream key."""
    m = Mock(tmp_session, "main", api_key=UPSTREAM_KEY)
    yield m
    m.stop()


@pytest.fixture(scope="session")
def proxy(tmp_session: Path, mock: Mock) -> Iterator[Proxy]:
    p = Proxy(tmp_session, upstream_block([mock], api_key=UPSTREAM_KEY) + CORE_MODELS)
    yield p
    p.stop()


@pytest.fixture
def start(tmp_path: Path) -> Iterator[StartProxy]:
    """Start proxies with a config text (``start(text, name)``); all stopped at the end."""
    started: list[Proxy] = []

    def make(text: str, name: str = "proxy") -> Proxy:
        proxy = Proxy(tmp_path, text, name=name)
        started.append(proxy)
        return proxy

    yield make
    for proxy in started:
        proxy.stop()


@pytest.fixture
def fresh_mock(mock: Mock) -> Mock:
    mock.reset()
    return mock


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A private redis-server for one test (chaos tests stop and restart it)."""
    server = RedisServer(tmp_path)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def trio(tmp_session: Path) -> Iterator[dict[str, Mock]]:
    """Three mock upstreams, a, b and c."""
    mocks = {name: Mock(tmp_session, name) for name in "abc"}
    yield mocks
    for m in mocks.values():
        m.stop()


@pytest.fixture
def fresh_trio(trio: dict[str, Mock]) -> dict[str, Mock]:
    for m in trio.values():
        m.reset()
    return trio


@pytest.fixture
def redis_proxy(tmp_path: Path, fresh_mock: Mock, redis_server: RedisServer) -> Iterator[Proxy]:
    """A proxy whose cache is the test's private redis-server."""
    proxy = Proxy(tmp_path, cache_config(fresh_mock, "redis", redis_server))
    yield proxy
    proxy.stop()
