"""
The start-up summary: what a configuration defines, one line per subject, as
``twistd -n llmproxy`` logs it at start and ``--check-config`` prints it.  It
names upstreams by URL and client keys by name: never a secret.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from llmproxy.config import Config, Target

#: Each subject's line lists at most this many entries, then how many more.
SHOWN = 20


def config_origin(explicit: str | None, environ: Mapping[str, str] | None = None) -> str:
    """Which config file ``load_config`` reads, and why (the rule of ``find_config``)."""
    env = os.environ if environ is None else environ
    if explicit:
        return f"{explicit} (--config)"
    if env.get("LLMPROXY_CONFIG"):
        return f"{env['LLMPROXY_CONFIG']} ($LLMPROXY_CONFIG)"
    if Path("etc/llmproxy.yaml").is_file():
        return f"{Path('etc/llmproxy.yaml').resolve()} (./etc/llmproxy.yaml, no --config)"
    return "the built-in default (no --config, no $LLMPROXY_CONFIG, no ./etc/llmproxy.yaml)"


def without_secrets(url: str) -> str:
    """``url`` without a user or password in it."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit(parts._replace(netloc=f"***@{netloc}"))


def _capped(items: list[str], between: str = ", ") -> str:
    if not items:
        return "none"
    shown = between.join(items[:SHOWN])
    return shown + (f" and {len(items) - SHOWN} more" if len(items) > SHOWN else "")


def _target(target: Target) -> str:
    weight = "" if target.weight == 1 else f" weight {target.weight}"
    return f"{target.id}{weight}"


def summary(
    config: Config, origin: str, listen: tuple[str, ...] = (), workers: int = 1
) -> list[str]:
    """The summary's lines: config file, listen, upstreams, models, cache, auth."""
    where = listen or config.listen
    fleet = f" ({workers} workers)" if workers > 1 else ""
    upstreams = [f"{u.name} → {without_secrets(u.base_url)}" for u in config.upstreams.values()]
    models = [
        f"{m.name} → {' | '.join(_target(t) for t in m.targets)} ({m.strategy})"
        for m in config.models.values()
    ]
    return [
        f"config: {origin}",
        f"listen: {', '.join(where)}{fleet}" + ("" if listen else " (from the config)"),
        f"upstreams ({len(upstreams)}): {_capped(upstreams)}",
        f"models ({len(models)}): {_capped(models, '; ')}",
        f"cache: {_cache(config)}",
        f"auth: {_auth(config)}",
    ]


def _cache(config: Config) -> str:
    cache = config.cache
    if cache.backend == "off":
        return "off"
    found = f"{cache.backend}, ttl {cache.ttl:g}s, scope {cache.scope}"
    if cache.backend == "memory":
        return f"{found}, at most {cache.max_bytes} bytes"
    redis = config.redis
    if redis is not None and redis.sentinel is not None:
        hosts = ", ".join(f"{h}:{p}" for h, p in redis.sentinel.addresses)
        return f"{found}, Redis master {redis.sentinel.master} by sentinels {hosts}"
    if redis is not None and redis.url:
        return f"{found}, Redis {without_secrets(redis.url)}"
    return found


def _auth(config: Config) -> str:
    auth = config.auth
    admin = f"; {len(auth.admin_keys)} admin keys" if auth.admin_keys else "; no admin keys"
    if not auth.keys:
        return f"open: no client keys, any client is let in{admin}"
    names = [k.name for k in auth.keys]
    return f"closed: {len(names)} client keys ({_capped(names)}){admin}"
