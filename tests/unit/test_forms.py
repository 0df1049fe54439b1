"""
Forms (multipart/form-data bodies), files and batches: read as they arrive,
forwarded from the spool with only the model rewritten, and pinned to their
upstream and owner.
"""

from __future__ import annotations

import hashlib
import io
import json
from typing import Any

import pytest
from twisted.internet.interfaces import IConsumer
from twisted.internet.task import Clock, Cooperator
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import FileBodyProducer
from zope.interface import implementer

from llmproxy.errors import APIError
from llmproxy.forms import FormReader, Upload, boundary_of
from tests.harness import Harness

BOUNDARY = "----llmproxy-test-boundary"


def multipart(fields: dict[str, str], files: dict[str, tuple[str, bytes]]) -> bytes:
    parts = []
    for name, value in fields.items():
        parts.append(
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode()
            + value.encode()
            + b"\r\n"
        )
    for name, (filename, data) in files.items():
        parts.append(
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}";'
            f' filename="{filename}"\r\nContent-Type: application/octet-stream\r\n\r\n'.encode()
            + data
            + b"\r\n"
        )
    return b"".join(parts) + f"--{BOUNDARY}--\r\n".encode()


CONTENT_TYPE = f"multipart/form-data; boundary={BOUNDARY}"
AUDIO = bytes(range(256)) * 300 + b"\r\n--not-the-boundary\r\n"


def read(body: bytes, chunk: int) -> Upload:
    boundary = boundary_of(CONTENT_TYPE)
    assert boundary is not None
    reader = FormReader(boundary)
    for i in range(0, len(body), chunk):
        reader.feed(body[i : i + chunk])
    return reader.form(io.BytesIO(body), len(body), CONTENT_TYPE)


@implementer(IConsumer)
class Consumer:
    def __init__(self, received: list[bytes]) -> None:
        self.received = received

    def registerProducer(self, producer: object, streaming: bool) -> None:
        pass

    def unregisterProducer(self) -> None:
        pass

    def write(self, data: bytes) -> None:
        self.received.append(data)


def produced(upload: Upload, model: str | None) -> bytes:
    """What an upload's producer writes, driven to the end on a Clock."""
    clock = Clock()
    cooperator = Cooperator(scheduler=lambda work: clock.callLater(0, work))
    producer = FileBodyProducer(upload.body(model), cooperator, readSize=997)
    received: list[bytes] = []
    done = producer.startProducing(Consumer(received))
    for _ in range(10_000):
        if done.called:
            break
        clock.advance(0)
    assert done.called
    assert producer.length == len(b"".join(received))
    return b"".join(received)


class FormReaderTests(SynchronousTestCase):
    body = multipart(
        {"model": "whisper-1", "response_format": "json", "stream": "true"},
        {"file": ("speech.wav", AUDIO)},
    )

    def test_fields_and_the_model_span_whatever_the_chunks(self) -> None:
        for chunk in (1, 7, 4096, len(self.body)):
            upload = read(self.body, chunk)
            assert upload.fields == {
                "model": "whisper-1",
                "response_format": "json",
                "stream": "true",
            }, chunk
            assert upload.payload()["stream"] is True
            assert upload.model_span is not None
            start, end = upload.model_span
            assert self.body[start:end] == b"whisper-1"

    def test_the_body_goes_as_it_came_unless_the_model_differs(self) -> None:
        upload = read(self.body, 1000)
        assert produced(upload, None) == self.body
        assert produced(upload, "whisper-1") == self.body
        rewritten = produced(upload, "whisper-large-v3")
        assert rewritten == self.body.replace(b"whisper-1", b"whisper-large-v3", 1)
        # The file part is untouched, byte for byte.
        assert AUDIO in rewritten

    def test_a_body_without_its_closing_boundary_or_with_a_huge_field_is_a_400(self) -> None:
        with pytest.raises(APIError) as cut:
            read(self.body[:-10], 100)
        assert cut.value.status == 400
        huge = multipart({"model": "m", "prompt": "x" * (70 * 1024)}, {})
        with pytest.raises(APIError) as big:
            read(huge, 4096)
        assert big.value.status == 400 and "prompt" in big.value.message

    def test_only_a_form_content_type_has_a_boundary(self) -> None:
        assert boundary_of("application/json") is None
        assert boundary_of("multipart/form-data") is None
        assert boundary_of('multipart/form-data; boundary="a b"') == b"a b"


CONFIG = """
upstreams:
  a: {base_url: http://a.test/v1, api_key: sk-up-a}
  b: {base_url: http://b.test/v1, api_key: sk-up-b}
models:
  whisper-1: {targets: [{upstream: a, model: whisper-up}]}
  tts-1: {targets: [{upstream: a}]}
  omni-moderation-latest: {targets: [{upstream: a}]}
files: {upstream: b}
auth:
  keys:
    - {name: team-a, key: sk-a}
    - {name: team-b, key: sk-b}
cache: {backend: memory}
"""

A = {"Authorization": "Bearer sk-a"}
B = {"Authorization": "Bearer sk-b"}


def form_headers(key: dict[str, str]) -> dict[str, str]:
    return {**key, "Content-Type": CONTENT_TYPE}


