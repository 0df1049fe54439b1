"""
Charging a model call: its tokens and their cost, to the key's limits (``tpm``
and budget), to the metrics, and to the request's log record.

The tokens are the upstream's own count (its ``usage``), split into the four
kinds of :class:`~llmproxy.answers.Usage`, and priced with the price of the
target that answered (``price``, on the target or its upstream).  An answer
without usage (a stream that did not ask for it, a server that never reports
it) is charged an estimate, so that a key cannot dodge its limits by
streaming; the estimate is marked ``estimated`` wherever it is reported and
counted apart from the exact numbers.  A call that was refused generated
nothing and costs nothing; one the client left half-way is charged for what
was generated.  A cache hit costs nothing, and what it would have cost is
counted as saved.  Counting a prompt's tokens
(``messages/count_tokens``) generates nothing, and is never charged; audio,
images and moderations are charged what their answers report, and not
estimated when they report nothing (their bytes are not tokens).
"""

from __future__ import annotations

from decimal import Decimal

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from llmproxy.answers import Inspector, Usage
from llmproxy.cache.entry import Entry
from llmproxy.calls import ModelCall
from llmproxy.limits import Limiter
from llmproxy.metrics import Metrics

#: Endpoints whose calls generate nothing: never charged, not even an estimate.
UNCHARGED = frozenset({"messages/count_tokens"})
#: Endpoints of text in, text out, whose tokens can be estimated when the answer
#: reports none.  Audio, images and moderations are charged only what they report.
ESTIMATED = frozenset({"chat/completions", "completions", "embeddings", "responses", "messages"})


def estimate_usage(body: bytes, inspector: Inspector) -> Usage:
    """
    About four bytes of prompt per token; and one token per streamed event, as
    servers stream token by token, or four bytes of a whole answer per token.
    """
    return Usage.estimate(body, inspector.data_events or inspector.body_bytes // 4)


class Accountant:
    log = Logger()

    def __init__(self, limiter: Limiter, metrics: Metrics) -> None:
        self.limiter = limiter
        self.metrics = metrics

    def charge(self, call: ModelCall, inspector: Inspector) -> None:
        """Charge what ``call``'s answer used (nothing, when nothing was answered)."""
        if call.endpoint in UNCHARGED:
            return
        usage = inspector.usage
        if usage is None:
            if not inspector.answered or call.endpoint not in ESTIMATED:
                return
            usage = estimate_usage(call.request.body, inspector)
        cost = usage.cost(inspector.price)
        trace = call.request.trace
        trace.usage, trace.cost = usage, cost
        principal = call.principal
        self.metrics.usage(principal.name, call.model.name, usage, cost)
        usd = float(cost) if cost is not None else None
        charging = Deferred.fromCoroutine(self.limiter.charge(principal, usage.total, usd))
        charging.addErrback(lambda f: self.log.failure("charging tokens failed", f))

    def saved(self, call: ModelCall, entry: Entry) -> None:
        """A cache hit: it costs nothing; what its answer cost is counted as saved."""
        usage = entry_usage(entry)
        price = None
        for target in call.model.targets:
            if target.upstream == entry.upstream and target.model == entry.model:
                price = target.price
        saved = usage.cost(price) if usage is not None else None
        call.request.trace.saved = saved
        if saved is not None:
            call.request.trace.cost = Decimal(0)
            self.metrics.saved(call.principal.name, call.model.name, saved)


def entry_usage(entry: Entry) -> Usage | None:
    """The usage a stored answer reported, kept with it (None: it reported none)."""
    return Usage(*entry.usage) if entry.usage is not None else None
