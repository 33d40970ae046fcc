"""What the gateway reads of the cluster from Redis: live instances, their loads, the epoch.

Only ``/health`` and ``/metrics`` call this; the request path never touches Redis.
"""

from __future__ import annotations

import logging

import msgspec
import redis.asyncio as aioredis

from kunserve.protocol import InstanceLoad, RedisKeys, Topology, decode

logger = logging.getLogger(__name__)

LOAD_PREFIX = RedisKeys.load("")


class ClusterView:
    def __init__(self, redis: aioredis.Redis) -> None:
        self._redis = redis

    async def ping(self) -> None:
        await self._redis.ping()

    async def live_instances(self) -> list[str]:
        """Instances whose load key has not expired (workers refresh it while alive)."""
        ids = [_text(key).removeprefix(LOAD_PREFIX)
               async for key in self._redis.scan_iter(match=RedisKeys.load("*"), count=1000)]
        return sorted(ids)

    async def loads(self) -> list[InstanceLoad]:
        ids = await self.live_instances()
        pipe = self._redis.pipeline(transaction=False)
        for instance_id in ids:
            pipe.hgetall(RedisKeys.load(instance_id))
        loads = []
        for instance_id, fields in zip(ids, await pipe.execute(), strict=True):
            if fields:  # expired between SCAN and HGETALL
                loads.append(_to_load(instance_id, fields))
        return loads

    async def topology_epoch(self) -> int:
        raw = await self._redis.get(RedisKeys.TOPOLOGY)
        if not raw:
            return 0
        try:
            return decode(raw, Topology).epoch
        except msgspec.DecodeError:
            logger.warning("ignoring an unreadable %s", RedisKeys.TOPOLOGY)
            return 0


def _to_load(instance_id: str, fields: dict) -> InstanceLoad:
    values = {_text(k): _text(v) for k, v in fields.items()}
    values.setdefault("instance_id", instance_id)
    try:
        return msgspec.convert(values, InstanceLoad, strict=False)
    except msgspec.ValidationError as exc:
        logger.warning("unreadable load of instance %s: %s", instance_id, exc)
        return InstanceLoad(instance_id=instance_id)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
