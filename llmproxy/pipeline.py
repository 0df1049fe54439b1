"""
The request pipeline: a model call (chat, completions, embeddings, responses)
from the parsed client request to the last byte of its answer.

    admit -> cache decision -> join a flight | replay a hit | lead a flight
          -> attempts (failover, relay) -> charge tokens -> store the answer
          -> release what admission took (a ``max_parallel`` slot)

This module only decides that order.  Admission is authentication, the body's
fields, the model, the key's allow-list and limits, the cache controls and
``previous_response_id``; each rule lives with its collaborator.  A chat
stream that did not ask for its usage is made to when ``routing.stream_usage``
is ``force`` (the cache key still uses the client's own body).
"""

from __future__ import annotations

from collections.abc import Mapping

from llmproxy import errors
from llmproxy.accounting import Accountant
from llmproxy.answers import Inspector
from llmproxy.attempts import Attempts
from llmproxy.auth import Authenticator, Principal, bearer_token
from llmproxy.body import check_fields, parse_body, wants_usage
from llmproxy.cache.keys import parse_controls
from llmproxy.cache.store import CacheDecision, ResponseCache, Verdict, announce
from llmproxy.calls import ClientRequest, ModelCall
from llmproxy.limits import Admission, Limiter
from llmproxy.relay import replay
from llmproxy.responses import Responses
from llmproxy.routing.router import Router
from llmproxy.sink import ClientSink, DroppableSink
from llmproxy.trace import Trace


class Pipeline:
    def __init__(
        self,
        auth: Authenticator,
        limiter: Limiter,
        router: Router,
        responses: Responses,
        cache: ResponseCache,
        attempts: Attempts,
        accountant: Accountant,
        stream_usage: str = "pass",
    ) -> None:
        self.auth = auth
        self.limiter = limiter
        self.router = router
        self.responses = responses
        self.cache = cache
        self.flights = cache.flights
        self.attempts = attempts
        self.accountant = accountant
        #: ``routing.stream_usage``: ``force`` asks chat streams for their usage.
        self.stream_usage = stream_usage

    async def handle(self, request: ClientRequest, sink: DroppableSink) -> None:
        """Answer a model call."""
        call, admission = await self.admit(request)
        for name, value in admission.headers.items():
            sink.header(name, value)
        try:
            await self._handle(call, sink)
        finally:
            admission.release()  # the last byte is written (or never will be)

    async def _handle(self, call: ModelCall, sink: DroppableSink) -> None:
        decision = self.cache.decide(call)
        if decision.key is None or not decision.lookup:
            announce(sink, decision.verdict)
            await self._answer(call, decision, sink)
            return
        key = decision.key
        if await self._join(key, sink, call.request.trace):
            return
        entry = await self.cache.lookup(key)
        if entry is not None:
            announce(sink, Verdict.HIT)
            self.accountant.saved(call, entry)
            replay(entry, sink)
            return
        # One may have started during the lookup.
        if await self._join(key, sink, call.request.trace):
            return
        announce(sink, Verdict.MISS)
        await self.flights.lead(key, sink, lambda flight: self._answer(call, decision, flight))

    async def admit(self, request: ClientRequest) -> tuple[ModelCall, Admission]:
        """
        The call, once the caller, its body, its model and its limits allow it,
        and what its admission took (to be released when it is over).
        """
        principal = self.auth.authenticate(bearer_token(request.headers))
        if request.upload is not None:
            payload = request.upload.payload()
        else:
            payload = parse_body(request.body)
        name = check_fields(payload)
        model = self.router.model(name)
        if model is None:
            raise errors.model_not_found(name, self._usable(principal, request.api))
        if not model.serves(request.api):
            raise errors.model_not_served(name, request.api)
        model = model.serving(request.api)  # only the targets that speak this API
        self.auth.authorize(principal, model.name)
        request.trace.model, request.trace.key = model.name, principal.name
        admission = await self.limiter.admit(principal)
        try:
            controls = parse_controls(request.headers.get("cache-control"), payload.get("cache"))
            previous = payload.get("previous_response_id")
            pinned = None
            if request.endpoint == "responses" and isinstance(previous, str):
                pinned = await self.responses.pin(principal, model, previous)
        except BaseException:
            admission.release()
            raise
        forced = (
            self.stream_usage == "force"
            and request.endpoint == "chat/completions"
            and payload.get("stream") is True
            and not wants_usage(payload)
        )
        call = ModelCall(request, payload, model, principal, controls, pinned, forced)
        return call, admission

    async def _join(self, key: str, sink: DroppableSink, trace: Trace) -> bool:
        """Share the upstream call of an identical request in flight, if there is one."""
        flight = self.flights.joinable(key)
        if flight is None:
            return False
        announce(sink, Verdict.JOINED)
        trace.wait(self.router.reactor.seconds())  # the leader's upstream wait is ours too
        await self.flights.join(flight, sink)
        return True

    def models(self, headers: Mapping[str, str], api: str) -> list[str]:
        """The public models the caller may use through ``api``, in config order."""
        return self._usable(self.auth.authenticate(bearer_token(headers)), api)

    def _usable(self, principal: Principal, api: str) -> list[str]:
        return [
            name
            for name, model in self.router.models.items()
            if principal.allows(name) and model.serves(api)
        ]

    async def _answer(self, call: ModelCall, decision: CacheDecision, sink: ClientSink) -> None:
        """Forward, then charge the tokens and store the answer if it completed."""
        inspector = Inspector(call.endpoint, strip_usage=call.forced_usage)
        if call.pinned is not None:
            plan = await self.router.single(call.pinned)
        else:
            plan = await self.router.plan(call.model)
        try:
            relayed = await self.attempts.forward(call, plan, sink, inspector, decision.store)
        finally:
            # Charged even when the client left half-way: what was generated was used.
            self.accountant.charge(call, inspector)
        entry = relayed.entry if relayed is not None else None
        skipped = (relayed.skipped if relayed is not None else None) or inspector.uncacheable
        await self.cache.keep(decision, entry, skipped, sink.gone)
