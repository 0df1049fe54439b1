"""
The Klein resource tree: thin routes that parse an HTTP request into a
:class:`~llmproxy.pipeline.Call`, hand it to one collaborator, and render.

Every client endpoint answers with and without the ``/v1`` prefix.  Every error
is OpenAI-shaped JSON, rendered by the handlers at the bottom.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Awaitable, Callable, Mapping
from http import HTTPStatus
from typing import Any

from klein import Klein
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.server import Request as IRequest
from werkzeug.exceptions import MethodNotAllowed, NotFound

from llmproxy import errors
from llmproxy.auth import Authenticator, bearer_token
from llmproxy.cache import ResponseCache
from llmproxy.config import Config
from llmproxy.metrics import Metrics
from llmproxy.pipeline import Call, Pipeline
from llmproxy.router import Router

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_RID_ATTR = "_llmproxy_request_id"


def request_id(request: IRequest) -> str:
    """The client's ``x-request-id`` if it is sane, else a new one; set once per request."""
    found = getattr(request, _RID_ATTR, None)
    if found is None:
        given = request.getHeader("x-request-id") or ""
        found = given if _REQUEST_ID.match(given) else uuid.uuid4().hex
        setattr(request, _RID_ATTR, found)
        request.setHeader("x-request-id", found)
    return found


def set_status(request: IRequest, status: int) -> None:
    """Set the status with its standard reason phrase (twisted.web lacks some, e.g. 429)."""
    try:
        phrase = HTTPStatus(status).phrase.encode("ascii")
    except ValueError:
        phrase = None  # a non-standard upstream status, e.g. 529: twisted.web's default
    request.setResponseCode(status, phrase)


def _headers(request: IRequest) -> dict[str, str]:
    return {
        k.decode("latin-1").lower(): v[0].decode("latin-1")
        for k, v in request.requestHeaders.getAllRawHeaders()
    }


class RequestSink:
    """A :class:`~llmproxy.pipeline.ClientSink` over a twisted.web request."""

    def __init__(self, request: IRequest) -> None:
        self.request = request
        self._gone = False
        request.notifyFinish().addErrback(self._lost)

    def _lost(self, reason: Failure) -> None:
        self._gone = True

    @property
    def gone(self) -> bool:
        return self._gone

    def header(self, name: str, value: str) -> None:
        self.request.setHeader(name, value)

    def start(self, status: int, headers: Mapping[str, str]) -> None:
        set_status(self.request, status)
        for name, value in headers.items():
            self.request.setHeader(name, value)

    def write(self, data: bytes) -> None:
        if not self._gone:
            self.request.write(data)

    def register_producer(self, producer: IPushProducer) -> None:
        if not self._gone:
            self.request.registerProducer(producer, True)

    def unregister_producer(self) -> None:
        if not self._gone:
            self.request.unregisterProducer()

    def abort(self) -> None:
        transport = self.request.channel.transport if self.request.channel else None
        if transport is not None and not self._gone:
            transport.abortConnection()  # type: ignore[attr-defined]


def _json(request: IRequest, payload: object, status: int = 200) -> bytes:
    set_status(request, status)
    request.setHeader("content-type", "application/json")
    return json.dumps(payload).encode("utf-8")


Handler = Callable[..., Awaitable[Any]]


def client_route(app: Klein, path: str, methods: list[str]) -> Callable[[Handler], Handler]:
    """Register a handler at ``/v1{path}`` and ``{path}``."""

    def register(handler: Handler) -> Handler:
        name = handler.__name__
        app.route("/v1" + path, methods=methods, endpoint=f"v1_{name}")(handler)
        app.route(path, methods=methods, endpoint=name)(handler)
        return handler

    return register


