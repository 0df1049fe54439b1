"""
Redis comes back on its own after a stall past every timeout: a private
redis-server is stalled (SIGSTOP, then SIGCONT; ``CLIENT PAUSE``) while the proxy
keeps serving, so every call and every reconnection times out, and cache hits
must resume within a few seconds of Redis answering again.

txredisapi gives a pool up for good when a reconnection's ``SELECT`` (or
``AUTH``) times out; before the fix, these tests saw no hit again until the
proxy restarted.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest

from llmproxy.testing.processes import Proxy, RedisServer, wait_for
from tests.system.harness import caching_works, chat, post

#: Seconds Redis stays stalled: past the call and reply timeouts (0.25 s) and
#: past txredisapi's first reconnection delay (about 1 s), so reconnections
#: meet the stalled server.  With :data:`CLIENTS` busy, 2 s already left the
#: old pool without Redis until restart (3 runs of 3); 2.5 s leaves a margin
#: over txredisapi's jittered reconnection delay.
STALL = 2.5
#: Clients the proxy serves during the stall, so that calls time out on many
#: of the pool's connections at once.
CLIENTS = 8
#: Seconds after the stall ends within which cache hits must be back.
RECOVERY = 5.0

_unique = itertools.count()


def serve_through_stall(proxy: Proxy, seconds: float) -> int:
    """
    Keep the proxy busy for ``seconds`` while Redis is stalled, from
    :data:`CLIENTS` clients at once: every answer is a miss.  The answers served.
    """
    until = time.monotonic() + seconds

    def client() -> int:
        served = 0
        while time.monotonic() < until:
            status, headers, body = post(proxy, chat(f"during the stall {next(_unique)}"))
            assert status == 200 and headers["x-llmproxy-cache"] == "miss"
            assert body.count(b"during the stall") == 1
            served += 1
        return served

    with ThreadPoolExecutor(CLIENTS) as pool:
        return sum(pool.map(lambda _: client(), range(CLIENTS)))


def assert_hits_resume(proxy: Proxy, redis_server: RedisServer, stall_ended: float) -> float:
    """Hits come back within :data:`RECOVERY` s of ``stall_ended``; the seconds it took."""
    wait_for(lambda: caching_works(proxy), timeout=RECOVERY, what="Redis cache hits to resume")
    took = time.monotonic() - stall_ended
    print(f"redis cache hits resumed {took:.2f} s after the stall ended")
    # The hits came from Redis: it holds the entries, and the proxy is connected to it.
    assert redis_server.cli_call("--scan", "--pattern", "llmproxy:cache:*").split()
    clients = redis_server.cli_call("INFO", "clients")
    assert int(clients.split("connected_clients:")[1].split()[0]) >= 2  # proxy + redis-cli
    return took


def stop_and_continue(redis_server: RedisServer) -> Callable[[], None]:
    redis_server.pause()
    return redis_server.resume


def client_pause(redis_server: RedisServer) -> Callable[[], None]:
    assert redis_server.cli_call("CLIENT", "PAUSE", str(int(STALL * 1000)), "ALL") == "OK"
    return lambda: None  # it ends on its own, after STALL


@pytest.mark.parametrize(
    "stall", [stop_and_continue, client_pause], ids=["sigstop", "client-pause"]
)
def test_redis_comes_back_after_a_stall_past_every_timeout(
    redis_proxy: Proxy,
    redis_server: RedisServer,
    stall: Callable[[RedisServer], Callable[[], None]],
) -> None:
    assert caching_works(redis_proxy)
    started = time.monotonic()
    end_stall = stall(redis_server)
    try:
        assert serve_through_stall(redis_proxy, STALL - 0.1) >= 1
    finally:
        wait_for(lambda: time.monotonic() >= started + STALL, what="the stall to last")
        end_stall()
    assert_hits_resume(redis_proxy, redis_server, time.monotonic())
