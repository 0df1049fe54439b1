"""
The operator's side, in memory: live reload, the probes, the request record,
the overhead and model headers, and the histograms.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import treq
from twisted.trial.unittest import SynchronousTestCase

from llmproxy.accesslog import FIELDS
from llmproxy.config import parse_yaml
from llmproxy.reload import ReloadRefused, diff, needs_restart, read_again
from tests.harness import Harness, chat, config_text, events, hang_up

KEYS = """
auth:
  keys:
    - {name: alice, key: sk-alice-0001}
    - {name: bob, key: sk-bob-0002}
"""


class Records:
    """An access log that keeps its records (the real writer is tested in test_accesslog)."""

    def __init__(self) -> None:
        self.records: list[dict[str, object]] = []

    def write(self, record: dict[str, object]) -> None:
        self.records.append(record)


def logged(h: Harness) -> Records:
    records = Records()
    h.gateway.requests.access_log = records
    return records


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


class ReloadTests(SynchronousTestCase):
    def test_a_new_config_serves_the_next_request(self) -> None:
        h = Harness(config_text(extra=KEYS))
        alice = bearer("sk-alice-0001")
        assert h.request("POST", "/v1/chat/completions", chat(), alice).code == 200
        text = config_text(extra=KEYS).replace("  m2:\n", "  m3:\n")
        text = text.replace("    - {name: alice, key: sk-alice-0001}\n", "")
        changes = h.gateway.apply(parse_yaml(text, "test", {}))
        assert changes.as_json() == {
            "reloaded": True,
            "added": ["m3"],
            "removed": ["m2"],
            "changed": [],
        }
        assert h.request("POST", "/v1/chat/completions", chat(), alice).code == 401
        bob = bearer("sk-bob-0002")
        models = h.request("GET", "/v1/models", headers=bob).json()
        assert [m["id"] for m in models["data"]] == ["m1", "m3"]
        gone = h.request("POST", "/v1/chat/completions", chat(model="m2"), bob)
        assert gone.code == 404

    def test_a_stream_open_across_a_reload_finishes_on_the_old_upstream(self) -> None:
        h = Harness(config_text(upstreams={"a": "ka", "b": "kb"}), mocks=("a", "b"))
        pending = h.start(
            "POST", "/v1/chat/completions", chat("one two three", stream=True, mock={"interval": 1})
        )
        h.tick(1.0)
        moved = config_text(upstreams={"b": "kb"}).replace("upstream: a", "upstream: b")
        h.gateway.apply(parse_yaml(moved, "test", {}))
        h.tick(1.0, 10)
        answer = h.finish(pending)
        assert answer.header("x-llmproxy-upstream") == "a"
        assert events(answer.body)[-1] == "data: [DONE]"
        text = "".join(
            json.loads(e[6:])["choices"][0]["delta"].get("content", "")
            for e in events(answer.body)[:-1]
            if json.loads(e[6:])["choices"]
        )
        assert "one two three" in text
        after = h.request("POST", "/v1/chat/completions", chat())
        assert after.header("x-llmproxy-upstream") == "b"

    def test_breakers_survive_for_unchanged_targets_only(self) -> None:
        cooling = "routing:\n  retries: 0\n  cooldown: {failures: 1, seconds: 60}\n"
        h = Harness(config_text(upstreams={"a": "ka", "b": "kb"}, extra=cooling), mocks=("a", "b"))
        failing = chat(model="m2", mock={"status": 503})
        assert h.request("POST", "/v1/chat/completions", failing).code == 503
        assert h.target("a/m2")["state"] == "cooling_down"
        same = config_text(upstreams={"a": "ka", "b": "kb"}, extra=cooling)
        h.gateway.apply(parse_yaml(same, "test", {}))
        assert h.target("a/m2")["state"] == "cooling_down"
        rekeyed = config_text(upstreams={"a": "ka-rotated", "b": "kb"}, extra=cooling)
        changes = h.gateway.apply(parse_yaml(rekeyed, "test", {}))
        assert changes.changed == ("a",)
        assert h.target("a/m2")["state"] == "healthy"

    def test_admin_reload_reads_the_file_and_refuses_a_bad_one(self) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "llmproxy.yaml"
            path.write_text(config_text())
            h = Harness(path.read_text(), source=str(path))
            path.write_text(config_text().replace("  m2:\n", "  m9:\n"))
            answer = h.request("POST", "/admin/reload")
            assert answer.code == 200
            assert answer.json() == {
                "reloaded": True,
                "added": ["m9"],
                "removed": ["m2"],
                "changed": [],
            }
            path.write_text(config_text().replace("upstream: a\n", "upstream: nowhere\n", 1))
            refused = h.request("POST", "/admin/reload")
            assert refused.code == 400
            message = refused.json()["error"]["message"]
            assert message.startswith(str(path))
            assert "no upstream named 'nowhere'" in message
            # The running config stays.
            assert h.request("POST", "/v1/chat/completions", chat(model="m9")).code == 200

    def test_fields_that_need_a_restart_are_refused(self) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "llmproxy.yaml"
            path.write_text(config_text())
            current = parse_yaml(path.read_text(), str(path), {})
            path.write_text(config_text(extra="listen: tcp:9999\ncache: {backend: 'off'}\n"))
            with self.assertRaises(ReloadRefused) as raised:
                read_again(current)
            assert "listen, cache.backend cannot change" in str(raised.exception)
            assert "restart" in str(raised.exception)

    def test_an_access_log_that_cannot_be_opened_is_refused_before_anything_applies(
        self,
    ) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "llmproxy.yaml"
            path.write_text(config_text())
            current = parse_yaml(path.read_text(), str(path), {})
            nowhere = Path(tmp) / "missing-dir" / "access.log"
            path.write_text(config_text(extra=f"access_log: {{path: '{nowhere}'}}\n"))
            with self.assertRaises(ReloadRefused) as raised:
                read_again(current)
            assert "access_log.path: cannot open" in str(raised.exception)
            assert str(raised.exception).startswith(str(path))

    def test_a_routing_change_keeps_the_cache_the_limits_and_the_slots(self) -> None:
        limited = "auth:\n  keys:\n    - {name: alice, key: sk-alice-0001, rpm: 2}\n"
        h = Harness(config_text(extra=limited))
        alice = bearer("sk-alice-0001")
        assert (
            h.request("POST", "/v1/chat/completions", chat(), alice).header("x-llmproxy-cache")
            == "miss"
        )
        slot = h.gateway._slots["a"][1]
        h.gateway.apply(parse_yaml(config_text(extra=limited + "routing: {retries: 0}\n"), "t", {}))
        again = h.request("POST", "/v1/chat/completions", chat(), alice)
        assert again.header("x-llmproxy-cache") == "hit"  # the memory cache was kept
        assert h.request("POST", "/v1/chat/completions", chat("other"), alice).code == 429
        # Requests of both configs share one max_connections to an unchanged upstream.
        assert h.gateway._slots["a"][1] is slot
        h.gateway.apply(parse_yaml(config_text(upstreams={"a": "rotated"}, extra=limited), "t", {}))
        assert h.gateway._slots["a"][1] is not slot  # a changed upstream gets its own

    def test_diff_and_restart_fields(self) -> None:
        old = parse_yaml(config_text(), "test", {})
        new = parse_yaml(config_text(upstreams={"a": "k2", "z": "kz"}), "test", {})
        assert diff(old, new).as_json()["added"] == ["z"]
        assert diff(old, new).changed == ("a",)
        assert needs_restart(old, new) == []

    def test_admin_reload_is_guarded_like_stats(self) -> None:
        h = Harness(config_text(extra="auth:\n  admin_keys: [sk-admin-000001]\n"))
        assert h.request("POST", "/admin/reload").code == 401


class ProbeTests(SynchronousTestCase):
    def test_live_and_ready(self) -> None:
        h = Harness()
        live = h.request("GET", "/health/live")
        assert live.code == 200 and live.json()["status"] == "ok"
        ready = h.request("GET", "/health/ready")
        assert ready.code == 200
        assert ready.json()["worker"]["index"] == 0

    def test_not_ready_while_a_model_has_no_usable_target_or_while_draining(self) -> None:
        cooling = "routing:\n  retries: 0\n  cooldown: {failures: 1, seconds: 60}\n"
        h = Harness(config_text(extra=cooling))
        h.request("POST", "/v1/chat/completions", chat(model="m2", mock={"status": 500}))
        ready = h.request("GET", "/health/ready")
        assert ready.code == 503
        assert ready.json()["reasons"] == ["model m2 has no usable target"]
        h.tick(61)
        assert h.request("GET", "/health/ready").code == 200
        h.site.draining = True
        draining = h.request("GET", "/health/ready")
        assert (draining.code, draining.json()["reasons"]) == (503, ["draining"])
        assert h.request("GET", "/health/live").code == 200

    def test_health_and_stats_say_which_worker_answered(self) -> None:
        h = Harness()
        assert set(h.request("GET", "/health").json()["worker"]) == {"index", "pid"}
        assert h.request("GET", "/stats").json()["worker"]["index"] == 0


class RecordTests(SynchronousTestCase):
    def test_a_proxied_answer_says_its_overhead_and_upstream_model(self) -> None:
        h = Harness()
        records = logged(h)
        pending = h.start("POST", "/v1/chat/completions", chat(mock={"delay": 2}))
        h.tick(2)
        answer = h.finish(pending)
        assert answer.header("x-llmproxy-model") == "upstream-m1"
        assert float(answer.header("x-llmproxy-overhead-ms") or "nan") >= 0
        (record,) = records.records
        assert tuple(record) == FIELDS
        assert record["model"] == "m1"
        assert record["upstream"] == "a"
        assert record["upstream_model"] == "upstream-m1"
        assert record["attempts"] == 1
        assert record["status"] == 200
        assert record["key"] == "anonymous"
        assert record["cache"] == "miss"
        assert record["input_tokens"] is not None and record["output_tokens"] is not None
        assert record["bytes_in"] == len(json.dumps(chat(mock={"delay": 2})))
        assert record["bytes_out"] == len(answer.body)
        # Two seconds went waiting on the upstream: none of it is overhead.
        assert record["upstream_ttfb_ms"] == 2000.0
        assert record["overhead_ms"] == 0.0
        assert record["duration_ms"] == 2000.0

    def test_a_streams_record_is_written_after_its_last_byte(self) -> None:
        h = Harness()
        records = logged(h)
        pending = h.start(
            "POST", "/v1/chat/completions", chat("a b c", stream=True, mock={"interval": 5})
        )
        h.tick(5)
        done = treq.collect(h.result(pending), lambda data: None)
        h.tick(5, 10)
        h.result(done)
        (record,) = records.records
        assert record["stream"] is True
        assert record["ttfb_ms"] == 0.0  # the first event goes at once
        assert isinstance(record["duration_ms"], float) and record["duration_ms"] >= 15000

    def test_a_client_that_leaves_is_logged_as_499(self) -> None:
        h = Harness()
        records = logged(h)
        pending = h.start(
            "POST",
            "/v1/chat/completions",
            chat(stream=True, mock={"infinite": True, "interval": 1}),
        )
        h.tick(1)
        response = h.result(pending)
        h.tick(1, 3)
        hang_up(response)
        h.pump()
        (record,) = records.records
        assert (record["status"], record["error_code"]) == (499, "client_closed")

    def test_an_error_carries_its_code(self) -> None:
        h = Harness()
        records = logged(h)
        h.request("POST", "/v1/chat/completions", chat(model="nope"))
        h.request("POST", "/v1/chat/completions", chat(mock={"status": 400}))
        codes = [(r["status"], r["error_code"]) for r in records.records]
        assert codes[0] == (404, "model_not_found")
        assert codes[1][0] == 400 and codes[1][1] is not None

    def test_the_histograms_are_in_metrics(self) -> None:
        h = Harness()
        h.request("POST", "/v1/chat/completions", chat())
        exposition = h.request("GET", "/metrics").body.decode()
        for line in (
            'llmproxy_request_duration_seconds_count{endpoint="chat/completions",model="m1"} 1.0',
            'llmproxy_client_ttfb_seconds_count{endpoint="chat/completions",model="m1"} 1.0',
            'llmproxy_overhead_seconds_count{endpoint="chat/completions"} 1.0',
        ):
            assert line in exposition, line

    def test_a_cache_hit_records_its_verdict(self) -> None:
        h = Harness()
        records = logged(h)
        h.request("POST", "/v1/chat/completions", chat())
        hit = h.request("POST", "/v1/chat/completions", chat())
        assert hit.header("x-llmproxy-model") == "upstream-m1"
        assert [r["cache"] for r in records.records] == ["miss", "hit"]
