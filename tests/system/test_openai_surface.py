"""
The rest of the OpenAI surface through a real proxy, as the official ``openai``
SDK uses it: audio (speech, transcriptions, translations), images, moderations,
files and batches, against real ``twistd -n llmproxy-mock`` upstreams.

Mock ``a`` serves the models, ``b`` the files (``files: {upstream: b}``).  What a
test asserts is what a user relies on: the bytes that came back, the model name
and file bytes the upstream received, the status of a refused request, which
upstream saw which call, and that one key never sees another key's files or
batches, in one process or across two sharing a private redis-server.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2
import openai
import pytest

from llmproxy.testing.media import SPEECH_SIZE, png, speech_bytes
from llmproxy.testing.processes import Mock, Proxy, RedisServer, proc_status, wait_for
from tests.system.harness import StartProxy

KEY_A = "sk-surface-team-a"
KEY_B = "sk-surface-team-b"
#: A key allowed only the speech model.
KEY_SPEECH = "sk-surface-speech-only"
MAX_BODY = 2_000_000
BATCH_LINE = (
    b'{"custom_id": "1", "method": "POST", "url": "/v1/chat/completions",'
    b' "body": {"model": "gpt-4o-mini", "messages": []}}\n'
)


def config(mocks: dict[str, Mock], extra: str = "") -> str:
    a, b = mocks["a"], mocks["b"]
    return f"""
upstreams:
  a: {{base_url: '{a.base_url}'}}
  b: {{base_url: '{b.base_url}'}}
models:
  tts-1:
    strategy: priority
    targets: [{{upstream: a, model: tts-up}}, {{upstream: b, model: tts-up}}]
  whisper-1: {{targets: [{{upstream: a, model: whisper-up}}]}}
  whisper-up: {{targets: [{{upstream: a}}]}}
  dall-e-2: {{targets: [{{upstream: a}}]}}
  omni-moderation-latest: {{targets: [{{upstream: a}}]}}
files: {{upstream: b}}
auth:
  keys:
    - {{name: team-a, key: {KEY_A}}}
    - {{name: team-b, key: {KEY_B}}}
    - {{name: speech, key: {KEY_SPEECH}, models: [tts-1]}}
