"""
The response cache: keys, controls, stored entries, and the backends behind
one small interface (:class:`CacheBackend`).

The pipeline asks :class:`ResponseCache` for a lookup before routing and hands
it a finished answer afterwards; what is stored is decided here (only complete
200 answers; streams only after their terminal event).  Backends store opaque
bytes under a key with a TTL, so memory and Redis behave the same.
"""

from llmproxy.cache.entry import Entry
from llmproxy.cache.keys import cache_key, parse_controls
from llmproxy.cache.memory import MemoryBackend
from llmproxy.cache.store import CacheBackend, ResponseCache

__all__ = [
    "CacheBackend",
    "Entry",
    "MemoryBackend",
    "ResponseCache",
    "cache_key",
    "parse_controls",
]
