"""
Redis cache backend: one ``SET key value EX ttl`` per entry (a single atomic
write, so no reader ever sees half an answer), ``GET`` to read, ``DEL`` to drop
a corrupt entry, and SCAN + UNLINK (never KEYS) to purge a namespace.  Every
call has the deadline of :class:`~llmproxy.redisclient.SharedRedis`; trouble
raises, and the response cache turns it into a miss.
"""

from __future__ import annotations

import math

from llmproxy.redisclient import SharedRedis


class RedisBackend:
    SCAN_COUNT = 500

    def __init__(self, redis: SharedRedis, namespace: str) -> None:
        self.redis = redis
        self.pattern = f"{namespace}:cache:*"

    async def get(self, key: str) -> bytes | None:
        value = await self.redis.call("get", key)
        return bytes(value) if value is not None else None

    async def set(self, key: str, value: bytes, ttl: float) -> None:
        await self.redis.call("set", key, value, pexpire=max(1, math.ceil(ttl * 1000)))

    async def delete(self, key: str) -> None:
        await self.redis.call("delete", key)

    async def purge(self) -> int:
        cursor: int | bytes = 0
        purged = 0
        while True:
            cursor, keys = await self.redis.call(
                "scan", cursor, pattern=self.pattern, count=self.SCAN_COUNT
            )
            if keys:
                purged += int(await self.redis.call("execute_command", "UNLINK", *keys))
            if int(cursor) == 0:
                return purged

    def stats(self) -> dict[str, int | None]:
        return {"entries": None, "bytes": None}
