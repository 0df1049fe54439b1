"""
The Klein resource tree: thin routes that parse an HTTP request, hand it to
one collaborator (the pipeline for model calls, Responses for stored response
objects, Files for files and batches, Operations for the operator's
endpoints), and render.  A form body (multipart/form-data) is taken only on
the endpoints that take one (:data:`FORM_ENDPOINTS`), and left in its spool.

Every client endpoint answers with and without the ``/v1`` prefix: OpenAI's,
and Anthropic's Messages API (``/v1/messages``, and ``/v1/models`` when asked
with ``anthropic-version``).  Every error is JSON in the shape of the API
called (:attr:`~llmproxy.site.GatewayRequest.api`), rendered by the handlers
at the bottom.  What
every request gets whatever its route (its id, its count) is the Site's
business (:mod:`llmproxy.site`).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from functools import wraps
from typing import Any

from klein import Klein
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from werkzeug.exceptions import MethodNotAllowed, NotFound
from werkzeug.routing import RequestRedirect

from llmproxy import errors
from llmproxy.calls import ClientRequest
from llmproxy.files import Files
from llmproxy.forms import Upload
from llmproxy.operations import Caller, Operations
from llmproxy.pipeline import Pipeline
from llmproxy.responses import Responses
from llmproxy.site import GatewayRequest, RequestSink, set_status
from llmproxy.status import PAGE_HEADERS, EventStream, StatusView, render_page

Handler = Callable[..., Awaitable[Any]]


def route(
    app: Klein, path: str, methods: list[str], endpoint: str, v1: bool = True
) -> Callable[[Handler], Handler]:
    """
    Register a handler at ``{path}`` (and at ``/v1{path}`` for client
    endpoints); ``endpoint`` names what the request asks for, in metrics and to
    the pipeline.
    """

    def register(handler: Handler) -> Handler:
        @wraps(handler)
        async def labelled(self: Any, request: IRequest, *args: Any, **kwargs: Any) -> Any:
            ours = _gateway(request)
            ours.endpoint = endpoint
            return await handler(self, ours, *args, **kwargs)

        name = endpoint.replace("/", "_")
        if v1:
            app.route("/v1" + path, methods=methods, endpoint=f"v1_{name}")(labelled)
        app.route(path, methods=methods, endpoint=name)(labelled)
        return labelled

    return register


def _gateway(request: IRequest) -> GatewayRequest:
    """The request as GatewaySite made it (Klein hands handlers the interface)."""
    if not isinstance(request, GatewayRequest):
        raise TypeError("the gateway is served by llmproxy.site.GatewaySite, not a plain Site")
    return request


def _headers(request: GatewayRequest) -> dict[str, str]:
    """Lower-cased names, first values; two different Authorization headers are refused."""
    given = request.requestHeaders.getRawHeaders(b"authorization") or []
    if len(set(given)) > 1:
        raise errors.APIError(
            400,
            "The request has two different Authorization headers.",
            code="ambiguous_authorization",
        )
    return {
        k.decode("latin-1").lower(): v[0].decode("latin-1")
        for k, v in request.requestHeaders.getAllRawHeaders()
    }


def _caller(request: GatewayRequest) -> Caller:
    """Who asks for an operator's endpoint: their headers, and whether they are on this host."""
    return Caller(_headers(request), local=request.direct_from_loopback())


#: Endpoints whose bodies are multipart/form-data (every other body is JSON,
#: whatever its Content-Type says).
FORM_ENDPOINTS = frozenset(
    {"audio/transcriptions", "audio/translations", "images/edits", "files/create"}
)


def _upload(request: GatewayRequest) -> Upload | None:
    """A multipart/form-data body, read as it arrived, and left in its spool."""
    if request.endpoint not in FORM_ENDPOINTS or request.form_reader is None:
        return None
    if request.content is None:
        return None
    content_type = request.getHeader("content-type") or ""
    return request.form_reader.form(request.content, request.bytes_in, content_type)


def _parse(
    request: GatewayRequest, path: str, body: bytes = b"", upload: Upload | None = None
) -> ClientRequest:
    return ClientRequest(
        endpoint=request.endpoint,
        method=request.method.decode("ascii"),
        path=path,
        headers=_headers(request),
        request_id=request.request_id,
        query=request.uri.partition(b"?")[2],
        body=body,
        api=request.api,
        upload=upload,
        trace=request.trace,
    )


