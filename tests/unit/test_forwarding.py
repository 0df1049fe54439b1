"""The forwarding rules, seen from both ends (client and upstream)."""

from __future__ import annotations

import json

from twisted.trial.unittest import SynchronousTestCase

from llmproxy.redact import Redactor
from tests.harness import Harness, chat, config_text

TENANTS = """
auth:
  keys:
    - {name: team-a, key: key-a}
    - {name: team-b, key: key-b}
"""


class ForwardingRuleTests(SynchronousTestCase):
    def test_upstream_gets_the_target_model_key_and_body_byte_for_byte(self) -> None:
        h = Harness()
        raw = b'{"model": "m1",  "messages":[{"role":"user","content":"x"}], "temperature": 0.50,'
        raw += b' "cache": {"ttl": 10}}'
        answer = h.request(
            "POST",
            "/v1/chat/completions",
            raw=raw,
            headers={
                "Authorization": "Bearer client-key",
                "Cookie": "session=abc",
                "X-Secret-Internal": "1",
                "User-Agent": "tester/1",
                "x-request-id": "req-123",
            },
        )
        assert answer.code == 200
        seen = h.seen()[-1]
        assert seen["path"] == "/v1/chat/completions"
        assert seen["body"] == (
            '{"model": "upstream-m1",  "messages":[{"role":"user","content":"x"}],'
            ' "temperature": 0.50}'
        )
        assert seen["headers"]["authorization"] == "Bearer sk-upstream-a-secret"
        assert "cookie" not in seen["headers"]
        assert "x-secret-internal" not in seen["headers"]
        assert seen["headers"]["user-agent"] == "tester/1"
        assert seen["headers"]["x-request-id"] == "req-123"
        assert answer.header("x-request-id") == "req-123"
        assert answer.header("x-llmproxy-upstream") == "a"

    def test_public_name_is_sent_when_target_has_no_model(self) -> None:
        h = Harness()
        h.request("POST", "/chat/completions", dict(chat(), model="m2"))
        assert json.loads(h.seen()[-1]["body"])["model"] == "m2"

    def test_no_authorization_when_upstream_has_no_key(self) -> None:
        text = config_text().replace("    api_key: sk-upstream-a-secret\n", "\n")
        h = Harness(text)
        h.request("POST", "/v1/chat/completions", chat(), headers={"Authorization": "Bearer mine"})
        assert "authorization" not in h.seen()[-1]["headers"]

    def test_extra_static_headers_are_sent(self) -> None:
        text = config_text().replace(
            "    api_key: sk-upstream-a-secret",
            "    api_key: k\n    headers: {OpenAI-Organization: org-1}",
        )
        h = Harness(text)
        h.request("POST", "/v1/chat/completions", chat())
        assert h.seen()[-1]["headers"]["openai-organization"] == "org-1"

    def test_cookies_and_encoding_headers_never_reach_the_client(self) -> None:
        h = Harness()
        answer = h.request(
            "POST", "/v1/chat/completions", chat(mock={"set_cookie": "tenant=a", "gzip": True})
        )
        assert answer.code == 200
        assert answer.header("set-cookie") is None
        # The proxy's treq un-gzipped the body and the header stayed behind. (The
        # test client's own treq leaves an empty content-encoding when there was
        # none; a forwarded "gzip" over the plain body would fail to decode.)
        assert answer.header("content-encoding") in (None, "")
        assert answer.json()["object"] == "chat.completion"

    def test_cookies_are_not_kept_between_requests(self) -> None:
        h = Harness()
        h.request("POST", "/v1/chat/completions", chat(mock={"set_cookie": "tenant=a; Path=/"}))
        h.request("POST", "/v1/chat/completions", chat())
        assert "cookie" not in h.seen()[-1]["headers"]

    def test_redirects_are_not_followed(self) -> None:
        h = Harness()
        answer = h.request(
            "POST", "/v1/chat/completions", chat(mock={"redirect": "http://evil.test/"})
        )
        assert answer.code == 502
        assert len(h.seen()) == 1
        assert answer.json()["error"]["code"] == "bad_gateway"

    def test_upstream_4xx_passes_through_unchanged(self) -> None:
        h = Harness()
        body = {
            "error": {
                "message": "context too long",
                "type": "invalid_request_error",
                "param": "messages",
                "code": "context_length_exceeded",
            }
        }
        answer = h.request("POST", "/v1/chat/completions", chat(mock={"status": 400, "body": body}))
        assert answer.code == 400
        assert answer.json() == body
        assert len(h.seen()) == 1  # a 400 is not retried

    def test_embeddings_and_completions_are_forwarded(self) -> None:
        h = Harness()
        emb = h.request("POST", "/v1/embeddings", {"model": "m1", "input": ["a", "b"]})
        assert emb.code == 200 and len(emb.json()["data"]) == 2
        comp = h.request("POST", "/completions", {"model": "m1", "prompt": "say"})
        assert comp.json()["choices"][0]["text"] == "Hello from a! You said: say"
        assert [r["path"] for r in h.seen()] == ["/v1/embeddings", "/v1/completions"]

    def test_upstream_endpoints(self) -> None:
        from twisted.internet.endpoints import (
            HostnameEndpoint,
            TCP4ClientEndpoint,
            TCP6ClientEndpoint,
        )
        from twisted.internet.testing import MemoryReactorClock
        from twisted.web.client import URI

        from llmproxy.upstream.client import UpstreamEndpoints

        factory = UpstreamEndpoints(MemoryReactorClock(), 3)
        # IP literals over plain HTTP connect directly (a refusal is reported at once).
        assert isinstance(
            factory.endpointForURI(URI.fromBytes(b"http://127.0.0.1:8001/v1")), TCP4ClientEndpoint
        )
        assert isinstance(
            factory.endpointForURI(URI.fromBytes(b"http://[::1]:8001/v1")), TCP6ClientEndpoint
        )
        assert isinstance(
            factory.endpointForURI(URI.fromBytes(b"http://vllm.internal:8000/v1")), HostnameEndpoint
        )
        tls = factory.endpointForURI(URI.fromBytes(b"https://api.openai.com/v1"))
        assert not isinstance(tls, HostnameEndpoint | TCP4ClientEndpoint)  # wrapped in TLS

    def test_each_upstream_endpoint_is_made_once_and_connects_each_time(self) -> None:
        from twisted.internet.protocol import Factory, Protocol
        from twisted.internet.testing import MemoryReactorClock
        from twisted.web.client import URI

        from llmproxy.upstream.client import UpstreamEndpoints

        reactor = MemoryReactorClock()
        factory = UpstreamEndpoints(reactor, 3)
        chat = factory.endpointForURI(URI.fromBytes(b"http://127.0.0.1:8001/v1/chat/completions"))
        models = factory.endpointForURI(URI.fromBytes(b"http://127.0.0.1:8001/v1/models?x=1"))
        other = factory.endpointForURI(URI.fromBytes(b"http://127.0.0.1:8002/v1/models"))
        tls = factory.endpointForURI(URI.fromBytes(b"https://127.0.0.1:8001/v1/models"))
        assert chat is models and other is not chat and tls is not chat
        chat.connect(Factory.forProtocol(Protocol))
        models.connect(Factory.forProtocol(Protocol))
        assert [(host, port) for host, port, *_ in reactor.tcpClients] == [("127.0.0.1", 8001)] * 2


