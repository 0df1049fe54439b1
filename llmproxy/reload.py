"""
Live reload: what a new configuration file changes, and what it may not.

SIGHUP and ``POST /admin/reload`` re-read the file the process was started
with.  A file that does not load is refused with its own path-named message,
and the running configuration stays.  So is one that changes what only a
restart can: the listening sockets (``listen``), the Redis connection
(``redis``) and where the cache lives (``cache.backend``).  Everything else
applies to the next request; see :class:`llmproxy.assembly.LiveGateway`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import attrs

from llmproxy import errors
from llmproxy.accesslog import open_log
from llmproxy.config import Config, ConfigError, load_config

#: What a running process cannot change without a restart.
RESTART_FIELDS = ("listen", "redis", "cache.backend")


class ReloadRefused(Exception):
    """The new file was not applied; ``str()`` says why, naming the file."""

    def api_error(self) -> errors.APIError:
        return errors.APIError(400, str(self), type="invalid_request_error", code="invalid_config")


@attrs.frozen
class Changes:
    """Model and upstream names a reload added, removed or changed."""

    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    changed: tuple[str, ...] = ()

    def as_json(self) -> dict[str, object]:
        return {
            "reloaded": True,
            "added": list(self.added),
            "removed": list(self.removed),
            "changed": list(self.changed),
        }


def _compare(old: Mapping[str, object], new: Mapping[str, object]) -> Changes:
    return Changes(
        added=tuple(n for n in new if n not in old),
        removed=tuple(n for n in old if n not in new),
        changed=tuple(n for n in new if n in old and new[n] != old[n]),
    )


def diff(old: Config, new: Config) -> Changes:
    """What ``new`` changes of ``old``: models first, then upstreams."""
    models, upstreams = _compare(old.models, new.models), _compare(old.upstreams, new.upstreams)
    return Changes(
        added=models.added + upstreams.added,
        removed=models.removed + upstreams.removed,
        changed=models.changed + upstreams.changed,
    )


def needs_restart(old: Config, new: Config) -> list[str]:
    """The fields of :data:`RESTART_FIELDS` that differ."""
    found = []
    if old.listen != new.listen:
        found.append("listen")
    if old.redis != new.redis:
        found.append("redis")
    if old.cache.backend != new.cache.backend:
        found.append("cache.backend")
    return found


def read_again(current: Config) -> Config:
    """
    The file ``current`` was loaded from, loaded again, or :class:`ReloadRefused`.
    (A process on the built-in default reloads the built-in default.)
    """
    source = current.source
    explicit = None if source.startswith("<") else source
    try:
        new = load_config(explicit)
    except ConfigError as e:
        message = str(e)
        if explicit and not message.startswith(explicit):
            message = f"{explicit}: {message}"
        raise ReloadRefused(message) from None
    refused = needs_restart(current, new)
    if refused:
        raise ReloadRefused(
            f"{source}: {', '.join(refused)} cannot change while the proxy runs; "
            "restart it to apply this file (nothing was applied)"
        )
    log = new.access_log
    if log is not None and log.path != "-" and log != current.access_log:
        # Found now, not half-way through applying the file.
        try:
            os.close(open_log(log.path))
        except OSError as e:
            raise ReloadRefused(
                f"{source}: access_log.path: cannot open '{log.path}': {e.strerror} "
                "(nothing was applied)"
            ) from None
    return new