def _with_body(request: GatewayRequest, path: str) -> ClientRequest:
    """The request, with its JSON body read, or its form left in the spool."""
    upload = _upload(request)
    body = b""
    if upload is None and request.content is not None:
        body = request.content.read()
    return _parse(request, path, body, upload)


def _json(request: GatewayRequest, payload: object, status: int = 200) -> bytes:
    set_status(request, status)
    request.setHeader("content-type", "application/json")
    return json.dumps(payload).encode("utf-8")


def _model_object(name: str, api: str) -> dict[str, object]:
    if api == errors.ANTHROPIC:
        # Anthropic's shape; the proxy knows no release date, so the epoch.
        return {
            "type": "model",
            "id": name,
            "display_name": name,
            "created_at": "1970-01-01T00:00:00Z",
        }
    return {"id": name, "object": "model", "created": 0, "owned_by": "llmproxy"}


def _model_list(names: list[str], api: str) -> dict[str, object]:
    data = [_model_object(name, api) for name in names]
    if api == errors.ANTHROPIC:
        return {
            "data": data,
            "has_more": False,
            "first_id": names[0] if names else None,
            "last_id": names[-1] if names else None,
        }
    return {"object": "list", "data": data}


#: The routes of every Gateway.  Module-level so that the route groups below,
#: mixed into :class:`Gateway`, register on it too (Klein hands each handler
#: the instance it serves).
app = Klein()


class ObjectRoutes:
    """Files and batches, answered by :class:`~llmproxy.files.Files`."""

    files: Files

    @route(app, "/files", ["POST"], "files/create")
    async def file_create(self, request: GatewayRequest) -> None:
        await self.files.create(_with_body(request, "/files"), RequestSink(request))

    @route(app, "/files", ["GET"], "files/list")
    async def file_list(self, request: GatewayRequest) -> None:
        await self.files.list(_with_body(request, "/files"), RequestSink(request))

    @route(app, "/files/<string:file_id>", ["GET"], "files/get")
    async def file_get(self, request: GatewayRequest, file_id: str) -> None:
        await self._on(request, "file", file_id, f"/files/{file_id}")

    @route(app, "/files/<string:file_id>", ["DELETE"], "files/delete")
    async def file_delete(self, request: GatewayRequest, file_id: str) -> None:
        await self._on(request, "file", file_id, f"/files/{file_id}")

    @route(app, "/files/<string:file_id>/content", ["GET"], "files/content")
    async def file_content(self, request: GatewayRequest, file_id: str) -> None:
        await self._on(request, "file", file_id, f"/files/{file_id}/content")

    @route(app, "/batches", ["POST"], "batches/create")
    async def batch_create(self, request: GatewayRequest) -> None:
        await self.files.create(_with_body(request, "/batches"), RequestSink(request))

    @route(app, "/batches", ["GET"], "batches/list")
    async def batch_list(self, request: GatewayRequest) -> None:
        await self.files.list(_with_body(request, "/batches"), RequestSink(request))

    @route(app, "/batches/<string:batch_id>", ["GET"], "batches/get")
    async def batch_get(self, request: GatewayRequest, batch_id: str) -> None:
        await self._on(request, "batch", batch_id, f"/batches/{batch_id}")

    @route(app, "/batches/<string:batch_id>/cancel", ["POST"], "batches/cancel")
    async def batch_cancel(self, request: GatewayRequest, batch_id: str) -> None:
        await self._on(request, "batch", batch_id, f"/batches/{batch_id}/cancel")

    async def _on(self, request: GatewayRequest, kind: str, object_id: str, path: str) -> None:
        parsed = _with_body(request, path)
        await self.files.on(parsed, kind, object_id, RequestSink(request))


class StatusRoutes:
    """The live status page and its event stream (:mod:`llmproxy.status`), guarded as /stats."""

    status: StatusView

    @route(app, "/status", ["GET"], "status", v1=False)
    async def status_page(self, request: GatewayRequest) -> bytes:
        snapshot = await self.status.snapshot(_caller(request), history=True)
        for name, value in PAGE_HEADERS.items():
            request.setHeader(name, value)
        return render_page(snapshot).encode("utf-8")

    @route(app, "/status/events", ["GET"], "status/events", v1=False)
    async def status_events(self, request: GatewayRequest) -> None:
        caller = _caller(request)
        await self.status.snapshot(caller)  # refused here, as a JSON error, not in the stream
        await EventStream(self.status, caller, RequestSink(request)).run()


