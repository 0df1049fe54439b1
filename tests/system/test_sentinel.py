"""
A proxy that finds Redis through Sentinel follows a failover: a real master, a
replica and sentinels; the replica is promoted (``SENTINEL FAILOVER``, or the
master crashes), and while every request keeps answering 200, the cache
entries of new requests land in the new master.

In the forced failover, the old master cannot be demoted (its ``REPLICAOF`` is
renamed away, as if the sentinels could not reach it while the proxy still
can): it stays a master that takes writes, and nothing ever closes the
proxy's connections to it.  Only the sentinels' announcement
(``+switch-master``) can move the proxy.

That is what the proxy alone can prove it did: after the promotion nothing
copies the old master's writes into the new one, so an entry there was written
there.  (Requests would answer 200 without following, too: the proxy degrades
to cache misses.)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from llmproxy.testing.processes import (
    Mock,
    Proxy,
    RedisSentinel,
    RedisServer,
    closed_port,
    upstream_block,
    wait_for,
)
from tests.system.harness import CACHE_MODELS, UPSTREAM_KEY, StartProxy, chat, post

NAME = "cache-master"


#: A master's options that keep Sentinel from ever demoting it.
UNDEMOTABLE = ("--rename-command", "REPLICAOF", "", "--rename-command", "SLAVEOF", "")


@pytest.fixture
def pair(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[tuple[RedisServer, RedisServer]]:
    """A master (with the options a test passes indirectly) and its replica, synced."""
    master = RedisServer(tmp_path, options=getattr(request, "param", ()))
    replica = RedisServer(tmp_path, replicaof=master)
    wait_for(replica.synced, what="the replica's first sync")
    yield master, replica
    replica.stop()
    master.stop()


@pytest.fixture
def watch(
    tmp_path: Path, pair: tuple[RedisServer, RedisServer]
) -> Iterator[Callable[[int], list[RedisSentinel]]]:
    """
    ``watch(count)``: that many sentinels on the pair, once they see the replica
    in sync and each other; stopped before the pair (or they would fail it over).
    """
    started: list[RedisSentinel] = []

    def make(count: int) -> list[RedisSentinel]:
        sentinels = [RedisSentinel(tmp_path, pair[0], NAME) for _ in range(count)]
        started.extend(sentinels)
        wait_for(
            lambda: all(s.ready(replicas=1, others=count - 1) for s in sentinels),
            timeout=30,
            what="the sentinels to see the replica and each other",
        )
        return sentinels

    yield make
    for sentinel in started:
        sentinel.stop()


def config(mock: Mock, addresses: list[str]) -> str:
    """A proxy caching in the Redis that the sentinels at ``addresses`` name."""
    return (
        upstream_block([mock], api_key=UPSTREAM_KEY)
        + CACHE_MODELS
        + "cache: {backend: redis}\n"
        + "redis:\n  timeout: 0.25\n"
        + f"  sentinel: {{master: {NAME}, addresses: [{', '.join(addresses)}]}}\n"
    )


def holds_entry(server: RedisServer, text: str) -> bool:
    """``server`` holds a cache entry whose answer echoes ``text`` (``"...You said: {text}"``)."""
    keys = server.cli_call("--scan", "--pattern", "llmproxy:cache:*").split()
    return bool(keys) and f': {text}"' in server.cli_call("MGET", *keys)


def until_one_lands(proxy: Proxy, server: RedisServer, label: str, timeout: float = 30) -> str:
    """
    Send new requests (each must answer 200, a miss) until the entry of one of
    them is in ``server``; the text of that one.  Sentinel demotes an old
    master on its own clock (seconds), and each check runs ``redis-cli``
    twice: one check every 0.1 s, not every 10 ms.
    """
    sent: list[str] = []

    def landed() -> str | None:
        text = f"{label} {len(sent)}"
        _, headers, _ = post(proxy, chat(text))  # asserts the 200
        assert headers["x-llmproxy-cache"] == "miss", headers
        sent.append(text)
        return next((t for t in sent[-20:] if holds_entry(server, t)), None)

    try:
        found = wait_for(
            landed, timeout, what=f"an entry of a new request in redis :{server.port}", interval=0.1
        )
    except AssertionError as e:
        # What the proxy and Redis were doing: without it a timeout here says nothing.
        said = [line for line in proxy.process.log().splitlines() if "redis" in line.lower()]
        raise AssertionError(
            f"{e}\nredis :{server.port} is a {server.role()}; the proxy's last redis lines:\n"
            + "\n".join(said[-15:])
        ) from None
    assert found is not None
    return found


def served_from(proxy: Proxy, server: RedisServer, label: str, timeout: float = 30) -> None:
    """New entries land in ``server``, and the proxy answers from them."""
    text = until_one_lands(proxy, server, label, timeout)
    assert post(proxy, chat(text))[1]["x-llmproxy-cache"] == "hit"


@pytest.mark.parametrize("pair", [UNDEMOTABLE], indirect=True)
def test_a_forced_failover_moves_new_entries_to_the_new_master(
    pair: tuple[RedisServer, RedisServer],
    watch: Callable[[int], list[RedisSentinel]],
    start: StartProxy,
    fresh_mock: Mock,
) -> None:
    master, replica = pair
    sentinels = watch(2)
    # A sentinel that is down is skipped: the others answer.
    dead = f"127.0.0.1:{closed_port()}"
    proxy = start(config(fresh_mock, [dead, *(s.address for s in sentinels)]))
    served_from(proxy, master, "before the failover")

    wait_for(sentinels[0].failover, what="SENTINEL FAILOVER to be accepted")
    wait_for(
        lambda: all(s.master_port() == replica.port for s in sentinels),
        timeout=30,
        what="the sentinels to name the replica as the master",
        interval=0.1,
    )
    wait_for(lambda: replica.role() == "master", what="the replica to be promoted")
    # Requests go on meanwhile; the proxy follows the announcement.
    served_from(proxy, replica, "after the failover")
    assert master.role() == "master"  # never demoted: the announcement alone moved the proxy
    assert "the sentinels moved cache-master to 127.0.0.1:" in proxy.process.log()
    assert "Traceback" not in proxy.process.log()


def test_a_crashed_master_is_replaced_without_a_failed_request(
    pair: tuple[RedisServer, RedisServer],
    watch: Callable[[int], list[RedisSentinel]],
    start: StartProxy,
    fresh_mock: Mock,
) -> None:
    master, replica = pair
    (sentinel,) = watch(1)
    proxy = start(config(fresh_mock, [sentinel.address]))
    served_from(proxy, master, "before the crash")

    master.kill()
    # Requests go on (misses) while the sentinel notices and promotes the replica.
    served_from(proxy, replica, "after the crash", timeout=60)
    assert sentinel.master_port() == replica.port and replica.role() == "master"
    assert "Traceback" not in proxy.process.log()
