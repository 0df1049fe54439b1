"""
No key fragment anywhere: partial echoes in upstream error bodies, keys in
logged query strings, and two different Authorization headers.
"""

from __future__ import annotations

import json

import treq
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers

from llmproxy.redact import Redactor
from llmproxy.site import safe_uri
from tests.harness import Harness, chat, config_text

UPSTREAM_KEY = "sk-upstream-a-secret-0123456789"
ALICE = "auth:\n  keys:\n    - {name: alice, key: sk-alice-000001}\n"


class FragmentTests(SynchronousTestCase):
    def test_runs_of_eight_or_more_characters_of_a_secret_are_masked(self) -> None:
        redact = Redactor((UPSTREAM_KEY, "sk-client-key-42"))
        quoted = b'{"error": {"message": "Incorrect API key provided: sk-upstre*****6789."}}'
        assert redact.fragments(quoted) == (
            b'{"error": {"message": "Incorrect API key provided: [REDACTED]*****6789."}}'
        )
        # The whole run goes, not just its first eight characters.
        assert redact.fragments(b"<sk-upstream-a-secre>") == b"<[REDACTED]>"
        assert redact.fragments(b"x 0123456789 y sk-clie") == b"x [REDACTED] y sk-clie"
        assert redact.fragments(b"seven: sk-upst") == b"seven: sk-upst"

    def test_an_upstream_401_quoting_part_of_its_key_reaches_no_client(self) -> None:
        h = Harness(config_text(upstreams={"a": UPSTREAM_KEY}))
        echo = {
            "status": 401,
            "body": {"error": {"message": f"Incorrect API key provided: {UPSTREAM_KEY[:12]}***"}},
        }
        answer = h.request("POST", "/v1/chat/completions", chat(mock=echo))
        assert answer.code == 401
        assert UPSTREAM_KEY[:8].encode() not in answer.body
        assert b"[REDACTED]" in answer.body


class QueryTests(SynchronousTestCase):
    def test_keys_are_dropped_from_logged_query_strings(self) -> None:
        secrets = ("sk-alice-000001",)
        assert safe_uri(b"/v1/models?key=sk-x&limit=2", secrets) == b"/v1/models?limit=2"
        assert safe_uri(b"/v1/models?API_KEY=a&api-key=b", secrets) == b"/v1/models"
        assert safe_uri(b"/v1/models?token=sk-alice-000001", secrets) == b"/v1/models"
        assert safe_uri(b"/v1/models?t=sk%2Dalice%2D000001", secrets) == b"/v1/models"
        assert safe_uri(b"/v1/models", secrets) == b"/v1/models"

    def test_the_combined_line_never_holds_a_key(self) -> None:
        h = Harness(
            config_text(extra="auth:\n  keys:\n    - {name: alice, key: sk-alice-000001}\n")
        )
        written: list[str] = []
        h.site._logFile = type("F", (), {"write": lambda self, line: written.append(line)})()
        h.request("GET", "/v1/models?key=sk-alice-000001&x=1")
        h.request("GET", "/v1/models?q=sk-alice-000001")
        assert written, "the combined line was written"
        assert all("sk-alice" not in line for line in written)
        assert '"GET /v1/models?x=1 HTTP/1.1"' in written[0]


class AuthorizationTests(SynchronousTestCase):
    def test_two_different_authorization_headers_are_a_400(self) -> None:
        h = Harness(
            config_text(extra="auth:\n  keys:\n    - {name: alice, key: sk-alice-000001}\n")
        )

        def send(*values: str) -> tuple[int, bytes]:
            headers = Headers({"authorization": list(values), "content-type": ["application/json"]})
            pending = h.client.request(
                "POST",
                "http://proxy.test/v1/chat/completions",
                data=json.dumps(chat()).encode(),
                headers=headers,
            )
            h.pump()
            response = h.result(pending)
            return response.code, h.result(treq.content(response))

        assert send("Bearer sk-alice-000001", "Bearer sk-alice-000001")[0] == 200
        code, body = send("Bearer sk-alice-000001", "Bearer sk-mallory-01")
        assert code == 400
        assert json.loads(body)["error"]["code"] == "ambiguous_authorization"
