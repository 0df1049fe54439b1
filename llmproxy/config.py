"""
Configuration: one YAML file read into frozen, typed objects.

Everything a running proxy knows about its upstreams, models, routing, cache and
keys comes from here.  Loading validates the whole schema up front: unknown keys
are errors (with a "did you mean"), ``${VAR}`` / ``${VAR:-default}`` are expanded
from the environment, and every error names the path of the offending value,
e.g. ``models.gpt-4o.targets[1].upstream: no upstream named 'azure'``.
"""

from __future__ import annotations

import difflib
import math
import os
import re
from collections.abc import Callable, Mapping
from decimal import Decimal
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import attrs
import yaml

T = TypeVar("T")

STRATEGIES = ("round_robin", "least_busy", "latency", "random", "priority")
CACHE_BACKENDS = ("memory", "redis", "off")
CACHE_SCOPES = ("key", "shared")
ACCESS_LOG_FORMATS = ("json", "text")
RETRY_REASONS = ("connect", "timeout", "reset")
#: The client APIs an upstream may serve: OpenAI's (``/v1/chat/completions``...)
#: and Anthropic's Messages API (``/v1/messages``).
APIS = ("openai", "anthropic")
STREAM_USAGE = ("pass", "force")
BUDGET_PERIODS = ("day", "week", "month", "total")


class ConfigError(Exception):
    """A configuration problem; ``str()`` is the path-named message for the user."""

    def __init__(self, path: str, message: str) -> None:
        self.path = path
        self.message = message
        super().__init__(f"{path}: {message}" if path else message)


# -- value objects -----------------------------------------------------------------


@attrs.frozen
class Timeouts:
    connect: float = 5.0
    first_byte: float = 120.0
    #: Seconds of upstream silence allowed before a body's first byte (and until a
    #: stream's first event), and between any two chunks of a body read whole.
    idle: float = 60.0
    total: float = 900.0
    #: Seconds of upstream silence allowed between two events of a stream, once its
    #: first event has arrived (0: no bound but ``total``; keep-alives hold the client).
    stream_idle: float = 0.0


@attrs.frozen
class Price:
    """
    USD per million tokens of each kind.  Cached input is billed as input, and
    reasoning as output, unless they have prices of their own.
    """

    input: float
    output: float
    cached_input: float | None = None
    reasoning: float | None = None

    def cost(self, input: int, cached_input: int, output: int, reasoning: int) -> Decimal:
        """
        The USD cost of these (disjoint) token counts, in decimal arithmetic:
        exact for prices as written (``0.15`` is 0.15, not the nearest double).
        """
        cached = self.input if self.cached_input is None else self.cached_input
        thinking = self.output if self.reasoning is None else self.reasoning
        per_million = (
            input * _exact(self.input)
            + cached_input * _exact(cached)
            + output * _exact(self.output)
            + reasoning * _exact(thinking)
        )
        return per_million / 1_000_000


def _exact(price: float) -> Decimal:
    """A price as its shortest decimal text, the way it was written in the YAML."""
    return Decimal(repr(price))


@attrs.frozen
class Upstream:
    name: str
    base_url: str
    api_key: str | None = attrs.field(default=None, repr=False)
    headers: Mapping[str, str] = attrs.field(factory=dict, repr=False)
    max_connections: int = 64
    timeouts: Timeouts = Timeouts()
    #: Seconds an idle pooled connection is kept for reuse (below common LB idle timeouts).
    keepalive_timeout: float = 30.0
    #: Seconds a request waits for one of the ``max_connections`` to come free; past
    #: it, the next target (or 503 ``overloaded``).  Not counted against the target.
    queue_timeout: float = 5.0
    #: What its tokens cost, unless a target says otherwise.
    price: Price | None = None
    #: The client APIs it serves (:data:`APIS`): requests of the others never go to it.
    apis: frozenset[str] = frozenset({"openai"})