class Gateway:
    """The HTTP face of the proxy."""

    app = Klein()
    log = Logger()

    def __init__(
        self,
        config: Config,
        pipeline: Pipeline,
        router: Router,
        auth: Authenticator,
        cache: ResponseCache,
        metrics: Metrics,
    ) -> None:
        self.config = config
        self.pipeline = pipeline
        self.router = router
        self.auth = auth
        self.cache = cache
        self.metrics = metrics
        self.inflight = 0
        self._idle: list[Deferred[None]] = []

    # -- bookkeeping ---------------------------------------------------------------

    def _begin(self, request: IRequest, endpoint: str) -> str:
        rid = request_id(request)
        self._default_cache_header(request)
        self.inflight += 1
        self.metrics.inflight.inc()

        def done(result: object) -> None:
            self.inflight -= 1
            self.metrics.inflight.dec()
            self.metrics.request(endpoint, request.code)
            if self.inflight == 0:
                waiting, self._idle = self._idle, []
                for d in waiting:
                    d.callback(None)

        request.notifyFinish().addBoth(done)
        return rid

    def idle(self) -> Deferred[None]:
        """Fires when no request is in progress (for a graceful drain)."""
        if self.inflight == 0:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._idle.append(d)
        return d

    def _call(self, request: IRequest, endpoint: str, path: str, **extra: Any) -> Call:
        rid = self._begin(request, endpoint)
        return Call(
            endpoint=endpoint,
            method=request.method.decode("ascii"),
            path=path,
            headers=_headers(request),
            request_id=rid,
            query=request.uri.partition(b"?")[2],
            **extra,
        )

    async def _model_call(self, request: IRequest, endpoint: str) -> None:
        body = request.content.read() if request.content is not None else b""
        call = self._call(request, endpoint, "/" + endpoint, body=body)
        await self.pipeline.handle(call, RequestSink(request))

    async def _response_object(self, request: IRequest, response_id: str, suffix: str) -> None:
        # The pipeline checks the id before it goes into the upstream URL.
        endpoint = "responses/" + (suffix.strip("/") or request.method.decode().lower())
        path = f"/responses/{response_id}{suffix}"
        call = self._call(request, endpoint, path, response_id=response_id)
        await self.pipeline.handle_response_object(call, RequestSink(request))

    # -- model calls ---------------------------------------------------------------

    @client_route(app, "/chat/completions", ["POST"])
    async def chat_completions(self, request: IRequest) -> None:
        await self._model_call(request, "chat/completions")

    @client_route(app, "/completions", ["POST"])
    async def completions(self, request: IRequest) -> None:
        await self._model_call(request, "completions")

    @client_route(app, "/embeddings", ["POST"])
    async def embeddings(self, request: IRequest) -> None:
        await self._model_call(request, "embeddings")

    @client_route(app, "/responses", ["POST"])
    async def responses(self, request: IRequest) -> None:
        await self._model_call(request, "responses")

    @client_route(app, "/responses/<string:response_id>", ["GET", "DELETE"])
    async def response_object(self, request: IRequest, response_id: str) -> None:
        await self._response_object(request, response_id, "")

    @client_route(app, "/responses/<string:response_id>/cancel", ["POST"])
    async def response_cancel(self, request: IRequest, response_id: str) -> None:
        await self._response_object(request, response_id, "/cancel")

    @client_route(app, "/responses/<string:response_id>/input_items", ["GET"])
    async def response_input_items(self, request: IRequest, response_id: str) -> None:
        await self._response_object(request, response_id, "/input_items")

    # -- models --------------------------------------------------------------------

    def _model_object(self, name: str) -> dict[str, object]:
        return {"id": name, "object": "model", "created": 0, "owned_by": "llmproxy"}

    @client_route(app, "/models", ["GET"])
    async def models(self, request: IRequest) -> bytes:
        self._begin(request, "models")
        principal = self.auth.authenticate(bearer_token(_headers(request)))
        data = [self._model_object(n) for n in self.config.models if principal.allows(n)]
        return _json(request, {"object": "list", "data": data})

    @client_route(app, "/models/<path:model_id>", ["GET"])
    async def model(self, request: IRequest, model_id: str) -> bytes:
        self._begin(request, "models/get")
        principal = self.auth.authenticate(bearer_token(_headers(request)))
        if model_id not in self.config.models or not principal.allows(model_id):
            raise errors.model_not_found(model_id)
        return _json(request, self._model_object(model_id))

    # -- operations ----------------------------------------------------------------

    @app.route("/health", methods=["GET"])
    async def health(self, request: IRequest) -> bytes:
        self._begin(request, "health")
        await self.router.refresh()
        targets = self.router.health_report()
        usable = any(t["state"] != "cooling_down" for t in targets.values())
        ok = usable or not targets
        payload = {"status": "ok" if ok else "unavailable", "targets": targets}
        return _json(request, payload, 200 if ok else 503)

    @app.route("/stats", methods=["GET"])
    async def stats(self, request: IRequest) -> bytes:
        self._begin(request, "stats")
        self.auth.check_admin(bearer_token(_headers(request)))
        payload = dict(self.metrics.snapshot())
        payload["inflight"] = self.inflight
        payload["cache"] = self.cache.snapshot()
        await self.router.refresh()
        payload["targets"] = self.router.health_report()
        return _json(request, payload)

    @app.route("/metrics", methods=["GET"])
    async def prometheus(self, request: IRequest) -> bytes:
        self._begin(request, "metrics")
        self.auth.check_admin(bearer_token(_headers(request)))
        request.setHeader("content-type", "text/plain; version=0.0.4; charset=utf-8")
        return self.metrics.exposition()

    @app.route("/cache", methods=["DELETE"])
    async def purge_cache(self, request: IRequest) -> bytes:
        self._begin(request, "cache")
        self.auth.check_admin(bearer_token(_headers(request)))
        purged = await self.cache.purge()
        return _json(request, {"purged": purged})

    # -- errors --------------------------------------------------------------------

    def _default_cache_header(self, request: IRequest) -> None:
        """Every answer says what the cache did; the pipeline refines it."""
        if not request.responseHeaders.hasHeader(b"x-llmproxy-cache"):
            request.setHeader("x-llmproxy-cache", "bypass" if self.cache.enabled else "off")

    def _render_error(self, request: IRequest, error: errors.APIError) -> bytes:
        request_id(request)
        self._default_cache_header(request)
        if getattr(request, "startedWriting", False):
            # Headers are gone: the only honest signal left is in the body.
            ctype = request.responseHeaders.getRawHeaders(b"content-type") or [b""]
            if b"event-stream" in ctype[0]:
                return error.sse_event()
            return b""
        set_status(request, error.status)
        request.setHeader("content-type", "application/json")
        for name, value in error.headers.items():
            request.setHeader(name, value)
        return error.body()

    @app.handle_errors(errors.APIError)
    def api_error(self, request: Any, failure: Failure) -> bytes:
        return self._render_error(request, failure.value)

    @app.handle_errors(NotFound)
    def not_found(self, request: Any, failure: Failure) -> bytes:
        self._begin(request, "unknown")
        path = request.path.decode("utf-8", "replace")
        return self._render_error(request, errors.route_not_found(path))

    @app.handle_errors(MethodNotAllowed)
    def method_not_allowed(self, request: Any, failure: Failure) -> bytes:
        self._begin(request, "unknown")
        error = errors.method_not_allowed(
            request.method.decode("ascii", "replace"),
            request.path.decode("utf-8", "replace"),
            list(failure.value.valid_methods or []),
        )
        return self._render_error(request, error)

    @app.handle_errors(Exception)
    def unexpected(self, request: Any, failure: Failure) -> bytes:
        rid = request_id(request)
        self.log.failure("request {request_id} failed", failure, request_id=rid)
        return self._render_error(request, errors.internal(rid))
