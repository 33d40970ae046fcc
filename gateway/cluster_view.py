"""What the gateway reads of the cluster from Redis: live instances, their loads, the topology.

``/health``, ``/metrics``, ``GET /v1/cluster`` and the failover watchdog (one EXISTS per
instance holding requests, every ``failover_check_s``) call this; the per-token path never
touches Redis.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import msgspec
import redis.asyncio as aioredis

from kunserve.protocol import InstanceLoad, PlannerStats, RedisKeys, Topology, decode

logger = logging.getLogger(__name__)

LOAD_PREFIX = RedisKeys.load("")
REDIS_TIMEOUT_S = 2.0  # what callers give a read here before they answer without it


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

    async def topology(self) -> Topology:
        """The planner's topology; an empty one (epoch 0) before the planner wrote any."""
        raw = await self._redis.get(RedisKeys.TOPOLOGY)
        if not raw:
            return Topology()
        try:
            return decode(raw, Topology)
        except msgspec.DecodeError:
            logger.warning("ignoring an unreadable %s", RedisKeys.TOPOLOGY)
            return Topology()

    async def topology_epoch(self) -> int:
        return (await self.topology()).epoch

    async def planner_stats(self) -> PlannerStats:
        """The planner's counters (all zero before its first reconfiguration)."""
        fields = await self._redis.hgetall(RedisKeys.PLANNER_STATS)
        try:
            return msgspec.convert({_text(k): _text(v) for k, v in fields.items()},
                                   PlannerStats, strict=False)
        except msgspec.ValidationError:
            logger.warning("ignoring unreadable %s", RedisKeys.PLANNER_STATS)
            return PlannerStats()

    async def dead(self, instance_ids: Iterable[str]) -> list[str]:
        """Those of ``instance_ids`` whose load key has expired (one round trip)."""
        ids = list(instance_ids)
        pipe = self._redis.pipeline(transaction=False)
        for instance_id in ids:
            pipe.exists(RedisKeys.load(instance_id))
        return [i for i, live in zip(ids, await pipe.execute(), strict=True) if not live]


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