cache: {{backend: memory}}
{extra}
"""


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory, trio: dict[str, Mock]) -> Iterator[Proxy]:
    p = Proxy(
        tmp_path_factory.mktemp("surface"),
        config(trio, f"server: {{max_body_bytes: {MAX_BODY}}}"),
    )
    yield p
    p.stop()


class Sent:
    """The headers of each request an SDK client sent (an httpx event hook)."""

    def __init__(self) -> None:
        self.requests: list[httpx2.Request] = []

    def __call__(self, request: httpx2.Request) -> None:
        self.requests.append(request)


def sdk(
    base_url: str, key: str = KEY_A, sent: Sent | None = None, timeout: float = 30.0
) -> openai.OpenAI:
    hooks: dict[str, list[Any]] = {"request": [sent]} if sent is not None else {}
    return openai.OpenAI(
        api_key=key,
        base_url=base_url,
        max_retries=0,
        timeout=timeout,
        http_client=openai.DefaultHttpxClient(event_hooks=hooks, timeout=timeout),
    )


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def paths(mock: Mock) -> list[str]:
    return [r["path"] for r in mock.requests()]


def seen(mock: Mock, path: str) -> list[dict[str, Any]]:
    return [r for r in mock.requests() if r["path"] == path]


# -- audio -------------------------------------------------------------------------


def test_speech_streams_the_audio_as_it_comes(proxy: Proxy, fresh_trio: dict[str, Mock]) -> None:
    a = fresh_trio["a"]
    a.configure(interval=0.05)  # 19 pieces of 16 KiB, one every 50 ms
    client = sdk(proxy.base_url)
    with client.audio.speech.with_streaming_response.create(
        model="tts-1", voice="alloy", input="Read this aloud."
    ) as response:
        assert response.headers["content-type"] == "audio/mpeg"
        assert response.headers.get("transfer-encoding") == "chunked"
        assert "content-length" not in response.headers
        pieces = response.iter_bytes()
        first = next(pieces)
        # The first bytes are here while the upstream is still sending: relayed, not held.
        assert a.stats()["bytes_streamed"] < SPEECH_SIZE
        audio = first + b"".join(pieces)
    assert audio == speech_bytes("Read this aloud.", "alloy", "mp3")
    [request] = seen(a, "/v1/audio/speech")
    assert json.loads(request["body"])["model"] == "tts-up"
    assert paths(fresh_trio["b"]) == []


def test_speech_fails_over_before_the_first_byte(proxy: Proxy, fresh_trio: dict[str, Mock]) -> None:
    a, b = fresh_trio["a"], fresh_trio["b"]
    a.configure(status=503)
    with sdk(proxy.base_url).audio.speech.with_streaming_response.create(
        model="tts-1", voice="echo", input="Failover.", response_format="flac"
    ) as response:
        assert response.headers["content-type"] == "audio/flac"
        audio = response.read()
    assert audio == speech_bytes("Failover.", "echo", "flac")
    assert len(seen(a, "/v1/audio/speech")) == 1
    [served] = seen(b, "/v1/audio/speech")
    assert json.loads(served["body"])["model"] == "tts-up"


def test_transcription_rewrites_only_the_model_part(
    proxy: Proxy, fresh_trio: dict[str, Mock]
) -> None:
    a = fresh_trio["a"]
    audio = os.urandom(1_000_000)
    sent = Sent()
    client = sdk(proxy.base_url, sent=sent)
    result = client.audio.transcriptions.create(
        model="whisper-1", file=("talk.wav", audio, "audio/wav")
    )
    assert result.text.endswith(f"sha256={sha(audio)} model=whisper-up")
    [request] = seen(a, "/v1/audio/transcriptions")
    assert request["form"]["model"] == "whisper-up"
    assert request["form"]["file"] == {
        "filename": "talk.wav",
        "content_type": "audio/wav",
        "bytes": len(audio),
        "sha256": sha(audio),
    }
    # Only the model's value changed: "whisper-1" became "whisper-up", one byte more.
    client_length = int(sent.requests[-1].headers["content-length"])
    assert request["body"] == f"<multipart {client_length + 1} bytes>"
    assert request["headers"]["content-type"] == sent.requests[-1].headers["content-type"]

    with pytest.warns(DeprecationWarning):  # the SDK marks translations deprecated
        translated = client.audio.translations.create(model="whisper-1", file=("t.wav", audio))
    assert translated.text == f"Translation from a: t.wav ({len(audio)} bytes) " + (
        f"sha256={sha(audio)} model=whisper-up"
    )


def test_transcription_with_the_same_name_is_relayed_byte_for_byte(
    proxy: Proxy, fresh_trio: dict[str, Mock]
) -> None:
    a = fresh_trio["a"]
    audio = os.urandom(1_000_000)
    sent = Sent()
    client = sdk(proxy.base_url, sent=sent)
    result = client.audio.transcriptions.create(model="whisper-up", file=("same.mp3", audio))
    assert result.text.endswith(f"sha256={sha(audio)} model=whisper-up")
    [request] = seen(a, "/v1/audio/transcriptions")
    client_headers = sent.requests[-1].headers
    assert request["body"] == f"<multipart {client_headers['content-length']} bytes>"
    assert request["headers"]["content-type"] == client_headers["content-type"]
    assert request["headers"]["content-length"] == client_headers["content-length"]
    assert request["form"]["file"]["sha256"] == sha(audio)


def test_transcription_as_text_and_as_a_stream(proxy: Proxy, fresh_trio: dict[str, Mock]) -> None:
    audio = os.urandom(50_000)
    client = sdk(proxy.base_url)
    raw = client.audio.transcriptions.with_raw_response.create(
        model="whisper-1", file=("a.wav", audio), response_format="text"
    )
    assert raw.headers["content-type"].startswith("text/plain")
    text = raw.parse()
    assert isinstance(text, str)
    assert text.strip().endswith(f"sha256={sha(audio)} model=whisper-up")

    stream = client.audio.transcriptions.create(
        model="whisper-1", file=("a.wav", audio), stream=True
    )
    events = list(stream)
    kinds = [e.type for e in events]
    assert kinds[-1] == "transcript.text.done"
    assert set(kinds[:-1]) == {"transcript.text.delta"} and len(kinds) > 2
    done = events[-1]
    assert done.type == "transcript.text.done"
    deltas = "".join(e.delta for e in events if e.type == "transcript.text.delta")
    assert deltas == done.text
    assert done.text.endswith(f"sha256={sha(audio)} model=whisper-up")
    form = seen(fresh_trio["a"], "/v1/audio/transcriptions")[-1]["form"]
    assert form["stream"] == "true" and form["model"] == "whisper-up"


# -- refusals ----------------------------------------------------------------------


def test_an_upload_over_max_body_bytes_is_413(proxy: Proxy, fresh_trio: dict[str, Mock]) -> None:
    client = sdk(proxy.base_url)
    with pytest.raises(openai.APIStatusError) as caught:
        client.audio.transcriptions.create(
            model="whisper-1", file=("big.wav", os.urandom(MAX_BODY + 500_000))
        )
    assert caught.value.status_code == 413
    with pytest.raises(openai.APIStatusError) as caught:
        client.files.create(file=("big.jsonl", os.urandom(MAX_BODY + 500_000)), purpose="batch")
    assert caught.value.status_code == 413
    assert paths(fresh_trio["a"]) == [] and paths(fresh_trio["b"]) == []


def multipart(parts: list[tuple[str, str | None, bytes]], boundary: str) -> bytes:
    """A form by hand: (name, filename or None, value) for each part."""
    out = b""
    for name, filename, value in parts:
        disposition = f'form-data; name="{name}"'
        if filename is not None:
            disposition += f'; filename="{filename}"'
        out += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n".encode()
        if filename is not None:
            out += b"Content-Type: application/octet-stream\r\n"
        out += b"\r\n" + value + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


def test_a_form_without_a_model_is_400(proxy: Proxy, fresh_trio: dict[str, Mock]) -> None:
    boundary = "surface-boundary-7d1c"
    body = multipart(
        [("file", "a.wav", os.urandom(10_000)), ("response_format", None, b"json")], boundary
    )
    for path in ("/v1/audio/transcriptions", "/audio/transcriptions", "/v1/images/edits"):
        conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=30)
        conn.request(
            "POST",
            path,
            body,
            {
                "Authorization": f"Bearer {KEY_A}",
                "Content-Type": f"multipart/form-data; boundary={boundary}",
            },
        )
        response = conn.getresponse()
        data = response.read()
        conn.close()
        assert response.status == 400, (path, data)
        error = json.loads(data)["error"]
        assert error["type"] == "invalid_request_error" and "model" in error["message"], error
    assert paths(fresh_trio["a"]) == [] and paths(fresh_trio["b"]) == []


def test_a_key_not_allowed_the_model_is_403(proxy: Proxy, fresh_trio: dict[str, Mock]) -> None:
    client = sdk(proxy.base_url, key=KEY_SPEECH)
    with pytest.raises(openai.PermissionDeniedError):
        client.audio.transcriptions.create(model="whisper-1", file=("a.wav", b"RIFF" * 100))
    with pytest.raises(openai.PermissionDeniedError):
        client.images.generate(model="dall-e-2", prompt="a cat")
    with pytest.raises(openai.PermissionDeniedError):
        client.moderations.create(model="omni-moderation-latest", input="hi")
    assert paths(fresh_trio["a"]) == [] and paths(fresh_trio["b"]) == []
    # ...and the model it is allowed goes through.
    assert client.audio.speech.create(model="tts-1", voice="alloy", input="ok").content == (
        speech_bytes("ok", "alloy", "mp3")
    )


# -- images and moderations --------------------------------------------------------


def test_images_generate_and_edit(proxy: Proxy, fresh_trio: dict[str, Mock]) -> None:
    a = fresh_trio["a"]
    client = sdk(proxy.url)  # without the /v1 prefix
    generated = client.images.generate(model="dall-e-2", prompt="a red square", n=2)
    assert generated.data is not None and len(generated.data) == 2
    assert json.loads(seen(a, "/v1/images/generations")[0]["body"])["model"] == "dall-e-2"

    picture = png(os.urandom(3), side=64)
    edited = sdk(proxy.base_url).images.edit(
        model="dall-e-2", image=("in.png", picture, "image/png"), prompt="make it blue"
    )
    assert edited.data is not None
    assert sha(picture) in (edited.data[0].revised_prompt or "")
    [request] = seen(a, "/v1/images/edits")
    assert request["form"]["image"]["sha256"] == sha(picture)
    assert request["form"]["model"] == "dall-e-2"


def test_moderations_are_cached(proxy: Proxy, fresh_trio: dict[str, Mock]) -> None:
    client = sdk(proxy.base_url)
    text = f"is this fine? {os.urandom(4).hex()}"
    first = client.moderations.with_raw_response.create(model="omni-moderation-latest", input=text)
    second = client.moderations.with_raw_response.create(model="omni-moderation-latest", input=text)
    assert first.headers["x-llmproxy-cache"] == "miss"
    assert second.headers["x-llmproxy-cache"] == "hit"
    assert second.parse().results == first.parse().results
    assert len(seen(fresh_trio["a"], "/v1/moderations")) == 1


# -- files and batches -------------------------------------------------------------


def batch_of(client: openai.OpenAI, file_id: str) -> Any:
    return client.batches.create(
        input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h"
    )


def check_files_and_batches(upload_through: str, use_through: str, mocks: dict[str, Mock]) -> None:
    """Key A's file and batch, uploaded through one proxy, used through another (or the same)."""
    a, b = mocks["a"], mocks["b"]
    a_up, a_use = sdk(upload_through, KEY_A), sdk(use_through, KEY_A)
    b_use = sdk(use_through, KEY_B)
    data = BATCH_LINE * 50
    uploaded = a_up.files.create(file=("input.jsonl", data), purpose="batch")
    assert uploaded.bytes == len(data)
    assert a_use.files.retrieve(uploaded.id).filename == "input.jsonl"
    assert a_use.files.content(uploaded.id).read() == data

    batch = batch_of(a_use, uploaded.id)
    assert batch.input_file_id == uploaded.id
    assert a_up.batches.retrieve(batch.id).status == "validating"
    assert a_use.batches.cancel(batch.id).status == "cancelling"
    assert a_up.batches.retrieve(batch.id).status == "cancelled"

    b_before = {f.id for f in b_use.files.list()}
    mine = b_use.files.create(file=("b.jsonl", BATCH_LINE), purpose="batch")
    a_files = {f.id for f in a_use.files.list()}
    assert uploaded.id in a_files and not a_files & (b_before | {mine.id})
    assert {f.id for f in b_use.files.list()} == b_before | {mine.id}
    assert batch.id in {x.id for x in a_use.batches.list()}
    assert [x.id for x in b_use.batches.list()] == []

    upstream_before = len(b.requests())
    with pytest.raises(openai.NotFoundError) as caught:
        b_use.files.retrieve(uploaded.id)
    body = caught.value.body
    assert isinstance(body, dict), body
    assert body["message"] == f"No such File object: {uploaded.id}"
    assert body["type"] == "invalid_request_error"
    for refused in (
        lambda: b_use.files.content(uploaded.id),
        lambda: b_use.files.delete(uploaded.id),
        lambda: batch_of(b_use, uploaded.id),
    ):
        with pytest.raises(openai.NotFoundError, match=f"No such File object: {uploaded.id}"):
            refused()
    for refused in (
        lambda: b_use.batches.retrieve(batch.id),
        lambda: b_use.batches.cancel(batch.id),
    ):
        with pytest.raises(openai.NotFoundError, match=f"No such Batch object: {batch.id}"):
            refused()
    # None of B's attempts reached the upstream: A's file is still there, whole.
    assert len(b.requests()) == upstream_before
    assert a_use.files.content(uploaded.id).read() == data

    assert a_use.files.delete(uploaded.id).deleted
    with pytest.raises(openai.NotFoundError):
        a_use.files.retrieve(uploaded.id)

    files_calls = [p for p in paths(b) if p.startswith(("/v1/files", "/v1/batches"))]
    assert files_calls and files_calls == paths(b)
    assert not [p for p in paths(a) if "/files" in p or "/batches" in p]


