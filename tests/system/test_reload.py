"""
Live reload as operators use it: edit the config file, then SIGHUP the
process or ``POST /admin/reload``.  New requests see the new models, keys and
targets; a stream in flight finishes on the old ones; a file that does not
load, or that changes what only a restart can, is refused and the running
config serves on; with ``--workers`` one reload reaches every worker.
"""

from __future__ import annotations

import http.client
import json
import signal
from collections.abc import Callable
from pathlib import Path

import pytest

from llmproxy.testing.processes import (
    Mock,
    Proxy,
    http_call,
    upstream_block,
    wait_for,
    workers_answering,
)
from tests.system.harness import StartProxy

ADMIN = {"Authorization": "Bearer admin-secret"}

AUTH = """
auth:
  keys:
    - {name: team-a, key: key-a}
    - {name: team-b, key: key-b}
  admin_keys: [admin-secret]
cache: {backend: off}
"""

#: Upstream a gives way to c, model "old" to "new", "m" moves to b; key-b is revoked.
CHANGES = {"reloaded": True, "added": ["new", "c"], "removed": ["old", "a"], "changed": ["m"]}


def first(trio: dict[str, Mock]) -> str:
    """Upstreams a and b; models m and old on a; two client keys and an admin key."""
    return (
        upstream_block([trio["a"], trio["b"]])
        + "models:\n  m: {targets: [{upstream: a}]}\n  old: {targets: [{upstream: a}]}\n"
        + AUTH
    )


def second(trio: dict[str, Mock]) -> str:
    """Upstreams b and c; m on b, new on c; key-b gone."""
    return (
        upstream_block([trio["b"], trio["c"]])
        + "models:\n  m: {targets: [{upstream: b}]}\n  new: {targets: [{upstream: c}]}\n"
        + AUTH.replace("    - {name: team-b, key: key-b}\n", "")
    )


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def chat(model: str, text: str, **extra: object) -> dict[str, object]:
    return {"model": model, "messages": [{"role": "user", "content": text}], **extra}


def model_ids(proxy: Proxy, key: str = "key-a") -> list[str]:
    reply = http_call(proxy.port, "GET", "/v1/models", headers=bearer(key))
    assert reply.status == 200, reply.body
    return sorted(m["id"] for m in reply.json()["data"])


def answer(proxy: Proxy, model: str, text: str, key: str = "key-a") -> str:
    reply = http_call(proxy.port, "POST", "/v1/chat/completions", chat(model, text), bearer(key))
    assert reply.status == 200, reply.body
    content: str = reply.json()["choices"][0]["message"]["content"]
    return content


def reload(proxy: Proxy, headers: dict[str, str] = ADMIN) -> tuple[int, dict[str, object]]:
    reply = http_call(proxy.port, "POST", "/admin/reload", headers=headers)
    found: dict[str, object] = reply.json()
    return reply.status, found


def refusal(proxy: Proxy) -> str:
    """The message of a refused /admin/reload (400, OpenAI-shaped)."""
    status, payload = reload(proxy)
    assert status == 400, payload
    error = payload["error"]
    assert isinstance(error, dict)
    assert error["type"] == "invalid_request_error"
    assert error["code"] == "invalid_config"
    message: str = error["message"]
    return message


def stream_text(body: bytes) -> tuple[str, list[bytes]]:
    """The text of a chat stream's deltas, and its ``data:`` payloads in order."""
    payloads = [line[len(b"data: ") :] for line in body.split(b"\n") if line.startswith(b"data: ")]
    text = "".join(
        chunk["choices"][0]["delta"].get("content", "")
        for chunk in map(json.loads, payloads[:-1])
        if chunk["choices"]
    )
    return text, payloads


