"""Records every reconfiguration the planner runs, automatic or admin: an OpenTelemetry span
with one child span per phase, a row in the ledger's ``plans`` table, and the counters the
gateway's ``/metrics`` exports (``RedisKeys.PLANNER_STATS``, ``PlannerStats`` fields).

A request refused before it started (400/409: nothing was published) is not a
reconfiguration: no row, no count. The phase spans are laid end to end from the
reconfiguration's start with the durations the coordinator measured (prepare then commit, or
restore); the publishes between them take milliseconds. Recording never fails the
reconfiguration: database and Redis trouble is logged.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence

from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode, Tracer
from redis.asyncio import Redis

from kunserve.ledger import PlanLedger
from kunserve.planner.group_transitions import members_of
from kunserve.planner.topology_publisher import TRANSIENT_ERRORS, TopologyPublisher
from kunserve.protocol import ReconfigureReply, RedisKeys, Topology

logger = logging.getLogger(__name__)


class ReconfigurationRecorder:
    def __init__(self, topology: TopologyPublisher, redis: Redis | None = None,
                 ledger: PlanLedger | None = None, tracer: Tracer | None = None) -> None:
        self.topology = topology
        self.redis = redis
        self.ledger = ledger
        self.tracer = tracer or trace.NoOpTracer()

    async def recorded(self, action: str, trigger: str,
                       run: Callable[[], Awaitable[ReconfigureReply]], *,
                       members: Sequence[str] = (), figures: dict | None = None,
                       plan_id: str | None = None,
                       plan_seconds: float | None = None) -> ReconfigureReply:
        """``run()`` (a coordinator drop or restore) inside its span; then the row and the
        counters. ``members``: the instances it is about, if the caller knows them."""
        before = self.topology.current
        started_wall, started = time.time(), time.monotonic()
        with self.tracer.start_as_current_span(f"planner.{action}") as span:
            span.set_attribute("kunserve.trigger", trigger)
            reply = await run()
            self._finish_span(span, started_wall, action, reply)
        if not reply.ok and reply.epoch == 0:  # refused before it started
            return reply
        after = self.topology.current
        members = list(members) or members_of(after, reply.group)
        await self._count(f"{action}s_{'ok' if reply.ok else 'failed'}",
                          **({"migrated_requests": reply.moved_requests}
                             if reply.moved_requests else {}))
        if self.ledger is not None:
            await self.ledger.record(
                plan_id=plan_id or uuid.uuid4().hex, epoch=reply.epoch, time=started_wall,
                action=action, trigger=trigger, group_id=reply.group, members=members,
                figures=figures or {}, groups_before=groups_of(before),
                groups_after=groups_of(after), phase_seconds=dict(reply.phase_seconds),
                plan_seconds=plan_seconds, duration_s=time.monotonic() - started,
                outcome="ok" if reply.ok else "failed", error=reply.error)
        return reply

    async def count_plan(self, seconds: float) -> None:
        """One drop plan computed in ``seconds`` (``kunserve:plan_seconds``)."""
        await self._count("plans", plan_seconds_sum=seconds)

    def _finish_span(self, span, started_wall: float, action: str,
                     reply: ReconfigureReply) -> None:
        span.set_attribute("kunserve.epoch", reply.epoch)
        span.set_attribute("kunserve.group", reply.group)
        span.set_attribute("kunserve.outcome", "ok" if reply.ok else "failed")
        if not reply.ok:
            span.set_status(Status(StatusCode.ERROR, reply.error or "failed"))
        at = int(started_wall * 1e9)
        for phase, seconds in reply.phase_seconds.items():
            end = at + int(seconds * 1e9)
            child = self.tracer.start_span(f"planner.{action}.{phase}", start_time=at)
            child.set_attribute("kunserve.phase_seconds", seconds)
            child.end(end_time=end)
            at = end

    async def _count(self, field: str, **more: float) -> None:
        """``field`` + 1, and each of ``more`` by its value (ints stay ints)."""
        if self.redis is None:
            return
        try:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.hincrby(RedisKeys.PLANNER_STATS, field, 1)
                for name, value in more.items():
                    if isinstance(value, int):
                        pipe.hincrby(RedisKeys.PLANNER_STATS, name, value)
                    else:
                        pipe.hincrbyfloat(RedisKeys.PLANNER_STATS, name, value)
                await pipe.execute()
        except TRANSIENT_ERRORS as exc:
            logger.warning("could not count %s in Redis: %r", field, exc)


def groups_of(topology: Topology) -> list[list[str]]:
    """Every group's members in stage order, solo instances as groups of one."""
    ids = dict.fromkeys(info.group_id for info in topology.instances)
    return [members_of(topology, group_id) for group_id in ids]
