"""
What happens once a request is over: it is counted, its timings go to the
histograms, and its record to the access log when one is configured.

The record is built from what the request noted on its way (its
:class:`~llmproxy.trace.Trace`), what went over the wire (status, bytes, the
``x-llmproxy-*`` headers it was answered with) and the clock.  It is written
after the last byte, so a stream's ``duration_ms`` is its true length.  A
client that left before the end is logged as nginx does: status 499,
``error_code: "client_closed"``.  A record holds names, never a secret: the
key's name, the request's path without its query string.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Protocol

from llmproxy.metrics import Metrics
from llmproxy.site import GatewayRequest


class RecordSink(Protocol):
    """Where records go (:class:`llmproxy.accesslog.AccessLog`)."""

    def write(self, record: dict[str, object]) -> None: ...


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


def _header(request: GatewayRequest, name: str) -> str | None:
    found = request.responseHeaders.getRawHeaders(name)
    return found[0] if found else None


def record(request: GatewayRequest, lost: bool, now: float) -> dict[str, object]:
    """The access-log record of a request that is over (field names as documented)."""
    trace = request.trace
    first = trace.first_byte if trace.first_byte is not None else now
    cache = _header(request, "x-llmproxy-cache")
    coalesced = _header(request, "x-llmproxy-coalesced") == "1"
    content_type = _header(request, "content-type") or ""
    client = request.getClientAddress()
    return {
        "time": datetime.fromtimestamp(trace.started, UTC).isoformat(timespec="milliseconds"),
        "request_id": request.request_id,
        "client": getattr(client, "host", None),
        "key": trace.key,
        "method": request.method.decode("ascii", "replace"),
        "path": request.path.decode("utf-8", "replace"),
        "endpoint": request.endpoint,
        "model": trace.model,
        "upstream": _header(request, "x-llmproxy-upstream"),
        "upstream_model": _header(request, "x-llmproxy-model"),
        "attempts": trace.attempts,
        "status": 499 if lost else request.code,
        "error_code": "client_closed" if lost else trace.error_code,
        "cache": "miss" if coalesced else cache,
        "coalesced": coalesced,
        "stream": "event-stream" in content_type,
        "ttfb_ms": _ms(first - trace.started),
        "duration_ms": _ms(now - trace.started),
        "upstream_ttfb_ms": _ms(trace.upstream_ttfb),
        "overhead_ms": _ms(trace.overhead(first)),
        "input_tokens": trace.input_tokens,
        "output_tokens": trace.output_tokens,
        "bytes_in": request.bytes_in,
        "bytes_out": request.bytes_out,
    }


class RequestLog:
    """The site's observer: counts, histograms, and the access log (settable on reload)."""

    def __init__(self, metrics: Metrics, access_log: RecordSink | None = None) -> None:
        self.metrics = metrics
        self.access_log = access_log

    def finished(self, request: GatewayRequest, lost: bool) -> None:
        now = request.now()
        trace = request.trace
        status = 499 if lost else request.code
        self.metrics.request(request.endpoint, status)
        first = trace.first_byte if trace.first_byte is not None else now
        overhead = None
        if trace.model is not None and not lost:
            overhead = trace.overhead(first)
        self.metrics.finished(
            request.endpoint, trace.model, now - trace.started, first - trace.started, overhead
        )
        if self.access_log is not None:
            self.access_log.write(record(request, lost, now))

    def refused(self, endpoint: str, status: int) -> None:
        self.metrics.request(endpoint, status)
