"""
HTTP/1.1 strictness at the gateway's own port: ambiguous framing is a 400 in
the API's shape, an oversized head a 431, a slow head a 408 at its deadline;
each answer says ``Connection: close`` and the connection closes.
"""

from __future__ import annotations

import json

from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import IProtocol
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from tests.harness import Harness, config_text

CHAT = b'{"model":"m1","messages":[]}'


def connect(h: Harness) -> tuple[IProtocol, StringTransport]:
    """A client connection to the gateway's site, on a transport that keeps what is written."""
    peer = IPv4Address("TCP", "10.0.0.1", 1234)
    proto = h.site.buildProtocol(peer)
    assert proto is not None
    transport = StringTransport(peerAddress=peer)
    proto.makeConnection(transport)
    return proto, transport


def harness(header_timeout: float | None = None) -> Harness:
    extra = "" if header_timeout is None else f"server: {{header_timeout: {header_timeout}}}\n"
    return Harness(config_text() + extra)


def answer(transport: StringTransport) -> tuple[int, dict[bytes, bytes], dict[str, object]]:
    """The one answer written: (status, lower-cased headers, JSON body)."""
    head, _, body = transport.value().partition(b"\r\n\r\n")
    status_line, *lines = head.split(b"\r\n")
    headers = dict(line.lower().split(b": ", 1) for line in lines)
    assert int(headers[b"content-length"]) == len(body)
    decoded: dict[str, object] = json.loads(body)
    return int(status_line.split(b" ")[1]), headers, decoded


def chat_request(version: bytes = b"HTTP/1.1", headers: bytes = b"", body: bytes = CHAT) -> bytes:
    return (
        b"POST /v1/chat/completions " + version + b"\r\nHost: x\r\n"
        b"Authorization: Bearer k\r\nContent-Type: application/json\r\n" + headers + b"\r\n" + body
    )


