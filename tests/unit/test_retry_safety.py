"""
Retries that cannot bill twice: what reached the upstream decides.

A request the upstream may have read (the connection was lost after it was
sent) is a ``reset``, retried on another target only when the operator opts in;
a request on a reused pooled connection the peer had closed is sent again once,
on a new connection to the same target, unseen by routing.
"""

from __future__ import annotations

import socket
from typing import Any, cast

from twisted.internet import error as ierror
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import (
    RequestNotSent,
    ResponseFailed,
    ResponseNeverReceived,
)
from zope.interface import implementer

from llmproxy.config import Upstream, parse_yaml
from llmproxy.failures import Kind, UpstreamFailure
from llmproxy.routing.plan import Plan
from llmproxy.upstream.client import (
    BytesProducer,
    ReusedConnection,
    UpstreamPool,
    UpstreamPools,
    closed_while_idle,
    peer_closed,
)
from llmproxy.upstream.forwarder import _translate
from tests.harness import Harness, chat, config_text, three

UPSTREAM = Upstream(name="a", base_url="http://a.test/v1")
KEY = ("http", b"a.test", 80)


def lost(*reasons: BaseException) -> list[Failure]:
    return [Failure(r) for r in reasons]


def never_answered() -> ResponseNeverReceived:
    """The upstream read the request, then reset the connection."""
    return ResponseNeverReceived(lost(ierror.ConnectionLost("Connection reset by peer")))


class Resets:
    """An upstream client whose every request is read, then the connection reset."""

    def request(self, method: str, url: str, **kwargs: Any) -> Deferred[Any]:
        return fail(never_answered())


class TranslateTests(SynchronousTestCase):
    def translate(self, e: Exception) -> Exception:
        return _translate(e, UPSTREAM, timed_out=False)

    def test_lost_after_sending_is_a_reset_not_a_connect_failure(self) -> None:
        for e in (
            never_answered(),
            ResponseNeverReceived(lost(ierror.ConnectionDone())),
            ResponseFailed(lost(ierror.ConnectionLost())),
        ):
            failure = self.translate(e)
            assert isinstance(failure, UpstreamFailure)
            assert failure.kind is Kind.RESET
            assert failure.retry_reason() == "reset"
            assert failure.counts_against()
        # A cancel (a client that left) stays a cancel.
        cancelled = ResponseNeverReceived(lost(CancelledError()))
        assert isinstance(self.translate(cancelled), CancelledError)

    def test_nothing_sent_is_a_connect_failure(self) -> None:
        for e in (
            ierror.ConnectionRefusedError("refused"),
            ierror.DNSLookupError("no such host"),
            RequestNotSent(),
        ):
            failure = self.translate(e)
            assert isinstance(failure, UpstreamFailure)
            assert failure.retry_reason() == "connect", e
        # A failed TLS handshake: no byte of the request left in the clear.
        from OpenSSL import SSL

        failure = self.translate(ResponseNeverReceived(lost(SSL.Error("bad certificate"))))
        assert isinstance(failure, UpstreamFailure)
        assert failure.retry_reason() == "connect"


class RetryOnTests(SynchronousTestCase):
    def plan(self, extra: str = "") -> Plan:
        config = parse_yaml(config_text(extra=extra), "t", {})
        unused = cast(Any, None)  # retryable() reads only retry_on
        return Plan(MemoryReactorClock(), unused, "m1", unused, 3, config.routing.retry_on)

    def test_reset_is_not_retried_by_default_but_may_be_opted_in(self) -> None:
        reset = UpstreamFailure(Kind.RESET, "lost")
        refused = UpstreamFailure(Kind.CONNECT, "refused")
        assert not self.plan().retryable(reset)
        assert self.plan().retryable(refused)
        opted = self.plan("routing: {retry_on: [connect, reset]}\n")
        assert opted.retryable(reset) and opted.retryable(refused)

    def test_a_reset_request_reaches_one_target_and_answers_502(self) -> None:
        h = Harness(three(), mocks=("a", "b", "c"), clients={"a": Resets()})
        answer = h.request("POST", "/v1/chat/completions", chat())
        assert answer.code == 502
        assert "after the request was sent" in answer.json()["error"]["message"]
        assert h.seen("b") == [] and h.seen("c") == []

    def test_a_body_cut_after_its_headers_is_not_generated_twice(self) -> None:
        # The upstream answered 200 and began the body: it generated (and billed) it.
        h = Harness(three(), mocks=("a", "b", "c"))
        h.mocks["a"].config = {"cut_body": True}
        h.mocks["b"].config = {"cut_body": True}
        h.mocks["c"].config = {"cut_body": True}
        answer = h.request("POST", "/v1/chat/completions", chat())
        assert answer.code == 502
        assert sum(len(h.seen(n)) for n in "abc") == 1
        opted = Harness(
            three(extra="routing: {retry_on: [connect, reset]}\n"), mocks=("a", "b", "c")
        )
        for name in "ab":
            opted.mocks[name].config = {"cut_body": True}
        assert opted.request("POST", "/v1/chat/completions", chat()).code == 200

    def test_an_operator_who_opts_in_gets_the_next_target(self) -> None:
        extra = "routing: {retry_on: [connect, timeout, reset]}\n"
        h = Harness(three(extra=extra), mocks=("a", "b", "c"), clients={"a": Resets()})
        answer = h.request("POST", "/v1/chat/completions", chat())
        assert answer.code == 200
        assert answer.header("x-llmproxy-upstream") == "b"


