"""Notice the death of the instances that hold this gateway's streaming requests.

A worker process that dies (SIGKILL, OOM, a crashed node) sends no last update: without this,
its requests would wait ``request_timeout_s`` and fail. Liveness in the mesh is the worker's
load key in Redis (``RedisKeys.load``), refreshed while the worker lives and expiring
``liveness_ttl_ms`` (2 s) after it stops; the routers already judge it that way. So every
``period_s`` the watchdog asks Redis, in one pipelined round trip, which of the instances
currently holding requests have no load key, and tells each of their requests
(``Generation.instance_lost``), which then fails over by itself (``generation.py``).

Why polling rather than the planner's ``kunserve.topology`` messages: it depends on no other
service noticing first, and it costs nothing while no request is in flight; while some are,
it is one Redis round trip per period for the whole gateway, never per token or per request.
Which instance holds a request is the one its latest update came from, so after a drop (a
group's leader streams its members' requests) the watchdog follows the leader.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Protocol

from redis.exceptions import RedisError

from kunserve.gateway.cluster_view import REDIS_TIMEOUT_S, ClusterView

logger = logging.getLogger(__name__)


class Watched(Protocol):
    """What the watchdog needs of a request (``Generation``)."""

    @property
    def holder(self) -> str | None: ...  # the instance it would be lost with, if any

    def instance_lost(self) -> None: ...


class InstanceWatchdog:
    def __init__(self, cluster: ClusterView, requests: Callable[[], Iterable[Watched]],
                 period_s: float) -> None:
        self._cluster = cluster
        self._requests = requests
        self._period_s = period_s

    async def run(self) -> None:
        """Check every ``period_s`` until cancelled; Redis trouble skips a round (no load
        key read is not the same as no load key)."""
        while True:
            await asyncio.sleep(self._period_s)
            try:
                await self.check()
            except (RedisError, OSError, TimeoutError) as exc:
                logger.warning("failover watchdog: cannot read liveness from Redis: %r", exc)

    async def check(self) -> None:
        held: dict[str, list[Watched]] = defaultdict(list)
        for request in self._requests():
            if (holder := request.holder) is not None:
                held[holder].append(request)
        if not held:
            return
        async with asyncio.timeout(REDIS_TIMEOUT_S):
            dead = await self._cluster.dead(held)
        for instance_id in dead:
            logger.warning("instance %s has no load key (dead): failing over its %d "
                           "request(s)", instance_id, len(held[instance_id]))
            for request in held[instance_id]:
                request.instance_lost()