class ErrorPages:
    """Every error, as JSON in the shape of the API called."""

    log = Logger()

    def _render_error(self, request: GatewayRequest, error: errors.APIError) -> bytes:
        request.trace.error_code = error.code or error.type
        if request.startedWriting:
            # Headers are gone: the only honest signal left is in the body.
            ctype = request.responseHeaders.getRawHeaders(b"content-type") or [b""]
            if b"event-stream" in ctype[0]:
                return error.sse_event(request.api)
            return b""
        set_status(request, error.status)
        request.setHeader("content-type", "application/json")
        for name, value in error.headers.items():
            request.setHeader(name, value)
        return error.body(request.api)

    @app.handle_errors(errors.APIError)
    def api_error(self, request: IRequest, failure: Failure) -> bytes:
        return self._render_error(_gateway(request), failure.value)

    @app.handle_errors(NotFound)
    def not_found(self, request: IRequest, failure: Failure) -> bytes:
        path = request.path.decode("utf-8", "replace")
        return self._render_error(_gateway(request), errors.route_not_found(path))

    @app.handle_errors(MethodNotAllowed)
    def method_not_allowed(self, request: IRequest, failure: Failure) -> bytes:
        error = errors.method_not_allowed(
            request.method.decode("ascii", "replace"),
            request.path.decode("utf-8", "replace"),
            list(failure.value.valid_methods or []),
        )
        return self._render_error(_gateway(request), error)

    @app.handle_errors(RequestRedirect)
    def redirect(self, request: IRequest, failure: Failure) -> bytes:
        """
        werkzeug would redirect a path that only matches once its repeated
        slashes are merged (``/v1//chat/completions``): it is not one of ours,
        so a 404, naming the path as sent.  A 308 would have SDKs replay (or
        not) the body at another URL, and serving it would hide a client's
        misconfigured base URL.
        """
        path = request.path.decode("utf-8", "replace")
        return self._render_error(_gateway(request), errors.route_not_found(path))

    @app.handle_errors(Exception)
    def unexpected(self, request: IRequest, failure: Failure) -> bytes:
        rid = _gateway(request).request_id
        self.log.failure("request {request_id} failed", failure, request_id=rid)
        return self._render_error(_gateway(request), errors.internal(rid))


