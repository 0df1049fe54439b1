"""
The operator's endpoints (/stats, /metrics, DELETE /cache, /admin/reload) are
closed by default: open on an open proxy, only to direct callers on the
proxy's host when there are client keys but no admin keys, and to an admin key
from anywhere when there are admin keys.  Each request here arrives on a
connection of its own from a chosen peer, as raw bytes through the real Site.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.test.requesthelper import DummyChannel

from llmproxy.site import GatewayRequest, GatewaySite
from tests.harness import Harness, chat, config_text

KEYS = "auth:\n  keys:\n    - {name: alice, key: sk-alice-0001}\n"
ADMIN = "auth:\n  admin_keys: [sk-admin-000001]\n"
BOTH = "auth:\n  keys:\n    - {name: alice, key: sk-alice-0001}\n  admin_keys: [sk-admin-000001]\n"

#: Each guarded endpoint, as (method, path).
GUARDED = [("GET", "/stats"), ("GET", "/metrics"), ("DELETE", "/cache"), ("POST", "/admin/reload")]
PROBES = ["/health", "/health/live", "/health/ready"]

LOOPBACK = ["127.0.0.1", "127.8.9.10", "::1", "::ffff:127.0.0.1"]
REMOTE = ["10.0.0.1", "203.0.113.9", "2001:db8::1", "::ffff:10.0.0.1"]

#: Headers that say a proxy passed the request on.
FORWARDED = [
    {"X-Forwarded-For": "203.0.113.9"},
    {"X-Real-IP": "203.0.113.9"},
    {"Forwarded": "for=203.0.113.9"},
    {"X-Forwarded-Proto": "https"},
    {"Via": "1.1 edge"},
]


class Reply:
    """A status and a body, off the wire."""

    def __init__(self, wire: bytes) -> None:
        head, _, rest = wire.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        self.status = int(lines[0].split(b" ")[1])
        headers = dict(line.lower().split(b": ", 1) for line in lines[1:])
        self.body = _dechunk(rest) if headers.get(b"transfer-encoding") == b"chunked" else rest

    def json(self) -> Any:
        return json.loads(self.body)


def _dechunk(data: bytes) -> bytes:
    out = []
    while data:
        size, _, data = data.partition(b"\r\n")
        n = int(size.split(b";")[0], 16)
        if n == 0:
            break
        out.append(data[:n])
        data = data[n + 2 :]
    return b"".join(out)


def call(
    h: Harness,
    method: str,
    path: str,
    peer: str = "127.0.0.1",
    headers: dict[str, str] | None = None,
) -> Reply:
    """One request from ``peer`` (IPv4 or IPv6) on a connection of its own."""
    address = (IPv6Address if ":" in peer else IPv4Address)("TCP", peer, 40000)
    proto = h.site.buildProtocol(address)
    assert proto is not None
    transport = StringTransport(peerAddress=address)
    proto.makeConnection(transport)
    head = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    proto.dataReceived(
        f"{method} {path} HTTP/1.1\r\nHost: proxy.test\r\nContent-Length: 0\r\n{head}\r\n".encode()
    )
    h.pump()
    proto.connectionLost(None)
    h.pump()
    return Reply(transport.value())


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


class GuardTests(SynchronousTestCase):
    def config_file(self, extra: str = "") -> Path:
        """A config file of ``config_text(extra=extra)``, removed after the test."""
        folder = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, folder)
        path = Path(folder) / "llmproxy.yaml"
        path.write_text(config_text(extra=extra))
        return path

    def harness(self, extra: str = "") -> Harness:
        """A gateway whose config is a file (so /admin/reload can read it again)."""
        path = self.config_file(extra)
        return Harness(path.read_text(), source=str(path))

    def assert_refused(self, reply: Reply) -> None:
        assert reply.status == 403, reply.body
        error = reply.json()["error"]
        assert error["type"] == "permission_error"
        assert error["code"] == "admin_key_required"
        assert "auth.admin_keys" in error["message"]
        assert "from its host" in error["message"]

    def test_an_open_proxy_keeps_them_open_to_anyone(self) -> None:
        h = self.harness()
        for method, path in GUARDED:
            for peer in ("127.0.0.1", *REMOTE):
                for headers in [{}, *FORWARDED]:
                    reply = call(h, method, path, peer, headers)
                    assert reply.status == 200, (method, path, peer, headers, reply.body)

    def test_with_client_keys_only_a_direct_local_caller_is_answered(self) -> None:
        h = self.harness(KEYS)
        for method, path in GUARDED:
            for peer in LOOPBACK:
                assert call(h, method, path, peer).status == 200, (method, path, peer)

    def test_with_client_keys_a_remote_caller_is_refused(self) -> None:
        h = self.harness(KEYS)
        for method, path in GUARDED:
            for peer in REMOTE:
                self.assert_refused(call(h, method, path, peer))
                # A client key opens nothing here, nor does a would-be admin key.
                self.assert_refused(call(h, method, path, peer, bearer("sk-alice-0001")))
                self.assert_refused(call(h, method, path, peer, bearer("sk-admin-000001")))

    def test_with_client_keys_a_forwarded_caller_is_refused(self) -> None:
        h = self.harness(KEYS)
        for method, path in GUARDED:
            # From nginx on this host (a trusted proxy), and from a local proxy
            # that is not in trusted_proxies, whatever header says it forwards.
            for peer in ("127.0.0.1", "127.0.0.2", "::1"):
                for headers in FORWARDED:
                    self.assert_refused(call(h, method, path, peer, headers))

    def test_a_refused_purge_purges_nothing(self) -> None:
        h = self.harness(KEYS)
        alice = {"authorization": "Bearer sk-alice-0001"}
        h.request("POST", "/v1/chat/completions", chat(), alice)
        self.assert_refused(
            call(h, "DELETE", "/cache", "127.0.0.1", {"X-Forwarded-For": "1.2.3.4"})
        )
        self.assert_refused(call(h, "DELETE", "/cache", "10.0.0.1"))
        hit = h.request("POST", "/v1/chat/completions", chat(), alice)
        assert hit.header("x-llmproxy-cache") == "hit"
        purged = call(h, "DELETE", "/cache")
        assert (purged.status, purged.json()) == (200, {"purged": 1})
        miss = h.request("POST", "/v1/chat/completions", chat(), alice)
        assert miss.header("x-llmproxy-cache") == "miss"

    def test_a_refused_reload_applies_nothing(self) -> None:
        path = self.config_file(KEYS)
        h = Harness(path.read_text(), source=str(path))
        path.write_text(config_text(extra=KEYS).replace("  m2:\n", "  m9:\n"))
        self.assert_refused(call(h, "POST", "/admin/reload", "10.0.0.1"))
        assert sorted(h.gateway.config.models) == ["m1", "m2"]
        reloaded = call(h, "POST", "/admin/reload")
        assert reloaded.status == 200 and reloaded.json()["added"] == ["m9"]

    def test_with_admin_keys_one_is_needed_from_anywhere(self) -> None:
        for extra in (ADMIN, BOTH):
            h = self.harness(extra)
            for method, path in GUARDED:
                for peer in ("127.0.0.1", *REMOTE):
                    for headers in [{}, {"X-Forwarded-For": "203.0.113.9"}]:
                        missing = call(h, method, path, peer, headers)
                        assert missing.status == 401, (extra, method, path, peer)
                        assert missing.json()["error"]["code"] == "invalid_api_key"
                        wrong = call(h, method, path, peer, {**headers, **bearer("sk-nope")})
                        assert wrong.status == 401
                        admin = {**headers, **bearer("sk-admin-000001")}
                        assert call(h, method, path, peer, admin).status == 200

    def test_the_probes_stay_open(self) -> None:
        for extra in (KEYS, BOTH):
            h = self.harness(extra)
            for path in PROBES:
                for peer in REMOTE:
                    assert call(h, "GET", path, peer, FORWARDED[0]).status == 200, (extra, path)


def request_from(peer: Any, headers: dict[bytes, bytes] | None = None) -> GatewayRequest:
    chan = DummyChannel()
    chan.site = GatewaySite(
        Resource(), max_body_bytes=10, trusted_proxies=("127.0.0.1",), reactor=Clock()
    )
    request = GatewayRequest(chan)
    request.client = peer
    for name, value in (headers or {}).items():
        request.requestHeaders.setRawHeaders(name, [value])
    return request


class DirectFromLoopbackTests(SynchronousTestCase):
    def test_the_peer_decides_not_the_forwarded_client(self) -> None:
        def local(host: str, headers: dict[bytes, bytes] | None = None) -> bool:
            cls = IPv6Address if ":" in host else IPv4Address
            return request_from(cls("TCP", host, 1), headers).direct_from_loopback()

        assert local("127.0.0.1") and local("127.255.0.1") and local("::1")
        assert local("::ffff:127.0.0.1")
        assert not local("10.0.0.1") and not local("::ffff:10.0.0.1") and not local("::")
        # An untrusted peer's X-Forwarded-For is ignored for its address, not here.
        assert not local("127.0.0.2", {b"x-forwarded-for": b"127.0.0.1"})
        assert not local("127.0.0.1", {b"x-forwarded-for": b""})

    def test_a_unix_socket_is_this_host(self) -> None:
        assert request_from(UNIXAddress(None)).direct_from_loopback()
        assert not request_from(UNIXAddress(None), {b"via": b"x"}).direct_from_loopback()
        assert not request_from(None).direct_from_loopback()
