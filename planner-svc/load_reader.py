"""Reads the live instances' loads from Redis.

An instance is live while its load hash ``RedisKeys.load(id)`` exists: the worker refreshes it
and sets an expiry, so the key vanishes when the worker dies. ``RedisKeys.INSTANCES`` lists
every id ever registered; the hashes say which of them are live.
"""

from __future__ import annotations

import logging

import msgspec
from redis.asyncio import Redis

from kunserve.protocol import InstanceLoad, RedisKeys

logger = logging.getLogger(__name__)


class LoadReader:
    def __init__(self, redis: Redis) -> None:
        self.redis = redis  # decode_responses=True
        self._warned: set[str] = set()

    async def live_loads(self) -> dict[str, InstanceLoad]:
        """instance id -> its last load, for every live instance (one round trip per call
        after the id set)."""
        ids = sorted(await self.redis.smembers(RedisKeys.INSTANCES))
        if not ids:
            return {}
        async with self.redis.pipeline(transaction=False) as pipe:
            for instance_id in ids:
                pipe.hgetall(RedisKeys.load(instance_id))
            hashes = await pipe.execute()
        return {i: self._parse(i, fields) for i, fields in zip(ids, hashes, strict=True) if fields}

    def _parse(self, instance_id: str, fields: dict[str, str]) -> InstanceLoad:
        try:
            return msgspec.convert({**fields, "instance_id": instance_id}, InstanceLoad,
                                   strict=False)
        except msgspec.ValidationError as exc:
            # the key exists, so the instance is live; its numbers are just unreadable
            if instance_id not in self._warned:
                self._warned.add(instance_id)
                logger.warning("unreadable load of %s (%s): counted live, load unknown",
                               instance_id, exc)
            return InstanceLoad(instance_id=instance_id)
