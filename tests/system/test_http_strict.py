"""
HTTP/1.1 strictness at the proxy's own port (issue 14, defect 11), against a
real ``twistd -n llmproxy`` over bare sockets, with ``server.header_timeout: 1``:

* obs-fold, ``Transfer-Encoding: identity`` with ``Content-Length``, and a
  chunked body on HTTP/1.0 are a 400 in the API's shape, then closed;
* a 17 KiB header line is a 431 with a JSON body, not a silent close;
* a bare-LF request is refused at once (400, not the deadline's 408), not
  left to hang for Twisted's 60 s idle timeout;
* a client sending its headers a byte at a time is answered 408 and closed
  once the deadline passes, however steadily it sends.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from llmproxy.testing.processes import Mock, Proxy, upstream_block
from tests.system.harness import CORE_MODELS, UPSTREAM_KEY, read_to_close

#: The longest any row may take to be answered and closed (it should be at once).
DEADLINE = 10.0
#: Between two bytes of the slow client: its whole head takes several header deadlines.
PACE = 0.1


@pytest.fixture(scope="module")
def strict(tmp_path_factory: pytest.TempPathFactory, mock: Mock) -> Iterator[Proxy]:
    """A proxy whose request heads must arrive within 1 s."""
    workdir: Path = tmp_path_factory.mktemp("strict")
    text = upstream_block([mock], api_key=UPSTREAM_KEY) + CORE_MODELS
    proxy = Proxy(workdir, text + "server: {header_timeout: 1}\n", name="strict")
    yield proxy
    proxy.stop()


def exchange(proxy: Proxy, data: bytes) -> bytes:
    """Send ``data`` on a new connection; what came back before the proxy closed it."""
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=DEADLINE) as sock:
        sock.sendall(data)
        return read_to_close(sock, DEADLINE)


def refusal(received: bytes, status: int) -> dict[str, object]:
    """``received`` is one ``status`` answer in the API's shape with close: its error."""
    head, sep, body = received.partition(b"\r\n\r\n")
    assert sep, received
    status_line, *lines = head.decode("latin-1").split("\r\n")
    assert status_line.split(" ")[:2] == ["HTTP/1.1", str(status)], received
    headers = {k.lower(): v for k, v in (line.split(": ", 1) for line in lines)}
    assert headers["connection"] == "close"
    assert headers["content-type"] == "application/json"
    assert int(headers["content-length"]) == len(body)
    error: dict[str, object] = json.loads(body)["error"]
    assert isinstance(error["message"], str) and error["type"] == "invalid_request_error"
    return error


CHAT = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]})


def chat_head(version: str, *headers: str) -> bytes:
    lines = [f"POST /v1/chat/completions {version}", "Host: llm.example.com"]
    lines += ["Content-Type: application/json", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def test_obs_fold_is_400(strict: Proxy) -> None:
    data = chat_head("HTTP/1.1", f"Content-Length: {len(CHAT)}", "X-Note: one", "  two")
    error = refusal(exchange(strict, data + CHAT.encode()), 400)
    assert error["code"] == "invalid_http_request"


def test_transfer_encoding_identity_with_content_length_is_400(strict: Proxy) -> None:
    data = chat_head("HTTP/1.1", "Transfer-Encoding: identity", f"Content-Length: {len(CHAT)}")
    refusal(exchange(strict, data + CHAT.encode()), 400)


def test_chunked_body_on_http_1_0_is_400(strict: Proxy) -> None:
    body = f"{len(CHAT):x}\r\n{CHAT}\r\n0\r\n\r\n".encode()
    refusal(exchange(strict, chat_head("HTTP/1.0", "Transfer-Encoding: chunked") + body), 400)


def test_17_kib_header_line_is_431_with_json(strict: Proxy) -> None:
    data = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (17 * 1024) + b"\r\n\r\n"
    error = refusal(exchange(strict, data), 431)
    assert error["code"] == "request_headers_too_large"


def test_bare_lf_request_is_refused_at_once(strict: Proxy) -> None:
    # A 400, not the 408 of the 1 s header deadline: refused as it arrived.
    refusal(exchange(strict, b"GET /health HTTP/1.1\nHost: x\n\n"), 400)


def test_a_well_formed_request_is_still_served(strict: Proxy) -> None:
    data = b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    assert exchange(strict, data).startswith(b"HTTP/1.1 200 ")


def trickle(sock: socket.socket, head: bytes) -> tuple[int, bytes]:
    """
    Send ``head`` a byte each ``PACE`` seconds, reading in between: (the bytes
    sent before the proxy closed the connection, what it sent back).
    """
    received = b""
    sock.settimeout(PACE)
    for sent, byte in enumerate(head):
        try:
            sock.sendall(bytes([byte]))
            chunk = sock.recv(65536)  # waits up to PACE: the client's pace
        except TimeoutError:
            continue
        except (BrokenPipeError, ConnectionResetError):
            return sent, received
        if not chunk:
            return sent, received
        received += chunk
    return len(head), received


def test_slowloris_is_closed_at_the_header_deadline(strict: Proxy) -> None:
    head = b"GET /health HTTP/1.1\r\nHost: llm.example.com\r\nX-Slow: " + b"a" * 40
    with socket.create_connection(("127.0.0.1", strict.port), timeout=DEADLINE) as sock:
        sent, received = trickle(sock, head)
    assert sent < len(head), f"still open after {len(head)} bytes at {PACE} s each"
    assert refusal(received, 408)["code"] == "request_timeout"
