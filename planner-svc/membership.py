"""Who is in the topology, and which groups still hold together: the next ``Topology`` after
instances come and go. Pure (no Redis, no NATS).

Rules, applied to the instances no reconfiguration is touching (the coordinator's ``busy``
instances keep their entries as they are, even dead ones: the coordinator publishes their
outcome itself):

* a new live instance joins ``solo``; an instance whose load key expired leaves;
* a pipelined group breaks when a member leaves, or when a member's load says ``solo`` after
  it had said ``pipelined`` in that group (its process group broke and it fell back); the
  surviving members are published solo, since the workers return to solo on their own when
  their process group breaks;
* an entry left ``preparing`` or ``restoring`` with no reconfiguration under way (a planner
  that stopped mid-way) becomes solo: a prepare never committed is given up by the workers
  and a restore ends solo.

Why a solo load counts only after a pipelined one: the load hash is written at step boundaries
or every ``ttl/3`` when idle, so right after a commit it can still be the solo load from
before the drop. The members that have confirmed their group are remembered here, which makes
``Membership`` stateful (still pure); a restarted planner learns them again from the next load.

Any change bumps the epoch by one; no change gives ``None``, so the caller publishes only real
changes. Where its job ends: it does not merge groups or start a restore (the coordinator
does, ``group_transitions.py``).
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping

from kunserve.planner.group_transitions import GroupState, check_transition, solo_instance
from kunserve.protocol import InstanceInfo, InstanceLoad, Topology

__all__ = ["Membership", "solo_instance"]


class Membership:
    def __init__(self, num_layers: int) -> None:
        self.num_layers = num_layers  # for new solo entries (0 when unknown)
        self._confirmed: dict[str, str] = {}  # instance -> the group its load said pipelined in

    def next_topology(self, current: Topology, loads: Mapping[str, InstanceLoad],
                      busy: Collection[str] = ()) -> Topology | None:
        """The topology for the live instances ``loads`` (epoch + 1), or None if that is
        ``current``. ``busy``: instances a reconfiguration is under way for."""
        self._remember_confirmed(current, loads)
        broken = self._broken_groups(current, loads, busy)
        listed = {info.instance_id: info for info in current.instances}
        ids = {i for i in listed if i in loads or i in busy} | set(loads)
        instances = [self._entry(listed.get(i), i, broken, busy) for i in sorted(ids, key=natural_key)]
        if instances == current.instances:
            return None
        return Topology(epoch=current.epoch + 1, instances=instances)

    def _entry(self, info: InstanceInfo | None, instance_id: str, broken: set[str],
               busy: Collection[str]) -> InstanceInfo:
        if info is None:
            return solo_instance(instance_id, self.num_layers)
        if instance_id in busy or info.state == GroupState.SOLO:
            return info
        if info.state == GroupState.PIPELINED and info.group_id not in broken:
            return info
        check_transition(instance_id, info.state, GroupState.SOLO)
        return solo_instance(instance_id, self.num_layers)

    def _broken_groups(self, current: Topology, loads: Mapping[str, InstanceLoad],
                       busy: Collection[str]) -> set[str]:
        broken = set()
        for info in current.instances:
            if info.state != GroupState.PIPELINED or info.instance_id in busy:
                continue
            load = loads.get(info.instance_id)
            fell_back = (load is not None and load.state == GroupState.SOLO
                         and self._confirmed.get(info.instance_id) == info.group_id)
            if load is None or fell_back:
                broken.add(info.group_id)
        return broken

    def _remember_confirmed(self, current: Topology, loads: Mapping[str, InstanceLoad]) -> None:
        pipelined = {info.instance_id: info.group_id for info in current.instances
                     if info.state == GroupState.PIPELINED}
        self._confirmed = {i: g for i, g in self._confirmed.items() if pipelined.get(i) == g}
        for instance_id, group_id in pipelined.items():
            load = loads.get(instance_id)
            if load is not None and load.state == GroupState.PIPELINED \
                    and load.group_id == group_id:
                self._confirmed[instance_id] = group_id


def natural_key(instance_id: str) -> list:
    """Sort key putting worker-2 before worker-10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", instance_id)]
