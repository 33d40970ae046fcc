"""When the ``llumnix`` baseline migrates, and what: Llumnix's load balancing, simplified. Pure.

An instance's *freeness* is the KV blocks it has left once its queue is admitted:
``blocks_total - blocks_used - ceil(queued_tokens / block_size)``. When the least free live
solo instance is short (negative freeness, requests queued, and running requests to move:
only running ones migrate; a burst just queued has none yet) and the freest one has room
(no queue, at least ``min_free_fraction`` of its blocks free), running requests holding up to
half that room move from the first to the second, newest first, as Llumnix picks them: the
source admits its queue into the freed blocks, the destination keeps half its room for its
own arrivals. (A budget of the shortfall alone, tried first, often fitted no request: a
request holds more blocks than a small shortfall, and then nothing moved.)
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass

from kunserve.protocol import InstanceLoad, Topology


@dataclass(frozen=True)
class Migration:
    source: str
    destination: str
    blocks: int


def freeness(load: InstanceLoad) -> int:
    queued = -(-load.queued_tokens // load.block_size) if load.block_size else 0
    return load.blocks_total - load.blocks_used - queued


def decide_migration(topology: Topology, loads: Mapping[str, InstanceLoad],
                     busy: Collection[str], min_free_fraction: float = 0.1
                     ) -> Migration | None:
    solo = [loads[i.instance_id] for i in topology.instances
            if i.state == "solo" and i.instance_id in loads and i.instance_id not in busy
            and loads[i.instance_id].blocks_total > 0]
    if len(solo) < 2:
        return None
    source = min(solo, key=lambda load: (freeness(load), load.instance_id))
    destination = max(solo, key=lambda load: (freeness(load), load.instance_id))
    short, room = -freeness(source), freeness(destination)
    if (short <= 0 or source.waiting == 0 or source.running == 0 or destination.waiting > 0
            or room < max(1, min_free_fraction * destination.blocks_total)):
        return None
    return Migration(source.instance_id, destination.instance_id, max(1, room // 2))