class SecretTests(SynchronousTestCase):
    def test_upstream_key_echoed_back_is_redacted(self) -> None:
        h = Harness()
        answer = h.request("POST", "/v1/chat/completions", chat(mock={"echo_auth": True}))
        assert answer.code == 400
        assert b"sk-upstream-a-secret" not in answer.body
        assert answer.json()["error"]["message"] == "bad key: Bearer [REDACTED]"

    def test_secrets_stay_out_of_reprs_and_are_redacted(self) -> None:
        text = config_text().replace(
            "    api_key: sk-upstream-a-secret",
            "    api_key: sk-upstream-a-secret\n    headers: {api-key: azure-secret-value}",
        )
        h = Harness(text)
        assert "sk-upstream-a-secret" not in repr(h.config)
        assert "azure-secret-value" not in repr(h.config)
        assert "azure-secret-value" in h.config.secrets()
        assert Redactor(h.config.secrets())(b"k=azure-secret-value") == b"k=[REDACTED]"


class ResponseObjectTests(SynchronousTestCase):
    def test_responses_objects_go_to_the_upstream_that_made_them(self) -> None:
        h = Harness(
            mocks=("a", "b"),
            text=config_text({"a": "ka", "b": "kb"})
            + ("  m3:\n    strategy: priority\n    targets:\n      - upstream: b\n"),
        )
        made = h.request("POST", "/v1/responses", {"model": "m3", "input": "remember me"})
        assert made.code == 200
        rid = made.json()["id"]
        for method, suffix in (
            ("GET", ""),
            ("GET", "/input_items"),
            ("POST", "/cancel"),
            ("DELETE", ""),
        ):
            answer = h.request(method, f"/v1/responses/{rid}{suffix}")
            assert answer.code == 200, (suffix, answer.body)
            assert answer.header("x-llmproxy-upstream") == "b"
        assert [r["path"] for r in h.seen("b")][1:] == [
            f"/v1/responses/{rid}",
            f"/v1/responses/{rid}/input_items",
            f"/v1/responses/{rid}/cancel",
            f"/v1/responses/{rid}",
        ]
        assert h.seen("a") == []
        follow = h.request(
            "POST", "/responses", {"model": "m3", "input": "again", "previous_response_id": rid}
        )
        assert follow.code == 404  # deleted upstream above: the upstream's own answer

    def test_unknown_response_id_with_several_upstreams_is_404(self) -> None:
        h = Harness(mocks=("a", "b"), text=config_text({"a": "ka", "b": "kb"}))
        answer = h.request("GET", "/v1/responses/resp_unknown")
        assert answer.code == 404
        assert answer.json()["error"]["code"] == "response_not_found"

    def test_object_ids_cannot_shape_the_upstream_url(self) -> None:
        h = Harness()
        for rid in ("x%3Fy=1", "..", "a%2F..%2Fb", "x%23frag"):
            answer = h.request("GET", f"/v1/responses/{rid}")
            assert answer.code == 404, rid
            assert answer.json()["error"]["code"] in ("response_not_found", "not_found")
        assert h.seen() == []

    def test_object_ids_belong_to_the_key_that_made_them(self) -> None:
        h = Harness(config_text() + TENANTS + "cache: {backend: off}\n")
        a = {"Authorization": "Bearer key-a"}
        b = {"Authorization": "Bearer key-b"}
        made = h.request("POST", "/v1/responses", {"model": "m1", "input": "private"}, headers=a)
        rid = made.json()["id"]
        assert h.request("GET", f"/v1/responses/{rid}", headers=a).code == 200
        for method, suffix in (
            ("GET", ""),
            ("GET", "/input_items"),
            ("POST", "/cancel"),
            ("DELETE", ""),
        ):
            answer = h.request(method, f"/v1/responses/{rid}{suffix}", headers=b)
            assert answer.code == 404 and answer.json()["error"]["code"] == "response_not_found"
        chained = h.request(
            "POST",
            "/v1/responses",
            {
                "model": "m1",
                "input": "steal",
                "previous_response_id": rid,
            },
            headers=b,
        )
        assert chained.code == 404 and chained.json()["error"]["param"] == "previous_response_id"
        # An id the proxy never handed out is not forwarded either.
        assert h.request("GET", "/v1/responses/resp_guess", headers=a).code == 404
        paths = [r["path"] for r in h.seen()]
        assert paths == ["/v1/responses", f"/v1/responses/{rid}"]

    def test_unusable_previous_object_ids_are_refused_without_a_lookup(self) -> None:
        h = Harness(config_text() + "auth:\n  keys:\n    - {name: t, key: k}\n")
        answer = h.request(
            "POST",
            "/v1/responses",
            {"model": "m1", "input": "x", "previous_response_id": "\ud800" * 3},
            headers={"Authorization": "Bearer k"},
        )
        assert answer.code == 404
        assert answer.json()["error"]["param"] == "previous_response_id"
        assert h.seen() == []


