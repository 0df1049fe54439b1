"""
The access log, the ``x-llmproxy-*`` timing headers and the latency
histograms as operators read them from a real proxy: one whole line per
request (JSON or logfmt text) written once its last byte is out, 499 for a
client that left, whole lines from two workers sharing the file, a new file
after logrotate's rename and SIGUSR1.
"""

from __future__ import annotations

import http.client
import json
import shlex
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from llmproxy.testing.processes import (
    Mock,
    Proxy,
    http_call,
    upstream_block,
    wait_for,
    workers_answering,
)
from tests.system.harness import UPSTREAM_KEY, StartProxy, events_arrived, raw_post, read_until

#: The record's fields, in order, as the README documents them.
DOCUMENTED = [
    "time",
    "request_id",
    "client",
    "key",
    "method",
    "path",
    "endpoint",
    "model",
    "upstream",
    "upstream_model",
    "attempts",
    "status",
    "error_code",
    "cache",
    "coalesced",
    "stream",
    "ttfb_ms",
    "duration_ms",
    "upstream_ttfb_ms",
    "overhead_ms",
    "input_tokens",
    "cached_input_tokens",
    "output_tokens",
    "reasoning_tokens",
    "tokens_estimated",
    "cost_usd",
    "saved_usd",
    "bytes_in",
    "bytes_out",
]


def config(
    mock: Mock, log: Path, format: str = "json", key_name: str = "team-a", flush: float | None = 0
) -> str:
    """
    Model m renamed upstream (mock-model), model plain as it is; one client
    key.  The log writes each record at once (``flush: 0``), so the tests read
    it without waiting for a timer; ``flush=None`` keeps the default (a second).
    """
    every = "" if flush is None else f", flush: {flush}"
    return upstream_block([mock], api_key=UPSTREAM_KEY) + (
        "models:\n"
        "  m: {targets: [{upstream: main, model: mock-model}]}\n"
        "  plain: {targets: [{upstream: main}]}\n"
        f"auth: {{keys: [{{name: {json.dumps(key_name)}, key: key-a}}]}}\n"
        "cache: {backend: off}\n"
        f"access_log: {{path: '{log}', format: {format}{every}}}\n"
    )


@pytest.fixture(scope="module")
def logged(tmp_path_factory: pytest.TempPathFactory, mock: Mock) -> Iterator[Proxy]:
    """A proxy writing its JSON access log to ``access.log`` next to its config."""
    workdir = tmp_path_factory.mktemp("access-log")
    proxy = Proxy(workdir, config(mock, workdir / "access.log"), name="logged")
    yield proxy
    proxy.stop()


def log_of(proxy: Proxy) -> Path:
    return proxy.config_path.parent / "access.log"


KEY = {"Authorization": "Bearer key-a"}


def headers(request_id: str, key: str = "key-a") -> dict[str, str]:
    return {"Authorization": f"Bearer {key}", "X-Request-Id": request_id}


def chat(model: str, text: str, **extra: object) -> dict[str, object]:
    return {"model": model, "messages": [{"role": "user", "content": text}], **extra}


def records(path: Path) -> dict[str, dict[str, Any]]:
    """Every record of a JSON log by request id; each line whole, with the documented fields."""
    found: dict[str, dict[str, Any]] = {}
    if not path.exists():
        return found
    for line in path.read_text().splitlines():
        record = json.loads(line)
        assert list(record) == DOCUMENTED, line
        assert record["request_id"] not in found, f"logged twice: {line}"
        found[record["request_id"]] = record
    return found


def logged_records(path: Path, *request_ids: str) -> dict[str, dict[str, Any]]:
    """The records of ``request_ids``, once all of them are in the file."""

    def all_there() -> dict[str, dict[str, Any]]:
        found = records(path)
        return found if all(r in found for r in request_ids) else {}

    return wait_for(all_there, what=f"all {len(request_ids)} records in {path}")


