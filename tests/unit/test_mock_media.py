"""
The mock upstream's audio, images, moderations, files and batches routes, driven
in memory: the shapes an OpenAI client gets, the uploaded bytes' sha256 echoed
back, speech as ``speech_bytes`` computes it, files and batches per instance.
"""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Any

import treq
from treq.testing import RequestTraversalAgent
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH

from llmproxy.testing.media import CATEGORIES, SPEECH_SIZE, ByteStream, speech_bytes
from llmproxy.testing.mock import MockUpstream
from llmproxy.upstream.client import upstream_client
from tests.harness import run

KEY = "sk-mock"
BOUNDARY = "mockboundary1234"


def multipart(fields: dict[str, Any]) -> bytes:
    """A multipart/form-data body: ``str`` values as fields, ``(name, bytes)`` as files."""
    out = b""
    for key, value in fields.items():
        for item in value if isinstance(value, list) else [value]:
            out += f"--{BOUNDARY}\r\n".encode()
            if isinstance(item, tuple):
                filename, data = item
                out += (
                    f'Content-Disposition: form-data; name="{key}"; filename="{filename}"\r\n'
                    "Content-Type: application/octet-stream\r\n\r\n"
                ).encode() + data
            else:
                out += f'Content-Disposition: form-data; name="{key}"\r\n\r\n{item}'.encode()
            out += b"\r\n"
    return out + f"--{BOUNDARY}--\r\n".encode()