@attrs.frozen
class Target:
    """One place a public model can be served from."""

    upstream: str
    model: str
    weight: int = 1
    #: What its tokens cost: the target's own price, else its upstream's (None: unpriced).
    price: Price | None = None
    #: The client APIs its upstream serves.
    apis: frozenset[str] = frozenset({"openai"})

    @property
    def id(self) -> str:
        return f"{self.upstream}/{self.model}"


@attrs.frozen
class Model:
    name: str
    targets: tuple[Target, ...]
    strategy: str = "round_robin"

    def serves(self, api: str) -> bool:
        return any(api in t.apis for t in self.targets)

    def serving(self, api: str) -> Model:
        """The model as a request of ``api`` sees it: only the targets that serve that API."""
        if all(api in t.apis for t in self.targets):
            return self
        return attrs.evolve(self, targets=tuple(t for t in self.targets if api in t.apis))


@attrs.frozen
class Cooldown:
    failures: int = 3
    seconds: float = 30.0
    max_seconds: float = 300.0


@attrs.frozen
class HealthChecks:
    """Active checks: ``GET {base_url}/models`` every ``interval`` seconds."""

    interval: float = 10.0
    timeout: float = 5.0


@attrs.frozen
class Routing:
    retries: int = 2
    retry_on: frozenset[str | int] = frozenset({"connect", "timeout", 429, 500, 502, 503, 504, 529})
    cooldown: Cooldown = Cooldown()
    health_checks: HealthChecks | None = None
    affinity_ttl: float = 7 * 24 * 3600.0
    #: ``force``: ask chat streams for their usage (``stream_options.include_usage``)
    #: and take the usage chunk out of what the client gets; ``pass``: leave them be.
    stream_usage: str = "pass"


@attrs.frozen
class Server:
    max_body_bytes: int = 32 * 1024 * 1024
    drain_seconds: float = 30.0
    trusted_proxies: tuple[str, ...] = ("127.0.0.1", "::1")
    #: Seconds of upstream silence in a stream before a ``: keep-alive`` comment (0: never).
    sse_keepalive: float = 15.0
    #: The largest upstream body the proxy holds whole (a non-streamed answer, an error
    #: body); past it the answer is a 502 ``response_too_large``.  Streams are not held.
    max_response_bytes: int = 64 * 1024 * 1024
    #: Seconds a client has to send a request's line and headers, from the connection
    #: (or the end of the previous answer on it); then 408 and closed (0: no deadline).
    header_timeout: float = 10.0
    #: Client requests in progress at once (0: no limit); the excess is answered 503
    #: ``overloaded`` at once.  Health, metrics and stats requests are never refused.
    max_inflight: int = 0
    #: Seconds a client may accept no bytes of an answer (its connection backed up)
    #: before it is dropped and the upstream closed, as nginx's ``send_timeout`` (0: never).
    send_timeout: float = 60.0


@attrs.frozen
class AccessLog:
    """One record per finished request, to ``path`` (``-``: standard output)."""

    path: str
    format: str = "json"
    #: Seconds between writes of the buffered lines (0: each record at once).
    flush: float = 1.0


@attrs.frozen
class Sentinel:
    """Redis behind Sentinel: ask the sentinels at ``addresses`` where ``master`` is."""

    master: str
    addresses: tuple[tuple[str, int], ...]
    #: The database number and password of the master (and of the replica it fails over to).
    db: int | None = None
    password: str | None = attrs.field(default=None, repr=False)


@attrs.frozen
class Redis:
    """The shared Redis: at ``url``, or wherever the sentinels of ``sentinel`` say."""

    url: str | None = "redis://127.0.0.1:6379/0"
    timeout: float = 0.25
    sentinel: Sentinel | None = None

    def __attrs_post_init__(self) -> None:
        if (self.url is None) == (self.sentinel is None):
            raise ValueError("Redis needs exactly one of url or sentinel")


@attrs.frozen
class Cache:
    backend: str = "memory"
    ttl: float = 3600.0
    namespace: str = "llmproxy"
    max_bytes: int = 256 * 1024 * 1024
    scope: str = "key"


