"""
No key fragment anywhere, against a real proxy: not in a passed-through
upstream error that quotes part of the upstream key, not in the logs when a
client key travels in the query string, and two different Authorization
headers are refused rather than one of them silently used.
"""

from __future__ import annotations

import http.client
import json

from llmproxy.testing.processes import Mock, http_call, upstream_block, wait_for
from tests.system.harness import UPSTREAM_KEY, StartProxy

CLIENT_KEY = "sk-client-alice-000001"
CONFIG = (
    "models:\n  m: {targets: [{upstream: main}]}\n"
    f"auth:\n  keys:\n    - {{name: alice, key: {CLIENT_KEY}}}\n"
    'cache: {backend: "off"}\naccess_log: {path: "-"}\n'
)


def fragments(secret: str) -> list[bytes]:
    """Every run of 8 characters of ``secret``."""
    return [secret[i : i + 8].encode() for i in range(len(secret) - 7)]


def test_no_key_fragment_reaches_a_client_or_a_log(start: StartProxy, fresh_mock: Mock) -> None:
    proxy = start(upstream_block([fresh_mock], api_key=UPSTREAM_KEY) + CONFIG, "secrets")
    auth = {"Authorization": f"Bearer {CLIENT_KEY}"}
    quoted = f"Incorrect API key provided: {UPSTREAM_KEY[:12]}****{UPSTREAM_KEY[-4:]}"
    echo = {"status": 401, "body": {"error": {"message": quoted, "type": "invalid_request_error"}}}
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "mock": echo}
    refused = http_call(proxy.port, "POST", "/v1/chat/completions", body, auth)
    assert refused.status == 401
    assert not [f for f in fragments(UPSTREAM_KEY) if f in refused.body]
    assert b"[REDACTED]" in refused.body

    # A key in the query string (some SDKs send ?key=) is in no log line.
    models = http_call(proxy.port, "GET", f"/v1/models?key={CLIENT_KEY}&limit=5", None, auth)
    assert models.status == 200

    # Two different Authorization headers: refused, not the first one taken.
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
    conn.putrequest("POST", "/v1/chat/completions")
    conn.putheader("Authorization", f"Bearer {CLIENT_KEY}")
    conn.putheader("Authorization", "Bearer sk-someone-else-01")
    data = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode()
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Content-Length", str(len(data)))
    conn.endheaders(data)
    answer = conn.getresponse()
    assert answer.status == 400
    assert json.loads(answer.read())["error"]["code"] == "ambiguous_authorization"
    conn.close()

    wait_for(lambda: "/v1/models" in proxy.process.log(), what="the access log's flush")
    proxy.stop()
    log = proxy.process.log().encode()
    assert b'"path":"/v1/models"' in log
    # (The log's own words, like "upstream", are not fragments of a real key.)
    leaked = [
        f for f in fragments(CLIENT_KEY) + fragments(UPSTREAM_KEY) if f in log and not f.isalpha()
    ]
    assert not leaked, leaked