class LocalEndpointTests(SynchronousTestCase):
    def test_models_list_and_get(self) -> None:
        h = Harness()
        listed = h.request("GET", "/v1/models").json()
        assert listed["object"] == "list"
        assert [m["id"] for m in listed["data"]] == ["m1", "m2"]
        assert h.request("GET", "/models/m1").json()["id"] == "m1"
        missing = h.request("GET", "/v1/models/zzz")
        assert missing.code == 404 and missing.json()["error"]["code"] == "model_not_found"
        assert h.seen() == []  # answered from config

    def test_health_reports_targets(self) -> None:
        h = Harness()
        answer = h.request("GET", "/health")
        assert answer.code == 200
        assert answer.json()["status"] == "ok"
        assert set(answer.json()["targets"]) == {"a/upstream-m1", "a/m2"}

    def test_stats_and_metrics_count_requests(self) -> None:
        h = Harness()
        h.request("POST", "/v1/chat/completions", chat())
        stats = h.request("GET", "/stats").json()
        assert stats["requests"]["by_status"]["200"] == 1
        assert stats["upstream_attempts"] == {"a:ok": 1}
        metrics = h.request("GET", "/metrics")
        assert (metrics.header("content-type") or "").startswith("text/plain")
        assert (
            b'llmproxy_requests_total{endpoint="chat/completions",key="anonymous",model="m1",'
            b'status="200"} 1.0' in metrics.body
        )
        assert b'llmproxy_target_available{target="a/upstream-m1"} 1.0' in metrics.body
        assert b'llmproxy_cache_events{name="stores"} 1.0' in metrics.body
        assert b"llmproxy_upstream_ttfb_seconds_count" in metrics.body
