"""
Cache keys and per-request cache controls.

The key is the sha256 of the canonical JSON (sorted keys, no whitespace) of the
endpoint, the public model and the whole request body minus the proxy-only
``cache`` field, plus the client key's name when ``scope: key``.  ``stream`` is
part of the body, so a streamed and a plain answer never share an entry.  A
Messages API request's ``anthropic-version`` and ``anthropic-beta`` headers are
part of its key too: they change what the answer is.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from typing import Any

from llmproxy import errors
from llmproxy.calls import CacheControl

#: The longest a request may ask its answer to be kept (one year).
MAX_TTL = 365 * 24 * 3600


def parse_controls(header: str | None, field: object) -> CacheControl:
    """From ``Cache-Control: no-cache|no-store`` and the body's ``cache`` object."""
    directives = {d.strip().lower() for d in (header or "").split(",") if d.strip()}
    lookup = "no-cache" not in directives and "no-store" not in directives
    store = "no-store" not in directives
    ttl = None
    if field is not None:
        if not isinstance(field, Mapping):
            raise errors.bad_request("'cache' must be an object", param="cache")
        for name in field:
            if name not in ("no-cache", "no-store", "ttl"):
                raise errors.bad_request(f"unknown cache control '{name}'", param="cache")
        for name in ("no-cache", "no-store"):
            if name in field and not isinstance(field[name], bool):
                raise errors.bad_request(f"'cache.{name}' must be a boolean", param="cache")
        if field.get("no-cache") or field.get("no-store"):
            lookup = False
        if field.get("no-store"):
            store = False
        if "ttl" in field:
            value = field["ttl"]
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not math.isfinite(value)
                or not 0 < value <= MAX_TTL
            ):
                raise errors.bad_request(
                    f"'cache.ttl' must be a number of seconds from 1 to {MAX_TTL}", param="cache"
                )
            ttl = float(value)
    return CacheControl(lookup=lookup, store=store, ttl=ttl)


def canonical(value: Any) -> bytes:
    """
    The canonical JSON of ``value`` as UTF-8, for any value ``json.loads`` can
    return: a lone surrogate (``"\\ud800"`` in the body) is encoded as its code
    point would be ("surrogatepass"), which no valid text encodes to, so keys
    stay distinct, and every other text keeps the key it always had.
    """
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return text.encode("utf-8", "surrogatepass")


def cache_key(
    namespace: str,
    endpoint: str,
    model: str,
    body: Mapping[str, Any],
    scope_name: str | None,
    headers: Mapping[str, str] | None = None,
) -> str:
    material: dict[str, Any] = {
        "endpoint": endpoint,
        "model": model,
        "body": {k: v for k, v in body.items() if k != "cache"},
    }
    if scope_name is not None:
        material["key"] = scope_name
    if headers:
        material["headers"] = dict(headers)
    return f"{namespace}:cache:{hashlib.sha256(canonical(material)).hexdigest()}"
