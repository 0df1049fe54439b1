"""
What the proxy knows about answers: OpenAI's, and the Anthropic Messages API's.

An :class:`Inspector` watches one answer go by, a whole body or a stream
event by event, and notes what the rest of the proxy needs: the token usage
(:class:`Usage`, for limits, cost and metrics), the ids of the objects it
hands out (responses, files, batches: for affinity), its terminal event (a
stream is complete only with one), and anything that makes it unfit for the
cache.  :func:`worth_storing` says whether a whole body is a
complete, non-empty answer.  Nothing here writes to a client.
"""

from __future__ import annotations

import json
import re
from decimal import Decimal

import attrs
from twisted.web.http_headers import Headers

from llmproxy.body import drop_member
from llmproxy.cache.entry import FINISHED, Uncacheable
from llmproxy.config import Price
from llmproxy.sse import Event

#: Stream events after which nothing more is due (the Responses API's, the Messages
#: API's, a streamed transcription's).
TERMINAL_EVENTS = frozenset(
    {
        "response.completed",
        "response.failed",
        "response.incomplete",
        "message_stop",
        "transcript.text.done",
    }
)
#: The terminal events of a finished answer (a chat stream's is ``data: [DONE]``).
COMPLETE = FINISHED | {"[DONE]"}
#: Objects an upstream keeps, whose ids are tied to it and to their owner.
PINNED_OBJECTS = frozenset({"response", "file", "batch"})
#: The Messages API's stream events that carry its usage.
_MESSAGE_USAGE = frozenset({"message_start", "message_delta"})

_LENGTH = re.compile(r'"finish_reason"\s*:\s*"length"')
#: Where a usage object begins, whatever the whitespace.  Inside a JSON string
#: the quotes would be escaped, so this only finds a member name.
_USAGE = re.compile(rb'"usage"\s*:\s*\{')
_USAGE_TEXT = re.compile(r'"usage"\s*:\s*(\{|null)')
#: The ``type`` of an event's data, when it comes first (as OpenAI writes them).
_TYPED = re.compile(r'\s*\{\s*"type"\s*:\s*"([a-z_.]{1,64})"')
_decoder = json.JSONDecoder()


def _count(value: object) -> int:
    """A token count as reported: a non-negative integer, else 0."""
    return value if type(value) is int and value > 0 else 0


