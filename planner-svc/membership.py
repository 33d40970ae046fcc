"""Who is in the topology: the next ``Topology`` after instances come and go. Pure.

A new live instance joins as ``solo``: its own group, stage 0, every layer. An instance whose
load key expired leaves. Any change bumps the epoch by one; no change gives ``None``, so the
caller publishes only real changes. Entries of instances that stay are kept as they are (the
drop/restore plan, not membership, changes them).

Where its job ends: it does not read Redis or publish; it does not merge or split groups.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from kunserve.protocol import InstanceInfo, Topology


def solo_instance(instance_id: str, num_layers: int) -> InstanceInfo:
    return InstanceInfo(instance_id=instance_id, state="solo", group_id=instance_id, stage=0,
                        layer_start=0, layer_end=num_layers)


def next_topology(current: Topology, live_ids: Iterable[str], num_layers: int) -> Topology | None:
    """The topology with exactly ``live_ids`` in it (epoch + 1), or None if that is ``current``.

    ``num_layers``: the model's layer count for new solo entries (0 when unknown)."""
    live = set(live_ids)
    if live == {info.instance_id for info in current.instances}:
        return None
    kept = {info.instance_id: info for info in current.instances if info.instance_id in live}
    instances = [kept.get(i) or solo_instance(i, num_layers) for i in sorted(live, key=_natural)]
    return Topology(epoch=current.epoch + 1, instances=instances)


def _natural(instance_id: str) -> list:
    """Sort key putting worker-2 before worker-10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", instance_id)]
