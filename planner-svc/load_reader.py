"""Reads the live instances' loads from Redis.

An instance is live while its load hash ``RedisKeys.load(id)`` exists: the worker refreshes it
and sets an expiry, so the key vanishes when the worker dies. ``RedisKeys.INSTANCES`` lists
every id ever registered; the hashes say which of them are live. Routers' reservations
(``RedisKeys.reserved(id)``: dispatched, not yet in the load) are read in the same round trip
for the automatic planner's demand.
"""

from __future__ import annotations

import logging

import msgspec
from redis.asyncio import Redis

from kunserve.planner.demand import Reserved
from kunserve.protocol import InstanceLoad, RedisKeys

logger = logging.getLogger(__name__)


class LoadReader:
    def __init__(self, redis: Redis) -> None:
        self.redis = redis  # decode_responses=True
        self._warned: set[str] = set()

    async def live_loads(self) -> dict[str, InstanceLoad]:
        """instance id -> its last load, for every live instance (one round trip per call
        after the id set)."""
        return (await self.live_figures())[0]

    async def live_figures(self) -> tuple[dict[str, InstanceLoad], dict[str, Reserved]]:
        """The live instances' loads, and what routers reserved on them that the loads do
        not show yet (one round trip after the id set)."""
        ids = sorted(await self.redis.smembers(RedisKeys.INSTANCES))
        if not ids:
            return {}, {}
        async with self.redis.pipeline(transaction=False) as pipe:
            for instance_id in ids:
                pipe.hgetall(RedisKeys.load(instance_id))
                pipe.hgetall(RedisKeys.reserved(instance_id))
            hashes = await pipe.execute()
        loads, reserved = {}, {}
        for i, fields, reservation in zip(ids, hashes[::2], hashes[1::2], strict=True):
            if fields:
                loads[i] = self._parse(i, fields)
                reserved[i] = _reserved(reservation)
        return loads, reserved

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


def _reserved(fields: dict[str, str]) -> Reserved:
    try:
        return Reserved(tokens=max(0, int(fields.get("tokens", 0))),
                        requests=max(0, int(fields.get("requests", 0))))
    except ValueError:
        return Reserved()