@attrs.frozen
class Usage:
    """
    The tokens of one answer, in four disjoint kinds that add up to its total:
    ``input`` is the prompt less what the upstream read from its prompt cache
    (``cached_input``), and ``output`` is the completion less its
    ``reasoning``.  ``estimated`` when the answer reported no usage and the
    proxy counted for itself.
    """

    input: int = 0
    cached_input: int = 0
    output: int = 0
    reasoning: int = 0
    estimated: bool = False

    @property
    def total(self) -> int:
        return self.input + self.cached_input + self.output + self.reasoning

    def counts(self) -> tuple[int, int, int, int]:
        return (self.input, self.cached_input, self.output, self.reasoning)

    def kinds(self) -> dict[str, int]:
        return {
            "input": self.input,
            "cached_input": self.cached_input,
            "output": self.output,
            "reasoning": self.reasoning,
        }

    def cost(self, price: Price | None) -> Decimal | None:
        """What these tokens cost at ``price`` (None: unpriced, and no guess)."""
        if price is None:
            return None
        return price.cost(self.input, self.cached_input, self.output, self.reasoning)

    @classmethod
    def of(cls, usage: object) -> Usage | None:
        """
        The usage object of any answer: chat and completions
        (``prompt_tokens``, ``completion_tokens`` and their ``_details``), the
        Responses API (``input_tokens``, ``output_tokens``...) or the Messages
        API (:meth:`of_messages`).  None when it is not one.
        """
        if not isinstance(usage, dict):
            return None
        if "cache_read_input_tokens" in usage or "cache_creation_input_tokens" in usage:
            return cls.of_messages(usage)
        if "input_tokens" in usage or "output_tokens" in usage:
            given, made = usage.get("input_tokens"), usage.get("output_tokens")
            given_details = usage.get("input_tokens_details")
            made_details = usage.get("output_tokens_details")
        elif "prompt_tokens" in usage or "completion_tokens" in usage:
            given, made = usage.get("prompt_tokens"), usage.get("completion_tokens")
            given_details = usage.get("prompt_tokens_details")
            made_details = usage.get("completion_tokens_details")
        else:
            return None
        prompt, completion = _count(given), _count(made)
        cached = (
            _count(given_details.get("cached_tokens")) if isinstance(given_details, dict) else 0
        )
        reasoning = (
            _count(made_details.get("reasoning_tokens")) if isinstance(made_details, dict) else 0
        )
        # A detail larger than its whole is the upstream's mistake: never a negative count.
        cached, reasoning = min(cached, prompt), min(reasoning, completion)
        return cls(prompt - cached, cached, completion - reasoning, reasoning)

    @classmethod
    def of_messages(cls, usage: dict[str, object]) -> Usage:
        """
        The Messages API's usage, whose ``input_tokens`` leave out what the
        prompt cache read (``cache_read_input_tokens``: cached input) and
        wrote (``cache_creation_input_tokens``: counted, and priced, as
        input).  Thinking is part of ``output_tokens``, not reported apart.
        """
        given = _count(usage.get("input_tokens")) + _count(usage.get("cache_creation_input_tokens"))
        return cls(
            given, _count(usage.get("cache_read_input_tokens")), _count(usage.get("output_tokens"))
        )

    @classmethod
    def estimate(cls, request_body: bytes, output: int) -> Usage:
        """About four bytes of prompt per token; ``output`` as counted."""
        return cls(input=len(request_body) // 4, output=output, estimated=True)


def usage_in(data: bytes) -> Usage | None:
    """
    The usage of a whole JSON answer, found without parsing the rest of it (an
    embeddings batch can be megabytes).  The usage object comes last.
    """
    found = None
    for match in _USAGE.finditer(data):
        found = match
    if found is None:
        return None
    try:
        text = data[found.end() - 1 :].decode("utf-8")
        value, _ = _decoder.raw_decode(text)
    except (ValueError, RecursionError):
        return None
    return Usage.of(value)


@attrs.define
class Inspector:
    """Watches one answer of ``endpoint`` (``chat/completions``, ``responses``...)."""

    endpoint: str
    #: Take the usage out of a chat stream that only has it because the proxy
    #: asked (``routing.stream_usage: force``): its client gets the bytes it
    #: would have got without it.
    strip_usage: bool = False
    #: The answer's usage, when it reported one.
    usage: Usage | None = None
    #: The price of the target that answered, once one does.
    price: Price | None = None
    #: Stream events that carried data (a token each, roughly).
    data_events: int = 0
    #: The size of a whole (non-streamed) answer.
    body_bytes: int = 0
    #: A 2xx answer went to the client: something was generated.
    answered: bool = False
    #: Ids of pinned objects (responses, files, batches) not yet taken by :meth:`take_object_ids`.
    object_ids: list[str] = attrs.field(factory=list)
    terminal: str | None = None
    uncacheable: Uncacheable | None = None
    #: A Messages API stream's usage so far: ``message_start``'s, updated by
    #: each ``message_delta`` (whose counts are the totals so far).
    _message_usage: dict[str, object] = attrs.field(factory=dict)
    #: A whole answer :meth:`body` had to parse, kept for :func:`worth_storing`.
    parsed: object = None

    def body(self, data: bytes) -> None:
        """A whole (non-streamed) answer."""
        self.body_bytes = len(data)
        if self.endpoint.startswith(("responses", "files", "batches")):
            try:
                self.parsed = json.loads(data)  # the response id is needed
            except ValueError:
                return
            self._json(self.parsed)
            return
        self.usage = usage_in(data) or self.usage

    def event(self, event: Event) -> Event | None:
        """
        One stream event on its way to the client: what the client gets of it
        (None: nothing, when it is the usage chunk the proxy asked for).
        """
        if event.is_done:
            self.terminal = "[DONE]"
            return event
        if event.data:
            self.data_events += 1
        kind = event.event
        if kind is None and (typed := _TYPED.match(event.data)) is not None:
            if typed.group(1) in TERMINAL_EVENTS:
                self.terminal = typed.group(1)  # a typed event without its ``event:`` line
        if kind == "error" or (kind is None and '"error"' in event.data and error_of(event.data)):
            # e.g. vLLM's `data: {"error": ...}` followed by `data: [DONE]`
            self.uncacheable = Uncacheable.ERROR_EVENT
        elif kind is None and _LENGTH.search(event.data):
            self.uncacheable = Uncacheable.TRUNCATED
        if kind in ("response.created", "response.completed"):
            try:
                data = json.loads(event.data)
            except ValueError:
                data = None
            if isinstance(data, dict) and isinstance(data.get("response"), dict):
                self._json(data["response"])
        elif kind in _MESSAGE_USAGE:
            self._message_event(event.data)
        elif kind is None and '"usage"' in event.data:
            return self._chunk_usage(event)
        if kind in TERMINAL_EVENTS:
            self.terminal = kind
        return event

    def _chunk_usage(self, event: Event) -> Event | None:
        """A chat chunk that names a usage: note it, and strip it when asked to."""
        match = _USAGE_TEXT.search(event.data)
        if match is None:
            return event
        if match.group(1) == "{":
            try:
                payload = json.loads(event.data)
            except ValueError:
                return event
            if not isinstance(payload, dict):
                return event
            self.usage = Usage.of(payload.get("usage")) or self.usage
            if self.strip_usage and payload.get("choices") == []:
                self.data_events -= 1
                return None  # the usage chunk, which this client did not ask for
        if self.strip_usage:
            # Each chunk of a stream with include_usage carries "usage": null.
            stripped = drop_member(event.data, "usage")
            if stripped != event.data:
                raw = event.raw.replace(event.data.encode("utf-8"), stripped.encode("utf-8"), 1)
                return attrs.evolve(event, raw=raw, data=stripped)
        return event

    def _message_event(self, data: str) -> None:
        """A Messages API ``message_start`` or ``message_delta``: its usage, its stop reason."""
        try:
            payload = json.loads(data)
        except ValueError:
            return
        if not isinstance(payload, dict):
            return
        message = payload.get("message")
        usage = (message if isinstance(message, dict) else payload).get("usage")
        if isinstance(usage, dict):
            self._message_usage.update(usage)
            self.usage = Usage.of_messages(self._message_usage)
        delta = payload.get("delta")
        if isinstance(delta, dict) and delta.get("stop_reason") == "max_tokens":
            self.uncacheable = Uncacheable.TRUNCATED

    def _json(self, payload: object) -> None:
        if not isinstance(payload, dict):
            return
        self.usage = Usage.of(payload.get("usage")) or self.usage
        kind = payload.get("object")
        if kind in PINNED_OBJECTS and isinstance(payload.get("id"), str):
            self.object_ids.append(payload["id"])
        if kind == "batch":
            # A batch's results are files on its upstream, the batch owner's.
            for name in ("output_file_id", "error_file_id"):
                if isinstance(payload.get(name), str) and payload[name]:
                    self.object_ids.append(payload[name])

    def take_object_ids(self) -> list[str]:
        """The pinned objects' ids seen since the last call."""
        found, self.object_ids = self.object_ids, []
        return found

    @property
    def complete(self) -> bool:
        """Ended with the terminal event of a finished answer (cacheable)."""
        return self.terminal in COMPLETE


def error_of(data: str | bytes) -> object:
    """The ``error`` member of a JSON object, if the data is one and has it."""
    try:
        payload = json.loads(data)
    except ValueError:
        return None
    return payload.get("error") if isinstance(payload, dict) else None


def worth_storing(endpoint: str, body: bytes, parsed: object = None) -> bool:
    """
    Is this whole answer complete and non-empty?  Nothing else is cached.
    ``parsed``: ``body`` already parsed (by :meth:`Inspector.body`), if it was.
    """
    payload = parsed
    if payload is None:
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
    if endpoint == "moderations":
        return bool(payload.get("results"))
    if endpoint == "messages":
        stop = payload.get("stop_reason")
        return (
            payload.get("type") == "message"
            and stop not in (None, "max_tokens")
            and bool(payload.get("content"))
        )
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


def is_piped(headers: Headers) -> bool:
    """
    Is this answer relayed as raw bytes as they arrive (audio, images, a
    file's content)?  Everything with a type that is not JSON, text or events
    is: nothing in it is for the proxy to read.
    """
    value = headers.getRawHeaders("content-type") or [""]
    kind = value[0].split(";")[0].strip().lower()
    if not kind or kind == "text/event-stream":
        return False
    return not (kind.startswith("text/") or kind.endswith("json") or kind.endswith("+json"))


def is_event_stream(headers: Headers) -> bool:
    """Do these response headers announce a server-sent-events stream?"""
    value = headers.getRawHeaders("content-type") or [""]
    return value[0].split(";")[0].strip().lower() == "text/event-stream"
