"""
The request, in the forms it takes on its way through the proxy.  Each is
frozen and complete when built; none has an optional field waiting to be
filled in later.

* :class:`ClientRequest`: what the HTTP layer parsed;
* :class:`ModelCall`: a model call that admission let through (its body parsed,
  model resolved, key authorised, cache controls read);
* :class:`ObjectCall`: a call on an object an upstream keeps (a Responses API
  response, a file, a batch), or one that makes it (an upload, a batch).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import IO, Any

import attrs

from llmproxy.auth import Principal
from llmproxy.body import rewrite_body
from llmproxy.config import Model, Target
from llmproxy.forms import Upload
from llmproxy.trace import Trace


@attrs.frozen
class ClientRequest:
    """One client request, as the HTTP layer parsed it."""

    #: What is asked for: ``chat/completions``, ``responses``, ``responses/get``...
    endpoint: str
    method: str
    #: The upstream path after ``base_url``, e.g. ``/responses/resp_1/cancel``.
    path: str
    #: Lower-cased names, first values.
    headers: Mapping[str, str]
    request_id: str
    query: bytes = b""
    body: bytes = b""
    #: The API it speaks: ``openai``, or ``anthropic`` (the Messages API).
    api: str = "openai"
    #: A multipart/form-data body, spooled (``body`` is then empty).
    upload: Upload | None = attrs.field(default=None, eq=False, repr=False)
    #: What the request did, for its log record (shared with the HTTP request).
    trace: Trace = attrs.field(factory=lambda: Trace(0.0), eq=False, repr=False)


@attrs.frozen
class CacheControl:
    """What a request asks of the cache (``Cache-Control`` and the body's ``cache``)."""

    lookup: bool = True
    store: bool = True
    ttl: float | None = None


@attrs.frozen
class ModelCall:
    """A model call (chat, completions, embeddings, responses), admitted."""

    request: ClientRequest
    payload: Mapping[str, Any]
    model: Model
    principal: Principal
    controls: CacheControl
    #: The target that made ``previous_response_id``, which must serve this call.
    pinned: Target | None = None
    #: A stream whose usage the proxy asks for (``routing.stream_usage: force``),
    #: and takes out of what the client gets.
    forced_usage: bool = False

    @property
    def endpoint(self) -> str:
        return self.request.endpoint

    def body_for(self, target: Target) -> bytes | IO[bytes]:
        """
        The body as ``target`` gets it: its model name, no proxy-only ``cache``
        field, and ``stream_options.include_usage`` when the usage is forced.
        A form is sent from its spool, its ``model`` field alone rewritten.
        """
        if self.request.upload is not None:
            return self.request.upload.body(target.model or None)
        options = None
        if self.forced_usage:
            given = self.payload.get("stream_options")
            options = {**(given if isinstance(given, dict) else {}), "include_usage": True}
        return rewrite_body(self.request.body, target.model or None, options)


@attrs.frozen
class ObjectCall:
    """
    A call on a stored object (``GET /responses/{id}``, ``DELETE
    /files/{id}``, ``POST /batches/{id}/cancel``...), or one that makes one
    (``POST /files``, ``POST /batches``): its body goes as it came.
    """

    request: ClientRequest
    #: The object's id ("" for a call that makes one, or lists them).
    object_id: str
    principal: Principal

    @property
    def endpoint(self) -> str:
        return self.request.endpoint

    def body_for(self, target: Target) -> bytes | IO[bytes] | None:
        if self.request.upload is not None:
            return self.request.upload.body()
        return self.request.body or None
