"""
The mock upstream's non-chat OpenAI surface: audio (speech, transcriptions,
translations), images (generations, edits), moderations, files and batches.

Everything here is deterministic so tests can check what came back: speech is
:func:`speech_bytes` of its text, voice and format; a transcript, an edit's
``revised_prompt`` and the logged form carry the sha256 of the uploaded bytes;
moderation scores come from the input's hash.  Multipart bodies are read with
``python_multipart``'s streaming parser, binary answers are written as push
producers in 16 KiB pieces.  Files and batches live on the mock instance that made
them.  The routes themselves are in :mod:`llmproxy.testing.mock`.
"""

from __future__ import annotations

import base64
import hashlib
import struct
import uuid
import zlib
from collections.abc import Callable
from typing import Any, Protocol

from attrs import define, field
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.web.server import Request as IRequest
from zope.interface import implementer

JSONDict = dict[str, Any]

CHUNK = 16 * 1024
SPEECH_SIZE = 300 * 1024
SPEECH_TYPES = {
    "mp3": "audio/mpeg",
    "opus": "audio/opus",
    "aac": "audio/aac",
    "flac": "audio/flac",
    "wav": "audio/wav",
    "pcm": "audio/pcm",
}
_MAGIC = {"mp3": b"ID3\x04\x00\x00", "opus": b"OggS", "flac": b"fLaC", "wav": b"RIFF", "aac": b""}
TRANSCRIPT_FORMATS = ("json", "text", "srt", "verbose_json", "vtt")
FILE_PURPOSES = ("assistants", "batch", "fine-tune", "vision", "user_data", "evals")
BATCH_ENDPOINTS = (
    "/v1/responses",
    "/v1/chat/completions",
    "/v1/embeddings",
    "/v1/completions",
    "/v1/moderations",
)
CATEGORIES = (
    "harassment",
    "harassment/threatening",
    "hate",
    "hate/threatening",
    "illicit",
    "illicit/violent",
    "self-harm",
    "self-harm/intent",
    "self-harm/instructions",
    "sexual",
    "sexual/minors",
    "violence",
    "violence/graphic",
)
_IMAGE_CATEGORIES = {
    c for c in CATEGORIES if c.split("/")[0] in ("self-harm", "sexual", "violence")
}
_IMAGE_CATEGORIES.discard("sexual/minors")  # text only