class Gateway(ObjectRoutes, StatusRoutes, ErrorPages):
    """The HTTP face of the proxy."""

    app = app

    def __init__(
        self, pipeline: Pipeline, responses: Responses, operations: Operations, files: Files
    ) -> None:
        self.pipeline = pipeline
        self.responses = responses
        self.operations = operations
        self.files = files
        self.status = StatusView(operations)

    async def _model_call(self, request: GatewayRequest) -> None:
        parsed = _with_body(request, "/" + request.endpoint)
        await self.pipeline.handle(parsed, RequestSink(request))

    async def _response_object(self, request: GatewayRequest, response_id: str, tail: str) -> None:
        parsed = _parse(request, f"/responses/{response_id}{tail}")
        await self.responses.handle(parsed, response_id, RequestSink(request))

    # -- model calls -----------------------------------------------------------------

    @route(app, "/chat/completions", ["POST"], "chat/completions")
    async def chat_completions(self, request: GatewayRequest) -> None:
        await self._model_call(request)

    @route(app, "/completions", ["POST"], "completions")
    async def completions(self, request: GatewayRequest) -> None:
        await self._model_call(request)

    @route(app, "/embeddings", ["POST"], "embeddings")
    async def embeddings(self, request: GatewayRequest) -> None:
        await self._model_call(request)

    @route(app, "/responses", ["POST"], "responses")
    async def responses_create(self, request: GatewayRequest) -> None:
        await self._model_call(request)

    @route(app, "/audio/speech", ["POST"], "audio/speech")
    async def speech(self, request: GatewayRequest) -> None:
        await self._model_call(request)

    @route(app, "/audio/transcriptions", ["POST"], "audio/transcriptions")
    async def transcriptions(self, request: GatewayRequest) -> None:
        await self._model_call(request)

    @route(app, "/audio/translations", ["POST"], "audio/translations")
    async def translations(self, request: GatewayRequest) -> None:
        await self._model_call(request)

    @route(app, "/images/generations", ["POST"], "images/generations")
    async def images(self, request: GatewayRequest) -> None:
        await self._model_call(request)

    @route(app, "/images/edits", ["POST"], "images/edits")
    async def image_edits(self, request: GatewayRequest) -> None:
        await self._model_call(request)

    @route(app, "/moderations", ["POST"], "moderations")
    async def moderations(self, request: GatewayRequest) -> None:
        await self._model_call(request)

    # -- the Anthropic Messages API ----------------------------------------------------

    @route(app, "/messages", ["POST"], "messages")
    async def messages(self, request: GatewayRequest) -> None:
        await self._model_call(request)

    @route(app, "/messages/count_tokens", ["POST"], "messages/count_tokens")
    async def count_tokens(self, request: GatewayRequest) -> None:
        await self._model_call(request)

    # -- stored responses --------------------------------------------------------------

    @route(app, "/responses/<string:response_id>", ["GET"], "responses/get")
    async def response_get(self, request: GatewayRequest, response_id: str) -> None:
        await self._response_object(request, response_id, "")

    @route(app, "/responses/<string:response_id>", ["DELETE"], "responses/delete")
    async def response_delete(self, request: GatewayRequest, response_id: str) -> None:
        await self._response_object(request, response_id, "")

    @route(app, "/responses/<string:response_id>/cancel", ["POST"], "responses/cancel")
    async def response_cancel(self, request: GatewayRequest, response_id: str) -> None:
        await self._response_object(request, response_id, "/cancel")

    @route(app, "/responses/<string:response_id>/input_items", ["GET"], "responses/input_items")
    async def response_input_items(self, request: GatewayRequest, response_id: str) -> None:
        await self._response_object(request, response_id, "/input_items")

    # -- models ----------------------------------------------------------------------

    @route(app, "/models", ["GET"], "models")
    async def models(self, request: GatewayRequest) -> bytes:
        """The models the caller may use, in the shape of the API that asks (and serves them)."""
        names = self.pipeline.models(_headers(request), request.api)
        return _json(request, _model_list(names, request.api))

    @route(app, "/models/<path:model_id>", ["GET"], "models/get")
    async def model(self, request: GatewayRequest, model_id: str) -> bytes:
        usable = self.pipeline.models(_headers(request), request.api)
        if model_id not in usable:
            raise errors.model_not_found(model_id, usable)
        return _json(request, _model_object(model_id, request.api))

    # -- operations ------------------------------------------------------------------

    @route(app, "/health", ["GET"], "health", v1=False)
    async def health(self, request: GatewayRequest) -> bytes:
        ok, payload = await self.operations.health()
        return _json(request, payload, 200 if ok else 503)

    @route(app, "/health/live", ["GET"], "health/live", v1=False)
    async def health_live(self, request: GatewayRequest) -> bytes:
        return _json(request, self.operations.live())

    @route(app, "/health/ready", ["GET"], "health/ready", v1=False)
    async def health_ready(self, request: GatewayRequest) -> bytes:
        ok, payload = await self.operations.ready()
        return _json(request, payload, 200 if ok else 503)

    @route(app, "/admin/reload", ["POST"], "admin/reload", v1=False)
    async def admin_reload(self, request: GatewayRequest) -> bytes:
        return _json(request, await self.operations.reload(_caller(request)))

    @route(app, "/stats", ["GET"], "stats", v1=False)
    async def stats(self, request: GatewayRequest) -> bytes:
        return _json(request, await self.operations.stats(_caller(request)))

    @route(app, "/metrics", ["GET"], "metrics", v1=False)
    async def prometheus(self, request: GatewayRequest) -> bytes:
        exposition = self.operations.exposition(_caller(request))
        request.setHeader("content-type", "text/plain; version=0.0.4; charset=utf-8")
        return exposition

    @route(app, "/cache", ["DELETE"], "cache", v1=False)
    async def purge_cache(self, request: GatewayRequest) -> bytes:
        return _json(request, {"purged": await self.operations.purge(_caller(request))})
