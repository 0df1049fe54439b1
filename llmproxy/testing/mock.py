"""
A mock OpenAI-compatible (and Anthropic Messages) upstream, on Klein, with real wire framing.

Tests use it as the backend behind llmproxy (in memory through StubTreq, or as a
real ``twistd -n llmproxy-mock`` process), and users run it to try the proxy
without an API key.  It answers chat completions (streamed: role chunk, content
deltas, finish chunk, usage chunk when ``stream_options.include_usage``,
``[DONE]``), legacy completions, embeddings (float and base64), the Responses
API (typed ``event:`` stream, retrieval, delete, cancel, input items) and models.

It speaks the Anthropic Messages API too (shapes in :mod:`llmproxy.testing.anthropic`):
``POST /v1/messages`` (a ``Message``; streamed: ``message_start``,
``content_block_start``, ``ping``, ``content_block_delta``..., ``content_block_stop``,
``message_delta``, ``message_stop``; ``max_tokens`` required, a longer reply cut with
``stop_reason: max_tokens``), ``POST /v1/messages/count_tokens`` and ``GET /v1/models``
with an ``anthropic-version`` header.  There the key must come as ``x-api-key`` (401
``authentication_error`` otherwise), ``anthropic-version`` is required (400), every error
is ``{"type": "error", "error": {"type": ..., "message": ...}}`` (the ``status`` knob's
default body too) and answers carry a ``request-id`` header.

And the rest of the OpenAI surface (shapes in :mod:`llmproxy.testing.media`)::

    POST   /v1/audio/speech              JSON; binary audio (``media.speech_bytes`` of
                                         input, voice, format), streamed 16 KiB a turn
    POST   /v1/audio/transcriptions      multipart (file, model, response_format json |
    POST   /v1/audio/translations        text | verbose_json | srt | vtt, stream): the
                                         text names the file's sha256 and the model;
                                         ``stream=true``: ``transcript.text.delta``...,
                                         ``transcript.text.done``
    POST   /v1/images/generations        JSON; ``n`` PNGs as ``b64_json`` or ``url``
    POST   /v1/images/edits              multipart (image, prompt, model, n); the
                                         image's sha256 in ``revised_prompt``
    POST   /v1/moderations               deterministic scores per input
    POST   /v1/files                     multipart (file, purpose); GET lists them
                                         (``purpose``, ``limit``, ``order``, ``after``)
    GET    /v1/files/{id}, DELETE too    the file object; ``/content`` its bytes
    POST   /v1/batches                   its ``input_file_id`` must be a ``batch`` file
                                         of this instance; GET lists them
    GET    /v1/batches/{id}              ``POST .../cancel``: ``cancelling``, then
                                         ``cancelled``

Files and batches exist only on the instance that made them; an unknown id is a 404
``No such File object: <id>``.  A multipart request's knobs come only from
``POST /_mock/config``; the log keeps its form (a file as name, size and sha256) and
``"body": "<multipart N bytes>"``.

Fault knobs, for tests, come from ``POST /_mock/config`` (every later request) or
from a ``mock`` object in the request body (that request only)::

    status, body, headers   answer with this status / JSON body / extra headers
    delay                   seconds before the response headers
    hang                    never answer (until the client goes away)
    gate                    wait until ``POST /_mock/release`` (tests line requests up)
    gate_after              send the headers and this many stream events, then wait
                            until ``POST /_mock/release`` before the rest
    stall_after_headers     send the headers (and ``stall_after`` events), then nothing
    cut_after               close the connection after this many stream events
    cut_body                a non-streamed 200: half its body, then close the connection
    interval                seconds between stream events
    comment                 send ``: {comment}`` (an SSE comment) before each stream event
    words                   how many content deltas (default: the reply's words)
    infinite, chunk_bytes   stream filler events forever, as a push producer
    omit_done               end a chat stream cleanly but without ``data: [DONE]``
    error_chunk             end a chat stream with ``data: {"error": ...}`` then ``[DONE]``
                            (a messages stream: ``event: error`` instead of ``message_stop``)
    overloaded              (Anthropic routes) answer 529 ``overloaded_error``
    echo_auth               put the received Authorization header (Anthropic routes:
                            ``x-api-key``) in an error body
    gzip                    gzip the response body
    big_body                answer a JSON body of this many bytes (a ``filler`` string),
                            written as a push producer, never held whole (with
                            ``interval``: one 64 KiB piece per interval)
    redirect                answer 302 to this location
    set_cookie              add a Set-Cookie header
    text                    the reply text
    reset                   read the request, then reset the connection (RST), no answer
    idle_close              close this connection after this many idle seconds once the
                            answer is over (a keep-alive timeout, as servers and LBs have)
    usage                   members that replace those of the reported usage (e.g.
                            ``prompt_tokens_details: {cached_tokens: 32}``; on messages
                            ``cache_read_input_tokens: 5``: a stream's ``message_start``,
                            and its ``message_delta`` for ``output_tokens``)
    no_usage                report no usage at all (a non-streamed answer without it)
    spaced                  write stream events' JSON with spaces (``"usage": {``), as
                            some servers do

What it saw is at ``GET /_mock/requests``; counters (requests, streams,
disconnects, pauses, resets, bytes streamed and received) at ``GET /_mock/stats``;
``POST /_mock/release`` lets gated requests go; ``POST /_mock/reset`` clears the log,
counters and config.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import itertools
import json
import socket
import struct
import time
from functools import partial
from typing import Any

from klein import Klein
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.python.failure import Failure
from twisted.web.server import Request as IRequest
from zope.interface import implementer

import llmproxy.testing.anthropic as anthropic
import llmproxy.testing.media as media

JSONDict = dict[str, Any]

_ids = itertools.count(1)


def _new_id(prefix: str) -> str:
    return f"{prefix}_{next(_ids):06d}{hashlib.sha1(str(time.time()).encode()).hexdigest()[:12]}"


def _tokens(text: str) -> int:
    return max(1, len(text.split()))


def _last_user_text(body: JSONDict) -> str:
    """The text the mock echoes: last user message, prompt, or Responses input."""
    if "messages" in body:
        for message in reversed(body.get("messages") or []):
            if isinstance(message, dict) and message.get("role") == "user":
                content = message.get("content")
                if isinstance(content, list):
                    return " ".join(p.get("text", "") for p in content if isinstance(p, dict))
                return str(content)
        return ""
    if "prompt" in body:
        prompt = body["prompt"]
        return " ".join(map(str, prompt)) if isinstance(prompt, list) else str(prompt)
    value = body.get("input", "")
    if isinstance(value, list):
        texts = []
        for item in value:
            if isinstance(item, dict):
                content = item.get("content")
                if isinstance(content, list):
                    texts += [str(p.get("text", "")) for p in content if isinstance(p, dict)]
                elif content is not None:
                    texts.append(str(content))
            else:
                texts.append(str(item))
        return " ".join(texts)
    return str(value)


def _reported(usage: JSONDict, knobs: JSONDict) -> JSONDict | None:
    """The usage as the knobs make the mock report it."""
    if knobs.get("no_usage"):
        return None
    return {**usage, **(knobs.get("usage") or {})}


def _spaced(event: bytes) -> bytes:
    """An event with its JSON data written with spaces after ``:`` and ``,``."""
    lines = []
    for line in event.split(b"\n"):
        if line.startswith(b"data: ") and line[6:7] == b"{":
            line = b"data: " + json.dumps(json.loads(line[6:])).encode()
        lines.append(line)
    return b"\n".join(lines)


def _sse(data: JSONDict | str, event: str | None = None) -> bytes:
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {payload}\n\n".encode()


@implementer(IPushProducer)
class _EventStream:
    """
    Writes a list of events (or filler forever) to a request, one per tick.
    As a registered push producer it stops when the client's socket backs up,
    which is how tests see that backpressure reached the upstream.
    """

    def __init__(
        self,
        mock: MockUpstream,
        request: IRequest,
        events: list[bytes],
        knobs: JSONDict,
    ) -> None:
        self.mock = mock
        self.request = request
        self.events = events
        self.interval = float(knobs.get("interval", 0))
        self.cut_after = knobs.get("cut_after")
        self.stall_after = knobs.get("stall_after") if knobs.get("stall_after_headers") else None
        self.infinite = bool(knobs.get("infinite"))
        self.filler = _sse({"filler": "x" * int(knobs.get("chunk_bytes", 16384))})
        self.comment = f": {knobs['comment']}\n\n".encode() if knobs.get("comment") else b""
        self.gate_after = knobs.get("gate_after")
        self.gate: Deferred[None] | None = None
        self.sent = 0
        self.paused = False
        self.stopped = False
        self.call: IDelayedCall | None = None
        self.done: Deferred[None] = Deferred()

    def start(self) -> Deferred[None]:
        self.request.registerProducer(self, True)
        self.request.notifyFinish().addErrback(self._client_gone)
        self._schedule(0)
        return self.done

    def _schedule(self, delay: float) -> None:
        if not (self.paused or self.stopped) and (self.call is None or not self.call.active()):
            self.call = self.mock.reactor.callLater(delay, self._tick)

    def _tick(self) -> None:
        self.call = None
        if self.stopped or self.paused:
            return
        if self.cut_after is not None and self.sent >= int(self.cut_after):
            self.mock.stats["cuts"] += 1
            self._stop()
            self.request.channel.transport.abortConnection()  # type: ignore[union-attr]
            return
        if self.stall_after is not None and self.sent >= int(self.stall_after):
            return  # stalled: nothing more is ever written
        if self.gate is not None and not self.gate.called:
            return  # held until released
        if self.gate_after is not None and self.sent >= int(self.gate_after):
            self.gate_after = None  # held once
            self.gate = self.mock.hold()
            self.gate.addCallbacks(lambda _: self._schedule(0), lambda _: None)
            return
        if self.sent < len(self.events):
            chunk = self.events[self.sent]
        elif self.infinite:
            chunk = self.filler
        else:
            self._stop()
            self.request.unregisterProducer()
            self.done.callback(None)
            return
        self.sent += 1
        self.mock.stats["bytes_streamed"] += len(chunk)
        self.request.write(self.comment + chunk)
        self._schedule(self.interval)

    def _stop(self) -> None:
        self.stopped = True
        self.mock.stats["active_streams"] -= 1
        if self.call is not None and self.call.active():
            self.call.cancel()
        if self.gate is not None and not self.gate.called:
            self.gate.cancel()

    def _client_gone(self, reason: Failure) -> None:
        self._hung_up()

    def _hung_up(self) -> None:
        """The client went away before the stream ended (seen once, either way)."""
        if not self.stopped:
            self.mock.stats["disconnects"] += 1
            self._stop()

    # IPushProducer
    def pauseProducing(self) -> None:
        if not self.paused:
            self.mock.stats["pauses"] += 1
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        self._schedule(self.interval)

    def stopProducing(self) -> None:
        # twisted.web stops a request's producer when its connection is lost.
        self._hung_up()


@implementer(IPushProducer)
class _BigBody:
    """
    Writes a JSON object of ``size`` bytes to a request in 64 KiB pieces, as a
    push producer (so the whole body is never in memory), then finishes it.
    """

    PIECE = 64 * 1024

    def __init__(self, mock: MockUpstream, request: IRequest, size: int, interval: float) -> None:
        self.mock = mock
        self.request = request
        self.interval = interval
        head, tail = b'{"filler":"', b'"}'
        self.tail = tail
        self.left = max(0, size - len(head) - len(tail))
        self.paused = False
        self.stopped = False
        self.done: Deferred[None] = Deferred()
        self.request.registerProducer(self, True)
        self.request.notifyFinish().addErrback(lambda _: self.stopProducing())
        self.request.write(head)
        self.mock.reactor.callLater(0, self._tick)

    def _tick(self) -> None:
        for _ in range(1 if self.interval else 16):
            if self.paused or self.stopped:
                return
            if self.left <= 0:
                self.stopped = True
                self.request.write(self.tail)
                self.request.unregisterProducer()
                self.done.callback(None)
                return
            piece = min(self.PIECE, self.left)
            self.left -= piece
            self.mock.stats["bytes_streamed"] += piece
            self.request.write(b"x" * piece)
        self.mock.reactor.callLater(self.interval, self._tick)

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        if self.paused and not self.stopped:
            self.paused = False
            self.mock.reactor.callLater(0, self._tick)

    def stopProducing(self) -> None:
        if not self.stopped:
            self.stopped = True
            self.mock.stats["disconnects"] += 1


class MockUpstream:
    """The mock server.  ``name`` shows in replies so tests see who answered."""

    app = Klein()
    sse = staticmethod(_sse)

    def __init__(self, reactor: IReactorTime, name: str = "mock", api_key: str | None = None):
        self.reactor = reactor
        self.name = name
        self.api_key = api_key
        self.config: JSONDict = {}
        self.received: list[JSONDict] = []
        self.stored: dict[str, JSONDict] = {}
        self.gated: list[Deferred[None]] = []
        self.stats: dict[str, int] = {}
        self.files = media.FileStore(reactor)
        self.batches = media.BatchStore(reactor, self.files)
        self.reset()

    def reset(self) -> None:
        self.config = {}
        self.received = []
        self.stats = dict.fromkeys(
            ("requests", "streams", "active_streams", "disconnects", "pauses", "cuts", "resets"),
            0,
        )
        self.stats["bytes_streamed"] = 0
        self.stats["bytes_received"] = 0

    # -- plumbing ------------------------------------------------------------------

    def _record(self, request: IRequest) -> tuple[JSONDict, JSONDict]:
        """Log the request; return its JSON body (or multipart form) and the knobs for it."""
        content_type = request.getHeader("content-type") or ""
        form = media.read_form(request, content_type) if media.is_multipart(content_type) else None
        if form is not None:
            body, logged, size = form
        else:
            raw = request.content.read() if request.content is not None else b""
            try:
                parsed: Any = json.loads(raw) if raw else {}
            except ValueError:
                parsed = None
            logged, size = {"body": media.logged_body(raw, parsed is not None)}, len(raw)
            body = parsed if isinstance(parsed, dict) else {}
        headers = self._headers(request)
        self.received.append(
            {
                "method": request.method.decode(),
                "path": request.path.decode(),
                "headers": headers,
                **logged,
            }
        )
        self.stats["requests"] += 1
        self.stats["bytes_received"] += size
        knobs = dict(self.config)
        if isinstance(body.get("mock"), dict):
            knobs.update(body["mock"])
        if knobs.get("idle_close"):
            _close_when_idle(request, float(knobs["idle_close"]))
        return body, knobs

    def _delay(self, knobs: JSONDict) -> Deferred[None]:
        if knobs.get("hang"):
            return Deferred()  # cancelled by Klein when the client goes away
        if knobs.get("gate"):
            return self.hold()
        seconds = float(knobs.get("delay", 0))
        if seconds <= 0:
            return succeed(None)
        d: Deferred[None] = Deferred(lambda d: call.cancel())
        call = self.reactor.callLater(seconds, d.callback, None)
        return d

    def hold(self) -> Deferred[None]:
        """A wait that ``POST /_mock/release`` ends (cancelling it ends it too)."""
        gate: Deferred[None] = Deferred(lambda d: self.gated.remove(d))
        self.gated.append(gate)
        return gate

    def _authorized(self, request: IRequest) -> bool:
        if self.api_key is None:
            return True
        got = request.getHeader("authorization") or ""
        return got == f"Bearer {self.api_key}"

    def _headers(self, request: IRequest) -> dict[str, str]:
        return {
            k.decode("latin-1").lower(): v[-1].decode("latin-1")
            for k, v in request.requestHeaders.getAllRawHeaders()
        }

    def _json(self, request: IRequest, status: int, payload: object, knobs: JSONDict) -> bytes:
        request.setResponseCode(status)
        request.setHeader("content-type", "application/json")
        request.setHeader("x-mock-upstream", self.name)
        for key, value in (knobs.get("headers") or {}).items():
            request.setHeader(key, str(value))
        if knobs.get("set_cookie"):
            request.setHeader("set-cookie", str(knobs["set_cookie"]))
        if knobs.get("big_body"):
            return self._big(request, knobs)
        data = json.dumps(payload).encode()
        if knobs.get("gzip"):
            request.setHeader("content-encoding", "gzip")
            data = gzip.compress(data)
        if knobs.get("stall_after_headers"):
            request.setHeader("content-length", str(len(data)))
            request.write(data[: len(data) // 2])
            return self._stall(request)
        if knobs.get("cut_body"):
            # Headers and half the body, then the connection drops: it was generated.
            request.setHeader("content-length", str(len(data)))
            request.write(data[: len(data) // 2])
            transport = getattr(request.channel, "transport", None)
            if transport is not None:
                transport.loseConnection()
            return self._stall(request)
        return data

    def _big(self, request: IRequest, knobs: JSONDict) -> Any:
        size, interval = int(knobs["big_body"]), float(knobs.get("interval", 0))
        return _BigBody(self, request, size, interval).done

    def _stall(self, request: IRequest) -> Any:
        return Deferred()

    def _fault(self, request: IRequest, knobs: JSONDict, api: str = "openai") -> bytes | None:
        """The configured failure for this request (``api``: whose errors), if any."""
        if knobs.get("redirect"):
            request.setResponseCode(302)
            request.setHeader("location", str(knobs["redirect"]))
            return b""
        if api == "anthropic":
            refused = anthropic.fault(self.name, self.api_key, self._headers(request), knobs)
            if refused is None:
                return None
            status, payload, shaped = refused
            return self._json(request, status, payload, knobs if shaped else {})
        if not self._authorized(request):
            return self._json(
                request,
                401,
                {
                    "error": {
                        "message": "Incorrect API key provided",
                        "type": "invalid_request_error",
                        "param": None,
                        "code": "invalid_api_key",
                    }
                },
                {},
            )
        if knobs.get("echo_auth"):
            got = request.getHeader("authorization") or ""
            return self._json(
                request,
                int(knobs.get("status", 400)),
                {
                    "error": {
                        "message": f"bad key: {got}",
                        "type": "invalid_request_error",
                        "param": None,
                        "code": "invalid_api_key",
                    }
                },
                knobs,
            )
        if knobs.get("status") and int(knobs["status"]) != 200:
            body = knobs.get("body") or {
                "error": {
                    "message": f"mock {self.name} failed with {knobs['status']}",
                    "type": "server_error",
                    "param": None,
                    "code": None,
                }
            }
            return self._json(request, int(knobs["status"]), body, knobs)
        return None

    def _stream(self, request: IRequest, events: list[bytes], knobs: JSONDict) -> Deferred[None]:
        request.setResponseCode(200)
        request.setHeader("content-type", "text/event-stream")
        request.setHeader("cache-control", "no-cache")
        request.setHeader("x-mock-upstream", self.name)
        for key, value in (knobs.get("headers") or {}).items():
            request.setHeader(key, str(value))
        self.stats["streams"] += 1
        self.stats["active_streams"] += 1
        if knobs.get("spaced"):
            events = [_spaced(e) for e in events]
        return _EventStream(self, request, events, knobs).start()

    def _reset(self, request: IRequest) -> Deferred[None]:
        """Drop the connection with an RST (no linger), never answering."""
        self.stats["resets"] += 1
        transport: Any = request.channel.transport
        handle = transport.getHandle() if hasattr(transport, "getHandle") else None
        if isinstance(handle, socket.socket):
            handle.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abortConnection()
        return Deferred()  # cancelled by Klein as the connection goes

    async def _serve(self, request: IRequest, build: Any, api: str = "openai") -> Any:
        body, knobs = self._record(request)
        if api == "anthropic":
            request.setHeader("request-id", _new_id("req"))
        if knobs.get("reset"):
            return await self._reset(request)
        await self._delay(knobs)
        fault = self._fault(request, knobs, api)
        if fault is not None:
            return fault
        return build(request, body, knobs)

    def _reply_text(self, body: JSONDict, knobs: JSONDict, said: str | None = None) -> str:
        """The reply: the ``text`` knob, or an echo of ``said`` (default: the last user text)."""
        if knobs.get("text") is not None:
            return str(knobs["text"])
        if said is None:
            said = _last_user_text(body)
        return f"Hello from {self.name}! You said: {said}"

    def _pieces(self, text: str, knobs: JSONDict) -> list[str]:
        words = text.split(" ")
        pieces = [w if i == 0 else " " + w for i, w in enumerate(words)]
        count = knobs.get("words")
        if count is not None:
            pieces = (pieces * (int(count) // max(1, len(pieces)) + 1))[: int(count)]
        return pieces

    # -- chat completions ----------------------------------------------------------

    @app.route("/v1/chat/completions", methods=["POST"])
    def chat(self, request: IRequest) -> Any:
        return self._serve(request, self._chat)

    def _chat(self, request: IRequest, body: JSONDict, knobs: JSONDict) -> Any:
        model = str(body.get("model", "mock-model"))
        text = self._reply_text(body, knobs)
        prompt_tokens = _tokens(_last_user_text(body))
        cid, created = _new_id("chatcmpl"), int(self.reactor.seconds())
        if not body.get("stream"):
            usage = _reported(
                {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": _tokens(text),
                    "total_tokens": prompt_tokens + _tokens(text),
                },
                knobs,
            )
            payload = {
                "id": cid,
                "object": "chat.completion",
                "created": created,
                "model": model,
                "system_fingerprint": None,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": text, "refusal": None},
                        "logprobs": None,
                        "finish_reason": "stop",
                    }
                ],
                "usage": usage,
            }
            if usage is None:
                del payload["usage"]
            return self._json(request, 200, payload, knobs)

        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        pieces = self._pieces(text, knobs)

        def chunk(delta: JSONDict, finish: str | None) -> bytes:
            data: JSONDict = {
                "id": cid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "system_fingerprint": None,
                "choices": [
                    {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
                ],
            }
            if include_usage:
                data["usage"] = None
            return _sse(data)

        events = [chunk({"role": "assistant", "content": ""}, None)]
        events += [chunk({"content": p}, None) for p in pieces]
        events.append(chunk({}, "stop"))
        if include_usage:
            completion_tokens = len(pieces)
            events.append(
                _sse(
                    {
                        "id": cid,
                        "object": "chat.completion.chunk",
                        "created": created,
                        "model": model,
                        "system_fingerprint": None,
                        "choices": [],
                        "usage": _reported(
                            {
                                "prompt_tokens": prompt_tokens,
                                "completion_tokens": completion_tokens,
                                "total_tokens": prompt_tokens + completion_tokens,
                            },
                            knobs,
                        ),
                    }
                )
            )
        if knobs.get("error_chunk"):
            # What vLLM sends on an internal error: an error chunk, then [DONE].
            error = {
                "message": str(knobs["error_chunk"]),
                "type": "server_error",
                "param": None,
                "code": 500,
            }
            events.insert(len(events) - 1 if include_usage else len(events), _sse({"error": error}))
        if not knobs.get("omit_done"):
            events.append(_sse("[DONE]"))
        return self._stream(request, events, knobs)

    # -- legacy completions --------------------------------------------------------

    @app.route("/v1/completions", methods=["POST"])
    def completions(self, request: IRequest) -> Any:
        return self._serve(request, self._completions)

    def _completions(self, request: IRequest, body: JSONDict, knobs: JSONDict) -> Any:
        model = str(body.get("model", "mock-model"))
        text = self._reply_text(body, knobs)
        cid, created = _new_id("cmpl"), int(self.reactor.seconds())
        prompt_tokens = _tokens(_last_user_text(body))

        def payload(piece: str, finish: str | None) -> JSONDict:
            return {
                "id": cid,
                "object": "text_completion",
                "created": created,
                "model": model,
                "choices": [{"text": piece, "index": 0, "logprobs": None, "finish_reason": finish}],
            }

        if not body.get("stream"):
            data = payload(text, "stop")
            data["usage"] = {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": _tokens(text),
                "total_tokens": prompt_tokens + _tokens(text),
            }
            return self._json(request, 200, data, knobs)
        events = [_sse(payload(p, None)) for p in self._pieces(text, knobs)]
        events += [_sse(payload("", "stop")), _sse("[DONE]")]
        return self._stream(request, events, knobs)

    # -- embeddings ----------------------------------------------------------------

    @app.route("/v1/embeddings", methods=["POST"])
    def embeddings(self, request: IRequest) -> Any:
        return self._serve(request, self._embeddings)

    def _embeddings(self, request: IRequest, body: JSONDict, knobs: JSONDict) -> Any:
        inputs = body.get("input", "")
        items = inputs if isinstance(inputs, list) else [inputs]
        dims = int(body.get("dimensions") or 8)
        data = []
        for index, item in enumerate(items):
            seed = hashlib.sha256(json.dumps(item).encode()).digest()
            vector = [(seed[i % 32] - 128) / 128.0 for i in range(dims)]
            if body.get("encoding_format") == "base64":
                packed = struct.pack(f"<{dims}f", *vector)
                embedding: Any = base64.b64encode(packed).decode()
            else:
                embedding = vector
            data.append({"object": "embedding", "index": index, "embedding": embedding})
        tokens = sum(_tokens(json.dumps(i)) for i in items)
        payload = {
            "object": "list",
            "data": data,
            "model": str(body.get("model", "mock-embedding")),
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
        return self._json(request, 200, payload, knobs)

    # -- responses API -------------------------------------------------------------

    @app.route("/v1/responses", methods=["POST"])
    def responses(self, request: IRequest) -> Any:
        return self._serve(request, self._responses)

    def _response_object(self, body: JSONDict, text: str, status: str) -> JSONDict:
        input_tokens = _tokens(_last_user_text(body))
        output_tokens = _tokens(text)
        return {
            "id": _new_id("resp"),
            "object": "response",
            "created_at": int(self.reactor.seconds()),
            "status": status,
            "background": False,
            "error": None,
            "incomplete_details": None,
            "instructions": body.get("instructions"),
            "max_output_tokens": body.get("max_output_tokens"),
            "model": str(body.get("model", "mock-model")),
            "output": [],
            "parallel_tool_calls": True,
            "previous_response_id": body.get("previous_response_id"),
            "reasoning": {"effort": None, "summary": None},
            "store": True,
            "temperature": body.get("temperature", 1.0),
            "text": {"format": {"type": "text"}},
            "tool_choice": "auto",
            "tools": [],
            "top_p": body.get("top_p", 1.0),
            "truncation": "disabled",
            "usage": {
                "input_tokens": input_tokens,
                "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": output_tokens,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": input_tokens + output_tokens,
            },
            "user": None,
            "metadata": body.get("metadata") or {},
        }

    def _responses(self, request: IRequest, body: JSONDict, knobs: JSONDict) -> Any:
        previous = body.get("previous_response_id")
        if previous and previous not in self.stored:
            return self._json(request, 404, _not_found_response(previous), {})
        text = self._reply_text(body, knobs)
        response = self._response_object(body, text, "completed")
        response["usage"] = _reported(response["usage"], knobs)
        message = {
            "id": _new_id("msg"),
            "type": "message",
            "status": "completed",
            "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}],
        }
        response["output"] = [message]
        self.stored[response["id"]] = {"response": response, "input": body.get("input")}
        if not body.get("stream"):
            return self._json(request, 200, response, knobs)

        seq = itertools.count()
        pending = dict(response, status="in_progress", output=[], usage=None)
        item = dict(message, status="in_progress", content=[])
        part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        ids = {"item_id": message["id"], "output_index": 0}

        def event(kind: str, **fields: Any) -> bytes:
            return _sse({"type": kind, "sequence_number": next(seq), **fields}, kind)

        events = [
            event("response.created", response=pending),
            event("response.in_progress", response=pending),
            event("response.output_item.added", output_index=0, item=item),
            event("response.content_part.added", content_index=0, part=part, **ids),
        ]
        events += [
            event("response.output_text.delta", content_index=0, delta=p, logprobs=[], **ids)
            for p in self._pieces(text, knobs)
        ]
        done_part = message["content"][0]
        events += [
            event("response.output_text.done", content_index=0, text=text, logprobs=[], **ids),
            event("response.content_part.done", content_index=0, part=done_part, **ids),
            event("response.output_item.done", output_index=0, item=message),
            event("response.completed", response=response),
        ]
        return self._stream(request, events, knobs)

    def _stored(self, request: IRequest, response_id: str) -> JSONDict | None:
        self._record(request)
        if not self._authorized(request):
            return None
        return self.stored.get(response_id)

    @app.route("/v1/responses/<string:response_id>", methods=["GET"])
    def get_response(self, request: IRequest, response_id: str) -> bytes:
        stored = self._stored(request, response_id)
        if stored is None:
            return self._json(request, 404, _not_found_response(response_id), {})
        return self._json(request, 200, stored["response"], {})

    @app.route("/v1/responses/<string:response_id>", methods=["DELETE"])
    def delete_response(self, request: IRequest, response_id: str) -> bytes:
        stored = self._stored(request, response_id)
        if stored is None:
            return self._json(request, 404, _not_found_response(response_id), {})
        del self.stored[response_id]
        payload = {"id": response_id, "object": "response.deleted", "deleted": True}
        return self._json(request, 200, payload, {})

    @app.route("/v1/responses/<string:response_id>/cancel", methods=["POST"])
    def cancel_response(self, request: IRequest, response_id: str) -> bytes:
        stored = self._stored(request, response_id)
        if stored is None:
            return self._json(request, 404, _not_found_response(response_id), {})
        stored["response"] = dict(stored["response"], status="cancelled")
        return self._json(request, 200, stored["response"], {})

    @app.route("/v1/responses/<string:response_id>/input_items", methods=["GET"])
    def input_items(self, request: IRequest, response_id: str) -> bytes:
        stored = self._stored(request, response_id)
        if stored is None:
            return self._json(request, 404, _not_found_response(response_id), {})
        given = stored["input"]
        text = given if isinstance(given, str) else json.dumps(given)
        item = {
            "id": _new_id("msg"),
            "type": "message",
            "role": "user",
            "status": "completed",
            "content": [{"type": "input_text", "text": text}],
        }
        payload = {
            "object": "list",
            "data": [item],
            "first_id": item["id"],
            "last_id": item["id"],
            "has_more": False,
        }
        return self._json(request, 200, payload, {})

    # -- models --------------------------------------------------------------------

    @app.route("/v1/models", methods=["GET"])
    def models(self, request: IRequest) -> Any:
        if request.getHeader("anthropic-version"):
            return self._serve(request, self._anthropic_models, "anthropic")
        return self._serve(request, self._models)

    def _anthropic_models(self, request: IRequest, body: JSONDict, knobs: JSONDict) -> bytes:
        return self._json(request, 200, anthropic.models(), knobs)

    def _models(self, request: IRequest, body: JSONDict, knobs: JSONDict) -> bytes:
        names = ["mock-model", "gpt-4o-mini", "text-embedding-3-small"]
        payload = {
            "object": "list",
            "data": [
                {"id": n, "object": "model", "created": 0, "owned_by": self.name} for n in names
            ],
        }
        return self._json(request, 200, payload, knobs)

    # -- Anthropic Messages API ----------------------------------------------------

    @app.route("/v1/messages", methods=["POST"])
    def messages(self, request: IRequest) -> Any:
        return self._serve(request, self._messages, "anthropic")

    @app.route("/v1/messages/count_tokens", methods=["POST"])
    def count_tokens(self, request: IRequest) -> Any:
        return self._serve(request, self._count_tokens, "anthropic")

    def _count_tokens(self, request: IRequest, body: JSONDict, knobs: JSONDict) -> bytes:
        problem = anthropic.invalid(body, "model", "messages")
        if problem is not None:
            return self._json(request, 400, anthropic.error("invalid_request_error", problem), {})
        payload = {"input_tokens": _tokens(anthropic.prompt_text(body))}
        return self._json(request, 200, payload, knobs)

    def _messages(self, request: IRequest, body: JSONDict, knobs: JSONDict) -> Any:
        problem = anthropic.invalid(body, "model", "messages", "max_tokens")
        if problem is not None:
            return self._json(request, 400, anthropic.error("invalid_request_error", problem), {})
        model, limit = str(body["model"]), int(body["max_tokens"])
        text = self._reply_text(body, knobs, anthropic.user_text(body))
        input_tokens = _tokens(anthropic.prompt_text(body))
        mid = _new_id("msg")
        # Longer than max_tokens (a token being a word here): cut, as the model is.
        pieces = self._pieces(text, knobs if body.get("stream") else {})
        stop = "max_tokens" if len(pieces) > limit else "end_turn"
        pieces = pieces[:limit]
        if not body.get("stream"):
            text = "".join(pieces)
            used = _reported(anthropic.usage(input_tokens, _tokens(text)), knobs)
            return self._json(request, 200, anthropic.message(mid, model, text, stop, used), knobs)
        start_usage = _reported(anthropic.usage(input_tokens, 1), knobs)
        start = anthropic.message(mid, model, None, None, start_usage)
        # message_delta's usage is the output's count (the ``usage`` knob's, if it has one).
        count = (knobs.get("usage") or {}).get("output_tokens", len(pieces))
        used = None if knobs.get("no_usage") else {"output_tokens": count}
        failure = str(knobs["error_chunk"]) if knobs.get("error_chunk") else None
        events = anthropic.stream(start, pieces, stop, used, failure)
        return self._stream(request, [_sse(e, e["type"]) for e in events], knobs)

    # -- audio, images, moderations, files, batches (in llmproxy.testing.media) -----

    @app.route("/v1/audio/speech", methods=["POST"])
    def audio_speech(self, request: IRequest) -> Any:
        return self._serve(request, partial(media.speech, self))

    @app.route("/v1/audio/transcriptions", methods=["POST"])
    def audio_transcriptions(self, request: IRequest) -> Any:
        return self._serve(request, partial(media.transcribe, self))

    @app.route("/v1/audio/translations", methods=["POST"])
    def audio_translations(self, request: IRequest) -> Any:
        return self._serve(request, partial(media.transcribe, self, task="translate"))

    @app.route("/v1/images/generations", methods=["POST"])
    def image_generations(self, request: IRequest) -> Any:
        return self._serve(request, partial(media.images, self))

    @app.route("/v1/images/edits", methods=["POST"])
    def image_edits(self, request: IRequest) -> Any:
        return self._serve(request, partial(media.images, self))

    @app.route("/v1/moderations", methods=["POST"])
    def moderations(self, request: IRequest) -> Any:
        return self._serve(request, partial(media.moderations, self))

    @app.route("/v1/files", methods=["POST"])
    def upload_file(self, request: IRequest) -> Any:
        return self._serve(request, partial(media.create_file, self))

    @app.route("/v1/files", methods=["GET"])
    def list_files(self, request: IRequest) -> Any:
        return self._serve(request, partial(media.list_files, self))

    @app.route("/v1/files/<string:file_id>", methods=["GET"])
    def file_info(self, request: IRequest, file_id: str) -> Any:
        return self._serve(request, partial(media.file_info, self, file_id))

    @app.route("/v1/files/<string:file_id>/content", methods=["GET"])
    def file_content(self, request: IRequest, file_id: str) -> Any:
        return self._serve(request, partial(media.file_content, self, file_id))

    @app.route("/v1/files/<string:file_id>", methods=["DELETE"])
    def delete_file(self, request: IRequest, file_id: str) -> Any:
        return self._serve(request, partial(media.delete_file, self, file_id))

    @app.route("/v1/batches", methods=["POST"])
    def create_batch(self, request: IRequest) -> Any:
        return self._serve(request, partial(media.create_batch, self))

    @app.route("/v1/batches", methods=["GET"])
    def list_batches(self, request: IRequest) -> Any:
        return self._serve(request, partial(media.list_batches, self))

    @app.route("/v1/batches/<string:batch_id>", methods=["GET"])
    def batch_info(self, request: IRequest, batch_id: str) -> Any:
        return self._serve(request, partial(media.batch_info, self, batch_id))

    @app.route("/v1/batches/<string:batch_id>/cancel", methods=["POST"])
    def cancel_batch(self, request: IRequest, batch_id: str) -> Any:
        return self._serve(request, partial(media.cancel_batch, self, batch_id))

    # -- control surface for tests -------------------------------------------------

    @app.route("/_mock/requests", methods=["GET"])
    def seen(self, request: IRequest) -> bytes:
        request.setHeader("content-type", "application/json")
        return json.dumps(self.received).encode()

    @app.route("/_mock/stats", methods=["GET"])
    def counters(self, request: IRequest) -> bytes:
        request.setHeader("content-type", "application/json")
        return json.dumps(dict(self.stats, gated=len(self.gated))).encode()

    @app.route("/_mock/config", methods=["POST"])
    def configure(self, request: IRequest) -> bytes:
        raw = request.content.read() if request.content is not None else b""
        self.config = json.loads(raw or b"{}")
        request.setHeader("content-type", "application/json")
        return json.dumps(self.config).encode()

    @app.route("/_mock/release", methods=["POST"])
    def release(self, request: IRequest) -> bytes:
        """Let every request (or stream) held by the ``gate`` (``gate_after``) knob go on."""
        gated, self.gated = self.gated, []
        for d in gated:
            d.callback(None)
        request.setHeader("content-type", "application/json")
        return json.dumps({"released": len(gated)}).encode()

    @app.route("/_mock/reset", methods=["POST"])
    def clear(self, request: IRequest) -> bytes:
        self.reset()
        return b"{}"


def _close_when_idle(request: IRequest, seconds: float) -> None:
    """Once ``request`` is answered, its connection closes after ``seconds`` without a request."""
    channel: Any = request.channel
    done = request.notifyFinish()
    done.addCallback(lambda _: channel.setTimeout(seconds))
    done.addErrback(lambda _: None)


def _not_found_response(response_id: str) -> JSONDict:
    return {
        "error": {
            "message": f"Response with id '{response_id}' not found.",
            "type": "invalid_request_error",
            "param": None,
            "code": None,
        }
    }
