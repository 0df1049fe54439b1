"""
The proxy's errors, in one place, in the shape of the API that was called.

Everything the proxy refuses or fails is raised as :class:`APIError` and
rendered by one handler, always JSON: OpenAI's ``{"error": {"message", "type",
"param", "code"}}``, or, for the Anthropic Messages API (``/v1/messages``),
Anthropic's ``{"type": "error", "error": {"type", "message"}}`` with the type
its status has there (:func:`anthropic_type`).  Nothing else (no traceback, no
upstream key) ever reaches a client.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence

import attrs

#: The two client APIs (see ``upstreams.<name>.apis``).
OPENAI = "openai"
ANTHROPIC = "anthropic"

#: Anthropic's error type for each status the proxy answers with.
_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
    529: "overloaded_error",
}


def anthropic_type(status: int) -> str:
    """The Anthropic error type of a status: 5xx are ``api_error``, other 4xx invalid requests."""
    found = _ANTHROPIC_TYPES.get(status)
    if found is not None:
        return found
    return "api_error" if status >= 500 else "invalid_request_error"


@attrs.frozen(auto_exc=True)
class APIError(Exception):
    status: int
    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None
    headers: Mapping[str, str] = attrs.field(factory=dict)

    def payload(self) -> dict[str, object]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def anthropic_payload(self) -> dict[str, object]:
        return {
            "type": "error",
            "error": {"type": anthropic_type(self.status), "message": self.message},
        }

    def body(self, api: str = OPENAI) -> bytes:
        payload = self.anthropic_payload() if api == ANTHROPIC else self.payload()
        return json.dumps(payload).encode("utf-8")

    def sse_event(self, api: str = OPENAI) -> bytes:
        """
        The error as a final server-sent event, for a stream cut after its first
        byte.  ``error`` is an object so the OpenAI SDK raises ``APIError`` on it;
        ``type``/``code``/``message`` make it a Responses API ``error`` event too.
        An Anthropic stream gets its own ``error`` event, whose type is
        ``api_error`` (or ``overloaded_error``) whatever cut it.
        """
        if api == ANTHROPIC:
            data = json.dumps(self.anthropic_payload()).encode("utf-8")
            return b"event: error\ndata: " + data + b"\n\n"
        event = dict(self.payload())
        event.update(type="error", code=self.code, message=self.message, param=self.param)
        return b"event: error\ndata: " + json.dumps(event).encode("utf-8") + b"\n\n"


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def malformed_http(message: str) -> APIError:
    """A request whose framing is ambiguous or not HTTP/1.1 (answered before any route)."""
    return APIError(400, message, code="invalid_http_request")


def headers_too_large(limit: int) -> APIError:
    """A request line and headers over ``limit`` bytes."""
    return APIError(
        431,
        f"The request line and headers are larger than {limit} bytes",
        code="request_headers_too_large",
    )


def header_timeout(seconds: float) -> APIError:
    """A request line and headers that did not all arrive within ``seconds``."""
    return APIError(
        408,
        f"The request line and headers did not arrive within {seconds:g} seconds",
        code="request_timeout",
    )


def unauthorized(message: str) -> APIError:
    return APIError(401, message, code="invalid_api_key")


def forbidden(message: str, code: str = "model_not_allowed") -> APIError:
    return APIError(403, message, type="permission_error", code=code)


#: At most this many model names are listed in a 404 for an unknown model.
LISTED_MODELS = 20


def model_not_found(model: str, available: Sequence[str] | None = None) -> APIError:
    """An unknown model; ``available``, when given, the names the caller may use."""
    message = f"The model '{model[:200]}' does not exist or you do not have access to it."
    if available is not None:
        shown = ", ".join(available[:LISTED_MODELS])
        more = (
            f" and {len(available) - LISTED_MODELS} more" if len(available) > LISTED_MODELS else ""
        )
        message += f" Models you may use: {shown}{more}." if available else " You may use none."
    return APIError(404, message, param="model", code="model_not_found")


def model_not_served(model: str, api: str) -> APIError:
    """A model none of whose targets' upstreams serve the API it was asked through."""
    name = "the Anthropic Messages API" if api == ANTHROPIC else "the OpenAI API"
    return APIError(
        404,
        f"The model '{model}' is not served through {name} by this proxy: none of its"
        f" targets' upstreams list '{api}' in their apis.",
        param="model",
        code="model_not_found",
    )


def response_not_found(response_id: str) -> APIError:
    return APIError(
        404,
        f"No response with id '{response_id[:100]}' is known to this proxy.",
        param="response_id",
        code="response_not_found",
    )


def file_not_found(file_id: str) -> APIError:
    return APIError(404, f"No such File object: {file_id[:100]}", param="file_id")


def batch_not_found(batch_id: str) -> APIError:
    return APIError(404, f"No such Batch object: {batch_id[:100]}", param="batch_id")


def route_not_found(path: str) -> APIError:
    return APIError(404, f"Unknown route: {path}", code="not_found")


def method_not_allowed(method: str, path: str, allowed: list[str]) -> APIError:
    return APIError(
        405,
        f"Method {method} is not allowed on {path}",
        code="method_not_allowed",
        headers={"Allow": ", ".join(sorted(allowed))},
    )


def too_large(limit: int) -> APIError:
    return APIError(413, f"Request body is larger than {limit} bytes", code="request_too_large")


def rate_limited(message: str, retry_after: float) -> APIError:
    seconds = max(1, int(retry_after + 0.999))
    return APIError(
        429,
        message,
        type="rate_limit_error",
        code="rate_limit_exceeded",
        headers={"Retry-After": str(seconds)},
    )


def insufficient_quota(message: str, retry_after: float | None) -> APIError:
    """
    A key at or over its budget: OpenAI's shape for an exhausted quota, with
    ``Retry-After`` (whole seconds, rounded up) until the next period starts,
    and none when the budget never resets.
    """
    headers = {} if retry_after is None else {"Retry-After": str(max(1, math.ceil(retry_after)))}
    return APIError(
        429, message, type="insufficient_quota", code="insufficient_quota", headers=headers
    )


def concurrency_limited(message: str, retry_after: float) -> APIError:
    """A key with ``max_parallel`` requests already in flight."""
    return APIError(
        429,
        message,
        type="rate_limit_error",
        code="concurrency_limit_exceeded",
        headers={"Retry-After": str(max(1, math.ceil(retry_after)))},
    )


def bad_gateway(message: str = "The upstream failed to answer") -> APIError:
    return APIError(502, message, type="upstream_error", code="bad_gateway")


def unavailable(message: str) -> APIError:
    return APIError(503, message, type="upstream_error", code="no_upstream_available")


def overloaded(message: str = "The proxy is overloaded; try again shortly.") -> APIError:
    """
    The excess under overload (``server.max_inflight``, or no upstream connection
    free within ``queue_timeout``): a 503 that asks to come back in a second, in
    the shape OpenAI answers its own overload with.
    """
    return APIError(
        503, message, type="server_error", code="overloaded", headers={"Retry-After": "1"}
    )


def shutting_down() -> APIError:
    """What a stream still running when a graceful stop ran out of time ends with."""
    return APIError(
        503,
        "The proxy is shutting down and could not finish this answer in time",
        type="server_error",
        code="shutting_down",
    )


def gateway_timeout(message: str = "The upstream timed out") -> APIError:
    return APIError(504, message, type="upstream_error", code="upstream_timeout")


def internal(request_id: str) -> APIError:
    return APIError(
        500,
        f"Internal proxy error (request id {request_id})",
        type="server_error",
        code="internal_error",
    )