def test_each_request_is_one_json_line_with_the_documented_fields(
    logged: Proxy, fresh_mock: Mock
) -> None:
    before = time.time()
    sent = chat("m", "hello log")
    plain = http_call(logged.port, "POST", "/v1/chat/completions", sent, headers("rec-plain"))
    assert plain.status == 200, plain.body
    streamed = http_call(
        logged.port,
        "POST",
        "/v1/chat/completions",
        chat("m", "stream log", stream=True, stream_options={"include_usage": True}),
        headers("rec-stream"),
    )
    assert streamed.status == 200, streamed.body
    missing = http_call(
        logged.port, "POST", "/v1/chat/completions", chat("gpt-9", "x"), headers("rec-missing")
    )
    assert missing.status == 404, missing.body
    after = time.time()
    found = logged_records(log_of(logged), "rec-plain", "rec-stream", "rec-missing")

    record = found["rec-plain"]
    usage = plain.json()["usage"]
    assert {name: record[name] for name in DOCUMENTED if not name.endswith("_ms")} == {
        "time": record["time"],
        "request_id": "rec-plain",
        "client": "127.0.0.1",
        "key": "team-a",
        "method": "POST",
        "path": "/v1/chat/completions",
        "endpoint": "chat/completions",
        "model": "m",
        "upstream": "main",
        "upstream_model": "mock-model",
        "attempts": 1,
        "status": 200,
        "error_code": None,
        "cache": "off",
        "coalesced": False,
        "stream": False,
        "input_tokens": usage["prompt_tokens"],
        "cached_input_tokens": 0,
        "output_tokens": usage["completion_tokens"],
        "reasoning_tokens": 0,
        "tokens_estimated": False,
        "cost_usd": None,
        "saved_usd": None,
        "bytes_in": len(json.dumps(sent).encode()),
        "bytes_out": len(plain.body),
    }
    # The request arrived between the test's two clock readings (the time is cut to ms).
    arrived = datetime.fromisoformat(record["time"]).timestamp()
    assert before - 0.001 <= arrived <= after
    assert record["time"].endswith("+00:00")
    # Upstream headers, then the client's first byte, then its last; the proxy's own
    # time is part of the time to the first byte.
    assert 0 <= record["upstream_ttfb_ms"] <= record["ttfb_ms"] <= record["duration_ms"]
    assert 0 <= record["overhead_ms"] <= record["ttfb_ms"]

    record = found["rec-stream"]
    (usage,) = [
        json.loads(line[len(b"data: ") :])["usage"]
        for line in streamed.body.split(b"\n")
        if line.startswith(b"data: {") and b'"usage":{' in line
    ]
    assert record["stream"] is True
    assert (record["status"], record["upstream_model"], record["error_code"]) == (
        200,
        "mock-model",
        None,
    )
    assert (record["input_tokens"], record["output_tokens"]) == (
        usage["prompt_tokens"],
        usage["completion_tokens"],
    )
    assert record["bytes_out"] == len(streamed.body)

    record = found["rec-missing"]
    assert (record["status"], record["error_code"]) == (404, "model_not_found")
    assert (record["upstream"], record["upstream_model"], record["attempts"]) == (None, None, 0)
    assert record["bytes_out"] == len(missing.body)


def test_a_stream_is_logged_after_its_last_byte(logged: Proxy, fresh_mock: Mock) -> None:
    path = log_of(logged)
    conn = http.client.HTTPConnection("127.0.0.1", logged.port, timeout=15)
    body = chat("m", "hold the end", stream=True, mock={"gate_after": 2})
    started = time.monotonic()
    conn.request("POST", "/v1/chat/completions", json.dumps(body), headers("rec-held"))
    try:
        response = conn.getresponse()
        first_byte = time.monotonic()  # the proxy's first byte came before this
        assert response.status == 200
        early = b""
        while early.count(b"\n\n") < 2:
            early += response.readline()
        wait_for(lambda: fresh_mock.stats()["gated"] == 1, what="the stream held upstream")
        # A later request is logged (the log is flushed) while the stream is not over.
        marker = http_call(logged.port, "GET", "/health", headers=headers("rec-marker"))
        assert marker.status == 200
        assert "rec-held" not in logged_records(path, "rec-marker")
        released = time.monotonic()  # the proxy's last byte comes after this
        fresh_mock.release()
        rest = response.read()
    finally:
        conn.close()
    assert rest.endswith(b"data: [DONE]\n\n")
    record = logged_records(path, "rec-held")["rec-held"]
    assert record["stream"] is True and record["status"] == 200
    assert record["duration_ms"] >= (released - first_byte) * 1000
    assert record["ttfb_ms"] <= (first_byte - started) * 1000
    assert record["bytes_out"] == len(early + rest)