class Answer:
    def __init__(self, code: int, headers: Headers, body: bytes, length: object) -> None:
        self.code, self.headers, self.body = code, headers, body
        self.length = length  # the content-length (the client takes it off the headers)

    def header(self, name: str) -> str | None:
        values = self.headers.getRawHeaders(name)
        return values[0] if values else None

    def json(self) -> Any:
        return json.loads(self.body)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class MediaTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.mock = MockUpstream(self.clock, name="a", api_key=KEY)
        self.agent = RequestTraversalAgent(self.mock.app.resource())
        self.client = upstream_client(self.agent)

    def call(
        self,
        path: str,
        body: Any = None,
        form: dict[str, Any] | None = None,
        method: str = "POST",
        key: str = KEY,
    ) -> Answer:
        headers = {"authorization": [f"Bearer {key}"]}
        data = None
        if form is not None:
            data = multipart(form)
            headers["content-type"] = [f"multipart/form-data; boundary={BOUNDARY}"]
        elif body is not None:
            data = json.dumps(body).encode()
            headers["content-type"] = ["application/json"]
        d = self.client.request(
            method, "http://a.test" + path, data=data, headers=Headers(headers), unbuffered=True
        )
        collected: list[bytes] = []

        async def whole() -> Answer:
            response = await d
            await treq.collect(response, collected.append)
            body = b"".join(collected)
            return Answer(response.code, response.headers, body, response.length)

        pending = Deferred.fromCoroutine(whole())
        for _ in range(400):
            self.clock.advance(0)
            self.agent.flush()
        return run(pending)

    def assert_error(self, answer: Answer, status: int, message: str) -> None:
        assert answer.code == status, answer.body
        error = answer.json()["error"]
        assert error["type"] == "invalid_request_error"
        assert message in error["message"], error

    # -- audio -------------------------------------------------------------------------

    def test_speech_is_speech_bytes_streamed(self) -> None:
        body = {"model": "tts-1", "input": "hello there", "voice": "alloy"}
        answer = self.call("/v1/audio/speech", body)
        assert answer.code == 200
        assert answer.header("content-type") == "audio/mpeg"
        assert answer.length == UNKNOWN_LENGTH  # chunked, as OpenAI sends it
        assert answer.body == speech_bytes("hello there", "alloy", "mp3")
        assert len(answer.body) == SPEECH_SIZE > 200_000
        assert answer.body.startswith(b"ID3")
        assert self.mock.stats["bytes_streamed"] == SPEECH_SIZE
        assert speech_bytes("hello there", "echo") != answer.body
        assert speech_bytes("hello there!", "alloy") != answer.body

    def test_speech_formats_and_errors(self) -> None:
        body = {"model": "tts-1", "input": "hi", "voice": "nova", "response_format": "wav"}
        answer = self.call("/v1/audio/speech", body)
        assert answer.header("content-type") == "audio/wav"
        assert answer.body == speech_bytes("hi", "nova", "wav")
        assert answer.body.startswith(b"RIFF")
        self.assert_error(self.call("/v1/audio/speech", {"model": "tts-1"}), 400, "'input'")
        bad = dict(body, response_format="ogg")
        self.assert_error(self.call("/v1/audio/speech", bad), 400, "response_format")

    def test_speech_is_a_paused_producer(self) -> None:
        """The speech pauses when the client's transport does, and goes on on resume."""
        request: Any = FakeRequest()

        stream = ByteStream(self.mock, request, b"x" * 100_000, interval=1)
        done = stream.start()
        self.clock.advance(0)
        self.clock.advance(1)
        assert request.written == [16384, 16384]
        stream.pauseProducing()
        for _ in range(5):
            self.clock.advance(1)
        assert request.written == [16384, 16384]
        assert self.mock.stats["pauses"] == 1
        stream.resumeProducing()
        for _ in range(10):
            self.clock.advance(1)
        assert sum(request.written) == 100_000
        assert request.producer is None
        assert self.successResultOf(done) is None

    def test_a_transcription_names_the_file_and_model(self) -> None:
        audio = bytes(range(256)) * 100
        form = {"file": ("talk.mp3", audio), "model": "whisper-1"}
        answer = self.call("/v1/audio/transcriptions", form=form)
        assert answer.code == 200
        assert answer.header("content-type") == "application/json"
        payload = answer.json()
        assert payload["text"].endswith(f"sha256={sha(audio)} model=whisper-1")
        assert payload["usage"] == {"type": "duration", "seconds": 2}
        seen = self.mock.received[-1]
        assert seen["body"] == f"<multipart {len(multipart(form))} bytes>"
        assert seen["form"]["model"] == "whisper-1"
        assert seen["form"]["file"]["sha256"] == sha(audio)
        assert seen["form"]["file"]["bytes"] == len(audio)
        assert self.mock.stats["bytes_received"] == len(multipart(form))

    def test_transcription_formats(self) -> None:
        audio = b"RIFF" + b"\x01" * 5000
        form: dict[str, Any] = {"file": ("a.wav", audio), "model": "gpt-4o-transcribe"}
        expected = f"sha256={sha(audio)} model=gpt-4o-transcribe"
        answer = self.call("/v1/audio/transcriptions", form=dict(form, response_format="text"))
        assert answer.header("content-type") == "text/plain; charset=utf-8"
        assert answer.body.decode().strip().endswith(expected)
        srt = self.call("/v1/audio/transcriptions", form=dict(form, response_format="srt"))
        assert srt.body.decode().startswith("1\n00:00:00,000 --> 00:00:01,000\n")
        vtt = self.call("/v1/audio/transcriptions", form=dict(form, response_format="vtt"))
        assert vtt.body.decode().startswith("WEBVTT\n\n00:00:00.000 --> 00:00:01.000\n")
        verbose = self.call(
            "/v1/audio/transcriptions",
            form=dict(form, response_format="verbose_json", language="en"),
        ).json()
        assert verbose["task"] == "transcribe" and verbose["language"] == "en"
        assert verbose["duration"] == 1.0
        assert verbose["segments"][0]["text"] == verbose["text"]
        assert verbose["text"].endswith(expected)
        usage = self.call("/v1/audio/transcriptions", form=form).json()["usage"]
        assert usage["type"] == "tokens" and usage["total_tokens"] > 0

    def test_a_transcription_stream(self) -> None:
        audio = b"\x02" * 1000
        form = {"file": ("a.wav", audio), "model": "gpt-4o-mini-transcribe", "stream": "true"}
        answer = self.call("/v1/audio/transcriptions", form=form)
        assert answer.header("content-type") == "text/event-stream"
        blocks = answer.body.decode().split("\n\n")
        assert blocks[-1] == ""
        events = [json.loads(b.removeprefix("data: ")) for b in blocks[:-1]]
        assert {e["type"] for e in events[:-1]} == {"transcript.text.delta"}
        done = events[-1]
        assert done["type"] == "transcript.text.done"
        assert "".join(e["delta"] for e in events[:-1]) == done["text"]
        assert done["text"].endswith(f"sha256={sha(audio)} model=gpt-4o-mini-transcribe")
        assert done["usage"]["type"] == "tokens"

    def test_a_translation(self) -> None:
        form = {"file": ("a.mp3", b"abc"), "model": "whisper-1", "response_format": "verbose_json"}
        payload = self.call("/v1/audio/translations", form=form).json()
        assert payload["task"] == "translate" and payload["language"] == "english"
        assert payload["text"].startswith("Translation from a: a.mp3 (3 bytes)")
        assert payload["text"].endswith(f"sha256={sha(b'abc')} model=whisper-1")

    def test_a_transcription_needs_file_and_model(self) -> None:
        path = "/v1/audio/transcriptions"
        self.assert_error(self.call(path, form={"model": "whisper-1"}), 400, "'file'")
        self.assert_error(self.call(path, form={"file": ("a.mp3", b"x")}), 400, "'model'")
        self.assert_error(self.call(path, {"model": "whisper-1"}), 400, "'file'")
        answer = self.call(path, form={"file": ("a.mp3", b"x"), "model": "whisper-1"}, key="no")
        assert answer.code == 401

    def test_multipart_knobs_come_from_config(self) -> None:
        self.mock.config = {"status": 503}
        form = {"file": ("a.mp3", b"x"), "model": "whisper-1"}
        assert self.call("/v1/audio/transcriptions", form=form).code == 503

    # -- images and moderations --------------------------------------------------------

    def test_image_generations(self) -> None:
        body = {"model": "gpt-image-1", "prompt": "a red fox", "n": 2}
        payload = self.call("/v1/images/generations", body).json()
        assert isinstance(payload["created"], int)
        assert len(payload["data"]) == 2
        pngs = [base64.b64decode(d["b64_json"]) for d in payload["data"]]
        assert all(p.startswith(b"\x89PNG\r\n\x1a\n") for p in pngs)
        assert pngs[0] != pngs[1]
        assert payload["usage"]["total_tokens"] > 0
        assert payload["size"] == "1024x1024"
        urls = self.call("/v1/images/generations", {"prompt": "fox", "model": "dall-e-2"}).json()
        assert urls["data"][0]["url"].startswith("https://")
        self.assert_error(self.call("/v1/images/generations", {"model": "dall-e-2"}), 400, "prompt")

    def test_image_edits_echo_the_image_hash(self) -> None:
        image = b"\x89PNG fake" * 50
        form = {"image": ("in.png", image), "prompt": "add a hat", "model": "dall-e-2", "n": "3"}
        payload = self.call("/v1/images/edits", form=form).json()
        assert len(payload["data"]) == 3
        assert payload["data"][0]["revised_prompt"] == f"add a hat (image sha256={sha(image)})"
        assert "url" in payload["data"][0]
        images = [("a.png", b"a"), ("b.png", b"b")]
        many = {"image[]": images, "prompt": "p", "model": "gpt-image-1"}
        revised = self.call("/v1/images/edits", form=many).json()["data"][0]["revised_prompt"]
        assert revised == f"p (image sha256={sha(b'a')},{sha(b'b')})"
        no_image = self.call("/v1/images/edits", form={"prompt": "p"})
        self.assert_error(no_image, 400, "'image'")

    def test_moderations(self) -> None:
        body = {"model": "omni-moderation-latest", "input": ["hello", "so much violence"]}
        payload = self.call("/v1/moderations", body).json()
        assert payload["id"].startswith("modr-")
        assert payload["model"] == "omni-moderation-latest"
        calm, violent = payload["results"]
        assert set(calm["categories"]) == set(CATEGORIES) == set(calm["category_scores"])
        assert calm["flagged"] is False and not any(calm["categories"].values())
        assert violent["flagged"] is True and violent["categories"]["violence"] is True
        assert calm["category_applied_input_types"]["violence"] == ["text"]
        again = self.call("/v1/moderations", {"input": "hello"}).json()["results"][0]
        assert again["category_scores"] == calm["category_scores"]
        self.assert_error(self.call("/v1/moderations", {"model": "m"}), 400, "'input'")

    # -- files and batches -------------------------------------------------------------

    def upload(self, data: bytes, purpose: str = "batch", name: str = "in.jsonl") -> Any:
        return self.call("/v1/files", form={"file": (name, data), "purpose": purpose}).json()

    def test_files(self) -> None:
        data = b'{"custom_id": "1"}\n' * 10
        made = self.upload(data)
        assert made["id"].startswith("file-")
        assert {k: v for k, v in made.items() if k not in ("id", "created_at")} == {
            "object": "file",
            "bytes": len(data),
            "filename": "in.jsonl",
            "purpose": "batch",
            "status": "processed",
            "expires_at": None,
            "status_details": None,
        }
        other = self.upload(b"x", "user_data", "x.txt")
        listed = self.call("/v1/files", method="GET").json()
        assert listed["object"] == "list" and listed["has_more"] is False
        assert [f["id"] for f in listed["data"]] == [other["id"], made["id"]]
        batch_only = self.call("/v1/files?purpose=batch", method="GET").json()
        assert [f["id"] for f in batch_only["data"]] == [made["id"]]
        one = self.call("/v1/files?limit=1", method="GET").json()
        assert len(one["data"]) == 1 and one["has_more"] is True
        assert self.call(f"/v1/files/{made['id']}", method="GET").json() == made
        content = self.call(f"/v1/files/{made['id']}/content", method="GET")
        assert content.body == data
        assert content.header("content-type") == "application/octet-stream"
        assert content.length == len(data)
        gone = self.call(f"/v1/files/{made['id']}", method="DELETE").json()
        assert gone == {"id": made["id"], "object": "file", "deleted": True}
        missing = self.call(f"/v1/files/{made['id']}", method="GET")
        assert missing.code == 404
        assert missing.json() == {
            "error": {
                "message": f"No such File object: {made['id']}",
                "type": "invalid_request_error",
                "param": None,
                "code": None,
            }
        }
        self.assert_error(self.call("/v1/files", form={"purpose": "batch"}), 400, "'file'")
        bad = self.call("/v1/files", form={"file": ("a", b"a"), "purpose": "nope"})
        self.assert_error(bad, 400, "purpose")

    def test_files_belong_to_one_instance(self) -> None:
        made = self.upload(b"abc")
        other = MockUpstream(self.clock, name="b", api_key=KEY)
        self.agent = RequestTraversalAgent(other.app.resource())
        self.client = upstream_client(self.agent)
        assert self.call(f"/v1/files/{made['id']}", method="GET").code == 404
        assert self.call(f"/v1/files/{made['id']}/content", method="GET").code == 404
        assert self.call("/v1/files", method="GET").json()["data"] == []
        batch = {"input_file_id": made["id"], "endpoint": "/v1/chat/completions"}
        answer = self.call("/v1/batches", dict(batch, completion_window="24h"))
        self.assert_error(answer, 404, f"No such File object: {made['id']}")

    def test_big_uploads_are_not_logged_as_text(self) -> None:
        data = bytes(range(256)) * 8192  # 2 MiB
        made = self.upload(data, "user_data")
        assert made["bytes"] == len(data)
        seen = self.mock.received[-1]
        assert seen["body"].startswith("<multipart ")
        assert len(json.dumps(seen)) < 2000
        assert self.mock.stats["bytes_received"] > len(data)
        content = self.call(f"/v1/files/{made['id']}/content", method="GET")
        assert sha(content.body) == sha(data)

    def test_batches(self) -> None:
        made = self.upload(b'{"custom_id": "1"}\n')
        body = {
            "input_file_id": made["id"],
            "endpoint": "/v1/chat/completions",
            "completion_window": "24h",
            "metadata": {"job": "nightly"},
        }
        batch = self.call("/v1/batches", body).json()
        assert batch["id"].startswith("batch_")
        assert batch["object"] == "batch" and batch["status"] == "validating"
        assert batch["input_file_id"] == made["id"]
        assert batch["endpoint"] == "/v1/chat/completions"
        assert batch["metadata"] == {"job": "nightly"}
        assert batch["request_counts"] == {"total": 0, "completed": 0, "failed": 0}
        assert batch["expires_at"] == batch["created_at"] + 86400
        assert self.call(f"/v1/batches/{batch['id']}", method="GET").json() == batch
        cancelling = self.call(f"/v1/batches/{batch['id']}/cancel").json()
        assert cancelling["status"] == "cancelling"
        later = self.call(f"/v1/batches/{batch['id']}", method="GET").json()
        assert later["status"] == "cancelled"
        second = self.call("/v1/batches", body).json()
        listed = self.call("/v1/batches", method="GET").json()
        assert [b["id"] for b in listed["data"]] == [second["id"], batch["id"]]
        assert listed["first_id"] == second["id"] and listed["last_id"] == batch["id"]
        assert listed["has_more"] is False
        assert self.call("/v1/batches/batch_nope", method="GET").code == 404

    def test_batches_are_validated(self) -> None:
        batch_file = self.upload(b"{}\n")
        other_file = self.upload(b"{}\n", "user_data")
        good = {
            "input_file_id": batch_file["id"],
            "endpoint": "/v1/chat/completions",
            "completion_window": "24h",
        }
        for param in good:
            partial = {k: v for k, v in good.items() if k != param}
            self.assert_error(self.call("/v1/batches", partial), 400, f"'{param}'")
        bad_endpoint = dict(good, endpoint="/v1/audio/speech")
        self.assert_error(self.call("/v1/batches", bad_endpoint), 400, "endpoint")
        self.assert_error(
            self.call("/v1/batches", dict(good, completion_window="1h")), 400, "completion_window"
        )
        self.assert_error(
            self.call("/v1/batches", dict(good, input_file_id="file-nope")),
            404,
            "No such File object: file-nope",
        )
        wrong = dict(good, input_file_id=other_file["id"])
        self.assert_error(self.call("/v1/batches", wrong), 400, "purpose")
        assert self.call("/v1/batches", method="GET").json()["data"] == []

    def test_knobs_and_auth_apply(self) -> None:
        assert self.call("/v1/files", method="GET", key="wrong").code == 401
        body = {"input": "x", "mock": {"status": 500}}
        assert self.call("/v1/moderations", body).code == 500
        self.mock.config = {"delay": 5}
        d = self.client.request(
            "GET", "http://a.test/v1/files", headers=Headers({"authorization": [f"Bearer {KEY}"]})
        )
        codes: list[int] = []
        d.addCallback(lambda response: codes.append(response.code))
        self.clock.advance(1)
        self.agent.flush()
        assert codes == []
        self.clock.advance(5)
        self.agent.flush()
        assert codes == [200]


class FakeRequest:
    """Just what a ``ByteStream`` uses of a request."""

    def __init__(self) -> None:
        self.written: list[int] = []
        self.producer: Any = None

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None

    def write(self, data: bytes) -> None:
        self.written.append(len(data))

    def notifyFinish(self) -> Deferred[None]:  # noqa: N802 (twisted.web's name)
        return Deferred()
