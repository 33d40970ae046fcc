"""Owns the topology: keeps the current one, applies changes one at a time, writes each to
Redis (``RedisKeys.TOPOLOGY``) and publishes it on NATS.

Both the membership poll and the reconfiguration coordinator change the topology; each passes
a pure function of the current topology to ``update``, which runs it under one lock, so a
change is always computed from the latest published topology and epochs go up by one per
publish, never skipping or repeating. The key is written before the message goes out, so
whoever reacts to the message and then reads the key sees that epoch or a later one. One
planner per cluster owns the key.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import msgspec
from nats.aio.client import Client as NATS
from nats.errors import Error as NatsError
from redis.asyncio import Redis
from redis.exceptions import RedisError

from kunserve.protocol import RedisKeys, Subjects, Topology, decode, encode

logger = logging.getLogger(__name__)

# what a Redis or NATS hiccup raises: worth retrying, not a bug
TRANSIENT_ERRORS = (RedisError, NatsError, OSError, asyncio.TimeoutError)

TopologyChange = Callable[[Topology], Topology | None]  # None: nothing to publish


class TopologyPublisher:
    def __init__(self, redis: Redis, nats: NATS, tracer=None) -> None:
        self.redis = redis
        self.nats = nats
        self.tracer = tracer
        self.current = Topology()
        self._lock = asyncio.Lock()

    async def load_stored(self) -> Topology:
        """Start from the topology a previous planner left in Redis (epochs continue from it),
        or an empty epoch-0 topology."""
        self.current = await self._stored()
        return self.current

    async def update(self, change: TopologyChange) -> Topology | None:
        """Publish ``change(current)`` unless it is None; return what was published. An
        exception from ``change`` or from Redis/NATS propagates and publishes nothing new."""
        async with self._lock:
            topology = change(self.current)
            if topology is not None:
                await self._traced_publish(topology)
                self.current = topology
            return topology

    async def _stored(self) -> Topology:
        raw = await self.redis.get(RedisKeys.TOPOLOGY)
        if not raw:
            return Topology()
        try:
            return decode(raw, Topology)
        except msgspec.DecodeError as exc:
            logger.warning("ignoring an unreadable stored topology: %s", exc)
            return Topology()

    async def _traced_publish(self, topology: Topology) -> None:
        if self.tracer is None:
            await self._publish(topology)
        else:
            with self.tracer.start_as_current_span("planner.topology") as span:
                span.set_attribute("kunserve.epoch", topology.epoch)
                span.set_attribute("kunserve.instances",
                                   [info.instance_id for info in topology.instances])
                await self._publish(topology)
        logger.info("topology epoch %d: %s", topology.epoch, _describe(topology))

    async def _publish(self, topology: Topology) -> None:
        data = encode(topology)
        await self.redis.set(RedisKeys.TOPOLOGY, data)
        await self.nats.publish(Subjects.TOPOLOGY, data)
        await self.nats.flush()


def _describe(topology: Topology) -> str:
    """``w1, w2 pipelined g3/1, w3 preparing g5`` for the log."""
    parts = []
    for info in topology.instances:
        if info.state == "solo":
            parts.append(info.instance_id)
        else:
            parts.append(f"{info.instance_id} {info.state} {info.group_id}/{info.stage}")
    return ", ".join(parts) or "no instances"
