"""
Request bodies: parse and check the fields the proxy relies on, and rewrite
``model`` / drop ``cache`` while keeping every other byte as the client sent it.

Re-serialising the JSON would change number formats, key order and escapes;
instead the top-level members are located in the original text and only the
two proxy-owned members are edited.
"""

from __future__ import annotations

import json
import re
from array import array
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


def parse_body(raw: bytes) -> dict[str, Any]:
    """The JSON object of a request body, or a 400 (not JSON, or nested over MAX_DEPTH)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise errors.bad_request(_UNPARSABLE) from None
    if nesting(text) > MAX_DEPTH:
        raise errors.bad_request(f"The request body nests deeper than {MAX_DEPTH} levels.")
    try:
        value = json.loads(text, parse_constant=_not_json)
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


def rewrite_body(raw: bytes, model: str | None) -> bytes:
    """
    ``raw`` (already validated as a JSON object) with every top-level ``model``
    set to ``model`` and every ``cache`` member removed; nothing else changes.
    """
    text = raw.decode("utf-8")
    members = _members(text)
    if not any(k in ("model", "cache") for k, *_ in members):
        return raw
    out = []
    pos = 0
    for key, start, value_start, end in members:
        if key == "model" and model is not None:
            out.append(text[pos:value_start])
            out.append(json.dumps(model))
            pos = end
        elif key == "cache":
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
                pos = rest
    out.append(text[pos:])
    return "".join(out).encode("utf-8")
