"""Runs the automatic planner's decisions (``auto_policy.py``) through the coordinator.

The service hands it every load it reads (``observe``, every ``topology_poll_interval``). At
most one decision runs at a time; while it runs, the policy is not asked (its windows would
watch a topology in the middle of changing). A drop plan's new groups are formed concurrently,
one coordinator ``drop`` each, so every instance sees at most one reconfiguration at a time
(the coordinator claims them); a restore decision restores its groups concurrently. Each
reconfiguration is recorded (``reconfiguration_recorder.py``) and its outcome goes back to
the policy (back-off after a failure, the groups it formed).

The groups it formed are kept in Redis (``RedisKeys.AUTO_GROUPS``) too, so a restarted
planner still restores them.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable, Mapping

from redis.asyncio import Redis

from kunserve.planner.auto_policy import AutoPolicy, Decision, DropDecision
from kunserve.planner.demand import GroupDemand, Reserved
from kunserve.planner.reconfiguration_coordinator import ReconfigurationCoordinator
from kunserve.planner.reconfiguration_recorder import ReconfigurationRecorder
from kunserve.planner.topology_publisher import TRANSIENT_ERRORS
from kunserve.protocol import InstanceLoad, RedisKeys, Topology

logger = logging.getLogger(__name__)


class AutoPlanner:
    def __init__(self, policy: AutoPolicy, coordinator: ReconfigurationCoordinator,
                 recorder: ReconfigurationRecorder, redis: Redis | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.policy = policy
        self.coordinator = coordinator
        self.recorder = recorder
        self.redis = redis
        self.clock = clock
        self._running: asyncio.Task | None = None

    async def start(self, topology: Topology) -> None:
        """Take back the groups a previous planner formed that ``topology`` still has."""
        if self.redis is None:
            return
        try:
            stored = await self.redis.smembers(RedisKeys.AUTO_GROUPS)
        except TRANSIENT_ERRORS as exc:
            logger.warning("could not read the groups formed before: %r", exc)
            return
        groups = {info.group_id for info in topology.instances if info.state != "solo"}
        self.policy.owned |= {_text(g) for g in stored} & groups

    @property
    def running(self) -> bool:
        return self._running is not None and not self._running.done()

    def observe(self, topology: Topology, loads: Mapping[str, InstanceLoad],
                reserved: Mapping[str, Reserved]) -> None:
        """One look at the loads; starts the decision due, if any and none is running."""
        if self.running:
            return
        try:
            decision = self.policy.decide(self.clock(), topology, loads, reserved,
                                          self.coordinator.busy)
        except Exception:  # a bug: membership and admin requests must go on regardless
            logger.exception("the automatic planner failed to decide")
            return
        if decision is not None:
            self._running = asyncio.create_task(self._run(decision))

    async def close(self) -> None:
        """Cut a running decision short (the coordinator's members are left to membership's
        rules, as for an admin request cut short)."""
        if self._running is not None:
            self._running.cancel()
            await asyncio.gather(self._running, return_exceptions=True)

    async def wait_idle(self) -> None:
        """Until the running decision (if any) has finished (for tests)."""
        if self._running is not None:
            await asyncio.gather(self._running, return_exceptions=True)

    async def _run(self, decision: Decision) -> None:
        try:
            if isinstance(decision, DropDecision):
                await self._drop_all(decision)
            else:
                await asyncio.gather(*(self._restore(d, decision.trigger)
                                       for d in decision.groups))
        except Exception:  # a bug: log it, keep planning
            logger.exception("automatic reconfiguration failed")

    async def _drop_all(self, decision: DropDecision) -> None:
        plan = decision.plan
        logger.info("overload (%s): dropping into %s (need %d tokens, gain %d, shortfall %d)",
                    ", ".join(decision.trigger["overloaded"]),
                    " + ".join("/".join(g) for g in plan.new_groups), plan.need_tokens,
                    plan.gain_tokens, plan.shortfall_tokens)
        await self.recorder.count_plan(decision.plan_seconds)
        plan_id = uuid.uuid4().hex
        await asyncio.gather(*(self._drop(members, decision, plan_id)
                               for members in plan.new_groups))

    async def _drop(self, members: tuple[str, ...], decision: DropDecision,
                    plan_id: str) -> None:
        reply = await self.recorder.recorded(
            "drop", "auto", lambda: self.coordinator.drop(members), members=members,
            figures=decision.trigger, plan_id=plan_id, plan_seconds=decision.plan_seconds)
        self.policy.drop_finished(self.clock(), members, reply.group, reply.ok)
        if not reply.ok:
            logger.warning("automatic drop of %s failed (%s): not retried for %.0f s",
                           ", ".join(members), reply.error,
                           self.policy.backoff_s(members[0]))
        elif self.redis is not None:
            await self._remember(reply.group)

    async def _restore(self, demand: GroupDemand, trigger: dict) -> None:
        logger.info("group %s calm (demand %d tokens): restoring", demand.group_id,
                    demand.demand_tokens)
        figures = {**trigger, "group": demand.group_id,
                   "group_demand_tokens": demand.demand_tokens}
        await self.recorder.recorded(
            "restore", "auto", lambda: self.coordinator.restore(demand.group_id),
            members=demand.members, figures=figures)
        self.policy.restore_finished(demand.group_id)
        if self.redis is not None:
            await self._forget(demand.group_id)

    async def _remember(self, group_id: str) -> None:
        try:
            await self.redis.sadd(RedisKeys.AUTO_GROUPS, group_id)
        except TRANSIENT_ERRORS as exc:
            logger.warning("could not remember group %s in Redis: %r", group_id, exc)

    async def _forget(self, group_id: str) -> None:
        try:
            await self.redis.srem(RedisKeys.AUTO_GROUPS, group_id)
        except TRANSIENT_ERRORS as exc:
            logger.warning("could not forget group %s in Redis: %r", group_id, exc)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
