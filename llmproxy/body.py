"""
Request bodies: parse and check the fields the proxy relies on, and rewrite
``model`` / drop ``cache`` (and, for ``routing.stream_usage: force``, set
``stream_options``) while keeping every other byte as the client sent it.

Re-serialising the JSON would change number formats, key order and escapes;
instead the top-level members are located in the original text and only the
two proxy-owned members are edited.
"""

from __future__ import annotations

import json
import re
from array import array
from collections.abc import Mapping
from itertools import accumulate
from typing import Any

from llmproxy import errors

_decoder = json.JSONDecoder()
_WS = " \t\n\r"

#: The deepest a request body may nest arrays and objects (the body itself is level 1).
MAX_DEPTH = 64
_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
#: Openers count +1 and closers -1, as signed bytes.
_STEPS = bytes.maketrans(b"[]{}", b"\x01\xff\x01\xff")


def nesting(text: str) -> int:
    """
    How deep ``text`` nests arrays and objects, counted without recursion.

    Strings are dropped first (a bracket inside one is text).  For a text that
    is not JSON the figure may be too high, never lower than the depth a JSON
    parser reaches before it finds the fault, which is what bounds it.
    """
    brackets = _NOT_BRACKET.sub("", _STRING.sub("", text)).encode("ascii")
    return max(accumulate(array("b", brackets.translate(_STEPS))), default=0)


_UNPARSABLE = "We could not parse the JSON body of your request. The body must be valid JSON."


def _not_json(constant: str) -> float:
    """``NaN`` and ``Infinity`` are Python's, not JSON's (RFC 8259)."""
    raise ValueError(f"{constant} is not JSON")


#: One decoder for every body (``json.loads`` with an option builds one per call).
_DECODER = json.JSONDecoder(parse_constant=_not_json)


def parse_body(raw: bytes) -> dict[str, Any]:
    """The JSON object of a request body, or a 400 (not JSON, or nested over MAX_DEPTH)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise errors.bad_request(_UNPARSABLE) from None
    # No text can nest deeper than it has openers: most bodies need no count.
    if text.count("[") + text.count("{") > MAX_DEPTH and nesting(text) > MAX_DEPTH:
        raise errors.bad_request(f"The request body nests deeper than {MAX_DEPTH} levels.")
    try:
        value = _DECODER.decode(text)
    except ValueError:
        raise errors.bad_request(_UNPARSABLE) from None
    if not isinstance(value, dict):
        raise errors.bad_request("The request body must be a JSON object.")
    return value


# Fields the proxy reads, with the JSON types it accepts.
_TYPES: dict[str, tuple[type, ...]] = {
    "stream": (bool,),
    "stream_options": (dict,),
    "messages": (list,),
    "previous_response_id": (str,),
}
_TYPE_NAMES = {bool: "a boolean", dict: "an object", list: "an array", str: "a string"}


def check_fields(body: dict[str, Any]) -> str:
    """Validate what the proxy relies on; return the public model name."""
    model = body.get("model")
    if model is None:
        raise errors.bad_request("you must provide a model parameter", param="model")
    if not isinstance(model, str) or not model:
        raise errors.bad_request("'model' must be a non-empty string", param="model")
    for name, types in _TYPES.items():
        if name in body and body[name] is not None and not isinstance(body[name], types):
            raise errors.bad_request(f"'{name}' must be {_TYPE_NAMES[types[0]]}", param=name)
    return model


def _members(text: str) -> list[tuple[str, int, int, int]]:
    """(key, member start, value start, value end) of each top-level member."""
    i = 0
    n = len(text)
    while i < n and text[i] in _WS:
        i += 1
    assert text[i] == "{"
    i += 1
    found: list[tuple[str, int, int, int]] = []
    while True:
        while text[i] in _WS:
            i += 1
        if text[i] == "}":
            return found
        if text[i] == ",":
            i += 1
            continue
        start = i
        key, i = json.decoder.scanstring(text, i + 1)  # type: ignore[attr-defined]
        while text[i] in _WS:
            i += 1
        i += 1  # the colon
        while text[i] in _WS:
            i += 1
        _, end = _decoder.raw_decode(text, i)
        found.append((key, start, i, end))
        i = end


def edit_members(
    text: str,
    replace: Mapping[str, str],
    drop: frozenset[str] = frozenset(),
    ensure: Mapping[str, str] | None = None,
) -> str:
    """
    The JSON object ``text`` (already validated) with the value of each member
    named in ``replace`` or ``ensure`` set to the JSON text given, every member
    named in ``drop`` removed (with the comma that joined it), and each
    ``ensure`` member it lacked appended.  Every other byte stays as it was.
    """
    members = _members(text)
    out = []
    pos = 0
    missing = dict(ensure or {})
    replace = {**replace, **missing}
    for key, start, value_start, end in members:
        if key in replace:
            missing.pop(key, None)
            out.append(text[pos:value_start])
            out.append(replace[key])
            pos = end
        elif key in drop:
            # Drop the member and the comma that joins it to its neighbour.
            before = text[pos:start].rstrip(_WS)
            if before.endswith(","):
                out.append(before[:-1])
                pos = end
            else:
                out.append(text[pos:start])
                rest = end
                while rest < len(text) and text[rest] in _WS:
                    rest += 1
                if rest < len(text) and text[rest] == ",":
                    rest += 1
                    while rest < len(text) and text[rest] in _WS:
                        rest += 1
                pos = rest
    closing = text.rindex("}")
    out.append(text[pos:closing])
    if missing:
        added = ",".join(f"{json.dumps(k)}:{v}" for k, v in missing.items())
        kept = "".join(out).rstrip(_WS)
        out = [kept, "," if not kept.endswith("{") else "", added]
    out.append(text[closing:])
    return "".join(out)


def drop_member(text: str, name: str) -> str:
    """The JSON object ``text`` without its top-level ``name`` member (or as it was)."""
    if f'"{name}"' not in text:
        return text
    try:
        return edit_members(text, {}, frozenset({name}))
    except (ValueError, IndexError, AssertionError):
        return text  # not a JSON object: nothing of ours to edit


def wants_usage(payload: Mapping[str, Any]) -> bool:
    """Does a streamed request already ask for its usage (``stream_options.include_usage``)?"""
    options = payload.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


def rewrite_body(raw: bytes, model: str | None, options: Mapping[str, Any] | None = None) -> bytes:
    """
    ``raw`` (already validated as a JSON object) with every top-level ``model``
    set to ``model``, every ``cache`` member removed and, when ``options`` is
    given, ``stream_options`` set to it; nothing else changes.
    """
    if options is None and b'"model"' not in raw and b'"cache"' not in raw:
        return raw
    replace = {"model": json.dumps(model)} if model is not None else {}
    ensure = None
    if options is not None:
        ensure = {"stream_options": json.dumps(options, separators=(",", ":"))}
    return edit_members(raw.decode("utf-8"), replace, frozenset({"cache"}), ensure).encode("utf-8")
