"""
Files and batches (``/v1/files``, ``/v1/batches``): objects an upstream keeps,
pinned like response ids.

An upload goes to ``files.upstream``.  Each file or batch id the proxy hands
out is remembered, through the same affinity store as response ids (memory or
Redis), with the upstream that made it and the client key that owns it
(:meth:`~llmproxy.responses.Responses.owned`): later calls on that id go
there, and only its owner may make them.  A batch goes to the upstream of its
``input_file_id``, which must be the caller's; the files a finished batch
names (``output_file_id``, ``error_file_id``) are its owner's too.  A list
(``GET /v1/files``, ``GET /v1/batches``) holds only the caller's objects.
None of it is cached.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

from twisted.internet.interfaces import IPushProducer

from llmproxy import errors
from llmproxy.answers import Inspector
from llmproxy.attempts import Attempts
from llmproxy.auth import Authenticator, Principal, bearer_token
from llmproxy.body import parse_body
from llmproxy.calls import ClientRequest, ObjectCall
from llmproxy.config import Target
from llmproxy.responses import Responses
from llmproxy.routing.router import Router
from llmproxy.sink import ClientSink

#: How each kind's unknown (or not owned) id is answered.
MISSING: Mapping[str, Callable[[str], errors.APIError]] = {
    "file": errors.file_not_found,
    "batch": errors.batch_not_found,
}


class Files:
    def __init__(
        self,
        responses: Responses,
        auth: Authenticator,
        router: Router,
        attempts: Attempts,
        upstream: str | None,
    ) -> None:
        self.responses = responses
        self.auth = auth
        self.router = router
        self.attempts = attempts
        #: ``files.upstream``: where uploads go (None: nowhere).
        self.upstream = upstream

    def _home(self) -> Target:
        """The target uploads go to (and lists are asked of)."""
        if self.upstream is None or self.upstream not in self.router.upstreams:
            raise errors.APIError(
                404,
                "Files are not served: no upstream serves the OpenAI API (files.upstream).",
                code="not_found",
            )
        return Target(self.upstream, "")

    async def create(self, request: ClientRequest, sink: ClientSink) -> None:
        """``POST /files`` (an upload) or ``POST /batches``."""
        principal = self.auth.authenticate(bearer_token(request.headers))
        target = self._home()
        if request.endpoint == "batches/create":
            target = await self._batch_target(principal, request.body) or target
        await self._forward(ObjectCall(request, "", principal), target, sink)

    async def _batch_target(self, principal: Principal, body: bytes) -> Target | None:
        """Where a batch goes: where its input file is (None: unknown to an open proxy)."""
        payload = parse_body(body)
        file_id = payload.get("input_file_id")
        if not isinstance(file_id, str) or not file_id:
            raise errors.bad_request(
                "'input_file_id' must be the id of a file you uploaded", param="input_file_id"
            )
        pin = await self.responses.owned(principal, file_id, "input_file_id", errors.file_not_found)
        return pin.target if pin is not None else None

    async def on(self, request: ClientRequest, kind: str, object_id: str, sink: ClientSink) -> None:
        """A call on one file or batch: at the upstream that made it, by its owner only."""
        principal = self.auth.authenticate(bearer_token(request.headers))
        pin = await self.responses.owned(principal, object_id, f"{kind}_id", MISSING[kind])
        target = pin.target if pin is not None else self._home()
        if not await self.router.usable_now(target):
            raise errors.unavailable(f"The backend that holds {kind} '{object_id}' is unavailable.")
        await self._forward(ObjectCall(request, object_id, principal), target, sink)

    async def list(self, request: ClientRequest, sink: ClientSink) -> None:
        """``GET /files`` or ``GET /batches``: the caller's objects only."""
        principal = self.auth.authenticate(bearer_token(request.headers))
        held = _Held(sink)
        await self._forward(ObjectCall(request, "", principal), self._home(), held)
        if held.status is None:
            return  # an upstream error was passed on as it came
        body = held.body
        if held.status == 200 and not self.auth.open:
            body = await self._owned_only(principal, body)
        sink.start(held.status, held.headers)
        sink.write(body)

    async def _owned_only(self, principal: Principal, body: bytes) -> bytes:
        """A list answer with only the objects ``principal`` owns."""
        try:
            payload = json.loads(body)
        except ValueError:
            return body
        if not isinstance(payload, dict) or not isinstance(payload.get("data"), list):
            return body
        kept: list[Any] = []
        for item in payload["data"]:
            object_id = item.get("id") if isinstance(item, dict) else None
            if not isinstance(object_id, str):
                continue
            pin = await self.responses.affinity.recall(object_id)
            if pin is not None and pin.owner == principal.name:
                kept.append(item)
        payload["data"] = kept
        for end, index in (("first_id", 0), ("last_id", -1)):
            if end in payload:
                payload[end] = kept[index]["id"] if kept else None
        return json.dumps(payload).encode("utf-8")

    async def _forward(self, call: ObjectCall, target: Target, sink: ClientSink) -> None:
        plan = await self.router.single(target)
        await self.attempts.forward(call, plan, sink, Inspector(call.endpoint))


class _Held:
    """
    A sink that holds a whole (JSON) answer for the caller to rewrite before it
    goes on; an upstream error goes straight through.
    """

    def __init__(self, sink: ClientSink) -> None:
        self.sink = sink
        self.status: int | None = None
        self.headers: dict[str, str] = {}
        self.chunks: list[bytes] = []

    @property
    def gone(self) -> bool:
        return self.sink.gone

    @property
    def body(self) -> bytes:
        return b"".join(self.chunks)

    def header(self, name: str, value: str) -> None:
        self.sink.header(name, value)

    def start(self, status: int, headers: Mapping[str, str]) -> None:
        if status >= 300:
            self.sink.start(status, headers)
            self.chunks = []
            return
        self.status, self.headers = status, dict(headers)

    def write(self, data: bytes) -> None:
        if self.status is None:
            self.sink.write(data)
        else:
            self.chunks.append(data)

    def register_producer(self, producer: IPushProducer) -> None:
        pass  # the answer is held whole: nothing to pace

    def unregister_producer(self) -> None:
        pass

    def abort(self) -> None:
        self.sink.abort()