class RefusedFramingTests(SynchronousTestCase):
    def refused(self, data: bytes, status: int = 400) -> dict[str, object]:
        """Send ``data``: it is answered ``status`` with close, and nothing reaches an upstream."""
        h = harness()
        proto, transport = connect(h)
        proto.dataReceived(data)
        h.pump()
        code, headers, body = answer(transport)
        assert code == status, transport.value()
        assert headers[b"connection"] == b"close"
        assert headers[b"content-type"] == b"application/json"
        assert transport.disconnecting
        assert h.seen() == []
        by_status = h.request("GET", "/stats").json()["requests"]["by_status"]
        assert by_status[str(status)] == 1
        error = body["error"]
        assert isinstance(error, dict)
        return error

    def test_obs_fold_is_refused(self) -> None:
        error = self.refused(chat_request(headers=b"X-Note: a\r\n  folded\r\n"))
        assert error["code"] == "invalid_http_request"
        assert "obs-fold" in str(error["message"])

    def test_transfer_encoding_identity_with_content_length(self) -> None:
        length = b"Content-Length: %d\r\n" % len(CHAT)
        self.refused(chat_request(headers=b"Transfer-Encoding: identity\r\n" + length))

    def test_transfer_encoding_identity_alone(self) -> None:
        self.refused(chat_request(headers=b"Transfer-Encoding: identity\r\n", body=b""))

    def test_transfer_encoding_other_than_chunked(self) -> None:
        self.refused(chat_request(headers=b"Transfer-Encoding: gzip, chunked\r\n", body=b""))

    def test_chunked_with_content_length(self) -> None:
        headers = b"Transfer-Encoding: chunked\r\nContent-Length: 3\r\n"
        self.refused(chat_request(headers=headers, body=b"0\r\n\r\n"))

    def test_chunked_on_http_1_0(self) -> None:
        body = b"%x\r\n%s\r\n0\r\n\r\n" % (len(CHAT), CHAT)
        error = self.refused(
            chat_request(b"HTTP/1.0", b"Transfer-Encoding: chunked\r\n", body=body)
        )
        assert "HTTP/1.1" in str(error["message"])

    def test_bare_lf_line_endings(self) -> None:
        self.refused(b"GET /health HTTP/1.1\nHost: x\n\n")

    def test_bare_lf_inside_a_crlf_request(self) -> None:
        self.refused(b"GET /health HTTP/1.1\r\nHost: x\nX-A: b\r\n\r\n")

    def test_a_header_line_over_the_limit_is_431(self) -> None:
        error = self.refused(
            b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 17 * 1024 + b"\r\n\r\n", 431
        )
        assert error["code"] == "request_headers_too_large"

    def test_headers_over_the_limit_in_total_are_431(self) -> None:
        many = b"".join(b"X-H%d: %s\r\n" % (i, b"a" * 1000) for i in range(20))
        self.refused(b"GET /health HTTP/1.1\r\nHost: x\r\n" + many + b"\r\n", 431)

    def test_twisted_own_bad_request_is_json(self) -> None:
        self.refused(b"GET /health HTTP/1.1\r\nNo colon here\r\n\r\n")

    def test_nothing_is_read_after_a_refusal(self) -> None:
        h = harness()
        proto, transport = connect(h)
        proto.dataReceived(b"GET /health HTTP/1.1\r\nHost: x\r\n a\r\n")
        written = transport.value()
        proto.dataReceived(b"\r\nGET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        h.pump()
        assert transport.value() == written


class AcceptedTests(SynchronousTestCase):
    def test_chunked_on_http_1_1_is_read(self) -> None:
        h = harness()
        proto, transport = connect(h)
        body = b"%x\r\n%s\r\n0\r\n\r\n" % (len(CHAT), CHAT)
        proto.dataReceived(chat_request(headers=b"Transfer-Encoding: chunked\r\n", body=body))
        h.pump()
        assert transport.value().startswith(b"HTTP/1.1 200 ")
        assert len(h.seen()) == 1

    def test_content_length_on_http_1_0_is_read(self) -> None:
        h = harness()
        proto, transport = connect(h)
        length = b"Content-Length: %d\r\n" % len(CHAT)
        proto.dataReceived(chat_request(b"HTTP/1.0", length))
        h.pump()
        assert transport.value().startswith(b"HTTP/1.0 200 ")
        assert len(h.seen()) == 1


class HeaderDeadlineTests(SynchronousTestCase):
    def test_slow_headers_get_408_at_the_deadline(self) -> None:
        h = harness(header_timeout=2)
        proto, transport = connect(h)
        head = b"GET /health HTTP/1.1\r\nHost: x\r\n"
        for byte in head:
            proto.dataReceived(bytes([byte]))
            h.clock.advance(0.05)  # each byte well within Twisted's idle timeout
        assert transport.value() == b""
        h.clock.advance(2 - 0.05 * len(head) - 0.01)
        assert not transport.disconnecting
        h.clock.advance(0.02)
        code, headers, body = answer(transport)
        assert code == 408 and headers[b"connection"] == b"close"
        assert body["error"]["code"] == "request_timeout"  # type: ignore[index]
        assert transport.disconnecting

    def test_a_silent_new_connection_gets_408(self) -> None:
        h = harness(header_timeout=1)
        proto, transport = connect(h)
        h.clock.advance(1)
        assert answer(transport)[0] == 408
        assert transport.disconnecting

    def test_headers_in_time_are_served_and_the_body_has_no_header_deadline(self) -> None:
        h = harness(header_timeout=1)
        proto, transport = connect(h)
        length = b"Content-Length: %d\r\n" % len(CHAT)
        proto.dataReceived(chat_request(headers=length, body=b""))
        h.clock.advance(5)
        assert transport.value() == b"" and not transport.disconnecting
        proto.dataReceived(CHAT)
        h.pump()
        assert transport.value().startswith(b"HTTP/1.1 200 ")

    def test_keep_alive_deadline_runs_from_the_first_byte_of_the_next_request(self) -> None:
        h = harness(header_timeout=1)
        proto, transport = connect(h)
        h.clock.advance(0.9)
        proto.dataReceived(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        h.pump()
        assert transport.value().startswith(b"HTTP/1.1 200 ")
        transport.clear()
        h.clock.advance(0.9)
        proto.dataReceived(b"GET /health HTTP/1.1\r\n")
        h.clock.advance(0.9)
        assert not transport.disconnecting  # 0.9 s since its first byte
        h.clock.advance(0.2)
        assert answer(transport)[0] == 408
        assert transport.disconnecting

    def test_an_idle_keep_alive_connection_is_not_cut(self) -> None:
        # nginx and SDK pools keep idle connections for a minute or more: the
        # header deadline must not close one under a client about to reuse it.
        h = harness(header_timeout=1)
        proto, transport = connect(h)
        proto.dataReceived(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        h.pump()
        transport.clear()
        h.clock.advance(50)  # (twisted.web closes a connection idle for 60 s)
        assert transport.value() == b"" and not transport.disconnecting
        proto.dataReceived(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        h.pump()
        assert transport.value().startswith(b"HTTP/1.1 200 ")

    def test_zero_means_no_deadline(self) -> None:
        h = harness(header_timeout=0)
        proto, transport = connect(h)
        proto.dataReceived(b"GET /health HTTP/1.1\r\n")
        h.clock.advance(59)
        assert transport.value() == b"" and not transport.disconnecting

    def test_default_is_ten_seconds(self) -> None:
        h = harness()
        assert h.config.server.header_timeout == 10.0
        assert h.site.header_timeout == 10.0
        proto, transport = connect(h)
        h.clock.advance(9.9)
        assert not transport.disconnecting
        h.clock.advance(0.1)
        assert transport.disconnecting
