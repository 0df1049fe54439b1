"""
The mock upstream's audio, images, moderations, files and batches as the official
``openai`` SDK sees them, against a real ``twistd -n llmproxy-mock`` process.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Iterator

import openai
import pytest

from llmproxy.testing.media import SPEECH_SIZE, speech_bytes
from llmproxy.testing.processes import Mock

KEY = "k"


@pytest.fixture(scope="module")
def media_mock(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mock]:
    m = Mock(tmp_path_factory.mktemp("media"), "a", api_key=KEY)
    yield m
    m.stop()


@pytest.fixture
def client(media_mock: Mock) -> openai.OpenAI:
    media_mock.reset()
    return openai.OpenAI(base_url=media_mock.base_url, api_key=KEY, max_retries=0)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_speech(client: openai.OpenAI, media_mock: Mock) -> None:
    with client.audio.speech.with_streaming_response.create(
        model="gpt-4o-mini-tts", voice="alloy", input="Read this aloud."
    ) as response:
        assert response.headers["content-type"] == "audio/mpeg"
        pieces = list(response.iter_bytes())
    audio = b"".join(pieces)
    assert audio == speech_bytes("Read this aloud.", "alloy", "mp3")
    assert len(audio) == SPEECH_SIZE
    assert media_mock.stats()["bytes_streamed"] == SPEECH_SIZE
    flac = client.audio.speech.create(
        model="tts-1", voice="echo", input="again", response_format="flac"
    )
    assert flac.content == speech_bytes("again", "echo", "flac")


def test_transcription(client: openai.OpenAI, media_mock: Mock) -> None:
    audio = bytes(range(256)) * 400
    result = client.audio.transcriptions.create(file=("talk.mp3", audio), model="whisper-1")
    assert result.text.endswith(f"sha256={sha(audio)} model=whisper-1")
    seen = media_mock.requests()[-1]
    assert seen["path"] == "/v1/audio/transcriptions"
    assert seen["headers"]["authorization"] == f"Bearer {KEY}"
    assert seen["form"]["file"] == {
        "filename": "talk.mp3",
        "content_type": "audio/mpeg",
        "bytes": len(audio),
        "sha256": sha(audio),
    }
    assert seen["body"].startswith("<multipart ")
    assert media_mock.stats()["bytes_received"] > len(audio)
    text = client.audio.transcriptions.create(
        file=("talk.mp3", audio), model="whisper-1", response_format="text"
    )
    assert text.strip() == result.text
    verbose = client.audio.transcriptions.create(
        file=("talk.mp3", audio), model="whisper-1", response_format="verbose_json"
    )
    assert verbose.text == result.text and verbose.segments and verbose.duration > 0
    with pytest.warns(DeprecationWarning):  # the SDK marks translations deprecated
        translated = client.audio.translations.create(file=("talk.mp3", audio), model="whisper-1")
    assert translated.text.startswith("Translation from a:")


def test_transcription_stream(client: openai.OpenAI) -> None:
    audio = b"\x01" * 3000
    events = list(
        client.audio.transcriptions.create(
            file=("a.wav", audio), model="gpt-4o-mini-transcribe", stream=True
        )
    )
    assert [e.type for e in events[:-1]] == ["transcript.text.delta"] * (len(events) - 1)
    done = events[-1]
    assert done.type == "transcript.text.done"
    assert "".join(e.delta for e in events[:-1] if e.type == "transcript.text.delta") == done.text
    assert done.text.endswith(f"sha256={sha(audio)} model=gpt-4o-mini-transcribe")


def test_a_transcription_without_a_file_is_a_400(media_mock: Mock) -> None:
    raw = openai.OpenAI(base_url=media_mock.base_url, api_key=KEY, max_retries=0)
    with pytest.raises(openai.BadRequestError) as caught:
        raw.post(
            "/audio/transcriptions",
            body={"model": "whisper-1"},
            files=[("audio", ("a.mp3", b"x"))],
            cast_to=object,
            options={"headers": {"content-type": "multipart/form-data"}},
        )
    assert caught.value.status_code == 400
    assert "'file'" in caught.value.message
    assert media_mock.requests()[-1]["form"]["audio"]["filename"] == "a.mp3"


def test_images(client: openai.OpenAI) -> None:
    made = client.images.generate(model="gpt-image-1", prompt="a red fox", n=2)
    assert made.data is not None and len(made.data) == 2
    assert all(
        base64.b64decode(i.b64_json or "").startswith(b"\x89PNG\r\n\x1a\n") for i in made.data
    )
    assert made.usage is not None and made.usage.total_tokens > 0
    image = b"\x89PNG not really" * 64
    edited = client.images.edit(image=("in.png", image, "image/png"), prompt="add a hat")
    assert edited.data is not None
    assert edited.data[0].revised_prompt == f"add a hat (image sha256={sha(image)})"


def test_moderations(client: openai.OpenAI) -> None:
    result = client.moderations.create(model="omni-moderation-latest", input=["hello", "violence!"])
    assert result.id.startswith("modr-") and result.model == "omni-moderation-latest"
    calm, violent = result.results
    assert calm.flagged is False and calm.categories.violence is False
    assert violent.flagged is True and violent.categories.violence is True
    assert 0 <= calm.category_scores.harassment < 0.01
    again = client.moderations.create(input="hello")
    assert again.results[0].category_scores == calm.category_scores


def test_files_and_batches(client: openai.OpenAI, media_mock: Mock) -> None:
    lines = [
        {
            "custom_id": str(i),
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {"model": "m", "messages": [{"role": "user", "content": "hi"}]},
        }
        for i in range(3)
    ]
    data = "".join(json.dumps(line) + "\n" for line in lines).encode()
    uploaded = client.files.create(file=("batch.jsonl", data), purpose="batch")
    assert uploaded.id.startswith("file-") and uploaded.bytes == len(data)
    assert uploaded.status == "processed" and uploaded.filename == "batch.jsonl"
    assert client.files.retrieve(uploaded.id) == uploaded
    assert [f.id for f in client.files.list(purpose="batch")] == [uploaded.id]
    assert client.files.content(uploaded.id).content == data
    batch = client.batches.create(
        input_file_id=uploaded.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata={"job": "nightly"},
    )
    assert batch.id.startswith("batch_") and batch.status == "validating"
    assert batch.input_file_id == uploaded.id and batch.metadata == {"job": "nightly"}
    assert client.batches.retrieve(batch.id) == batch
    assert [b.id for b in client.batches.list()] == [batch.id]
    assert client.batches.cancel(batch.id).status == "cancelling"
    assert client.batches.retrieve(batch.id).status == "cancelled"
    with pytest.raises(openai.NotFoundError) as caught:
        client.batches.create(
            input_file_id="file-elsewhere",
            endpoint="/v1/chat/completions",
            completion_window="24h",
        )
    assert caught.value.message.endswith("No such File object: file-elsewhere")
    deleted = client.files.delete(uploaded.id)
    assert deleted.deleted is True and deleted.id == uploaded.id
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(uploaded.id)


def test_auth_and_knobs(client: openai.OpenAI, media_mock: Mock) -> None:
    wrong = openai.OpenAI(base_url=media_mock.base_url, api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.files.list()
    media_mock.configure(status=503)
    with pytest.raises(openai.InternalServerError):
        client.audio.transcriptions.create(file=("a.mp3", b"x"), model="whisper-1")
