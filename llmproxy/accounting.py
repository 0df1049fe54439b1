"""
Charging a model call's tokens: to the key's ``tpm`` limit and to the
``llmproxy_tokens`` metric.

The tokens are the upstream's own count (``usage.total_tokens``) when the
answer reported one.  A stream without ``stream_options.include_usage``
reports none: it is charged an estimate, so that a key cannot dodge its limit
by streaming.  A call that was refused generated nothing and costs nothing; one
the client left half-way is charged for what was generated.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from llmproxy.answers import Inspector
from llmproxy.calls import ModelCall
from llmproxy.limits import Limiter
from llmproxy.metrics import Metrics


def estimate_tokens(body: bytes, inspector: Inspector) -> int:
    """
    About four bytes of prompt per token, and one token per streamed event, as
    servers stream token by token.
    """
    return len(body) // 4 + inspector.data_events


class Accountant:
    log = Logger()

    def __init__(self, limiter: Limiter, metrics: Metrics) -> None:
        self.limiter = limiter
        self.metrics = metrics

    def charge(self, call: ModelCall, inspector: Inspector) -> None:
        """Charge what ``call``'s answer used (nothing, when nothing was answered)."""
        if inspector.usage_tokens:
            tokens = inspector.usage_tokens
        elif inspector.answered:
            tokens = estimate_tokens(call.request.body, inspector)
        else:
            return
        principal = call.principal
        trace = call.request.trace
        trace.input_tokens, trace.output_tokens = inspector.input_tokens, inspector.output_tokens
        # The metric counts what upstreams reported, never an estimate.
        self.metrics.tokens(call.model.name, principal.name, inspector.usage_tokens)
        charging = Deferred.fromCoroutine(self.limiter.charge_tokens(principal, tokens))
        charging.addErrback(lambda f: self.log.failure("charging tokens failed", f))