@attrs.frozen
class Budget:
    """At most ``usd`` of spend per UTC ``period`` (day, week, month, or total)."""

    usd: float
    period: str = "month"


@attrs.frozen
class ApiKey:
    """A client key.  Exactly one of ``key`` / ``key_sha256`` is set."""

    name: str
    key: str | None = attrs.field(default=None, repr=False)
    key_sha256: str | None = None
    models: frozenset[str] | None = None
    rpm: int | None = None
    tpm: int | None = None
    budget: Budget | None = None
    #: Requests of this key in flight at once, across the fleet (streams to their last byte).
    max_parallel: int | None = None

    @property
    def rate_limited(self) -> bool:
        """Has an ``rpm`` or ``tpm``, and so gets the ``x-ratelimit-*`` headers."""
        return self.rpm is not None or self.tpm is not None


@attrs.frozen
class Auth:
    keys: tuple[ApiKey, ...] = ()
    admin_keys: tuple[str, ...] = attrs.field(default=(), repr=False)


@attrs.frozen
class Config:
    listen: tuple[str, ...] = ("tcp:8080:interface=127.0.0.1",)
    server: Server = Server()
    upstreams: Mapping[str, Upstream] = attrs.field(factory=dict)
    models: Mapping[str, Model] = attrs.field(factory=dict)
    routing: Routing = Routing()
    redis: Redis | None = None
    cache: Cache = Cache()
    auth: Auth = Auth()
    access_log: AccessLog | None = None
    #: ``files.upstream``: where uploads (``POST /v1/files``) go, and so their
    #: batches (None: no upstream serves the OpenAI API).
    files_upstream: str | None = None
    source: str = ""

    def secrets(self) -> tuple[str, ...]:
        """Every configured secret, for redaction: upstream keys first."""
        found = [u.api_key for u in self.upstreams.values() if u.api_key]
        found += [
            value
            for u in self.upstreams.values()
            for name, value in u.headers.items()
            if any(word in name.lower() for word in ("key", "token", "auth", "secret"))
        ]
        found += [k.key for k in self.auth.keys if k.key]
        found += list(self.auth.admin_keys)
        return tuple(s for s in found if len(s) >= 4)


# -- environment expansion -----------------------------------------------------------

_ENV = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def expand_env(text: str, path: str, environ: Mapping[str, str]) -> str:
    """Expand ``${VAR}`` and ``${VAR:-default}``; ``$$`` is a literal ``$``."""

    def substitute(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, default = match.group(1), match.group(2)
        value = environ.get(name)
        if value is None or (value == "" and default is not None):
            if default is None:
                raise ConfigError(path, f"environment variable {name} is not set")
            return default
        return value

    return _ENV.sub(substitute, text)


def _expand_tree(node: Any, path: str, environ: Mapping[str, str]) -> Any:
    if isinstance(node, str):
        return expand_env(node, path, environ)
    if isinstance(node, dict):
        return {k: _expand_tree(v, _join(path, str(k)), environ) for k, v in node.items()}
    if isinstance(node, list):
        return [_expand_tree(v, f"{path}[{i}]", environ) for i, v in enumerate(node)]
    return node


# -- a small typed reader over the raw YAML tree -------------------------------------


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _type_name(value: object) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean"}.get(
        type(value), type(value).__name__
    )


class _Section:
    """A mapping in the YAML tree, with the path that names it in errors."""

    def __init__(self, raw: object, path: str, allowed: tuple[str, ...]) -> None:
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise ConfigError(path, f"expected a mapping, got {_type_name(raw)}")
        for key in raw:
            if not isinstance(key, str) or key not in allowed:
                hint = difflib.get_close_matches(str(key), allowed, n=1)
                extra = f" (did you mean '{hint[0]}'?)" if hint else ""
                raise ConfigError(_join(path, str(key)), f"unknown key{extra}")
        self.raw: dict[str, Any] = raw
        self.path = path

    def path_of(self, key: str) -> str:
        return _join(self.path, key)

    def has(self, key: str) -> bool:
        return self.raw.get(key) is not None

    def get(self, key: str, parse: Callable[[object, str], T], default: T) -> T:
        if self.raw.get(key) is None:
            return default
        return parse(self.raw[key], self.path_of(key))

    def require(self, key: str, parse: Callable[[object, str], T]) -> T:
        if self.raw.get(key) is None:
            raise ConfigError(self.path_of(key), "is required")
        return parse(self.raw[key], self.path_of(key))


