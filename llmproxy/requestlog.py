"""
What happens once a request is over: it is counted, its timings go to the
histograms, and its record to the access log when one is configured.

The record is built from what the request noted on its way (its
:class:`~llmproxy.trace.Trace`), what went over the wire (status, bytes, the
``x-llmproxy-*`` headers it was answered with) and the clock.  It is written
after the last byte, so a stream's ``duration_ms`` is its true length.  A
client that left before the end is logged as nginx does: status 499,
``error_code: "client_closed"``.  Tokens are given by kind (as
:class:`~llmproxy.answers.Usage` splits them), with ``tokens_estimated``
true when the answer reported none and the proxy counted.  A record holds names, never a secret: the
key's name, the request's path without its query string.
"""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Protocol

from llmproxy.metrics import Metrics
from llmproxy.site import GatewayRequest
from llmproxy.trace import Trace


class RecordSink(Protocol):
    """Where records go (:class:`llmproxy.accesslog.AccessLog`)."""

    def write(self, record: dict[str, object]) -> None: ...


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


def _header(request: GatewayRequest, name: str) -> str | None:
    found = request.responseHeaders.getRawHeaders(name)
    return found[0] if found else None


def _usd(amount: Decimal | None) -> float | None:
    return None if amount is None else float(amount)


def _usage(trace: Trace) -> dict[str, object]:
    """The tokens by kind (exact, or ``tokens_estimated``), their cost, and a hit's saving."""
    usage = trace.usage
    found: dict[str, object] = {
        f"{kind}_tokens": count for kind, count in (usage.kinds() if usage else {}).items()
    }
    found["tokens_estimated"] = usage.estimated if usage is not None else None
    found["cost_usd"] = _usd(trace.cost)
    found["saved_usd"] = _usd(trace.saved)
    return found


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
        **_usage(trace),
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
        self.metrics.request(request.endpoint, status, trace.key, trace.model)
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