def speech_bytes(text: str, voice: str, fmt: str = "mp3") -> bytes:
    """The audio ``POST /v1/audio/speech`` answers: ~300 KB from sha256 of voice and text."""
    seed = hashlib.sha256(f"{fmt}\0{voice}\0{text}".encode()).digest()
    blocks = (
        hashlib.sha256(seed + struct.pack(">I", i)).digest() for i in range(SPEECH_SIZE // 32)
    )
    return (_MAGIC.get(fmt, b"") + b"".join(blocks))[:SPEECH_SIZE]


def png(seed: bytes, side: int = 8) -> bytes:
    """A real (tiny) PNG, one colour taken from ``seed``."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    rows = b"".join(b"\0" + seed[:3] * side for _ in range(side))
    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def error(message: str, param: str | None = None, code: str | None = None) -> JSONDict:
    """An OpenAI-shaped ``invalid_request_error`` body."""
    return {
        "error": {
            "message": message,
            "type": "invalid_request_error",
            "param": param,
            "code": code,
        }
    }


def missing(param: str) -> JSONDict:
    return error(f"Missing required parameter: '{param}'.", param, "missing_required_parameter")


def not_found(kind: str, object_id: str) -> JSONDict:
    return error(f"No such {kind} object: {object_id}")


def _new_id(prefix: str) -> str:
    return prefix + uuid.uuid4().hex[:24]


# -- multipart ---------------------------------------------------------------------


@define
class Upload:
    """One file part of a multipart form."""

    name: str
    filename: str
    content_type: str
    data: bytes

    @property
    def sha256(self) -> str:
        return sha256(self.data)

    def describe(self) -> JSONDict:
        return {
            "filename": self.filename,
            "content_type": self.content_type,
            "bytes": len(self.data),
            "sha256": self.sha256,
        }


@define
class _Part:
    headers: dict[str, str] = field(factory=dict)
    data: list[bytes] = field(factory=list)


class _FormReader:
    """The callbacks of a ``MultipartParser``: collects parts, then fields and uploads."""

    def __init__(self) -> None:
        self.parts: list[_Part] = []
        self.header = [b"", b""]

    def callbacks(self) -> dict[str, Callable[..., None]]:
        return {
            "on_part_begin": lambda: self.parts.append(_Part()),
            "on_part_data": lambda d, s, e: self.parts[-1].data.append(d[s:e]),
            "on_header_field": lambda d, s, e: self._grow(0, d[s:e]),
            "on_header_value": lambda d, s, e: self._grow(1, d[s:e]),
            "on_header_end": self._header_end,
        }

    def _grow(self, which: int, data: bytes) -> None:
        self.header[which] += data

    def _header_end(self) -> None:
        name, value = self.header
        self.parts[-1].headers[name.decode("latin-1").lower()] = value.decode("latin-1")
        self.header = [b"", b""]

    def form(self) -> JSONDict:
        """Text fields as ``str``, files as :class:`Upload`; ``name[]`` fields as lists."""
        found: JSONDict = {}
        for part in self.parts:
            disposition = parse_options_header(part.headers.get("content-disposition"))[1]
            name = disposition.get(b"name", b"").decode()
            data = b"".join(part.data)
            value: Any = data.decode("utf-8", "replace")
            if b"filename" in disposition:
                kind = part.headers.get("content-type", "application/octet-stream")
                value = Upload(name, disposition[b"filename"].decode(), kind, data)
            if name.endswith("[]"):
                found.setdefault(name, []).append(value)
            else:
                found.setdefault(name, value)
        return found


def is_multipart(content_type: str) -> bool:
    return content_type.lower().startswith("multipart/form-data")


def read_form(request: IRequest, content_type: str) -> tuple[JSONDict, JSONDict, int] | None:
    """
    Stream the request's multipart body through ``python_multipart``: the form,
    what the log keeps of it (no file bytes) and the body's size.  None (and the
    body rewound) if it is not a well-formed form with at least one part.
    """
    reader = _FormReader()
    size = 0
    boundary = parse_options_header(content_type)[1].get(b"boundary")
    content = request.content
    if not boundary or content is None:
        return None
    try:
        parser = MultipartParser(boundary, reader.callbacks())
        for piece in iter(lambda: content.read(64 * 1024), b""):
            size += len(piece)
            parser.write(piece)
        parser.finalize()
        form = reader.form()
    except (MultipartParseError, ValueError):
        form = {}
    if not form:
        content.seek(0)
        return None
    seen = {
        k: [_described(i) for i in v] if isinstance(v, list) else _described(v)
        for k, v in form.items()
    }
    return form, {"body": f"<multipart {size} bytes>", "form": seen}, size


def _described(value: Any) -> Any:
    return value.describe() if isinstance(value, Upload) else value


def logged_body(raw: bytes, parsed: bool) -> str:
    """What the request log keeps of a non-multipart body (big non-JSON: its size)."""
    if not parsed and len(raw) > 64 * 1024:
        return f"<{len(raw)} bytes>"
    return raw.decode("utf-8", "replace")


# -- rendering ---------------------------------------------------------------------


class Host(Protocol):
    """What the handlers use of :class:`llmproxy.testing.mock.MockUpstream`."""

    reactor: IReactorTime
    name: str
    stats: dict[str, int]
    files: FileStore
    batches: BatchStore

    def _json(self, request: IRequest, status: int, payload: object, knobs: JSONDict) -> bytes: ...

    def _stream(
        self, request: IRequest, events: list[bytes], knobs: JSONDict
    ) -> Deferred[None]: ...

    def sse(self, data: JSONDict | str, event: str | None = None) -> bytes: ...


def _headers(host: Host, request: IRequest, status: int, kind: str, knobs: JSONDict) -> None:
    request.setResponseCode(status)
    request.setHeader("content-type", kind)
    request.setHeader("x-mock-upstream", host.name)
    for key, value in (knobs.get("headers") or {}).items():
        request.setHeader(key, str(value))


def text(host: Host, request: IRequest, body: str, kind: str, knobs: JSONDict) -> bytes:
    _headers(host, request, 200, f"{kind}; charset=utf-8", knobs)
    return body.encode()


def binary(
    host: Host, request: IRequest, data: bytes, kind: str, knobs: JSONDict, sized: bool
) -> Deferred[None]:
    """Answer ``data`` in pieces as a push producer (``sized``: with a content-length)."""
    _headers(host, request, 200, kind, knobs)
    if sized:
        request.setHeader("content-length", str(len(data)))
    return ByteStream(host, request, data, float(knobs.get("interval", 0))).start()


@implementer(IPushProducer)
class ByteStream:
    """
    Writes bytes to a request 16 KiB per reactor turn (or per ``interval``) as a
    registered push producer: a client that stops reading pauses it.
    """

    def __init__(self, host: Host, request: IRequest, data: bytes, interval: float) -> None:
        self.host = host
        self.request = request
        self.data = data
        self.interval = interval
        self.sent = 0
        self.paused = False
        self.stopped = False
        self.call: Any = None
        self.done: Deferred[None] = Deferred(lambda _: self._stop())

    def start(self) -> Deferred[None]:
        self.request.registerProducer(self, True)
        self.request.notifyFinish().addErrback(lambda _: self.stopProducing())
        self._schedule(0)
        return self.done

    def _schedule(self, delay: float) -> None:
        if not (self.paused or self.stopped) and (self.call is None or not self.call.active()):
            self.call = self.host.reactor.callLater(delay, self._tick)

    def _tick(self) -> None:
        self.call = None
        if self.paused or self.stopped:
            return
        if self.sent >= len(self.data):
            self.stopped = True
            self.request.unregisterProducer()
            self.done.callback(None)
            return
        piece = self.data[self.sent : self.sent + CHUNK]
        self.sent += len(piece)
        self.host.stats["bytes_streamed"] += len(piece)
        self.request.write(piece)
        self._schedule(self.interval)

    def _stop(self) -> None:
        self.stopped = True
        if self.call is not None and self.call.active():
            self.call.cancel()

    def pauseProducing(self) -> None:
        if not self.paused:
            self.host.stats["pauses"] += 1
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        self._schedule(self.interval)

    def stopProducing(self) -> None:
        if not self.stopped:
            self.host.stats["disconnects"] += 1
            self._stop()


# -- audio -------------------------------------------------------------------------


def speech(host: Host, request: IRequest, body: JSONDict, knobs: JSONDict) -> Any:
    for param in ("model", "input", "voice"):
        if not body.get(param):
            return host._json(request, 400, missing(param), {})
    said, fmt = str(body["input"]), str(body.get("response_format") or "mp3")
    if len(said) > 4096:
        message = "Input is too long: at most 4096 characters."
        return host._json(request, 400, error(message, "input", "string_above_max_length"), {})
    if fmt not in SPEECH_TYPES:
        message = f"Invalid response_format {fmt!r}: one of {', '.join(SPEECH_TYPES)}."
        return host._json(request, 400, error(message, "response_format", "invalid_value"), {})
    voice = body["voice"]
    voice = str(voice.get("id", "")) if isinstance(voice, dict) else str(voice)
    audio = speech_bytes(said, voice, fmt)
    return binary(host, request, audio, SPEECH_TYPES[fmt], knobs, sized=False)


def transcribe(
    host: Host, request: IRequest, body: JSONDict, knobs: JSONDict, task: str = "transcribe"
) -> Any:
    """``/v1/audio/transcriptions`` (``task="transcribe"``) and ``/translations``."""
    upload = body.get("file")
    if not isinstance(upload, Upload):
        return host._json(request, 400, missing("file"), {})
    if not body.get("model"):
        return host._json(request, 400, missing("model"), {})
    model, fmt = str(body["model"]), str(body.get("response_format") or "json")
    if fmt not in TRANSCRIPT_FORMATS:
        message = f"Invalid response_format {fmt!r}: one of {', '.join(TRANSCRIPT_FORMATS)}."
        return host._json(request, 400, error(message, "response_format", "invalid_value"), {})
    what = "Transcript" if task == "transcribe" else "Translation"
    said = (
        f"{what} from {host.name}: {upload.filename} ({len(upload.data)} bytes)"
        f" sha256={upload.sha256} model={model}"
    )
    seconds = round(max(1.0, len(upload.data) / 16000), 2)
    stamp = f"{int(seconds // 60):02d}:{seconds % 60:06.3f}"
    if fmt == "text":
        return text(host, request, said + "\n", "text/plain", knobs)
    if fmt in ("srt", "vtt"):
        cue = f"00:00:00.000 --> 00:{stamp}\n{said}\n\n"
        framed = f"WEBVTT\n\n{cue}" if fmt == "vtt" else "1\n" + cue.replace(".", ",", 2)
        return text(host, request, framed, "text/plain", knobs)
    usage = _transcript_usage(model, said, seconds)
    if fmt == "verbose_json":
        return host._json(request, 200, _verbose(body, said, seconds, task), knobs)
    if task == "transcribe" and str(body.get("stream", "")).lower() == "true":
        return host._stream(request, _transcript_events(host, said, usage), knobs)
    return host._json(request, 200, {"text": said, "usage": usage}, knobs)


def _transcript_usage(model: str, said: str, seconds: float) -> JSONDict:
    if model.startswith("whisper"):
        return {"type": "duration", "seconds": int(seconds + 0.999)}
    audio, words = int(seconds * 10), len(said.split())
    return {
        "type": "tokens",
        "input_tokens": audio,
        "input_token_details": {"text_tokens": 0, "audio_tokens": audio},
        "output_tokens": words,
        "total_tokens": audio + words,
    }


def _verbose(body: JSONDict, said: str, seconds: float, task: str) -> JSONDict:
    segment = {
        "id": 0,
        "seek": 0,
        "start": 0.0,
        "end": seconds,
        "text": said,
        "tokens": [50364 + i for i in range(len(said.split()))],
        "temperature": 0.0,
        "avg_logprob": -0.25,
        "compression_ratio": 1.2,
        "no_speech_prob": 0.01,
    }
    payload: JSONDict = {
        "task": task,
        "language": "english" if task == "translate" else str(body.get("language") or "english"),
        "duration": seconds,
        "text": said,
        "segments": [segment],
        "usage": {"type": "duration", "seconds": int(seconds + 0.999)},
    }
    if "word" in (body.get("timestamp_granularities[]") or []):
        step = seconds / max(1, len(said.split()))
        payload["words"] = [
            {"word": w, "start": round(i * step, 3), "end": round((i + 1) * step, 3)}
            for i, w in enumerate(said.split())
        ]
    return payload


def _transcript_events(host: Host, said: str, usage: JSONDict) -> list[bytes]:
    """A transcription stream: ``data:``-only events (the event's name is its ``type``)."""
    words = said.split(" ")
    events = [
        host.sse({"type": "transcript.text.delta", "delta": w if i == 0 else " " + w})
        for i, w in enumerate(words)
    ]
    events.append(host.sse({"type": "transcript.text.done", "text": said, "usage": usage}))
    return events


# -- images ------------------------------------------------------------------------


def images(host: Host, request: IRequest, body: JSONDict, knobs: JSONDict) -> bytes:
    """``/v1/images/generations`` (JSON) and ``/v1/images/edits`` (multipart, ``image``)."""
    editing = request.path.endswith(b"/edits")
    uploads = body.get("image[]") or body.get("image")
    uploads = [u for u in (uploads if isinstance(uploads, list) else [uploads]) if u]
    if editing and not all(isinstance(u, Upload) for u in uploads):
        uploads = []
    if editing and not uploads:
        return host._json(request, 400, missing("image"), {})
    if not body.get("prompt"):
        return host._json(request, 400, missing("prompt"), {})
    try:
        n = int(body.get("n") or 1)
    except ValueError:
        n = 0
    if not 1 <= n <= 10:
        message = f"Invalid n {body.get('n')!r}: between 1 and 10."
        return host._json(request, 400, error(message, "n", "invalid_value"), {})
    prompt, model = str(body["prompt"]), str(body.get("model") or "dall-e-2")
    gpt_image = model.startswith("gpt-image")
    fmt = str(body.get("response_format") or ("b64_json" if gpt_image else "url"))
    if fmt not in ("url", "b64_json"):
        message = f"Invalid response_format {fmt!r}: one of url, b64_json."
        return host._json(request, 400, error(message, "response_format", "invalid_value"), {})
    revised = prompt
    if editing:
        revised = f"{prompt} (image sha256={','.join(u.sha256 for u in uploads)})"
    data = []
    for index in range(n):
        seed = hashlib.sha256(f"{model}\0{index}\0{revised}".encode()).digest()
        item: JSONDict = {"revised_prompt": revised} if editing or model == "dall-e-3" else {}
        if fmt == "b64_json":
            item["b64_json"] = base64.b64encode(png(seed)).decode()
        else:
            item["url"] = f"https://images.mock.invalid/{host.name}/{seed.hex()[:32]}.png"
        data.append(item)
    words = max(1, len(prompt.split()))
    payload: JSONDict = {
        "created": int(host.reactor.seconds()),
        "data": data,
        "usage": {
            "input_tokens": words + 194 * len(uploads),
            "input_tokens_details": {"text_tokens": words, "image_tokens": 194 * len(uploads)},
            "output_tokens": 272 * n,
            "total_tokens": words + 194 * len(uploads) + 272 * n,
        },
    }
    if gpt_image:
        payload.update(background="opaque", output_format="png", quality="medium")
        payload["size"] = str(body.get("size") or "1024x1024")
    return host._json(request, 200, payload, knobs)


# -- moderations -------------------------------------------------------------------


def moderations(host: Host, request: IRequest, body: JSONDict, knobs: JSONDict) -> bytes:
    """One result per input string (one for a list of text and image parts)."""
    given = body.get("input")
    if given in (None, "", []):
        return host._json(request, 400, missing("input"), {})
    if isinstance(given, list) and all(isinstance(i, dict) for i in given):
        said = " ".join(str(p.get("text", "")) for p in given)
        imaged = any(p.get("type") == "image_url" for p in given)
        results = [_moderation(said, imaged)]
    else:
        results = [
            _moderation(str(i), False) for i in (given if isinstance(given, list) else [given])
        ]
    payload = {
        "id": _new_id("modr-"),
        "model": str(body.get("model") or "omni-moderation-latest"),
        "results": results,
    }
    return host._json(request, 200, payload, knobs)


def _moderation(said: str, imaged: bool) -> JSONDict:
    """Low scores from the text's hash; a category named in the text scores high."""
    lowered, scores = said.lower(), {}
    for category in CATEGORIES:
        digest = hashlib.sha256(f"{category}\0{said}".encode()).digest()
        score = int.from_bytes(digest[:4], "big") / 2**32 / 1000
        if "/" not in category and category in lowered:
            score += 0.9
        scores[category] = score
    applied = {
        c: ["text", "image"] if imaged and c in _IMAGE_CATEGORIES else ["text"] for c in CATEGORIES
    }
    flags = {c: s > 0.5 for c, s in scores.items()}
    return {
        "flagged": any(flags.values()),
        "categories": flags,
        "category_scores": scores,
        "category_applied_input_types": applied,
    }


# -- files and batches -------------------------------------------------------------


@define
class StoredFile:
    info: JSONDict
    data: bytes


def _page(items: list[JSONDict], limit: int, after: str | None) -> JSONDict:
    """A cursor page of ``items`` (already in order): those after ``after``, ``limit`` of them."""
    ids = [i["id"] for i in items]
    if after in ids:
        items = items[ids.index(after) + 1 :]
    page = items[: max(0, limit)]
    return {
        "object": "list",
        "data": page,
        "first_id": page[0]["id"] if page else None,
        "last_id": page[-1]["id"] if page else None,
        "has_more": len(items) > len(page),
    }


class FileStore:
    """The files uploaded to one mock instance."""

    def __init__(self, reactor: IReactorTime) -> None:
        self.reactor = reactor
        self.files: dict[str, StoredFile] = {}

    def add(self, upload: Upload, purpose: str) -> JSONDict:
        info = {
            "id": _new_id("file-"),
            "object": "file",
            "bytes": len(upload.data),
            "created_at": int(self.reactor.seconds()),
            "filename": upload.filename,
            "purpose": purpose,
            "status": "processed",
            "expires_at": None,
            "status_details": None,
        }
        self.files[str(info["id"])] = StoredFile(info, upload.data)
        return info

    def get(self, file_id: str) -> StoredFile | None:
        return self.files.get(file_id)

    def delete(self, file_id: str) -> bool:
        return self.files.pop(file_id, None) is not None

    def listing(self, args: dict[bytes, list[bytes]]) -> JSONDict:
        """``GET /v1/files``: newest first (``order=asc``: oldest), by ``purpose``."""
        query = {k.decode(): v[0].decode() for k, v in args.items() if v}
        items = [f.info for f in self.files.values()]
        if query.get("order", "desc") == "desc":
            items.reverse()
        if query.get("purpose"):
            items = [i for i in items if i["purpose"] == query["purpose"]]
        return _page(items, int(query.get("limit") or 10000), query.get("after"))


class BatchStore:
    """The batches of one mock instance; their input files must be on it too."""

    def __init__(self, reactor: IReactorTime, files: FileStore) -> None:
        self.reactor = reactor
        self.files = files
        self.batches: dict[str, JSONDict] = {}

    def create(self, body: JSONDict) -> tuple[int, JSONDict]:
        for param in ("input_file_id", "endpoint", "completion_window"):
            if not body.get(param):
                return 400, missing(param)
        if body["endpoint"] not in BATCH_ENDPOINTS:
            message = f"Invalid endpoint {body['endpoint']!r}: one of {', '.join(BATCH_ENDPOINTS)}."
            return 400, error(message, "endpoint", "invalid_value")
        if body["completion_window"] != "24h":
            message = f"Invalid completion_window {body['completion_window']!r}: only '24h'."
            return 400, error(message, "completion_window", "invalid_value")
        file_id = str(body["input_file_id"])
        stored = self.files.get(file_id)
        if stored is None:
            return 404, not_found("File", file_id)
        if stored.info["purpose"] != "batch":
            message = f"The input file must have purpose 'batch', not {stored.info['purpose']!r}."
            return 400, error(message, "input_file_id", "invalid_file_purpose")
        now = int(self.reactor.seconds())
        batch = dict.fromkeys(
            ("cancelled_at", "cancelling_at", "completed_at", "error_file_id", "errors")
            + ("expired_at", "failed_at", "finalizing_at", "in_progress_at", "model")
            + ("output_file_id", "usage")
        )
        batch.update(
            id=_new_id("batch_"),
            object="batch",
            endpoint=body["endpoint"],
            input_file_id=body["input_file_id"],
            completion_window="24h",
            status="validating",
            created_at=now,
            expires_at=now + 24 * 3600,
            request_counts={"total": 0, "completed": 0, "failed": 0},
            metadata=body.get("metadata"),
        )
        self.batches[str(batch["id"])] = batch
        return 200, batch

    def get(self, batch_id: str) -> JSONDict | None:
        """The batch; one that was cancelling is cancelled by the time it is looked at again."""
        batch = self.batches.get(batch_id)
        if batch is not None and batch["status"] == "cancelling":
            batch.update(status="cancelled", cancelled_at=int(self.reactor.seconds()))
        return batch

    def cancel(self, batch_id: str) -> JSONDict | None:
        batch = self.batches.get(batch_id)
        if batch is not None and batch["status"] in ("validating", "in_progress"):
            batch.update(status="cancelling", cancelling_at=int(self.reactor.seconds()))
        return batch

    def listing(self, args: dict[bytes, list[bytes]]) -> JSONDict:
        query = {k.decode(): v[0].decode() for k, v in args.items() if v}
        items = list(reversed(self.batches.values()))
        return _page(items, int(query.get("limit") or 20), query.get("after"))


def create_file(host: Host, request: IRequest, body: JSONDict, knobs: JSONDict) -> bytes:
    upload = body.get("file")
    if not isinstance(upload, Upload):
        return host._json(request, 400, missing("file"), {})
    purpose = body.get("purpose")
    if not purpose:
        return host._json(request, 400, missing("purpose"), {})
    if purpose not in FILE_PURPOSES:
        message = f"Invalid purpose {purpose!r}: one of {', '.join(FILE_PURPOSES)}."
        return host._json(request, 400, error(message, "purpose", "invalid_value"), {})
    return host._json(request, 200, host.files.add(upload, str(purpose)), knobs)


def list_files(host: Host, request: IRequest, body: JSONDict, knobs: JSONDict) -> bytes:
    return host._json(request, 200, host.files.listing(request.args or {}), knobs)


def file_info(
    host: Host, file_id: str, request: IRequest, body: JSONDict, knobs: JSONDict
) -> bytes:
    stored = host.files.get(file_id)
    if stored is None:
        return host._json(request, 404, not_found("File", file_id), {})
    return host._json(request, 200, stored.info, knobs)


def file_content(
    host: Host, file_id: str, request: IRequest, body: JSONDict, knobs: JSONDict
) -> Any:
    stored = host.files.get(file_id)
    if stored is None:
        return host._json(request, 404, not_found("File", file_id), {})
    return binary(host, request, stored.data, "application/octet-stream", knobs, sized=True)


def delete_file(
    host: Host, file_id: str, request: IRequest, body: JSONDict, knobs: JSONDict
) -> bytes:
    if not host.files.delete(file_id):
        return host._json(request, 404, not_found("File", file_id), {})
    return host._json(request, 200, {"id": file_id, "object": "file", "deleted": True}, knobs)


def create_batch(host: Host, request: IRequest, body: JSONDict, knobs: JSONDict) -> bytes:
    status, payload = host.batches.create(body)
    return host._json(request, status, payload, knobs if status == 200 else {})


def list_batches(host: Host, request: IRequest, body: JSONDict, knobs: JSONDict) -> bytes:
    return host._json(request, 200, host.batches.listing(request.args or {}), knobs)


def batch_info(
    host: Host, batch_id: str, request: IRequest, body: JSONDict, knobs: JSONDict
) -> bytes:
    batch = host.batches.get(batch_id)
    if batch is None:
        return host._json(request, 404, not_found("Batch", batch_id), {})
    return host._json(request, 200, batch, knobs)


def cancel_batch(
    host: Host, batch_id: str, request: IRequest, body: JSONDict, knobs: JSONDict
) -> bytes:
    batch = host.batches.cancel(batch_id)
    if batch is None:
        return host._json(request, 404, not_found("Batch", batch_id), {})
    return host._json(request, 200, batch, knobs)
