"""
The Anthropic Messages API as the mock upstream speaks it: pure builders of its
wire shapes, no HTTP.

:mod:`llmproxy.testing.mock` routes ``POST /v1/messages``,
``POST /v1/messages/count_tokens`` and ``GET /v1/models`` (with an
``anthropic-version`` header) here for what to answer, and frames the stream's
events as SSE itself.  The shapes are those of the real API: a ``Message``
object, the typed ``event:`` stream (``message_start``, ``content_block_start``,
``ping``, ``content_block_delta``..., ``content_block_stop``, ``message_delta``,
``message_stop``), ``{"type": "error", "error": {...}}`` errors, ``x-api-key``
authentication and the required ``anthropic-version`` header.
"""

from __future__ import annotations

from typing import Any

JSONDict = dict[str, Any]

#: The ``error.type`` Anthropic gives each status.
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    529: "overloaded_error",
}

#: The models ``GET /v1/models`` lists to an Anthropic client.
MODELS = [
    ("claude-sonnet-4-5-20250929", "Claude Sonnet 4.5", "2025-09-29T00:00:00Z"),
    ("claude-haiku-4-5-20251001", "Claude Haiku 4.5", "2025-10-01T00:00:00Z"),
    ("mock-model", "Mock Model", "2025-01-01T00:00:00Z"),
]


def error_type(status: int) -> str:
    """The ``error.type`` of an answer with ``status``."""
    if status in ERROR_TYPES:
        return ERROR_TYPES[status]
    return "api_error" if status >= 500 else "invalid_request_error"


def error(kind: str, message: str) -> JSONDict:
    """An error body, as Anthropic writes them."""
    return {"type": "error", "error": {"type": kind, "message": message}}


def fault(
    name: str, api_key: str | None, headers: dict[str, str], knobs: JSONDict
) -> tuple[int, JSONDict, bool] | None:
    """
    The refusal of a request (status, body, whether the knobs shape the answer),
    if it gets one: a bad ``x-api-key``, no ``anthropic-version``, or a fault knob.
    """
    got = headers.get("x-api-key")
    if api_key is not None and got != api_key:
        return 401, error("authentication_error", "invalid x-api-key"), False
    if not headers.get("anthropic-version"):
        message = "anthropic-version: header is required"
        return 400, error("invalid_request_error", message), False
    if knobs.get("echo_auth"):
        status = int(knobs.get("status", 400))
        return status, error(error_type(status), f"bad key: {got or ''}"), True
    if knobs.get("overloaded"):
        return 529, error("overloaded_error", "Overloaded"), True
    if knobs.get("status") and int(knobs["status"]) != 200:
        status = int(knobs["status"])
        body = knobs.get("body") or error(error_type(status), f"mock {name} failed with {status}")
        return status, body, True
    return None


def invalid(body: JSONDict, *required: str) -> str | None:
    """What is wrong with a request body, as the 400's message, if anything is."""
    for field in required:
        if field not in body:
            return f"{field}: Field required"
    if not isinstance(body.get("messages"), list):
        return "messages: Input should be a valid list"
    if "max_tokens" in required:
        limit = body["max_tokens"]
        if not isinstance(limit, int) or isinstance(limit, bool):
            return "max_tokens: Input should be a valid integer"
        if limit < 1:
            return "max_tokens: Input should be greater than or equal to 1"
    return None


def _block_text(block: object) -> str:
    """The text of one content block (a tool result's text too; none of an image)."""
    if isinstance(block, str):
        return block
    if not isinstance(block, dict):
        return ""
    if block.get("type", "text") == "text":
        return str(block.get("text", ""))
    if block.get("type") == "tool_result":
        return content_text(block.get("content"))
    return ""


def content_text(content: object) -> str:
    """The text of a message's ``content``: a string or a list of content blocks."""
    if isinstance(content, list):
        return " ".join(text for text in map(_block_text, content) if text)
    return "" if content is None else str(content)


def user_text(body: JSONDict) -> str:
    """What the last user message says (the mock echoes it; ``system`` is not echoed)."""
    for message in reversed(body.get("messages") or []):
        if isinstance(message, dict) and message.get("role") == "user":
            return content_text(message.get("content"))
    return ""


def prompt_text(body: JSONDict) -> str:
    """All the text the model would read: ``system`` and every message, to count tokens."""
    texts = [content_text(body.get("system"))]
    for message in body.get("messages") or []:
        if isinstance(message, dict):
            texts.append(content_text(message.get("content")))
    return " ".join(text for text in texts if text)


def usage(input_tokens: int, output_tokens: int) -> JSONDict:
    return {
        "input_tokens": input_tokens,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
        "output_tokens": output_tokens,
    }


def message(
    message_id: str, model: str, text: str | None, stop_reason: str | None, used: JSONDict | None
) -> JSONDict:
    """A ``Message`` object; with ``text`` None, one that has no content yet (a stream's start)."""
    found: JSONDict = {
        "id": message_id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [] if text is None else [{"type": "text", "text": text}],
        "stop_reason": stop_reason,
        "stop_sequence": None,
        "usage": used,
    }
    if used is None:
        del found["usage"]
    return found


def stream(
    start: JSONDict,
    pieces: list[str],
    stop_reason: str,
    used: JSONDict | None,
    failure: str | None = None,
) -> list[JSONDict]:
    """
    The data of a streamed answer's events, in order (each one's ``type`` is its
    event name): ``start`` is the ``message_start`` message, ``used`` the
    ``message_delta`` usage; with ``failure``, an ``error`` event ends the stream
    instead of ``message_stop``.
    """
    delta: JSONDict = {
        "type": "message_delta",
        "delta": {"stop_reason": stop_reason, "stop_sequence": None},
        "usage": used,
    }
    if used is None:
        del delta["usage"]
    events: list[JSONDict] = [
        {"type": "message_start", "message": start},
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        {"type": "ping"},
    ]
    events += [
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": p}}
        for p in pieces
    ]
    events += [{"type": "content_block_stop", "index": 0}, delta]
    if failure is not None:
        events.append(error("api_error", failure))
    else:
        events.append({"type": "message_stop"})
    return events


def models() -> JSONDict:
    """The ``GET /v1/models`` page an Anthropic client gets: every model, one page."""
    data = [
        {"type": "model", "id": model_id, "display_name": shown, "created_at": created}
        for model_id, shown, created in MODELS
    ]
    return {"data": data, "has_more": False, "first_id": data[0]["id"], "last_id": data[-1]["id"]}