def test_a_client_that_leaves_is_logged_as_499_client_closed(
    logged: Proxy, fresh_mock: Mock
) -> None:
    body = chat("m", "left early", stream=True, mock={"gate_after": 2})
    sock = raw_post(logged.port, body, headers=headers("rec-gone"))
    try:
        read_until(sock, events_arrived(2), "two streamed events")
    finally:
        sock.close()
    wait_for(lambda: fresh_mock.stats()["disconnects"] == 1, what="the upstream disconnect")
    record = logged_records(log_of(logged), "rec-gone")["rec-gone"]
    assert (record["status"], record["error_code"]) == (499, "client_closed")
    assert (record["model"], record["upstream"], record["stream"]) == ("m", "main", True)
    assert record["bytes_out"] > 0


def test_a_proxied_answer_names_its_upstream_model_and_the_proxys_overhead(
    logged: Proxy, fresh_mock: Mock
) -> None:
    cases = [
        ("rec-renamed", chat("m", "renamed"), "mock-model"),
        ("rec-as-is", chat("plain", "as is"), "plain"),
        ("rec-streamed", chat("m", "streamed", stream=True), "mock-model"),
    ]
    overheads = {}
    for request_id, body, upstream_model in cases:
        reply = http_call(logged.port, "POST", "/v1/chat/completions", body, headers(request_id))
        assert reply.status == 200, reply.body
        assert reply.headers["x-llmproxy-model"] == upstream_model
        assert json.loads(fresh_mock.requests()[-1]["body"])["model"] == upstream_model
        overheads[request_id] = float(reply.headers["x-llmproxy-overhead-ms"])
        assert overheads[request_id] >= 0
    # The header and the access log tell the same overhead (the header has 0.1 ms).
    found = logged_records(log_of(logged), *overheads)
    for request_id, overhead in overheads.items():
        assert abs(found[request_id]["overhead_ms"] - overhead) <= 0.05 + 1e-9, request_id
    # The proxy's own answers are no proxied answers.
    health = http_call(logged.port, "GET", "/health")
    assert "x-llmproxy-model" not in health.headers
    assert "x-llmproxy-overhead-ms" not in health.headers


HISTOGRAMS = (
    "llmproxy_request_duration_seconds",
    "llmproxy_client_ttfb_seconds",
    "llmproxy_overhead_seconds",
)


def histogram_counts(proxy: Proxy) -> dict[tuple[str, str, str], float]:
    """Each latency histogram's observation count by (histogram, endpoint, model)."""
    reply = http_call(proxy.port, "GET", "/metrics")
    assert reply.status == 200, reply.body
    found: dict[tuple[str, str, str], float] = {}
    for family in text_string_to_metric_families(reply.body.decode()):
        for sample in family.samples:
            if family.name in HISTOGRAMS and sample.name.endswith("_count"):
                key = (family.name, sample.labels["endpoint"], sample.labels.get("model", "-"))
                found[key] = sample.value
    return found


def test_metrics_have_the_latency_histograms(logged: Proxy, fresh_mock: Mock) -> None:
    before = histogram_counts(logged)
    for model, text in [("m", "one"), ("m", "two"), ("plain", "three")]:
        reply = http_call(logged.port, "POST", "/v1/chat/completions", chat(model, text), KEY)
        assert reply.status == 200, reply.body
    after = histogram_counts(logged)
    grown = {key: count - before.get(key, 0) for key, count in after.items()}
    for histogram in HISTOGRAMS[:2]:
        assert grown[(histogram, "chat/completions", "m")] == 2
        assert grown[(histogram, "chat/completions", "plain")] == 1
    assert grown[("llmproxy_overhead_seconds", "chat/completions", "-")] == 3


