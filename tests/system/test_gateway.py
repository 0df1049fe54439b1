"""
The core gateway as users run it: a real ``twistd -n llmproxy`` in front of a
real mock upstream process, driven by the official ``openai`` SDK and raw HTTP.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
from pathlib import Path

import openai
import pytest

from llmproxy.testing.processes import BIN, Mock, Proxy, port_open, upstream_block, wait_for
from tests.system.harness import (
    CORE_MODELS,
    UPSTREAM_KEY,
    StartProxy,
    events_arrived,
    raw_post,
    read_to_close,
    read_until,
    response_ended,
)


def client(proxy: Proxy) -> openai.OpenAI:
    return openai.OpenAI(base_url=proxy.base_url, api_key="client-key", max_retries=0)


def aclient(proxy: Proxy) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=proxy.base_url, api_key="client-key", max_retries=0)


def test_basic_completion(proxy: Proxy, fresh_mock: Mock) -> None:
    answer = client(proxy).chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hello there"}]
    )
    assert answer.choices[0].message.content == "Hello from main! You said: hello there"
    assert answer.model == "mock-model"
    seen = fresh_mock.requests()
    assert len(seen) == 1
    assert json.loads(seen[0]["body"])["model"] == "mock-model"
    assert seen[0]["headers"]["authorization"] == f"Bearer {UPSTREAM_KEY}"


def test_streaming_completion(proxy: Proxy, fresh_mock: Mock) -> None:
    stream = client(proxy).chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "stream me"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Hello from main! You said: stream me"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.total_tokens == chunks[-1].usage.prompt_tokens + 7


def test_async_completion_and_embeddings(proxy: Proxy, fresh_mock: Mock) -> None:
    async def run() -> tuple[str | None, int]:
        c = aclient(proxy)
        chat = await c.chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "async"}]
        )
        emb = await c.embeddings.create(model="text-embedding-3-small", input=["a", "b", "c"])
        return chat.choices[0].message.content, len(emb.data)

    content, count = asyncio.run(run())
    assert content == "Hello from main! You said: async" and count == 3


def test_raw_http_stream_arrives_event_by_event(proxy: Proxy, fresh_mock: Mock) -> None:
    # The upstream sends the role chunk and one delta, then stalls forever: if the
    # proxy waited for the stream to end, nothing would arrive.
    sock = raw_post(
        proxy.port,
        {
            "model": "gpt-4o-mini",
            "stream": True,
            "messages": [{"role": "user", "content": "x"}],
            "mock": {"stall_after_headers": True, "stall_after": 2},
        },
    )
    received = read_until(sock, events_arrived(2), "two streamed events")
    head, _, body = received.partition(b"\r\n\r\n")
    lines = head.decode().lower().split("\r\n")
    assert lines[0] == "http/1.1 200 ok"
    assert "content-type: text/event-stream; charset=utf-8" in lines
    assert "cache-control: no-cache" in lines
    assert "x-accel-buffering: no" in lines
    assert "transfer-encoding: chunked" in lines
    assert b'"delta":{"role":"assistant","content":""}' in body
    assert b'"delta":{"content":"Hello"}' in body
    # The client hangs up: the proxy closes the upstream connection.
    sock.close()
    wait_for(lambda: fresh_mock.stats()["disconnects"] == 1, what="upstream disconnect")
    assert fresh_mock.stats()["active_streams"] == 0


def test_stream_cut_by_upstream_is_visible(proxy: Proxy, fresh_mock: Mock) -> None:
    stream = client(proxy).chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "a b c d"}],
        stream=True,
        extra_body={"mock": {"cut_after": 3}},
    )
    received = []
    with pytest.raises(openai.APIError) as info:
        for chunk in stream:
            received.append(chunk)
    assert len(received) == 3
    assert "closed the stream early" in info.value.message


def test_backpressure_pauses_the_upstream(proxy: Proxy, fresh_mock: Mock) -> None:
    before = proxy.rss_kib()
    sock = raw_post(
        proxy.port,
        {
            "model": "gpt-4o-mini",
            "stream": True,
            "messages": [],
            "mock": {"infinite": True, "chunk_bytes": 65536},
        },
    )
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    # We read nothing: the proxy must stop reading the upstream, so the mock's
    # socket backs up and it is paused as a producer.
    wait_for(lambda: fresh_mock.stats()["pauses"] >= 1, timeout=30, what="upstream paused")
    produced = fresh_mock.stats()["bytes_streamed"]
    grown_mib = (proxy.rss_kib() - before) / 1024
    assert grown_mib < 64, f"proxy grew {grown_mib:.0f} MiB while the client was not reading"
    # Reading again resumes the upstream.
    sock.settimeout(5)
    for _ in range(200):
        sock.recv(1 << 20)
    wait_for(lambda: fresh_mock.stats()["bytes_streamed"] > produced, what="upstream resumed")
    sock.close()
    wait_for(lambda: fresh_mock.stats()["disconnects"] == 1, what="upstream disconnect")


def test_invalid_model_error(proxy: Proxy, fresh_mock: Mock) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client(proxy).chat.completions.create(model="gpt-9", messages=[])
    assert info.value.status_code == 404
    assert info.value.code == "model_not_found"
    assert fresh_mock.requests() == []


def test_fifty_concurrent_requests(proxy: Proxy, fresh_mock: Mock) -> None:
    async def run() -> list[str | None]:
        c = aclient(proxy)
        answers = await asyncio.gather(
            *[
                c.chat.completions.create(
                    model="gpt-4o-mini", messages=[{"role": "user", "content": f"request {i}"}]
                )
                for i in range(50)
            ]
        )
        return [a.choices[0].message.content for a in answers]

    contents = asyncio.run(run())
    assert contents == [f"Hello from main! You said: request {i}" for i in range(50)]
    assert len(fresh_mock.requests()) == 50


def test_health(proxy: Proxy) -> None:
    import urllib.request

    with urllib.request.urlopen(proxy.url + "/health", timeout=5) as response:
        assert response.status == 200
        payload = json.loads(response.read())
    assert payload["status"] == "ok"
    assert payload["targets"]["main/mock-model"]["state"] == "healthy"


def test_responses_basic(proxy: Proxy, fresh_mock: Mock) -> None:
    c = client(proxy)
    response = c.responses.create(model="gpt-4o", input="tell me")
    assert response.output_text == "Hello from main! You said: tell me"
    assert c.responses.retrieve(response.id).id == response.id
    follow = c.responses.create(model="gpt-4o", input="more", previous_response_id=response.id)
    assert follow.previous_response_id == response.id
    items = c.responses.input_items.list(response.id)
    assert json.loads(items.to_json())["data"][0]["content"][0]["text"] == "tell me"
    c.responses.delete(response.id)
    paths = [r["path"] for r in fresh_mock.requests()]
    assert paths == [
        "/v1/responses",
        f"/v1/responses/{response.id}",
        "/v1/responses",
        f"/v1/responses/{response.id}/input_items",
        f"/v1/responses/{response.id}",
    ]


def test_responses_async(proxy: Proxy, fresh_mock: Mock) -> None:
    async def run() -> str:
        response = await aclient(proxy).responses.create(model="gpt-4o", input="async resp")
        return response.output_text

    assert asyncio.run(run()) == "Hello from main! You said: async resp"


def test_responses_streaming(proxy: Proxy, fresh_mock: Mock) -> None:
    with client(proxy).responses.stream(model="gpt-4o", input="stream resp") as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_response()
    assert final.output_text == "Hello from main! You said: stream resp"
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert kinds.count("response.output_text.delta") == 7  # one per word


def test_bad_config_exits_nonzero_with_path_named_message(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "upstreams:\n  a: {base_url: 'http://x/v1'}\nmodels:\n  m: {targets: [{upstream: azure}]}\n"
    )
    done = subprocess.run(
        [str(BIN / "twistd"), "--pidfile=", "-n", "llmproxy", "--config", str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    output = done.stdout + done.stderr
    assert done.returncode != 0
    assert "models.m.targets[0].upstream: no upstream named 'azure'" in output
    assert "Traceback" not in output


def test_llmproxy_help_documents_options() -> None:
    done = subprocess.run(
        [str(BIN / "twistd"), "-n", "llmproxy", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0
    assert "--config" in done.stdout and "--listen" in done.stdout


def test_graceful_shutdown_drains_in_flight_streams(start: StartProxy, mock: Mock) -> None:
    proxy = start(upstream_block([mock], api_key=UPSTREAM_KEY) + CORE_MODELS, "draining")
    sock = raw_post(
        proxy.port,
        {
            "model": "gpt-4o-mini",
            "stream": True,
            "messages": [{"role": "user", "content": "drain me please"}],
            # The mock holds the stream after its first event until released.
            "mock": {"gate_after": 1},
        },
    )
    received = read_until(sock, events_arrived(1), "the stream to start")
    proxy.process.signal(signal.SIGTERM)
    # The listening port closes at once; the stream in flight still finishes.
    wait_for(lambda: not port_open(proxy.port), what="the port to close")
    wait_for(lambda: "draining 1 in-flight requests" in proxy.process.log(), what="the drain")
    assert proxy.process.proc.poll() is None
    mock.release()
    received = read_until(sock, response_ended, "the end of the stream", received=received)
    assert b"data: [DONE]" in received
    assert b"event: error" not in received
    # A drain that ended in time is a clean stop: status 0 (not twistd's re-raised SIGTERM).
    assert proxy.process.proc.wait(timeout=30) == 0
    assert "draining 1 in-flight requests" in proxy.process.log()
    assert "Traceback" not in proxy.process.log()


def test_a_stream_the_drain_cuts_ends_with_an_error_event(start: StartProxy, mock: Mock) -> None:
    config = upstream_block([mock], api_key=UPSTREAM_KEY) + CORE_MODELS
    proxy = start(config + "server:\n  drain_seconds: 0.2\n", "cut-by-drain")
    sock = raw_post(
        proxy.port,
        {
            "model": "gpt-4o-mini",
            "stream": True,
            "messages": [{"role": "user", "content": "never ends"}],
            # Held after its first event, never released: no event races the cut.
            "mock": {"gate_after": 1},
        },
    )
    received = read_until(sock, events_arrived(1), "the stream to start")
    proxy.process.signal(signal.SIGTERM)
    received += read_to_close(sock)
    # The last event is the error, whole, and then the connection closes.
    last = received.rstrip(b"\r\n").rsplit(b"\r\n", 1)[-1]
    assert last.startswith(b"event: error\ndata: ") and b'"code": "shutting_down"' in last
    assert b"data: [DONE]" not in received
    # It did not drain in time: twistd ends by the signal, as without --workers it always did.
    assert proxy.process.proc.wait(timeout=30) == -signal.SIGTERM
    assert "drain timed out with 1 requests in flight" in proxy.process.log()
    assert "Traceback" not in proxy.process.log()


def test_a_port_in_use_stops_twistd_with_a_clear_message(proxy: Proxy) -> None:
    done = subprocess.run(
        [
            str(BIN / "twistd"),
            "--pidfile=",
            "-n",
            "llmproxy",
            "--listen",
            f"tcp:{proxy.port}:interface=127.0.0.1",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    output = done.stdout + done.stderr
    assert done.returncode != 0
    assert f"llmproxy: cannot listen on tcp:{proxy.port}:interface=127.0.0.1" in output
    assert "Traceback" not in output
