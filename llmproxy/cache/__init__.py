"""
The response cache.

* :mod:`~llmproxy.cache.store`: :class:`ResponseCache`, what the pipeline talks
  to: one decision per call, lookups, and the rules of what is stored; the
  :class:`CacheBackend` interface;
* :mod:`~llmproxy.cache.keys`: keys, and the controls a request sends;
* :mod:`~llmproxy.cache.entry`: a stored answer, and its recording;
* :mod:`~llmproxy.cache.flight`: single-flight;
* :mod:`~llmproxy.cache.memory`, :mod:`~llmproxy.cache.redis`: the backends,
  which store opaque bytes under a key with a TTL, so both behave the same.
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
