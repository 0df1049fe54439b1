"""
What the system tests share, on top of :mod:`llmproxy.testing.processes`: nginx
in front of a proxy, raw HTTP over a bare socket (to watch bytes arrive), and
the small configs and clients several test files use.
"""

from __future__ import annotations

import http.client
import itertools
import json
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llmproxy.testing.processes import (
    Mock,
    Process,
    Proxy,
    RedisServer,
    require_binary,
    start_on_a_free_port,
    upstream_block,
)

ROOT = Path(__file__).resolve().parents[2]
UPSTREAM_KEY = "sk-mock-upstream-secret"

#: Starts a proxy from a config text (``start(text, name)``); see conftest.
StartProxy = Callable[..., Proxy]

CORE_MODELS = """
models:
  gpt-4o-mini:
    targets:
      - upstream: main
        model: mock-model
  gpt-4o:
    targets:
      - upstream: main
  text-embedding-3-small:
    targets:
      - upstream: main
cache:
  backend: off
"""

CACHE_MODELS = """
models:
  m:
    targets:
      - upstream: main
auth:
  keys:
    - {name: team-a, key: key-a}
    - {name: team-b, key: key-b}
"""


def cache_config(mock: Mock, backend: str, redis: RedisServer | None, extra: str = "") -> str:
    """One model ``m`` on ``mock``, two client keys, and the given cache backend."""
    text = (
        upstream_block([mock], api_key=UPSTREAM_KEY)
        + CACHE_MODELS
        + f"cache: {{backend: {backend}, max_bytes: 200000}}\n"
    )
    if redis is not None:
        text += f"redis: {{url: '{redis.url}', timeout: 0.25}}\n"
    return text + extra


def chat(text: str, **extra: object) -> dict[str, object]:
    return {"model": "m", "messages": [{"role": "user", "content": text}], **extra}


def post(
    proxy: Proxy,
    body: dict[str, object],
    key: str = "key-a",
    headers: dict[str, str] | None = None,
    path: str = "/v1/chat/completions",
) -> tuple[int, dict[str, str], bytes]:
    """A POST that must answer 200: (status, lower-cased headers, body)."""
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=30)
    conn.request(
        "POST",
        path,
        json.dumps(body),
        {"Authorization": f"Bearer {key}", "Content-Type": "application/json", **(headers or {})},
    )
    response = conn.getresponse()
    data = response.read()
    conn.close()
    assert response.status == 200, data
    return response.status, {k.lower(): v for k, v in response.getheaders()}, data


def stats(proxy: Proxy) -> dict[str, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=5)
    conn.request("GET", "/stats")
    found: dict[str, Any] = json.loads(conn.getresponse().read())
    return found


class Nginx:
    """nginx in front of a proxy, with the shipped site config (etc/nginx/llmproxy.conf)."""

    SITE = ROOT / "etc" / "nginx" / "llmproxy.conf"

    def __init__(self, tmp: Path, proxy_port: int) -> None:
        self.binary = require_binary("nginx", "nginx")
        self.root = tmp / "nginx"
        (self.root / "logs").mkdir(parents=True, exist_ok=True)
        self.proxy_port = proxy_port
        self.port = 0
        self.process: Process
        # nginx cannot say which port a `listen ...:0` got: it gets a free one.
        start_on_a_free_port(self._start)

    def _start(self, port: int) -> None:
        self.port = port
        root = self.root
        site = self.SITE.read_text()
        site = site.replace("server 127.0.0.1:8080", f"server 127.0.0.1:{self.proxy_port}")
        site = site.replace("listen 80;", f"listen 127.0.0.1:{port};")
        site = site.replace("listen [::]:80;", "")
        site = site.replace("/var/log/nginx/", f"{root}/logs/")
        (root / "site.conf").write_text(site)
        temp = "".join(
            f"    {name}_temp_path {root}/{name};\n"
            for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        )
        pid = root / "nginx.pid"
        pid.unlink(missing_ok=True)
        (root / "nginx.conf").write_text(
            f"daemon off;\nworker_processes 1;\npid {pid};\n"
            f"error_log {root}/logs/error.log;\nevents {{ worker_connections 256; }}\n"
            f"http {{\n{temp}    access_log off;\n    include {root}/site.conf;\n}}\n"
        )
        self.process = Process(
            [self.binary, "-p", str(root), "-c", str(root / "nginx.conf")],
            root / "logs" / "stdout.log",
        )
        # nginx writes its pid file once it has bound its ports (it exits if it cannot).
        self.process.wait_line("", port, "nginx", ready=pid.exists)
        self.process.wait_listening(port, "nginx")

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def stop(self) -> None:
        self.process.stop()


def raw_post(
    port: int,
    body: dict[str, Any],
    path: str = "/v1/chat/completions",
    headers: dict[str, str] | None = None,
) -> socket.socket:
    """Send a POST over a bare socket (to watch the bytes arrive) and return the socket."""
    data = json.dumps(body).encode()
    head = "".join(
        f"{k}: {v}\r\n"
        for k, v in {
            "Host": "llm.example.com",
            "Content-Type": "application/json",
            "Content-Length": str(len(data)),
            **(headers or {}),
        }.items()
    )
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(f"POST {path} HTTP/1.1\r\n{head}\r\n".encode() + data)
    return sock


def read_until(
    sock: socket.socket,
    done: Callable[[bytes], bool],
    what: str,
    timeout: float = 15.0,
    received: bytes = b"",
) -> bytes:
    """
    Read from ``sock`` until ``done(received)`` (``received`` may carry what an
    earlier read got); fail if the socket closes or the deadline passes.
    """
    deadline = time.monotonic() + timeout
    while not done(received):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"timed out waiting for {what}; received {received[-500:]!r}")
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        if not chunk:
            raise AssertionError(f"connection closed before {what}; received {received[-500:]!r}")
        received += chunk
    return received


def read_to_close(sock: socket.socket, timeout: float = 15.0) -> bytes:
    """Everything ``sock`` receives until the peer closes (or resets) it; fail at the deadline."""
    received = b""
    deadline = time.monotonic() + timeout
    while (remaining := deadline - time.monotonic()) > 0:
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        except ConnectionResetError:
            return received
        if not chunk:
            return received
        received += chunk
    raise AssertionError(f"not closed within {timeout} s; received {received[-300:]!r}")


def events_arrived(count: int) -> Callable[[bytes], bool]:
    return lambda received: received.count(b"\n\n") >= count


def response_ended(received: bytes) -> bool:
    """The terminating chunk of a chunked response has arrived."""
    return received.endswith(b"0\r\n\r\n")


_probes = itertools.count()


def caching_works(proxy: Proxy) -> bool:
    """A new prompt, asked twice: the second answer is a hit (from Redis, say)."""
    body = chat(f"probe {next(_probes)}")
    post(proxy, body)
    return post(proxy, body)[1]["x-llmproxy-cache"] == "hit"
