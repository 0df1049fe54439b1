"""
What one request did, noted as it goes through the proxy, for its access-log
record, its histograms and its ``x-llmproxy-overhead-ms`` header.

The site starts a :class:`Trace` when a request arrives; the pipeline, the
failover loop and the accountant note the model, the key, the attempts, the
time spent waiting on upstreams, the tokens and their cost; the site reads it back when
the request is over.  It only ever holds names, numbers and error codes:
never a key, a header value or a body.
"""

from __future__ import annotations

from decimal import Decimal
from typing import TYPE_CHECKING

import attrs

if TYPE_CHECKING:
    from llmproxy.answers import Usage


@attrs.define
class Trace:
    #: When the request arrived (the reactor's clock).
    started: float
    model: str | None = None
    key: str | None = None
    #: Upstream attempts made for it.
    attempts: int = 0
    #: Time to the response headers of the attempt that answered.
    upstream_ttfb: float | None = None
    #: Time spent waiting on upstreams (or on an identical request's flight)
    #: before the first byte, closed waits only.
    upstream_wait: float = 0.0
    #: When the wait under way began, if one is.
    waiting_since: float | None = None
    #: The tokens its answer used (reported, or estimated), once charged.
    usage: Usage | None = None
    #: What they cost, when the target that answered has a price.
    cost: Decimal | None = None
    #: What a cache hit would have cost (its answer's usage at today's price).
    saved: Decimal | None = None
    #: The error code the client got (ours, or the upstream's), if any.
    error_code: str | None = None
    #: When the client's first byte (its headers) went out.
    first_byte: float | None = None
    #: When the request ended (its observer hears of it a little later).
    ended: float | None = None

    def wait(self, now: float) -> None:
        """A wait on an upstream (or a flight) begins."""
        if self.waiting_since is None:
            self.waiting_since = now

    def waited(self, now: float) -> None:
        """The wait under way is over."""
        if self.waiting_since is not None:
            self.upstream_wait += max(0.0, now - self.waiting_since)
            self.waiting_since = None

    def overhead(self, first_byte: float) -> float:
        """The proxy's own time before ``first_byte``: all of it but the upstream waits."""
        return max(0.0, (first_byte - self.started) - self.upstream_wait)

    def answering(self, now: float) -> float:
        """The client's headers go out now: the proxy's own time so far, in seconds."""
        self.waited(now)
        if self.first_byte is None:
            self.first_byte = now
        return self.overhead(now)