def test_files_and_batches_are_pinned_to_their_owner(
    proxy: Proxy, fresh_trio: dict[str, Mock]
) -> None:
    check_files_and_batches(proxy.base_url, proxy.base_url, fresh_trio)


def test_pins_in_redis_work_across_two_proxies(
    start: StartProxy, fresh_trio: dict[str, Mock], redis_server: RedisServer
) -> None:
    text = config(fresh_trio, f"redis: {{url: '{redis_server.url}'}}")
    one, two = start(text, "proxy-1"), start(text, "proxy-2")
    check_files_and_batches(one.base_url, two.base_url, fresh_trio)
    assert int(redis_server.cli_call("DBSIZE")) > 0
    # A second pair the other way round, so each process both writes and reads pins.
    check_files_and_batches(two.base_url, one.base_url, fresh_trio)


# -- memory ------------------------------------------------------------------------

UPLOAD_MB = 20


def memory_figures(proxy: Proxy, client: openai.OpenAI) -> dict[str, int]:
    """VmRSS/VmHWM (KiB) of the proxy before and after a 20 MB upload and its download."""
    warm = client.files.create(file=("warm.jsonl", os.urandom(500_000)), purpose="batch")
    client.files.content(warm.id).read()
    before = proc_status(proxy.process.pid)
    data = os.urandom(UPLOAD_MB * 1024 * 1024)
    uploaded = client.files.create(file=("big.jsonl", data), purpose="batch")
    assert uploaded.bytes == len(data)
    uploaded_status = proc_status(proxy.process.pid)
    got = client.files.content(uploaded.id).read()
    assert sha(got) == sha(data)
    after = proc_status(proxy.process.pid)
    return {
        "rss_before": before["VmRSS"],
        "hwm_before": before["VmHWM"],
        "rss_after_upload": uploaded_status["VmRSS"],
        "hwm_after_upload": uploaded_status["VmHWM"],
        "rss_after_download": after["VmRSS"],
        "hwm_after_download": after["VmHWM"],
    }


def test_a_20_mb_upload_is_not_held_in_memory(
    start: StartProxy, fresh_trio: dict[str, Mock], tmp_path: Path
) -> None:
    proxy = start(config(fresh_trio))
    wait_for(lambda: proc_status(proxy.process.pid), what="the proxy's /proc status")
    figures = memory_figures(proxy, sdk(proxy.base_url, timeout=120))
    print("proxy memory (KiB):", json.dumps(figures))
    bound = 15 * 1024
    upload_peak = figures["hwm_after_upload"] - figures["hwm_before"]
    assert upload_peak < bound, f"peak grew {upload_peak} KiB on a {UPLOAD_MB} MB upload"
    assert figures["rss_after_upload"] - figures["rss_before"] < bound, figures
    download_peak = figures["hwm_after_download"] - figures["hwm_before"]
    assert download_peak < bound, f"peak grew {download_peak} KiB on a {UPLOAD_MB} MB download"
