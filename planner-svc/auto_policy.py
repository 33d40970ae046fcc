"""What the planner does by itself: drop when a group is overloaded, restore a group it formed
when that group is calm. Pure and stateful: loads in, a decision out (the caller runs it
through the coordinator and reports back). No NATS, no Redis.

Each ``decide`` call is one look at the loads (every ``topology_poll_interval``):

1. Demand per group (``demand.py``); the solo capacity of every instance seen solo is
   remembered (a restore compares with it), and so is the memory model for the plan
   (``GroupCapacity`` from a solo load).
2. Drop: when some solo instance has been overloaded for ``overload_window_s``
   (``overload_detector.py``), plan over every *plannable* solo instance (live, its load
   confirming it is solo, not being reconfigured, not backing off): the need is the sum of
   their deficits (demand beyond capacity) and the greedy (``drop_plan.py``) merges until the
   estimated gain covers it. A plan with no new group (nothing helps) is no decision.
3. Restore: a pipelined group *this planner formed* (an operator's drop stays until the
   operator restores it) that has been calm for ``restore_window_s`` (``restore_policy.py``:
   demand never at ``overload_usage`` of the solo capacity, below ``restore_usage`` of it on
   average).

Back-off: the members of a drop that failed or was refused are left out of plans for
``retry_backoff_s``, doubling with every further failure up to ``max_backoff_s``; a drop that
succeeds clears it. So a plan the workers refuse (e.g. one that gains no KV after all) is
retried at most every few seconds, never in a tight loop. After any decision the windows start
again: the topology they watched is changing.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field

from kunserve.planner.demand import GroupDemand, Reserved, group_demands
from kunserve.planner.drop_plan import DropPlan, PlanGroup, plan_drop
from kunserve.planner.group_capacity import GroupCapacity
from kunserve.planner.group_transitions import GroupState
from kunserve.planner.overload_detector import OverloadDetector
from kunserve.planner.restore_policy import RestorePolicy
from kunserve.protocol import InstanceLoad, Topology


@dataclass(frozen=True)
class AutoSettings:
    overload_window_s: float = 0.1
    overload_usage: float = 0.8  # KV usage at which a queue that does not fit is an overload
    restore_window_s: float = 5.0
    restore_usage: float = 0.5  # of the members' solo capacity
    retry_backoff_s: float = 5.0
    max_backoff_s: float = 120.0


@dataclass(frozen=True)
class DropDecision:
    plan: DropPlan
    trigger: dict  # the figures that made it: overloaded groups, demand, need, ...
    plan_seconds: float  # computing the plan


@dataclass(frozen=True)
class RestoreDecision:
    groups: tuple[GroupDemand, ...]
    trigger: dict


Decision = DropDecision | RestoreDecision


@dataclass
class _Backoff:
    retry_at: float = 0.0
    delay_s: float = 0.0


@dataclass
class AutoPolicy:
    settings: AutoSettings
    num_layers: int
    clock: Callable[[], float] = time.perf_counter  # times the plan computation only
    owned: set[str] = field(default_factory=set)  # pipelined groups this planner formed
    solo_tokens: dict[str, int] = field(default_factory=dict)  # instance -> KV tokens solo
    capacity: GroupCapacity | None = None
    _backoff: dict[str, _Backoff] = field(default_factory=dict)

    def __post_init__(self) -> None:
        s = self.settings
        self.overload = OverloadDetector(s.overload_window_s, s.overload_usage)
        # calm: never at the drop's usage of the solo capacity, half of it on average
        self.calm = RestorePolicy(s.restore_window_s, s.restore_usage, s.overload_usage)

    def decide(self, now: float, topology: Topology, loads: Mapping[str, InstanceLoad],
               reserved: Mapping[str, Reserved] | None = None,
               busy: Collection[str] = ()) -> Decision | None:
        """The reconfiguration due now, if any (module docstring)."""
        self._learn(topology, loads)
        demands = group_demands(topology, loads, reserved)
        if busy:
            demands = [d for d in demands if not any(m in busy for m in d.members)]
        solo = [d for d in demands if d.state == GroupState.SOLO]
        pipelined = [d for d in demands if d.state == GroupState.PIPELINED
                     and d.group_id in self.owned]
        decision = self._drop(now, solo) or self._restore(now, pipelined)
        if decision is not None:
            self.overload.reset()
            self.calm.reset()
        return decision

    def drop_finished(self, now: float, members: Sequence[str], group_id: str,
                      ok: bool) -> None:
        if ok:
            self.owned.add(group_id)
            for member in members:
                self._backoff.pop(member, None)
            return
        for member in members:
            backoff = self._backoff.setdefault(member, _Backoff())
            backoff.delay_s = min(self.settings.max_backoff_s,
                                  backoff.delay_s * 2 or self.settings.retry_backoff_s)
            backoff.retry_at = now + backoff.delay_s

    def backoff_s(self, instance_id: str) -> float:
        """How long ``instance_id`` is left out of plans after its last failed drop."""
        return self._backoff.get(instance_id, _Backoff()).delay_s

    def restore_finished(self, group_id: str) -> None:
        """Whatever the outcome, the members are solo again (the coordinator publishes it)."""
        self.owned.discard(group_id)

    def _drop(self, now: float, solo: list[GroupDemand]) -> DropDecision | None:
        overloaded = self.overload.observe(now, solo)
        if not overloaded or self.capacity is None:
            return None
        started = self.clock()
        plannable = [d for d in solo if self._backoff.get(d.group_id, _Backoff()).retry_at
                     <= now]
        groups = [PlanGroup(d.members, d.deficit_tokens) for d in plannable]
        need = sum(g.deficit_tokens for g in groups)
        plan = plan_drop(groups, need, self.capacity)
        seconds = self.clock() - started
        if not plan.new_groups:
            return None
        trigger = {
            "overloaded": [d.group_id for d in overloaded],
            "window_s": self.settings.overload_window_s,
            "demand_tokens": sum(d.demand_tokens for d in plannable),
            "capacity_tokens": sum(d.capacity_tokens for d in plannable),
            "queued_blocks": sum(d.queued_blocks for d in plannable),
            "waiting": sum(d.waiting for d in plannable),
            "need_tokens": need, "gain_tokens": plan.gain_tokens,
            "shortfall_tokens": plan.shortfall_tokens,
        }
        return DropDecision(plan, trigger, seconds)

    def _restore(self, now: float, pipelined: list[GroupDemand]) -> RestoreDecision | None:
        solo = self._solo_tokens(pipelined)
        ready = self.calm.observe(now, pipelined, solo)
        if not ready:
            return None
        trigger = {
            "calm": [d.group_id for d in ready], "window_s": self.settings.restore_window_s,
            "demand_tokens": sum(d.demand_tokens for d in ready),
            "solo_tokens": sum(solo[m] for d in ready for m in d.members),
            "usage_fraction": self.settings.restore_usage,
            "peak_fraction": self.calm.peak_fraction,
        }
        return RestoreDecision(tuple(ready), trigger)

    def _solo_tokens(self, groups: list[GroupDemand]) -> Mapping[str, int]:
        """Each member's capacity when it was last seen solo; for one never seen solo (the
        planner restarted meanwhile), the estimate, if there is one."""
        if self.capacity is None:
            return self.solo_tokens
        estimate = self.capacity.tokens(1)
        return {m: self.solo_tokens.get(m, estimate) for d in groups for m in d.members}

    def _learn(self, topology: Topology, loads: Mapping[str, InstanceLoad]) -> None:
        """Remember each solo instance's capacity and the memory model; forget owned groups
        the topology no longer has (broken, or restored by someone else)."""
        smallest: InstanceLoad | None = None
        for info in topology.instances:
            load = loads.get(info.instance_id)
            if info.state != GroupState.SOLO or load is None or load.state != GroupState.SOLO \
                    or load.blocks_total <= 0:
                continue
            self.solo_tokens[info.instance_id] = load.blocks_total * load.block_size
            if load.kv_bytes > 0 and (smallest is None or load.kv_bytes < smallest.kv_bytes):
                smallest = load
        # alike instances; else the one with the least KV, to be safe
        capacity = smallest and GroupCapacity.from_solo_load(smallest, self.num_layers)
        if capacity is not None and capacity != self.capacity:
            self.capacity = capacity
        groups = {info.group_id for info in topology.instances
                  if info.state != GroupState.SOLO}
        self.owned &= groups
