"""
Responses API objects: which target made each response id, for which client
key, and the calls that must reach that target and no other
(``previous_response_id``, ``GET``/``DELETE /responses/{id}``, ``/cancel``,
``/input_items``).

Every tenant shares the upstream key, so the upstream cannot tell them apart:
with client keys configured, only the key that created a response may read,
delete, cancel or continue it; to anyone else it is "not found" (an id the
proxy never handed out too, as its owner cannot be checked).  An open proxy has
one tenant and routes unknown ids normally.
"""

from __future__ import annotations

from collections.abc import Callable

import attrs

from llmproxy import errors
from llmproxy.answers import Inspector
from llmproxy.attempts import Attempts
from llmproxy.auth import Authenticator, Principal, bearer_token
from llmproxy.calls import ClientRequest, ObjectCall
from llmproxy.config import Model, Target
from llmproxy.routing.affinity import AffinityStore, Pin, valid_response_id
from llmproxy.routing.router import Router
from llmproxy.sink import ClientSink


class Responses:
    def __init__(
        self, affinity: AffinityStore, auth: Authenticator, router: Router, attempts: Attempts
    ) -> None:
        self.affinity = affinity
        self.auth = auth
        self.router = router
        self.attempts = attempts

    async def handle(self, request: ClientRequest, response_id: str, sink: ClientSink) -> None:
        """A call on a stored response: to the target that made it."""
        principal = self.auth.authenticate(bearer_token(request.headers))
        # Checked before the id goes into the upstream URL.
        pin = await self.owned(principal, response_id, "response_id")
        if pin is None:
            target = self._only_target(response_id)
        elif await self.router.usable_now(pin.target):
            target = pin.target
        else:
            raise self._unavailable(response_id)
        call = ObjectCall(request, response_id, principal)
        plan = await self.router.single(target)
        await self.attempts.forward(call, plan, sink, Inspector(request.endpoint))

    async def pin(self, principal: Principal, model: Model, previous: str) -> Target | None:
        """
        The target of ``model`` that made ``previous`` (a ``previous_response_id``),
        or None when an open proxy does not know it (expired, restarted): route normally.
        """
        pin = await self.owned(principal, previous, "previous_response_id")
        if pin is None:
            return None
        for target in model.targets:
            if target.upstream == pin.target.upstream:
                if not await self.router.usable_now(target):
                    raise self._unavailable(previous)
                return target
        raise errors.bad_request(
            f"Response '{previous}' was made by a backend that does not serve "
            f"the model '{model.name}'.",
            param="previous_response_id",
        )

    async def owned(
        self,
        principal: Principal,
        object_id: str,
        param: str,
        missing: Callable[[str], errors.APIError] = errors.response_not_found,
    ) -> Pin | None:
        """
        The pin of an object id (a response's, a file's, a batch's) the caller
        may use: None when an open proxy does not know it; ``missing`` (a 404)
        when it is not the caller's, or the proxy never handed it out.
        """
        if not valid_response_id(object_id):
            raise attrs.evolve(missing(object_id), param=param)
        pin = await self.affinity.recall(object_id)
        if pin is not None and pin.target.upstream not in self.router.upstreams:
            pin = None  # made by an upstream that is no longer configured
        if self.auth.open:
            return pin
        if pin is None or pin.owner != principal.name:
            raise attrs.evolve(missing(object_id), param=param)
        return pin

    def _only_target(self, response_id: str) -> Target:
        """An unknown id on an open proxy with one upstream: it can only be there."""
        if len(self.router.upstreams) == 1:
            (only,) = self.router.upstreams
            for target in self.router.targets():
                if target.upstream == only:
                    return target
        raise errors.response_not_found(response_id)

    def _unavailable(self, response_id: str) -> errors.APIError:
        return errors.unavailable(
            f"The backend that created response '{response_id}' is unavailable."
        )
