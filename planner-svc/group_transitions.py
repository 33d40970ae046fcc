"""A group's lifecycle and the topology each transition publishes. Pure (no torch, NATS, Redis).

State per instance entry (DESIGN §4)::

    SOLO --drop--> PREPARING --commit--> PIPELINED --restore--> RESTORING --> SOLO
                       └----abort/failed commit---> SOLO <--group broke--┘

Every transition is a new ``Topology`` whose epoch is the current one plus one; only the
listed members' entries change, so instances joining or leaving meanwhile are kept.

What an entry says is what the instance holds and serves *now*: a preparing member still holds
every layer (stage 0, ``[0, L)``) and serves solo; a restoring member still holds its stage's
layers. The group id of a drop is ``g<E>``, ``E`` being the epoch of its preparing topology:
epochs never repeat, so neither do group ids, and the id says when the group was made.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from enum import StrEnum

import msgspec

from kunserve.protocol import InstanceInfo, Topology
from kunserve.worker.layer_range import LayerRange


class GroupState(StrEnum):
    SOLO = "solo"
    PREPARING = "preparing"
    PIPELINED = "pipelined"
    RESTORING = "restoring"


_ALLOWED = {
    GroupState.SOLO: {GroupState.PREPARING},
    GroupState.PREPARING: {GroupState.PIPELINED, GroupState.SOLO},  # commit | abort, failed commit
    GroupState.PIPELINED: {GroupState.RESTORING, GroupState.SOLO},  # restore | group broke
    GroupState.RESTORING: {GroupState.SOLO},
}


class IllegalTransition(ValueError):
    """A transition the lifecycle does not have (a bug in the caller, not a bad request)."""


def check_transition(instance_id: str, current: str, new: str) -> None:
    if GroupState(new) not in _ALLOWED[GroupState(current)]:
        raise IllegalTransition(f"{instance_id}: {current} -> {new} is not a group transition")


def group_id_for(epoch: int) -> str:
    """The id of the group whose drop starts at topology ``epoch``."""
    return f"g{epoch}"


def solo_instance(instance_id: str, num_layers: int) -> InstanceInfo:
    """An instance on its own: its own group, stage 0, every layer."""
    return InstanceInfo(instance_id=instance_id, state=GroupState.SOLO, group_id=instance_id,
                        stage=0, layer_start=0, layer_end=num_layers)


def stage_entries(group_id: str, members: Sequence[str], num_layers: int) -> list[InstanceInfo]:
    """A committed group: member ``r`` is stage ``r`` and holds ``LayerRange.for_stage(r)``
    (an even split, earlier stages take the remainder)."""
    entries = []
    for rank, instance_id in enumerate(members):
        layers = LayerRange.for_stage(rank, len(members), num_layers)
        entries.append(InstanceInfo(instance_id=instance_id, state=GroupState.PIPELINED,
                                    group_id=group_id, stage=rank, layer_start=layers.start,
                                    layer_end=layers.end))
    return entries


def begin_drop(topology: Topology, members: Sequence[str], num_layers: int) -> Topology:
    """``members`` start preparing group ``g<epoch>`` (still solo-serving, every layer)."""
    epoch = topology.epoch + 1
    group_id = group_id_for(epoch)
    entries = [msgspec.structs.replace(solo_instance(i, num_layers),
                                       state=GroupState.PREPARING, group_id=group_id)
               for i in members]
    return _with_entries(topology, entries)


def commit_drop(topology: Topology, group_id: str, members: Sequence[str],
                num_layers: int) -> Topology:
    return _with_entries(topology, stage_entries(group_id, members, num_layers))


def begin_restore(topology: Topology, group_id: str) -> Topology:
    """Every member of ``group_id`` starts restoring, holding its stage's layers meanwhile."""
    entries = [msgspec.structs.replace(info, state=GroupState.RESTORING)
               for info in topology.instances if info.group_id == group_id]
    return _with_entries(topology, entries)


def back_to_solo(topology: Topology, members: Sequence[str], num_layers: int) -> Topology:
    """``members`` serve solo again (an abort, a failed commit, a restore, a broken group)."""
    return _with_entries(topology, [solo_instance(i, num_layers) for i in members])


def members_of(topology: Topology, group_id: str) -> list[str]:
    """A group's members in stage order."""
    entries = [info for info in topology.instances if info.group_id == group_id]
    return [info.instance_id for info in sorted(entries, key=lambda info: info.stage)]


def _with_entries(topology: Topology, entries: Sequence[InstanceInfo]) -> Topology:
    """``topology`` at the next epoch with ``entries`` replacing the entries of the same
    instances. An instance the topology no longer lists is not added back: it left."""
    by_id: Mapping[str, InstanceInfo] = {info.instance_id: info for info in entries}
    instances = []
    for info in topology.instances:
        new = by_id.get(info.instance_id, info)
        if new is not info:
            check_transition(info.instance_id, info.state, new.state)
        instances.append(new)
    return Topology(epoch=topology.epoch + 1, instances=instances)
