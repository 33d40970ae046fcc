"""Writes an instance's load to Redis and releases the router's reservations with it.

One write at a time, off the token path: a slow Redis delays the load, never the tokens. The
release of the requests the engine took rides in the same MULTI as the load that first shows
them, so their demand is never counted twice (reservation plus load) or not at all.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

import msgspec
import redis.asyncio as aioredis

from kunserve.protocol import InstanceLoad, RedisKeys
from kunserve.reservations import Reservations

logger = logging.getLogger(__name__)


@dataclass
class LoadReport:
    load: InstanceLoad
    released_tokens: int  # reservations of the requests the engine took since the last report
    released_requests: int


class LoadWriter:
    """Writes load reports to Redis one at a time, off the pump: a slow Redis delays the
    load, never the tokens. Reports that pile up coalesce (the newest load wins, releases
    add up); a failed write hands its releases to the next report. Nothing is written before
    ``open``: the load key tells the router and the gateway that the instance takes
    requests, so it must not appear before the worker's subscriptions are in place (a
    request published before then would be lost)."""

    def __init__(self, redis: aioredis.Redis, reservations: Reservations, instance_id: str,
                 liveness_ttl_ms: int, on_written: Callable[[], None]) -> None:
        self.redis, self.reservations = redis, reservations
        self.instance_id, self.liveness_ttl_ms = instance_id, liveness_ttl_ms
        self.on_written = on_written
        self._pending: LoadReport | None = None
        self._carry = [0, 0]  # releases of failed writes
        self._task: asyncio.Task | None = None
        self._open = False

    def submit(self, report: LoadReport) -> None:
        if self._pending is not None:
            report.released_tokens += self._pending.released_tokens
            report.released_requests += self._pending.released_requests
        self._pending = report
        self._start()

    def open(self) -> None:
        """Start writing (the newest report submitted so far goes first)."""
        self._open = True
        self._start()

    def _start(self) -> None:
        if self._open and self._pending is not None and (self._task is None
                                                         or self._task.done()):
            self._task = asyncio.create_task(self._write_pending())

    async def close(self) -> None:
        if self._task is not None:
            await self._task

    async def _write_pending(self) -> None:
        while (report := self._pending) is not None:
            self._pending = None
            report.released_tokens += self._carry[0]
            report.released_requests += self._carry[1]
            self._carry = [0, 0]
            try:
                await self._write(report)
            except Exception as exc:  # Redis away: keep serving, retry with the next report
                logger.warning("load write failed: %s", exc)
                self._carry = [report.released_tokens, report.released_requests]

    async def keep_alive(self) -> None:
        """Push the load key's expiry back without new contents (nothing if it is gone)."""
        await self.redis.pexpire(RedisKeys.load(self.instance_id), self.liveness_ttl_ms)

    async def _write(self, report: LoadReport) -> None:
        key = RedisKeys.load(self.instance_id)
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(key, mapping=msgspec.structs.asdict(report.load))
        pipe.pexpire(key, self.liveness_ttl_ms)
        pipe.sadd(RedisKeys.INSTANCES, self.instance_id)
        if report.released_requests:
            await self.reservations.release(self.instance_id, report.released_tokens,
                                            report.released_requests, client=pipe)
        await pipe.execute()
        self.on_written()
