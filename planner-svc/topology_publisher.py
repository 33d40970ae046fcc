"""Writes the topology to Redis (``RedisKeys.TOPOLOGY``) and publishes it on NATS.

The key is written before the message goes out, so whoever reacts to the message and then
reads the key sees that epoch or a later one. One planner per cluster owns the key.
"""

from __future__ import annotations

import logging

import msgspec
from nats.aio.client import Client as NATS
from redis.asyncio import Redis

from kunserve.protocol import RedisKeys, Subjects, Topology, decode, encode

logger = logging.getLogger(__name__)


class TopologyPublisher:
    def __init__(self, redis: Redis, nats: NATS) -> None:
        self.redis = redis
        self.nats = nats

    async def stored(self) -> Topology:
        """The topology a previous planner left in Redis (epochs continue from it), or an
        empty epoch-0 topology."""
        raw = await self.redis.get(RedisKeys.TOPOLOGY)
        if not raw:
            return Topology()
        try:
            return decode(raw, Topology)
        except msgspec.DecodeError as exc:
            logger.warning("ignoring an unreadable stored topology: %s", exc)
            return Topology()

    async def publish(self, topology: Topology) -> None:
        data = encode(topology)
        await self.redis.set(RedisKeys.TOPOLOGY, data)
        await self.nats.publish(Subjects.TOPOLOGY, data)
        await self.nats.flush()
