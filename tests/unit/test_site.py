"""The Site: body limits before the body is read, and X-Forwarded-For trust."""

from __future__ import annotations

from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import IProtocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from llmproxy.site import GatewayRequest, GatewaySite
from tests.harness import Harness, config_text


def channel(limit: int = 100, peer: str = "10.0.0.1") -> tuple[Harness, IProtocol, StringTransport]:
    """A client connection to the gateway's site, on a transport that keeps what is written."""
    h = Harness(config_text() + f"server: {{max_body_bytes: {limit}}}\n")
    proto = h.site.buildProtocol(IPv4Address("TCP", peer, 1234))
    assert proto is not None
    transport = StringTransport(peerAddress=IPv4Address("TCP", peer, 1234))
    proto.makeConnection(transport)
    return h, proto, transport


def request_from(peer: str, forwarded: str | None) -> GatewayRequest:
    from twisted.web.resource import Resource
    from twisted.web.test.requesthelper import DummyChannel

    chan = DummyChannel()
    chan.site = GatewaySite(
        Resource(), max_body_bytes=10, trusted_proxies=("127.0.0.1",), reactor=Clock()
    )
    request = GatewayRequest(chan)
    request.client = IPv4Address("TCP", peer, 1)
    if forwarded:
        request.requestHeaders.setRawHeaders(b"x-forwarded-for", [forwarded.encode()])
    return request


class BodyLimitTests(SynchronousTestCase):
    def test_413_from_content_length_before_the_body(self) -> None:
        h, proto, transport = channel(limit=100)
        proto.dataReceived(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 101\r\n\r\n"
        )
        reply = transport.value()
        assert reply.startswith(b"HTTP/1.1 413 ")
        assert b'"code": "request_too_large"' in reply
        assert transport.disconnecting
        assert h.seen() == []
        assert h.request("GET", "/stats").json()["requests"]["by_status"]["413"] == 1

    def test_413_is_not_followed_by_100_continue(self) -> None:
        h, proto, transport = channel(limit=100)
        proto.dataReceived(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n"
            b"Expect: 100-continue\r\n\r\n"
        )
        reply = transport.value()
        assert reply.startswith(b"HTTP/1.1 413 ") and b"100 Continue" not in reply

    def test_413_while_reading_a_chunked_body(self) -> None:
        h, proto, transport = channel(limit=100)
        proto.dataReceived(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        proto.dataReceived(b"3c\r\n" + b"x" * 60 + b"\r\n")
        assert transport.value() == b""  # 60 bytes: still under the limit
        proto.dataReceived(b"3c\r\n" + b"x" * 60 + b"\r\n")
        reply = transport.value()
        assert reply.startswith(b"HTTP/1.1 413 ")
        assert transport.disconnecting
        proto.dataReceived(b"0\r\n\r\n")  # the rest is ignored, nothing is dispatched
        assert h.seen() == []
        assert h.request("GET", "/stats").json()["inflight"] == 1  # only that /stats request

    def test_body_at_the_limit_is_accepted(self) -> None:
        body = b'{"model":"m1","messages":[]}'
        h, proto, transport = channel(limit=len(body))
        proto.dataReceived(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: "
            + str(len(body)).encode()
            + b"\r\n\r\n"
            + body
        )
        h.pump()
        assert not transport.value().startswith(b"HTTP/1.1 413")
        assert len(h.seen()) == 1


class ForwardedForTests(SynchronousTestCase):
    def test_forwarded_for_is_honoured_only_from_trusted_proxies(self) -> None:
        assert request_from("127.0.0.1", "203.0.113.9").getClientAddress().host == "203.0.113.9"
        assert (
            request_from("127.0.0.1", "6.6.6.6, 203.0.113.9, 127.0.0.1").getClientAddress().host
            == "203.0.113.9"
        )
        assert request_from("198.51.100.7", "203.0.113.9").getClientAddress().host == "198.51.100.7"
        assert request_from("127.0.0.1", "garbage").getClientAddress().host == "127.0.0.1"


class ObserverTimingTests(SynchronousTestCase):
    def test_the_observer_hears_of_a_request_after_its_turn_and_it_counts_till_then(self) -> None:
        from twisted.web.resource import Resource
        from twisted.web.test.requesthelper import DummyChannel

        clock = Clock()
        seen: list[tuple[GatewayRequest, bool, float]] = []

        class Observer:
            def finished(self, request: GatewayRequest, lost: bool) -> None:
                seen.append((request, lost, request.now()))

            def refused(self, endpoint: str, status: int) -> None:
                pass

        chan = DummyChannel()
        site = GatewaySite(
            Resource(), max_body_bytes=10, trusted_proxies=(), observer=Observer(), reactor=clock
        )
        chan.site = site
        clock.advance(10)
        request = GatewayRequest(chan)
        site.begin(request)
        request.finish()
        # The access log and metrics wait for the turn's end (after the answer's
        # bytes are sent); a drain still waits for them.
        assert seen == [] and site.inflight.count == 1
        clock.advance(3)  # a turn that took long: the request still ended at 10
        assert seen == [(request, False, 10.0)] and site.inflight.count == 0
