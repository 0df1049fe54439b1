"""
Fast mock upstreams, never the bottleneck: they answer canned bytes without
parsing JSON (a substring test picks the answer).

- ``POST /v1/chat/completions``: a chat completion (about 600 bytes of JSON);
  with ``"stream": true``, an SSE stream of ``chunks`` content events written
  one by one (each flushed, ``interval`` seconds apart), a finish event and
  ``data: [DONE]``; for the model ``bench-idle``, one event and then silence for
  ``idle_seconds`` (the idle open streams);
- ``POST /v1/responses``: a Responses API answer;
- ``GET /v1/models``: the models, for readiness checks.

Two implementations with the same bytes: nginx with its Lua module
(:func:`nginx_mock_conf`, one worker) and a uvloop + httptools asyncio server
(:func:`serve`, ``python -m bench.upstream --port N``).  The harness uses the
faster one (nginx + Lua on this project's 2-core reference machine; ``python -m
bench mocks`` measures both).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MODEL = "bench"
IDLE_MODEL = "bench-idle"
NGINX_MODULES = Path("/usr/lib/nginx/modules")
STREAMED = re.compile(rb'"stream"\s*:\s*true')


def _sse(data: dict[str, Any] | str) -> bytes:
    text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {text}\n\n".encode()


@dataclass(frozen=True)
class Canned:
    """The bytes every mock answers."""

    chat: bytes
    responses: bytes
    chunks: tuple[bytes, ...]
    finish: bytes
    models: bytes

    @classmethod
    def build(cls, chunks: int) -> Canned:
        usage = {"prompt_tokens": 250, "completion_tokens": 60, "total_tokens": 310}
        text = "This is a canned answer from the benchmark's mock upstream. " * 5
        chat = {
            "id": "chatcmpl-bench",
            "object": "chat.completion",
            "created": 1700000000,
            "model": MODEL,
            "system_fingerprint": None,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text.strip(), "refusal": None},
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
            "usage": usage,
        }
        responses = {
            "id": "resp_bench",
            "object": "response",
            "created_at": 1700000000,
            "status": "completed",
            "error": None,
            "incomplete_details": None,
            "instructions": None,
            "max_output_tokens": None,
            "model": MODEL,
            "output": [
                {
                    "id": "msg_bench",
                    "type": "message",
                    "status": "completed",
                    "role": "assistant",
                    "content": [{"type": "output_text", "text": text.strip(), "annotations": []}],
                }
            ],
            "parallel_tool_calls": True,
            "previous_response_id": None,
            "store": False,
            "temperature": 1.0,
            "text": {"format": {"type": "text"}},
            "tool_choice": "auto",
            "tools": [],
            "top_p": 1.0,
            "truncation": "disabled",
            "usage": {
                "input_tokens": 250,
                "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": 60,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": 310,
            },
            "metadata": {},
        }

        def chunk(delta: dict[str, str], finish: str | None) -> bytes:
            return _sse(
                {
                    "id": "chatcmpl-bench",
                    "object": "chat.completion.chunk",
                    "created": 1700000000,
                    "model": MODEL,
                    "choices": [
                        {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
                    ],
                }
            )

        pieces = [chunk({"role": "assistant", "content": ""}, None)]
        pieces += [chunk({"content": f"tok{i} "}, None) for i in range(1, chunks)]
        models = {"object": "list", "data": [{"id": MODEL, "object": "model", "owned_by": "b"}]}
        return cls(
            chat=json.dumps(chat).encode(),
            responses=json.dumps(responses).encode(),
            chunks=tuple(pieces),
            finish=chunk({}, "stop") + _sse("[DONE]"),
            models=json.dumps(models).encode(),
        )


# -- nginx + Lua ------------------------------------------------------------------------


def _lua_string(data: bytes) -> str:
    """A Lua long-bracket string literal holding ``data`` (ASCII JSON/SSE)."""
    text = data.decode()
    level = "=" * 4
    assert f"]{level}]" not in text
    # A long string drops a newline right after its opening bracket: start with one.
    return f"[{level}[\n{text}]{level}]"


def nginx_available() -> bool:
    return (NGINX_MODULES / "ngx_http_lua_module.so").exists()


def nginx_common(workdir: Path, name: str) -> str:
    """The main-context lines every nginx of the benchmark shares."""
    user = "user root;\n" if os.geteuid() == 0 else ""
    return (
        f"{user}worker_processes 1;\ndaemon off;\npid {workdir}/{name}.pid;\n"
        f"error_log {workdir}/{name}.error.log warn;\nworker_rlimit_nofile 20000;\n"
        "events { worker_connections 16384; multi_accept on; }\n"
    )


def nginx_temp_paths(workdir: Path, name: str) -> str:
    return "".join(
        f"    {kind}_temp_path {workdir}/{name}-{kind};\n"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )


def nginx_mock_conf(
    workdir: Path, port: int, canned: Canned, interval: float, idle_seconds: float
) -> str:
    """An nginx config serving the canned answers from Lua on ``port``."""
    chunks = ", ".join(_lua_string(c) for c in canned.chunks)
    return (
        f"load_module {NGINX_MODULES}/ndk_http_module.so;\n"
        f"load_module {NGINX_MODULES}/ngx_http_lua_module.so;\n"
        + nginx_common(workdir, "mock-nginx")
        + "http {\n    access_log off;\n"
        + nginx_temp_paths(workdir, "mock-nginx")
        + "    client_body_buffer_size 256k;\n    client_body_in_single_buffer on;\n"
        "    keepalive_requests 10000000;\n    keepalive_timeout 600s;\n"
        "    lua_socket_log_errors off;\n    lua_check_client_abort on;\n"
        "    init_by_lua_block {\n"
        f"        CHAT = {_lua_string(canned.chat)}\n"
        f"        RESPONSES = {_lua_string(canned.responses)}\n"
        f"        MODELS = {_lua_string(canned.models)}\n"
        f"        CHUNKS = {{{chunks}}}\n"
        f"        FINISH = {_lua_string(canned.finish)}\n"
        f"        INTERVAL = {interval!r}\n        IDLE = {idle_seconds!r}\n"
        "    }\n"
        f"    server {{\n        listen 127.0.0.1:{port} backlog=4096;\n"
        "        location = /v1/models {\n"
        "            content_by_lua_block {\n"
        '                ngx.header["Content-Type"] = "application/json"\n'
        "                ngx.print(MODELS)\n            }\n        }\n"
        "        location = /v1/chat/completions {\n"
        "            content_by_lua_block {\n"
        "                ngx.req.read_body()\n"
        '                local body = ngx.req.get_body_data() or ""\n'
        # A plain find first: a Lua pattern scan of the whole body costs the mock ~7 µs.
        "                local at = string.find(body, '\"stream\"', 1, true)\n"
        "                if not (at and string.find(body, '^\"stream\"%s*:%s*true', at)) then\n"
        '                    ngx.header["Content-Type"] = "application/json"\n'
        '                    ngx.header["Content-Length"] = #CHAT\n'
        "                    ngx.print(CHAT)\n                    return\n                end\n"
        '                ngx.header["Content-Type"] = "text/event-stream"\n'
        '                ngx.header["Cache-Control"] = "no-cache"\n'
        f"                if string.find(body, '\"{IDLE_MODEL.replace('-', '%-')}\"', 1) then\n"
        "                    ngx.print(CHUNKS[1])\n                    ngx.flush(true)\n"
        "                    ngx.sleep(IDLE)\n                    ngx.print(FINISH)\n"
        "                    return\n                end\n"
        "                for i = 1, #CHUNKS do\n"
        "                    ngx.print(CHUNKS[i])\n                    ngx.flush(true)\n"
        "                    if INTERVAL > 0 then ngx.sleep(INTERVAL) end\n                end\n"
        "                ngx.print(FINISH)\n            }\n        }\n"
        "        location = /v1/responses {\n"
        "            content_by_lua_block {\n"
        "                ngx.req.read_body()\n"
        '                ngx.header["Content-Type"] = "application/json"\n'
        '                ngx.header["Content-Length"] = #RESPONSES\n'
        "                ngx.print(RESPONSES)\n            }\n        }\n"
        "    }\n}\n"
    )


# -- uvloop + httptools -----------------------------------------------------------------


class _MockProtocol(asyncio.Protocol):
    """One connection to the asyncio mock: httptools parses, canned bytes answer."""

    def __init__(self, canned: Canned, interval: float, idle_seconds: float) -> None:
        import httptools

        self.canned = canned
        self.interval = interval
        self.idle_seconds = idle_seconds
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.url = b""
        self.body: list[bytes] = []
        self.streaming: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except Exception:  # noqa: BLE001 - httptools' parse errors: drop the connection
            if self.transport is not None:
                self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.streaming is not None:
            self.streaming.cancel()

    # httptools callbacks
    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        body = b"".join(self.body)
        url, self.url, self.body = self.url, b"", []
        assert self.transport is not None
        if url == b"/v1/chat/completions" and STREAMED.search(body):
            idle = IDLE_MODEL.encode() in body
            self.streaming = asyncio.ensure_future(self._stream(idle))
            return
        payload = {
            b"/v1/chat/completions": self.canned.chat,
            b"/v1/responses": self.canned.responses,
            b"/v1/models": self.canned.models,
        }.get(url.split(b"?")[0])
        if payload is None:
            self.transport.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
            return
        self.transport.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
            + str(len(payload)).encode()
            + b"\r\n\r\n"
            + payload
        )

    async def _stream(self, idle: bool) -> None:
        transport = self.transport
        assert transport is not None

        def chunk(data: bytes) -> None:
            transport.write(b"%x\r\n%s\r\n" % (len(data), data))

        transport.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            b"Cache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        if idle:
            chunk(self.canned.chunks[0])
            await asyncio.sleep(self.idle_seconds)
        else:
            for piece in self.canned.chunks:
                chunk(piece)
                if self.interval > 0:
                    await asyncio.sleep(self.interval)
        chunk(self.canned.finish)
        transport.write(b"0\r\n\r\n")
        self.streaming = None


def serve(port: int, chunks: int, interval: float, idle_seconds: float) -> None:
    """Run the asyncio mock on ``port`` until killed (uvloop when installed)."""
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    canned = Canned.build(chunks)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: _MockProtocol(canned, interval, idle_seconds),
            "127.0.0.1",
            port,
            backlog=4096,
        )
        print(f"bench mock listening on 127.0.0.1:{port}", flush=True)
        await server.serve_forever()

    asyncio.run(main())


def main() -> None:
    parser = argparse.ArgumentParser(description="The benchmark's asyncio mock upstream.")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--chunks", type=int, default=50)
    parser.add_argument("--interval", type=float, default=0.001)
    parser.add_argument("--idle-seconds", type=float, default=600)
    args = parser.parse_args()
    serve(args.port, args.chunks, args.interval, args.idle_seconds)


if __name__ == "__main__":
    main()
