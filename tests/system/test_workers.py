"""
``twistd -n llmproxy --workers 2`` as operators run it: one port, two worker
processes under one parent that restarts a worker that dies, drains them all
on SIGTERM, and whose ``/metrics`` add the workers up.
"""

from __future__ import annotations

import http.client
import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from llmproxy.testing.processes import (
    Mock,
    Proxy,
    children,
    exchange,
    http_call,
    upstream_block,
    wait_for,
    workers_answering,
)
from tests.system.harness import (
    CORE_MODELS,
    UPSTREAM_KEY,
    events_arrived,
    raw_post,
    read_until,
    response_ended,
)

#: Starts a proxy with ``--workers 2`` from a config text; all stopped at the end.
StartFleet = Callable[[str], Proxy]


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[StartFleet]:
    started: list[Proxy] = []

    def make(text: str) -> Proxy:
        proxy = Proxy(tmp_path, text, name=f"fleet{len(started)}", workers=2)
        started.append(proxy)
        return proxy

    yield make
    for proxy in started:
        proxy.stop()


def config(mock: Mock) -> str:
    return upstream_block([mock], api_key=UPSTREAM_KEY) + CORE_MODELS


def chat(text: str, **extra: object) -> dict[str, object]:
    return {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": text}], **extra}


def answered(proxy: Proxy, text: str) -> None:
    """A chat completion through the shared port, answered in full."""
    reply = http_call(proxy.port, "POST", "/v1/chat/completions", chat(text))
    assert reply.status == 200, reply.body
    assert reply.json()["choices"][0]["message"]["content"] == f"Hello from main! You said: {text}"


def gone(pid: int) -> bool:
    """No such process any more (nor a zombie waiting for its parent)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().rpartition(")")[2].split()[0] == "Z"
    except FileNotFoundError:
        return True


def connections_to_each_worker(proxy: Proxy) -> dict[int, http.client.HTTPConnection]:
    """An open keep-alive connection to each of the two workers, by pid."""
    found: dict[int, http.client.HTTPConnection] = {}

    def one_to_each() -> bool:
        conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
        reply = exchange(conn, "GET", "/health/ready")
        assert reply.status == 200, reply.body
        pid = reply.json()["worker"]["pid"]
        if pid in found:
            conn.close()
        else:
            found[pid] = conn
        return len(found) == 2

    wait_for(one_to_each, what="a connection to each worker")
    return found


def test_two_workers_share_one_port(fleet: StartFleet, fresh_mock: Mock) -> None:
    proxy = fleet(config(fresh_mock))
    # Fresh connections to the one port are answered by both workers.
    seen = workers_answering(proxy.port, 2)
    assert sorted(seen.values()) == [0, 1]
    assert set(seen) == set(children(proxy.process.pid))  # the parent's own children
    assert proxy.process.pid not in seen
    # /stats, /health/live and /health/ready name the worker that answered, too.
    for path in ("/stats", "/health/live", "/health/ready"):
        named: dict[int, int] = {}

        def both_named(path: str = path, named: dict[int, int] = named) -> bool:
            reply = http_call(proxy.port, "GET", path)
            assert reply.status == 200, reply.body
            worker = reply.json()["worker"]
            named[worker["pid"]] = worker["index"]
            return len(named) == 2

        wait_for(both_named, what=f"both workers answering {path}")
        assert named == seen, path
    for i in range(4):
        answered(proxy, f"request {i}")
    assert len(fresh_mock.requests()) == 4


def test_a_killed_worker_is_restarted_while_requests_go_on(
    fleet: StartFleet, fresh_mock: Mock
) -> None:
    proxy = fleet(config(fresh_mock))
    before = workers_answering(proxy.port, 2)
    victim = min(before)
    index = before[victim]
    os.kill(victim, signal.SIGKILL)
    served = 0

    def replaced() -> set[int]:
        # The other worker answers every request while the killed one is away.
        nonlocal served
        answered(proxy, f"while restarting {served}")
        served += 1
        now = set(children(proxy.process.pid))
        return now if len(now) == 2 and victim not in now else set()

    (new,) = wait_for(replaced, what="a new worker in place of the killed one") - set(before)
    assert gone(victim)
    # The new worker takes the killed one's index and serves the shared port.
    wait_for(
        lambda: workers_answering(proxy.port, 2).get(new) == index,
        what=f"the new worker {new} answering",
    )
    answered(proxy, "after the restart")
    log = proxy.process.log()
    assert f"worker {index} (pid {victim})" in log
    assert "restarting in 0.5s" in log
    assert f"worker {index} started (pid {new})" in log
    assert served == len([r for r in fresh_mock.requests() if "while restarting" in r["body"]])


def test_sigterm_drains_every_worker_before_the_parent_exits(
    fleet: StartFleet, fresh_mock: Mock
) -> None:
    proxy = fleet(config(fresh_mock))
    pids = workers_answering(proxy.port, 2)
    # Once the workers stop listening a new connection is refused, but an open
    # one is still served while they drain.
    open_to = connections_to_each_worker(proxy)
    # A stream that the upstream holds after two events keeps its worker draining.
    sock = raw_post(proxy.port, chat("drain me please", stream=True, mock={"gate_after": 2}))
    try:
        received = read_until(sock, events_arrived(2), "two streamed events")
        wait_for(lambda: fresh_mock.stats()["gated"] == 1, what="the stream held upstream")
        proxy.process.signal(signal.SIGTERM)

        def not_ready() -> dict[str, object] | None:
            for pid, conn in list(open_to.items()):
                try:
                    reply = exchange(conn, "GET", "/health/ready")
                except (OSError, http.client.HTTPException):
                    del open_to[pid]  # that worker had nothing in flight: it has closed
                    continue
                payload: dict[str, object] = reply.json()
                assert payload["worker"] == {"index": pids[pid], "pid": pid}
                if reply.status == 503:
                    return payload
                assert reply.status == 200, reply.body  # the stop has not begun there yet
            return None

        payload = wait_for(not_ready, what="/health/ready answering 503 while draining")
        assert payload is not None
        assert payload["status"] == "not ready"
        assert payload["reasons"] == ["draining"]
        assert proxy.process.proc.poll() is None  # the parent waits for its draining worker
        fresh_mock.release()
        received = read_until(sock, response_ended, "the end of the stream", received=received)
    finally:
        sock.close()
        for conn in open_to.values():
            conn.close()
    assert b"data: [DONE]" in received
    assert b"event: error" not in received
    # A fleet that drained in time exits 0 (a lone twistd would re-raise SIGTERM).
    assert proxy.process.proc.wait(timeout=30) == 0
    assert all(gone(pid) for pid in pids)
    log = proxy.process.log()
    assert "draining 1 in-flight requests" in log
    assert "all workers have exited" in log
    assert "Traceback" not in log


def requests_counted(conn: http.client.HTTPConnection, endpoint: str) -> float:
    """``llmproxy_requests_total`` with status 200 for ``endpoint``, from one /metrics scrape."""
    reply = exchange(conn, "GET", "/metrics")
    assert reply.status == 200, reply.body
    total = 0.0
    for family in text_string_to_metric_families(reply.body.decode()):
        for sample in family.samples:
            labels = sample.labels
            if sample.name == "llmproxy_requests_total" and labels.get("endpoint") == endpoint:
                total += sample.value if labels.get("status") == "200" else 0.0
    return total


def test_metrics_from_either_worker_count_the_requests_of_both(
    fleet: StartFleet, fresh_mock: Mock
) -> None:
    proxy = fleet(config(fresh_mock))
    by_worker: dict[int, int] = {}

    def both_answered() -> bool:
        reply = http_call(proxy.port, "GET", "/health")
        assert reply.status == 200, reply.body
        pid = reply.json()["worker"]["pid"]
        by_worker[pid] = by_worker.get(pid, 0) + 1
        return len(by_worker) == 2

    wait_for(both_answered, what="both workers answering /health")
    total = sum(by_worker.values())
    assert total > max(by_worker.values())  # one worker's own count is short of it
    # Each worker's /metrics reports the fleet's total.
    scraped = connections_to_each_worker(proxy)
    try:
        assert {pid: requests_counted(conn, "health") for pid, conn in scraped.items()} == {
            pid: total for pid in by_worker
        }
    finally:
        for conn in scraped.values():
            conn.close()