def test_the_text_format_is_one_logfmt_line_per_request(
    start: StartProxy, tmp_path: Path, fresh_mock: Mock
) -> None:
    path = tmp_path / "access.txt"
    # A key name that logfmt must quote and escape.
    proxy = start(config(fresh_mock, path, "text", key_name='team "a" = one'))
    body = chat("m", "text log")
    reply = http_call(proxy.port, "POST", "/v1/chat/completions", body, headers("rec-text"))
    assert reply.status == 200, reply.body

    def text_line() -> str | None:
        lines = path.read_text().splitlines() if path.exists() else []
        return next((line for line in lines if "request_id=rec-text " in line), None)

    line = wait_for(text_line, what="the text record")
    pairs = [token.partition("=") for token in shlex.split(line)]
    assert [name for name, _, _ in pairs] == DOCUMENTED
    values = {name: value for name, _, value in pairs}
    assert {name: values[name] for name in DOCUMENTED[1:13]} == {
        "request_id": "rec-text",
        "client": "127.0.0.1",
        "key": 'team "a" = one',
        "method": "POST",
        "path": "/v1/chat/completions",
        "endpoint": "chat/completions",
        "model": "m",
        "upstream": "main",
        "upstream_model": "mock-model",
        "attempts": "1",
        "status": "200",
        "error_code": "-",
    }
    assert (values["cache"], values["coalesced"], values["stream"]) == ("off", "false", "false")
    assert values["bytes_in"] == str(len(json.dumps(body).encode()))
    assert float(values["duration_ms"]) >= float(values["ttfb_ms"]) >= 0


def start_fleet(workdir: Path, mock: Mock, flush: float | None = 0) -> tuple[Proxy, Path]:
    path = workdir / "access.log"
    return Proxy(workdir, config(mock, path, flush=flush), name="fleet", workers=2), path


def health_by(proxy: Proxy, request_id: str) -> int:
    """GET /health on a fresh connection; the pid of the worker that answered."""
    reply = http_call(proxy.port, "GET", "/health", headers={"X-Request-Id": request_id})
    assert reply.status == 200, reply.body
    pid: int = reply.json()["worker"]["pid"]
    return pid


def test_two_workers_write_whole_lines_to_one_file(tmp_path: Path, fresh_mock: Mock) -> None:
    # The default flush: each write holds a second's worth of lines.
    proxy, path = start_fleet(tmp_path, fresh_mock, flush=None)
    try:
        # Long request ids make long lines; many at once keep both workers writing.
        padding = "x" * 100

        def one(i: int) -> tuple[str, int | None]:
            request_id = f"bulk-{i:03d}-{padding}"
            if i % 2:
                return request_id, health_by(proxy, request_id)
            body = chat("m", f"bulk {i}")
            reply = http_call(proxy.port, "POST", "/v1/chat/completions", body, headers(request_id))
            assert reply.status == 200, reply.body
            return request_id, None

        with ThreadPoolExecutor(8) as pool:
            answered = dict(pool.map(one, range(200)))
        extra = 0
        while len({pid for pid in answered.values() if pid is not None}) < 2:
            answered[f"more-{extra}"] = health_by(proxy, f"more-{extra}")
            extra += 1
        # Every line is whole JSON, each request's record is there, once.
        logged_records(path, *answered)
    finally:
        proxy.stop()


def test_sigusr1_after_a_rename_makes_a_new_file(tmp_path: Path, fresh_mock: Mock) -> None:
    proxy, path = start_fleet(tmp_path, fresh_mock)
    try:
        workers_answering(proxy.port, 2)
        health_by(proxy, "rec-before")
        logged_records(path, "rec-before")
        moved = path.with_name("access.log.1")
        path.rename(moved)
        proxy.process.signal(signal.SIGUSR1)  # the parent passes it on to its workers
        wait_for(path.exists, what="a new file at the log's path")
        # Each worker writes to the new file once it has reopened it.
        answered: dict[str, int] = {}

        def both_write_the_new_file() -> bool:
            request_id = f"rec-after-{len(answered)}"
            answered[request_id] = health_by(proxy, request_id)
            in_new = records(path)
            return len({pid for r, pid in answered.items() if r in in_new}) == 2

        wait_for(both_write_the_new_file, what="both workers writing the new file")
        assert "rec-before" in records(moved)
        assert "rec-before" not in records(path)
    finally:
        proxy.stop()