@pytest.mark.parametrize("trigger", ["sighup", "admin"])
def test_a_new_file_serves_new_requests_while_a_stream_ends_on_the_old(
    start: StartProxy, fresh_trio: dict[str, Mock], trigger: str
) -> None:
    a, b, c = fresh_trio["a"], fresh_trio["b"], fresh_trio["c"]
    proxy = start(first(fresh_trio))
    assert model_ids(proxy, "key-a") == model_ids(proxy, "key-b") == ["m", "old"]
    # A stream on a, which the upstream holds after two events, across the reload.
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=15)
    body = chat("m", "stay on a", stream=True, mock={"gate_after": 2})
    conn.request("POST", "/v1/chat/completions", json.dumps(body), bearer("key-a"))
    try:
        response = conn.getresponse()
        assert response.status == 200
        early = b""
        while early.count(b"\n\n") < 2:
            early += response.readline()
        wait_for(lambda: a.stats()["gated"] == 1, what="the stream held by upstream a")

        proxy.config_path.write_text(second(fresh_trio))
        if trigger == "admin":
            status, payload = reload(proxy, bearer("key-a"))  # a client key is no admin key
            assert status == 401, payload
            assert model_ids(proxy) == ["m", "old"]
            assert reload(proxy) == (200, CHANGES)
        else:
            proxy.process.signal(signal.SIGHUP)
            wait_for(lambda: model_ids(proxy) == ["m", "new"], what="the new model list")
        assert model_ids(proxy) == ["m", "new"]
        for method, path, sent in [
            ("GET", "/v1/models", None),
            ("POST", "/v1/chat/completions", chat("m", "revoked")),
        ]:
            revoked = http_call(proxy.port, method, path, sent, bearer("key-b"))
            assert revoked.status == 401, revoked.body
            assert revoked.json()["error"]["code"] == "invalid_api_key"
        assert answer(proxy, "m", "moved") == "Hello from b! You said: moved"
        assert answer(proxy, "new", "added") == "Hello from c! You said: added"

        a.release()
        rest = response.read()
    finally:
        conn.close()
    text, payloads = stream_text(early + rest)
    assert text == "Hello from a! You said: stay on a"
    assert payloads[-1] == b"[DONE]"
    assert b"event: error" not in rest
    assert [json.loads(r["body"])["model"] for r in a.requests()] == ["m"]  # the stream only
    assert "revoked" not in json.dumps(b.requests())
    assert len(b.requests()) == len(c.requests()) == 1
    assert (
        f"reloaded {proxy.config_path}: added ['new', 'c'], removed ['old', 'a'], "
        "changed ['m']" in proxy.process.log()
    )


@pytest.mark.parametrize(
    "broken, says",
    [
        ("models: [unclosed\n", "expected ',' or ']'"),
        (
            "upstreams:\n  a: {base_url: 'http://127.0.0.1:9/v1'}\n"
            "models:\n  m: {targets: [{upstream: azure}]}\n",
            "models.m.targets[0].upstream: no upstream named 'azure'",
        ),
    ],
    ids=["yaml", "meaning"],
)
def test_a_file_that_does_not_load_is_refused_and_the_old_config_serves(
    start: StartProxy, fresh_trio: dict[str, Mock], broken: str, says: str
) -> None:
    proxy = start(first(fresh_trio))
    proxy.config_path.write_text(broken)
    message = refusal(proxy)
    assert message.startswith(f"{proxy.config_path}: "), message
    assert says in message
    proxy.process.signal(signal.SIGHUP)
    wait_for(
        lambda: proxy.process.log().count(f"reload refused: {proxy.config_path}: ") == 2,
        what="the refusals in the log",
    )
    # The running config serves on: its models, its keys, its upstreams.
    assert model_ids(proxy, "key-b") == ["m", "old"]
    assert answer(proxy, "m", "still here", "key-b") == "Hello from a! You said: still here"
    # Once the file is right again, it applies.
    proxy.config_path.write_text(second(fresh_trio))
    assert reload(proxy) == (200, CHANGES)


@pytest.mark.parametrize(
    "field, edit",
    [
        ("listen", lambda text: text + "listen: 'tcp:1:interface=127.0.0.1'\n"),
        ("cache.backend", lambda text: text.replace("{backend: off}", "{backend: memory}")),
    ],
    ids=["listen", "cache.backend"],
)
def test_a_change_only_a_restart_can_apply_is_refused(
    start: StartProxy, fresh_trio: dict[str, Mock], field: str, edit: Callable[[str], str]
) -> None:
    proxy = start(first(fresh_trio))
    # The rest of the new file would be fine; none of it applies.
    proxy.config_path.write_text(edit(second(fresh_trio)))
    message = refusal(proxy)
    assert message.startswith(f"{proxy.config_path}: {field} cannot change"), message
    assert "restart" in message
    assert model_ids(proxy, "key-b") == ["m", "old"]
    assert answer(proxy, "m", "unchanged") == "Hello from a! You said: unchanged"


def targets(reply_json: dict[str, object]) -> set[str]:
    found = reply_json["targets"]
    assert isinstance(found, dict)
    return set(found)


def test_admin_reload_on_one_worker_reloads_every_worker(
    tmp_path: Path, fresh_trio: dict[str, Mock]
) -> None:
    proxy = Proxy(tmp_path, first(fresh_trio), workers=2)
    try:
        pids = workers_answering(proxy.port, 2)
        proxy.config_path.write_text(second(fresh_trio))
        assert reload(proxy) == (200, CHANGES)  # one worker answers it
        reloaded: set[int] = set()

        def every_worker_reloaded() -> bool:
            reply = http_call(proxy.port, "GET", "/health")
            found = targets(reply.json())
            if found == {"b/m", "c/new"}:
                reloaded.add(reply.json()["worker"]["pid"])
            else:
                assert found == {"a/m", "a/old"}, found  # the old config, not yet reloaded
            return reloaded == set(pids)

        wait_for(every_worker_reloaded, what="both workers on the new config")
        assert "passing SIGHUP to 2 workers" in proxy.process.log()
    finally:
        proxy.stop()
