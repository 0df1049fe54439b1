"""
What can go wrong with one upstream attempt, and what each failure means.

The upstream client raises an :class:`UpstreamFailure`; routing reads it to
decide whether another target may be tried (:meth:`UpstreamFailure.retry_reason`)
and whether the target's health suffers (:meth:`UpstreamFailure.counts_against`);
the client finally sees it as a 502 or a 504 (:meth:`UpstreamFailure.to_api_error`).
"""

from __future__ import annotations

import enum

import attrs
from twisted.web.http_headers import Headers

from llmproxy import errors


class Kind(enum.Enum):
    """How an attempt failed.  The values are the labels of metrics and logs."""

    #: Nothing reached the upstream (refused, DNS, connect timeout, TLS), or a
    #: redirect (not followed).
    CONNECT = "connect"
    #: The connection was lost after the request was sent and before the
    #: response headers: the upstream may have acted on it (a generation, a bill).
    RESET = "reset"
    #: Out of time before or after the response headers.
    TIMEOUT = "timeout"
    #: An error status; ``status``, ``body`` and ``headers`` are set.
    HTTP = "http"
    #: The body stopped before it was complete.
    CUT = "cut"


@attrs.define
class UpstreamFailure(Exception):
    """An attempt that failed."""

    kind: Kind
    message: str
    status: int | None = None
    body: bytes = b""
    headers: Headers | None = None
    retry_after: float | None = None
    #: The exchange ran out of time while the client was not reading: the
    #: client's doing, not the target's.
    client_slow: bool = False

    def __str__(self) -> str:
        return f"{self.kind.value}: {self.message}"

    @property
    def label(self) -> str:
        """How metrics name this failure: ``connect``, ``timeout``, ``http_503``..."""
        if self.status is None:
            return self.kind.value
        return f"{self.kind.value}_{self.status}"

    def retry_reason(self) -> str | int:
        """The ``routing.retry_on`` entry that allows another attempt after this one."""
        if self.kind is Kind.HTTP and self.status is not None:
            return self.status
        if self.kind is Kind.TIMEOUT:
            return "timeout"
        if self.kind in (Kind.RESET, Kind.CUT):
            # Only when the operator opts in: the upstream got the request (and,
            # for a body cut after its headers, generated it), so it may be a replay.
            return "reset"
        return "connect"  # nothing reached the upstream

    def counts_against(self) -> bool:
        """Does this failure say the target is unhealthy?  A 4xx is the client's problem."""
        if self.client_slow:
            return False
        if self.kind is Kind.HTTP:
            return self.status == 429 or (self.status or 0) >= 500
        return True

    def to_api_error(self) -> errors.APIError:
        if self.kind is Kind.TIMEOUT:
            return errors.gateway_timeout(f"The upstream timed out ({self.message})")
        return errors.bad_gateway(f"The upstream failed ({self.message})")