class FormRouteTests(SynchronousTestCase):
    def test_a_transcription_reaches_the_target_with_its_model_and_file_intact(self) -> None:
        h = Harness(CONFIG, mocks=("a", "b"))
        body = multipart({"model": "whisper-1"}, {"file": ("a.wav", AUDIO)})
        answer = h.request("POST", "/v1/audio/transcriptions", raw=body, headers=form_headers(A))
        assert answer.code == 200, answer.body
        sha = hashlib.sha256(AUDIO).hexdigest()
        assert f"sha256={sha}" in answer.json()["text"]
        assert "model=whisper-up" in answer.json()["text"]
        seen = h.seen("a")[-1]
        assert seen["headers"]["content-type"] == CONTENT_TYPE
        assert seen["headers"]["authorization"] == "Bearer sk-up-a"

    def test_a_form_without_a_model_is_a_400_and_a_json_route_ignores_the_type(self) -> None:
        h = Harness(CONFIG, mocks=("a", "b"))
        body = multipart({"language": "en"}, {"file": ("a.wav", b"abc")})
        answer = h.request("POST", "/v1/audio/transcriptions", raw=body, headers=form_headers(A))
        assert answer.code == 400 and answer.json()["error"]["param"] == "model"
        assert h.seen("a") == []

    def test_speech_is_relayed_as_bytes_and_never_estimated(self) -> None:
        h = Harness(CONFIG, mocks=("a", "b"))
        body = {"model": "tts-1", "input": "hello there", "voice": "alloy"}
        answer = h.request("POST", "/v1/audio/speech", body, headers=A)
        assert answer.code == 200
        assert answer.header("content-type") == "audio/mpeg"
        from llmproxy.testing.media import speech_bytes

        assert answer.body == speech_bytes("hello there", "alloy", "mp3")
        row = h.request("GET", "/stats").json()["keys"]["team-a"]["tts-1"]
        assert row["estimated_tokens"] == {"input": 0, "output": 0}

    def test_moderations_are_cached(self) -> None:
        h = Harness(CONFIG, mocks=("a", "b"))
        body = {"model": "omni-moderation-latest", "input": "is this fine"}
        first = h.request("POST", "/v1/moderations", body, headers=A)
        again = h.request("POST", "/v1/moderations", body, headers=A)
        assert (first.header("x-llmproxy-cache"), again.header("x-llmproxy-cache")) == (
            "miss",
            "hit",
        )
        assert again.body == first.body and len(h.seen("a")) == 1


def upload(h: Harness, key: dict[str, str], data: bytes = b'{"custom_id": "1"}\n') -> Any:
    body = multipart({"purpose": "batch"}, {"file": ("in.jsonl", data)})
    answer = h.request("POST", "/v1/files", raw=body, headers=form_headers(key))
    assert answer.code == 200, answer.body
    return answer.json()


class FileTests(SynchronousTestCase):
    def test_files_and_batches_are_pinned_to_their_upstream_and_owner(self) -> None:
        h = Harness(CONFIG, mocks=("a", "b"))
        file = upload(h, A)
        assert h.seen("b")[-1]["path"] == "/v1/files"
        batch_body = {
            "input_file_id": file["id"],
            "endpoint": "/v1/chat/completions",
            "completion_window": "24h",
        }
        batch = h.request("POST", "/v1/batches", batch_body, headers=A)
        assert batch.code == 200, batch.body
        batch_id = batch.json()["id"]
        for path in (f"/v1/files/{file['id']}", f"/v1/files/{file['id']}/content"):
            assert h.request("GET", path, headers=A).code == 200
        content = h.request("GET", f"/v1/files/{file['id']}/content", headers=A)
        assert content.body == b'{"custom_id": "1"}\n'
        assert h.request("GET", f"/v1/batches/{batch_id}", headers=A).json()["id"] == batch_id
        # Key B: none of it exists.
        for method, path in (
            ("GET", f"/v1/files/{file['id']}"),
            ("GET", f"/v1/files/{file['id']}/content"),
            ("DELETE", f"/v1/files/{file['id']}"),
            ("GET", f"/v1/batches/{batch_id}"),
            ("POST", f"/v1/batches/{batch_id}/cancel"),
        ):
            refused = h.request(method, path, headers=B)
            assert refused.code == 404, (method, path)
        stolen = h.request("POST", "/v1/batches", batch_body, headers=B)
        assert stolen.code == 404 and stolen.json()["error"]["param"] == "input_file_id"
        assert all(not r["path"].startswith(("/v1/files", "/v1/batches")) for r in h.seen("a"))

    def test_lists_hold_only_the_callers_objects(self) -> None:
        h = Harness(CONFIG, mocks=("a", "b"))
        mine, theirs = upload(h, A), upload(h, B)
        listed = h.request("GET", "/v1/files", headers=A).json()
        assert [f["id"] for f in listed["data"]] == [mine["id"]]
        other = h.request("GET", "/v1/files", headers=B).json()
        assert [f["id"] for f in other["data"]] == [theirs["id"]]
        assert json.loads(h.request("GET", "/v1/batches", headers=B).body)["data"] == []
