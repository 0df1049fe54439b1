"""
What the proxy knows about OpenAI answers.

An :class:`Inspector` watches one answer go by, a whole body or a stream
event by event, and notes what the rest of the proxy needs: the token usage
(for limits and metrics), the response ids it hands out (for affinity), its
terminal event (a stream is complete only with one), and anything that makes
it unfit for the cache.  :func:`worth_storing` says whether a whole body is a
complete, non-empty answer.  Nothing here writes to a client.
"""

from __future__ import annotations

import json
import re

import attrs
from twisted.web.http_headers import Headers

from llmproxy.cache.entry import Uncacheable
from llmproxy.sse import Event

#: Stream events after which nothing more is due (the Responses API's).
TERMINAL_EVENTS = frozenset({"response.completed", "response.failed", "response.incomplete"})

_LENGTH = re.compile(r'"finish_reason"\s*:\s*"length"')
_TOTAL_TOKENS = re.compile(rb'"total_tokens"\s*:\s*(\d+)')
_INPUT_TOKENS = re.compile(rb'"(?:prompt|input)_tokens"\s*:\s*(\d+)')
_OUTPUT_TOKENS = re.compile(rb'"(?:completion|output)_tokens"\s*:\s*(\d+)')


@attrs.define
class Inspector:
    """Watches one answer of ``endpoint`` (``chat/completions``, ``responses``...)."""

    endpoint: str
    #: ``usage.total_tokens``, when the answer reported it.
    usage_tokens: int = 0
    #: ``usage``'s prompt (input) and completion (output) tokens, when reported.
    input_tokens: int | None = None
    output_tokens: int | None = None
    #: Stream events that carried data (a token each, roughly).
    data_events: int = 0
    #: A 2xx answer went to the client: something was generated.
    answered: bool = False
    #: Response ids seen and not yet taken by :meth:`take_response_ids`.
    response_ids: list[str] = attrs.field(factory=list)
    terminal: str | None = None
    uncacheable: Uncacheable | None = None

    def body(self, data: bytes) -> None:
        """A whole (non-streamed) answer."""
        if self.endpoint.startswith("responses"):
            try:
                self._json(json.loads(data))  # the response id is needed
            except ValueError:
                pass
            return
        # Only the usage is needed: a regex over the bytes costs a fraction of
        # parsing a large answer (an embeddings batch).  The usage object comes
        # last; inside a JSON string the quotes would be escaped and not match.
        matches = _TOTAL_TOKENS.findall(data)
        if matches:
            self.usage_tokens = int(matches[-1])
            inputs, outputs = _INPUT_TOKENS.findall(data), _OUTPUT_TOKENS.findall(data)
            self.input_tokens = int(inputs[-1]) if inputs else None
            self.output_tokens = int(outputs[-1]) if outputs else None

    def event(self, event: Event) -> None:
        """One stream event, as it goes to the client."""
        if event.is_done:
            self.terminal = "[DONE]"
            return
        if event.data:
            self.data_events += 1
        kind = event.event
        if kind == "error" or (kind is None and '"error"' in event.data and error_of(event.data)):
            # e.g. vLLM's `data: {"error": ...}` followed by `data: [DONE]`
            self.uncacheable = Uncacheable.ERROR_EVENT
        elif kind is None and _LENGTH.search(event.data):
            self.uncacheable = Uncacheable.TRUNCATED
        if kind in ("response.created", "response.completed") or (
            kind is None and '"usage":{' in event.data
        ):
            try:
                data = json.loads(event.data)
            except ValueError:
                return
            if isinstance(data, dict) and isinstance(data.get("response"), dict):
                data = data["response"]
            self._json(data)
        if kind in TERMINAL_EVENTS:
            self.terminal = kind

    def _json(self, payload: object) -> None:
        if not isinstance(payload, dict):
            return
        usage = payload.get("usage")
        if isinstance(usage, dict) and isinstance(usage.get("total_tokens"), int):
            self.usage_tokens = usage["total_tokens"]
            given = usage.get("prompt_tokens", usage.get("input_tokens"))
            self.input_tokens = given if isinstance(given, int) else None
            made = usage.get("completion_tokens", usage.get("output_tokens"))
            self.output_tokens = made if isinstance(made, int) else None
        if payload.get("object") == "response" and isinstance(payload.get("id"), str):
            self.response_ids.append(payload["id"])

    def take_response_ids(self) -> list[str]:
        """The response ids seen since the last call."""
        found, self.response_ids = self.response_ids, []
        return found

    @property
    def complete(self) -> bool:
        """Ended with the terminal event of a finished answer (cacheable)."""
        return self.terminal in ("[DONE]", "response.completed")


def error_of(data: str | bytes) -> object:
    """The ``error`` member of a JSON object, if the data is one and has it."""
    try:
        payload = json.loads(data)
    except ValueError:
        return None
    return payload.get("error") if isinstance(payload, dict) else None


def worth_storing(endpoint: str, body: bytes) -> bool:
    """Is this whole answer complete and non-empty?  Nothing else is cached."""
    try:
        payload = json.loads(body)
    except ValueError:
        return False
    if not isinstance(payload, dict) or payload.get("error"):
        return False
    if endpoint == "responses":
        return payload.get("status") == "completed" and bool(payload.get("output"))
    if endpoint == "embeddings":
        return bool(payload.get("data"))
    choices = payload.get("choices")
    if not isinstance(choices, list) or not choices:
        return False
    for choice in choices:
        if not isinstance(choice, dict) or choice.get("finish_reason") in (None, "length"):
            continue
        message = choice.get("message") or {}
        if choice.get("text") or message.get("content") or message.get("tool_calls"):
            return True
    return False


def is_event_stream(headers: Headers) -> bool:
    """Do these response headers announce a server-sent-events stream?"""
    value = headers.getRawHeaders("content-type") or [""]
    return value[0].split(";")[0].strip().lower() == "text/event-stream"