def _string(value: object, path: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ConfigError(path, f"expected a string, got {_type_name(value)}")
    return str(value)


def _number(low: float = 0, allow_equal: bool = True) -> Callable[[object, str], float]:
    def parse(value: object, path: str) -> float:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(path, f"expected a number, got '{value}'") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(path, f"expected a number, got {_type_name(value)}")
        if not math.isfinite(value):  # YAML's .nan and .inf, or 'nan' as a string
            raise ConfigError(path, f"expected a finite number, got {value}")
        if value < low or (value == low and not allow_equal):
            op = ">=" if allow_equal else ">"
            raise ConfigError(path, f"must be {op} {low:g}, got {value:g}")
        return float(value)

    return parse


def _integer(low: int = 0) -> Callable[[object, str], int]:
    def parse(value: object, path: str) -> int:
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(path, f"expected an integer, got {_type_name(value)}")
        if value < low:
            raise ConfigError(path, f"must be >= {low}, got {value}")
        return value

    return parse


def _choice(options: tuple[str, ...]) -> Callable[[object, str], str]:
    def parse(value: object, path: str) -> str:
        if value is False and "off" in options:
            value = "off"  # YAML 1.1 reads a bare `off` as false
        text = _string(value, path)
        if text not in options:
            hint = difflib.get_close_matches(text, options, n=1)
            extra = f" (did you mean '{hint[0]}'?)" if hint else ""
            raise ConfigError(path, f"must be one of {', '.join(options)}; got '{text}'{extra}")
        return text

    return parse


def _list(value: object, path: str) -> list[Any]:
    if not isinstance(value, list):
        raise ConfigError(path, f"expected a list, got {_type_name(value)}")
    return value


def _strings(value: object, path: str) -> tuple[str, ...]:
    return tuple(_string(v, f"{path}[{i}]") for i, v in enumerate(_list(value, path)))


def _http_url(value: object, path: str) -> str:
    text = _string(value, path).rstrip("/")
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(path, f"expected an http(s) URL, got '{text}'")
    return text


# -- sections ------------------------------------------------------------------------


def _timeouts(raw: object, path: str) -> Timeouts:
    s = _Section(raw, path, ("connect", "first_byte", "idle", "total", "stream_idle"))
    positive = _number(0, allow_equal=False)
    d = Timeouts()
    return Timeouts(
        connect=s.get("connect", positive, d.connect),
        first_byte=s.get("first_byte", positive, d.first_byte),
        idle=s.get("idle", positive, d.idle),
        total=s.get("total", positive, d.total),
        stream_idle=s.get("stream_idle", _number(0), d.stream_idle),
    )


def _open_section(raw: object, path: str) -> _Section:
    """A mapping whose keys are the user's to choose (e.g. extra headers)."""
    keys = tuple(map(str, raw)) if isinstance(raw, dict) else ()
    return _Section(raw, path, keys)


def _upstream(name: str, raw: object, path: str) -> Upstream:
    s = _Section(
        raw,
        path,
        (
            "base_url",
            "api_key",
            "headers",
            "max_connections",
            "timeouts",
            "keepalive_timeout",
            "queue_timeout",
            "price",
            "apis",
        ),
    )
    headers_raw = s.get("headers", _open_section, None)
    headers: dict[str, str] = {}
    if headers_raw is not None:
        for key, value in headers_raw.raw.items():
            lowered = key.lower()
            if lowered in SET_BY_PROXY:
                raise ConfigError(headers_raw.path_of(key), "this header is set by the proxy")
            headers[key] = _string(value, headers_raw.path_of(key))
    api_key = s.get("api_key", _string, None) or None
    return Upstream(
        name=name,
        base_url=s.require("base_url", _http_url),
        api_key=api_key,
        headers=headers,
        max_connections=s.get("max_connections", _integer(1), 64),
        timeouts=s.get("timeouts", _timeouts, Timeouts()),
        keepalive_timeout=s.get("keepalive_timeout", _number(0), 30.0),
        queue_timeout=s.get("queue_timeout", _number(0), 5.0),
        price=s.get("price", _price, None),
        apis=s.get("apis", _apis, frozenset({"openai"})),
    )


#: Upstream request headers that only the proxy sets (``x-api-key`` carries the
#: key to an Anthropic upstream, as ``authorization`` does to the others).
SET_BY_PROXY = ("authorization", "x-api-key", "host", "content-length", "transfer-encoding")


def _apis(value: object, path: str) -> frozenset[str]:
    items = _list(value, path)
    if not items:
        raise ConfigError(path, f"needs at least one of {', '.join(APIS)}")
    for i, item in enumerate(items):
        if item not in APIS:
            raise ConfigError(f"{path}[{i}]", f"expected one of {', '.join(APIS)}, got '{item}'")
    return frozenset(items)


def _price(raw: object, path: str) -> Price:
    s = _Section(raw, path, ("input", "cached_input", "output", "reasoning"))
    usd = _number(0)
    return Price(
        input=s.require("input", usd),
        output=s.require("output", usd),
        cached_input=s.get("cached_input", usd, None),
        reasoning=s.get("reasoning", usd, None),
    )


def _target(raw: object, path: str, public: str, upstreams: Mapping[str, Upstream]) -> Target:
    s = _Section(raw, path, ("upstream", "model", "weight", "price"))
    upstream = s.require("upstream", _string)
    if upstream not in upstreams:
        hint = difflib.get_close_matches(upstream, list(upstreams), n=1)
        extra = f" (did you mean '{hint[0]}'?)" if hint else ""
        raise ConfigError(s.path_of("upstream"), f"no upstream named '{upstream}'{extra}")
    return Target(
        upstream=upstream,
        model=s.get("model", _string, public),
        weight=s.get("weight", _integer(0), 1),
        price=s.get("price", _price, None) or upstreams[upstream].price,
        apis=upstreams[upstream].apis,
    )


def _model(name: str, raw: object, path: str, upstreams: Mapping[str, Upstream]) -> Model:
    s = _Section(raw, path, ("strategy", "targets"))
    targets_raw = s.require("targets", _list)
    if not targets_raw:
        raise ConfigError(s.path_of("targets"), "needs at least one target")
    targets = tuple(
        _target(t, f"{s.path_of('targets')}[{i}]", name, upstreams)
        for i, t in enumerate(targets_raw)
    )
    return Model(
        name=name,
        targets=targets,
        strategy=s.get("strategy", _choice(STRATEGIES), "round_robin"),
    )


def _retry_on(value: object, path: str) -> frozenset[str | int]:
    found: set[str | int] = set()
    for i, item in enumerate(_list(value, path)):
        item_path = f"{path}[{i}]"
        if isinstance(item, str) and item in RETRY_REASONS:
            found.add(item)
        elif isinstance(item, int | str) and str(item).isdigit() and 400 <= int(item) <= 599:
            found.add(int(item))
        else:
            raise ConfigError(
                item_path,
                f"expected connect, timeout, reset or an HTTP status 400-599, got '{item}'",
            )
    return frozenset(found)


def _cooldown(raw: object, path: str) -> Cooldown:
    s = _Section(raw, path, ("failures", "seconds", "max_seconds"))
    d = Cooldown()
    cooldown = Cooldown(
        failures=s.get("failures", _integer(1), d.failures),
        seconds=s.get("seconds", _number(0), d.seconds),
        max_seconds=s.get("max_seconds", _number(0), d.max_seconds),
    )
    if cooldown.max_seconds < cooldown.seconds:
        raise ConfigError(s.path_of("max_seconds"), "must be >= seconds")
    return cooldown


def _health_checks(raw: object, path: str) -> HealthChecks:
    s = _Section(raw, path, ("interval", "timeout"))
    positive = _number(0, allow_equal=False)
    d = HealthChecks()
    return HealthChecks(
        interval=s.get("interval", positive, d.interval),
        timeout=s.get("timeout", positive, d.timeout),
    )


def _routing(raw: object, path: str) -> Routing:
    s = _Section(
        raw,
        path,
        ("retries", "retry_on", "cooldown", "health_checks", "affinity_ttl", "stream_usage"),
    )
    d = Routing()
    return Routing(
        retries=s.get("retries", _integer(0), d.retries),
        retry_on=s.get("retry_on", _retry_on, d.retry_on),
        cooldown=s.get("cooldown", _cooldown, d.cooldown),
        health_checks=s.get("health_checks", _health_checks, None),
        affinity_ttl=s.get("affinity_ttl", _number(0, allow_equal=False), d.affinity_ttl),
        stream_usage=s.get("stream_usage", _choice(STREAM_USAGE), d.stream_usage),
    )


def _server(raw: object, path: str) -> Server:
    s = _Section(
        raw,
        path,
        (
            "max_body_bytes",
            "drain_seconds",
            "trusted_proxies",
            "sse_keepalive",
            "max_response_bytes",
            "header_timeout",
            "max_inflight",
            "send_timeout",
        ),
    )
    d = Server()
    return Server(
        max_body_bytes=s.get("max_body_bytes", _integer(1), d.max_body_bytes),
        drain_seconds=s.get("drain_seconds", _number(0), d.drain_seconds),
        trusted_proxies=s.get("trusted_proxies", _strings, d.trusted_proxies),
        sse_keepalive=s.get("sse_keepalive", _number(0), d.sse_keepalive),
        max_response_bytes=s.get("max_response_bytes", _integer(1), d.max_response_bytes),
        header_timeout=s.get("header_timeout", _number(0), d.header_timeout),
        max_inflight=s.get("max_inflight", _integer(0), d.max_inflight),
        send_timeout=s.get("send_timeout", _number(0), d.send_timeout),
    )


def _access_log(raw: object, path: str) -> AccessLog:
    s = _Section(raw, path, ("path", "format", "flush"))
    return AccessLog(
        path=s.require("path", _string),
        format=s.get("format", _choice(ACCESS_LOG_FORMATS), "json"),
        flush=s.get("flush", _number(0), 1.0),
    )


def _address(value: object, path: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` for an IPv6 address) as a (host, port) pair."""
    text = _string(value, path).strip()
    host, _, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        host = ""  # an IPv6 address needs its brackets: [::1]:26379
    if not host or not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
        raise ConfigError(path, f"expected host:port, got '{text}'")
    return host, int(port)


def _addresses(value: object, path: str) -> tuple[tuple[str, int], ...]:
    items = _list(value, path)
    if not items:
        raise ConfigError(path, "needs at least one host:port")
    found: list[tuple[str, int]] = []
    for i, item in enumerate(items):
        address = _address(item, f"{path}[{i}]")
        if address in found:
            raise ConfigError(f"{path}[{i}]", f"duplicate address '{item}'")
        found.append(address)
    return tuple(found)


def _sentinel(raw: object, path: str) -> Sentinel:
    s = _Section(raw, path, ("master", "addresses", "db", "password"))
    master = s.require("master", _string)
    if not master.strip():
        raise ConfigError(s.path_of("master"), "must not be empty")
    return Sentinel(
        master=master,
        addresses=s.require("addresses", _addresses),
        db=s.get("db", _integer(0), None),
        password=s.get("password", _string, None) or None,
    )


def _redis(raw: object, path: str) -> Redis:
    s = _Section(raw, path, ("url", "sentinel", "timeout"))
    timeout = s.get("timeout", _number(0, allow_equal=False), Redis().timeout)
    if s.has("sentinel"):
        if s.has("url"):
            raise ConfigError(path, "url and sentinel are alternatives: give one of them")
        return Redis(url=None, timeout=timeout, sentinel=s.require("sentinel", _sentinel))
    url = s.get("url", _string, "redis://127.0.0.1:6379/0")
    if urlsplit(url).scheme not in ("redis", "unix"):
        raise ConfigError(s.path_of("url"), f"expected a redis:// URL, got '{url}'")
    return Redis(url=url, timeout=timeout)


def _ttl(value: object, path: str) -> float:
    seconds = _number(0, allow_equal=False)(value, path)
    if seconds > 365 * 24 * 3600:
        raise ConfigError(path, "must be at most one year (31536000 seconds)")
    return seconds


def _cache(raw: object, path: str) -> Cache:
    s = _Section(raw, path, ("backend", "ttl", "namespace", "max_bytes", "scope"))
    d = Cache()
    return Cache(
        backend=s.get("backend", _choice(CACHE_BACKENDS), d.backend),
        ttl=s.get("ttl", _ttl, d.ttl),
        namespace=s.get("namespace", _string, d.namespace),
        max_bytes=s.get("max_bytes", _integer(1), d.max_bytes),
        scope=s.get("scope", _choice(CACHE_SCOPES), d.scope),
    )


_HEX64 = re.compile(r"^[0-9a-fA-F]{64}$")


def _api_key(raw: object, path: str, models: Mapping[str, Model]) -> ApiKey:
    s = _Section(
        raw,
        path,
        ("name", "key", "key_sha256", "models", "rpm", "tpm", "budget", "max_parallel"),
    )
    name = s.require("name", _string)
    key = s.get("key", _string, None) or None
    digest = s.get("key_sha256", _string, None) or None
    if (key is None) == (digest is None):
        raise ConfigError(path, "exactly one of key or key_sha256 is required")
    if digest is not None and not _HEX64.match(digest):
        raise ConfigError(s.path_of("key_sha256"), "expected 64 hex digits")
    allowed = None
    if s.has("models"):
        allowed = s.require("models", _strings)
        for i, model in enumerate(allowed):
            if model not in models:
                raise ConfigError(f"{s.path_of('models')}[{i}]", f"no model named '{model}'")
    return ApiKey(
        name=name,
        key=key,
        key_sha256=digest.lower() if digest else None,
        models=frozenset(allowed) if allowed is not None else None,
        rpm=s.get("rpm", _integer(1), None),
        tpm=s.get("tpm", _integer(1), None),
        budget=s.get("budget", _budget, None),
        max_parallel=s.get("max_parallel", _integer(1), None),
    )


def _budget(raw: object, path: str) -> Budget:
    s = _Section(raw, path, ("usd", "period"))
    return Budget(
        usd=s.require("usd", _number(0, allow_equal=False)),
        period=s.get("period", _choice(BUDGET_PERIODS), "month"),
    )


def _auth(raw: object, path: str, models: Mapping[str, Model]) -> Auth:
    s = _Section(raw, path, ("keys", "admin_keys"))
    keys_path = s.path_of("keys")
    keys = tuple(
        _api_key(k, f"{keys_path}[{i}]", models)
        for i, k in enumerate(s.get("keys", _list, list[Any]()))
    )
    seen: dict[str, int] = {}
    for i, k in enumerate(keys):
        if k.name in seen:
            raise ConfigError(f"{keys_path}[{i}].name", f"duplicate key name '{k.name}'")
        seen[k.name] = i
    none: tuple[str, ...] = ()
    admin = tuple(a for a in s.get("admin_keys", _strings, none) if a)
    return Auth(keys=keys, admin_keys=admin)


def _listen(value: object, path: str) -> tuple[str, ...]:
    if isinstance(value, list):
        found = _strings(value, path)
    else:
        found = (_string(value, path),)
    if not found:
        raise ConfigError(path, "needs at least one endpoint")
    return found


def _named(raw: object, path: str) -> dict[str, Any]:
    """A mapping of user-chosen names (upstreams, models) to their sections."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(path, f"expected a mapping, got {_type_name(raw)}")
    return {str(k): v for k, v in raw.items()}


_TOP = (
    "listen",
    "server",
    "upstreams",
    "models",
    "routing",
    "redis",
    "cache",
    "auth",
    "access_log",
    "files",
)


def _files_upstream(raw: object, path: str, upstreams: Mapping[str, Upstream]) -> str:
    s = _Section(raw, path, ("upstream",))
    name = s.require("upstream", _string)
    if name not in upstreams:
        raise ConfigError(s.path_of("upstream"), f"no upstream named '{name}'")
    if "openai" not in upstreams[name].apis:
        raise ConfigError(s.path_of("upstream"), f"'{name}' does not serve the openai API")
    return name


def _default_files_upstream(upstreams: Mapping[str, Upstream]) -> str | None:
    """The first upstream that serves the OpenAI API, in config order."""
    return next((name for name, u in upstreams.items() if "openai" in u.apis), None)


def parse_config(raw: object, environ: Mapping[str, str] | None = None, source: str = "") -> Config:
    """Validate a raw YAML tree (already loaded) into a :class:`Config`."""
    env = os.environ if environ is None else environ
    tree = _expand_tree(raw, "", env)
    top = _Section(tree, "", _TOP)

    upstreams = {
        name: _upstream(name, value, _join("upstreams", name))
        for name, value in _named(top.raw.get("upstreams"), "upstreams").items()
    }
    models = {
        name: _model(name, value, _join("models", name), upstreams)
        for name, value in _named(top.raw.get("models"), "models").items()
    }

    cache = top.get("cache", _cache, Cache())
    redis = top.get("redis", _redis, None)
    if cache.backend == "redis" and redis is None:
        raise ConfigError("cache.backend", "redis needs a top-level redis section")

    return Config(
        listen=top.get("listen", _listen, Config().listen),
        server=top.get("server", _server, Server()),
        upstreams=upstreams,
        models=models,
        routing=top.get("routing", _routing, Routing()),
        redis=redis,
        cache=cache,
        auth=top.get("auth", lambda v, p: _auth(v, p, models), Auth()),
        access_log=top.get("access_log", _access_log, None),
        files_upstream=top.get(
            "files",
            lambda v, p: _files_upstream(v, p, upstreams),
            _default_files_upstream(upstreams),
        ),
        source=source,
    )


def parse_yaml(text: str, source: str, environ: Mapping[str, str] | None = None) -> Config:
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or "invalid YAML"
        raise ConfigError("", f"{source}: {problem}{where}") from None
    return parse_config(raw, environ, source)


def find_config(explicit: str | None, environ: Mapping[str, str] | None = None) -> str | None:
    """
    The config path to use: ``--config``, else ``$LLMPROXY_CONFIG``, else
    ``./etc/llmproxy.yaml``; ``None`` means the default shipped in the package.
    """
    env = os.environ if environ is None else environ
    if explicit:
        return explicit
    if env.get("LLMPROXY_CONFIG"):
        return env["LLMPROXY_CONFIG"]
    if Path("etc/llmproxy.yaml").is_file():
        return "etc/llmproxy.yaml"
    return None


def load_config(explicit: str | None = None, environ: Mapping[str, str] | None = None) -> Config:
    path = find_config(explicit, environ)
    if path is None:
        text = resources.files("llmproxy").joinpath("default.yaml").read_text("utf-8")
        return parse_yaml(text, "<built-in default>", environ)
    try:
        text = Path(path).read_text("utf-8")
    except OSError as e:
        raise ConfigError("", f"cannot read config {path}: {e.strerror}") from None
    return parse_yaml(text, path, environ)
