"""Whether a drop or restore may start, and with which members. Pure (no NATS, no Redis).

The answer is a member list, or ``ReconfigureRejected`` carrying the HTTP status the gateway
answers with: 400 for a request that can never succeed as written (unknown instance or group,
too few or too many members), 409 for one that conflicts with a reconfiguration under way or
with the current groups (it may succeed later), and an error ``code`` saying which
(``reconfiguration_in_progress``, ``instance_in_group``, ``not_enough_solo_instances``). ``busy`` is the set of instances some
reconfiguration is in the middle of; ``topology`` is the planner's current one, whose entries
are exactly the live instances.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

from kunserve.planner.group_transitions import GroupState, members_of
from kunserve.protocol import Topology

BAD_REQUEST, CONFLICT = 400, 409
IN_PROGRESS, IN_GROUP, TOO_FEW_SOLO = (
    "reconfiguration_in_progress", "instance_in_group", "not_enough_solo_instances")


class ReconfigureRejected(Exception):
    def __init__(self, status: int, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code


def drop_members(requested: Sequence[str], topology: Topology, busy: Collection[str],
                 num_layers: int) -> list[str]:
    """The members of the group to form, in rank order (``requested`` as given; empty: every
    live solo instance no reconfiguration is touching, in topology order)."""
    entries = {info.instance_id: info for info in topology.instances}
    if not requested:
        members = [i for i, info in entries.items()
                   if info.state == GroupState.SOLO and i not in busy]
    else:
        members = list(requested)
        _check_listed(members, entries.keys())
        for instance_id in members:
            if instance_id in busy:
                raise ReconfigureRejected(CONFLICT, f"instance {instance_id} is being reconfigured",
                                          IN_PROGRESS)
            info = entries[instance_id]
            if info.state != GroupState.SOLO:
                raise ReconfigureRejected(
                    CONFLICT, f"instance {instance_id} is already in group {info.group_id} "
                              f"({info.state})", IN_GROUP)
    if len(members) < 2 and not requested and len(entries) >= 2:  # the others are grouped
        raise ReconfigureRejected(  # or busy: once restored, the same request can succeed
            CONFLICT, f"a drop needs at least 2 live solo instances, got {len(members)} (of "
                      f"{len(entries)} live: the others are in groups or being reconfigured)",
            TOO_FEW_SOLO)
    if len(members) < 2:
        what = "instances" if requested else "live solo instances"
        raise ReconfigureRejected(BAD_REQUEST,
                                  f"a drop needs at least 2 {what}, got {len(members)}")
    if len(members) > num_layers:
        raise ReconfigureRejected(
            BAD_REQUEST, f"cannot split the model's {num_layers} layers over {len(members)} "
                         "instances: a group has at most one instance per layer")
    return members


def restore_members(group_id: str, topology: Topology, busy: Collection[str]) -> list[str]:
    """The members of pipelined group ``group_id`` in stage order."""
    if not group_id:
        raise ReconfigureRejected(BAD_REQUEST, "a restore needs a group")
    members = members_of(topology, group_id)
    states = {info.state for info in topology.instances if info.group_id == group_id}
    if not members or states == {GroupState.SOLO}:
        raise ReconfigureRejected(BAD_REQUEST, f"unknown group {group_id}: no pipelined group "
                                               "has that id")
    if any(i in busy for i in members) or states != {GroupState.PIPELINED}:
        raise ReconfigureRejected(CONFLICT, f"group {group_id} is being reconfigured "
                                            f"({', '.join(sorted(states))})", IN_PROGRESS)
    return members


def _check_listed(members: Sequence[str], live: Collection[str]) -> None:
    duplicates = sorted({i for i in members if members.count(i) > 1})
    if duplicates:
        raise ReconfigureRejected(BAD_REQUEST, f"instances listed twice: {', '.join(duplicates)}")
    unknown = [i for i in members if i not in live]
    if unknown:
        raise ReconfigureRejected(BAD_REQUEST, f"unknown or not live instances: "
                                               f"{', '.join(unknown)}")
