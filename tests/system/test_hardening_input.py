"""
Malformed input against a real ``twistd -n llmproxy``: each of the four ways
to a 500 the fault run found gets a 4xx in OpenAI's error shape, and the log
holds no traceback.
"""

from __future__ import annotations

import http.client
import json

from llmproxy.testing.processes import Mock, upstream_block
from tests.system.harness import CORE_MODELS, UPSTREAM_KEY, StartProxy


def send(
    port: int, method: str, path: str, body: bytes = b"", headers: dict[str, bytes] | None = None
) -> tuple[int, dict[str, str], bytes]:
    """One request with raw header values and body; its status, headers and body."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.putrequest(method, path)
        for name, value in {"Content-Type": b"application/json", **(headers or {})}.items():
            conn.putheader(name, value)
        conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        answer = conn.getresponse()
        return answer.status, {k.lower(): v for k, v in answer.getheaders()}, answer.read()
    finally:
        conn.close()


def test_malformed_input_is_a_4xx_in_the_api_shape(start: StartProxy, mock: Mock) -> None:
    config = upstream_block([mock], api_key=UPSTREAM_KEY) + CORE_MODELS
    proxy = start(config.replace("backend: off", "backend: memory"), "malformed")
    chat = b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}'

    status, headers, _ = send(proxy.port, "GET", "/health", headers={"X-Request-Id": b"\xff\xfe"})
    assert status == 200
    assert headers["x-request-id"].isascii() and len(headers["x-request-id"]) == 32

    status, _, body = send(proxy.port, "POST", "/v1//chat/completions", chat)
    assert status == 404 and json.loads(body)["error"]["code"] == "not_found"

    deep = b'{"model": "gpt-4o-mini", "messages": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    status, _, body = send(proxy.port, "POST", "/v1/chat/completions", deep)
    assert status == 400 and json.loads(body)["error"]["type"] == "invalid_request_error"

    lone = chat.replace(b'"hi"', b'"\\ud800"')
    status, headers, body = send(proxy.port, "POST", "/v1/chat/completions", lone)
    assert status == 200, body  # forwarded as sent, and cached
    status, headers, _ = send(proxy.port, "POST", "/v1/chat/completions", lone)
    assert (status, headers["x-llmproxy-cache"]) == (200, "hit")

    log = proxy.process.log()
    assert "Traceback" not in log and "Unhandled" not in log