class Connection:
    """An HTTP11ClientProtocol stand-in whose request ends with ``outcome``."""

    def __init__(self, outcome: Any) -> None:
        self.state = "QUIESCENT"
        self.outcome = outcome
        self.sent: list[Any] = []
        self.closed = False
        self.transport = self

    def request(self, request: Any) -> Deferred[Any]:
        self.sent.append(request)
        if isinstance(self.outcome, Exception):
            return fail(self.outcome)
        return succeed(self.outcome)

    def loseConnection(self) -> None:  # noqa: N802 - Twisted's name
        self.closed = True


@implementer(IStreamClientEndpoint)
class Endpoint:
    """Connects to the given new connections in turn."""

    def __init__(self, *fresh: Connection) -> None:
        self.fresh = list(fresh)

    def connect(self, factory: Any) -> Deferred[Any]:
        return succeed(self.fresh.pop(0))


class Request:
    def __init__(self, body: Any = None) -> None:
        self.bodyProducer = body


class ReusedConnectionTests(SynchronousTestCase):
    def outcome(self, failure: Exception, body: Any = None) -> tuple[Any, UpstreamPool, Connection]:
        """A request on a reused connection that fails with ``failure``, a new one answering."""
        pool = UpstreamPool(MemoryReactorClock())
        cached, fresh = Connection(failure), Connection("response")
        pool._putConnection(KEY, cached)
        connection = self.successResultOf(pool.getConnection(KEY, Endpoint(fresh)))
        assert isinstance(connection, ReusedConnection)
        results: list[Any] = []
        connection.request(Request(body)).addBoth(results.append)
        assert cached.sent
        return results[0], pool, fresh

    def test_a_reused_connection_closed_by_the_peer_is_sent_again_once(self) -> None:
        for closed in (
            ResponseNeverReceived(lost(ierror.ConnectionDone())),
            never_answered(),
            RequestNotSent(),
        ):
            result, pool, fresh = self.outcome(closed, BytesProducer(b"{}"))
            assert result == "response", closed
            assert pool.resent == 1 and len(fresh.sent) == 1

    def test_no_resend_after_a_response_byte_or_a_cancel(self) -> None:
        for failure in (
            ResponseFailed(lost(ierror.ConnectionDone())),  # part of the response came
            ResponseNeverReceived(lost(CancelledError())),
            ResponseNeverReceived(lost(ierror.ConnectionAborted())),  # our own abort
        ):
            result, pool, fresh = self.outcome(failure)
            assert isinstance(result, Failure) and result.value is failure
            assert pool.resent == 0 and fresh.sent == []

    def test_a_body_that_cannot_be_produced_again_is_not_resent(self) -> None:
        result, pool, _ = self.outcome(never_answered(), body=object())
        assert isinstance(result, Failure) and pool.resent == 0

    def test_only_a_reused_connection_is_wrapped(self) -> None:
        pool = UpstreamPool(MemoryReactorClock())
        fresh = Connection(never_answered())
        connection = self.successResultOf(pool.getConnection(KEY, Endpoint(fresh)))
        assert connection is fresh  # not wrapped: its failure goes to routing as it is
        dead, cached, other = Connection("stale"), Connection("ok"), Connection("new")
        pool._putConnection(KEY, dead)
        pool._putConnection(KEY, cached)
        dead.state = "CONNECTION_LOST"
        reused = self.successResultOf(pool.getConnection(KEY, Endpoint(other)))
        assert isinstance(reused, ReusedConnection) and reused.connection is cached
        assert self.successResultOf(pool.getConnection(KEY, Endpoint(other))) is other


class KeepaliveTimeoutTests(SynchronousTestCase):
    def test_idle_connections_close_after_keepalive_timeout(self) -> None:
        text = config_text().replace(
            "    api_key: sk-upstream-a-secret", "    api_key: k\n    keepalive_timeout: 2"
        )
        upstreams = parse_yaml(text, "t", {}).upstreams
        assert upstreams["a"].keepalive_timeout == 2.0
        assert parse_yaml(config_text(), "t", {}).upstreams["a"].keepalive_timeout == 30.0
        reactor = MemoryReactorClock()
        pool = UpstreamPools(reactor, upstreams).pools["a"]
        idle = Connection("x")
        pool._putConnection(KEY, idle)
        reactor.advance(1.9)
        assert not idle.closed
        reactor.advance(0.1)
        assert idle.closed

    def test_a_socket_the_peer_closed_is_seen_before_writing(self) -> None:
        ours, theirs = socket.socketpair()
        ours.setblocking(False)
        try:
            holder = type("Transport", (), {"socket": ours})()
            assert not closed_while_idle(holder)
            theirs.close()
            assert closed_while_idle(holder)
            assert not closed_while_idle(object())  # no socket: taken as open
        finally:
            ours.close()

    def test_peer_closed_reads_the_reasons(self) -> None:
        assert peer_closed(ResponseNeverReceived(lost(ierror.ConnectionDone())))
        assert not peer_closed(ResponseNeverReceived([]))
        assert not peer_closed(ierror.ConnectionRefusedError())
