"""KV demand per group, counted the Llumnix way: the blocks of the running requests plus the
blocks the queued requests need to start. Pure (no NATS, no Redis).

A group's figures are its leader's (stage 0: it owns the group's scheduler, and every member
holds the same block count). Queued demand is what the worker's queue holds
(``queued_tokens``: uncomputed tokens of waiting and preempted requests) plus what routers
reserved on it and the worker has not taken yet, each rounded up to whole blocks, as the
router's ``RESERVE_LUA`` counts them.

A group counts only when its leader's load confirms its place in the topology (a solo load for
a solo entry, a pipelined load of the same group for a pipelined one): right after a
reconfiguration the load can still be the one from before it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from kunserve.planner.group_transitions import GroupState
from kunserve.protocol import InstanceLoad, Topology


@dataclass(frozen=True, slots=True)
class Reserved:
    """What routers dispatched to an instance that its load does not show yet."""

    tokens: int = 0
    requests: int = 0


@dataclass(frozen=True, slots=True)
class GroupDemand:
    group_id: str
    members: tuple[str, ...]  # stage order
    state: str  # solo | pipelined
    block_size: int
    blocks_total: int
    blocks_used: int
    queued_blocks: int  # what the queued (and reserved) requests need to start
    waiting: int  # queued requests, reserved ones included
    kv_bound: bool = False  # the leader's last step held a request back for want of blocks

    @property
    def free_blocks(self) -> int:
        return max(0, self.blocks_total - self.blocks_used)

    @property
    def usage(self) -> float:
        return self.blocks_used / self.blocks_total

    @property
    def capacity_tokens(self) -> int:
        return self.blocks_total * self.block_size

    @property
    def demand_tokens(self) -> int:
        return (self.blocks_used + self.queued_blocks) * self.block_size

    @property
    def deficit_tokens(self) -> int:
        """Demand the group's KV cache does not hold."""
        return max(0, self.demand_tokens - self.capacity_tokens)

    def overloaded(self, usage_threshold: float) -> bool:
        """The queued requests do not fit the free blocks, and memory is what holds them back:
        the leader's last step held a request back for want of blocks, or the cache is at
        least ``usage_threshold`` used, or its free blocks cannot take even an average queued
        request (a small cache with long prompts is full well below the threshold). A queue
        that only waits for the next step's batch is no overload; one the last step could not
        admit still is in the report written after requests finished and freed their blocks,
        before the next step admits from it (without ``kv_bound`` the overload would blink
        off at every completion, and a window would rarely fill)."""
        if self.queued_blocks <= self.free_blocks:
            return False
        next_request = self.queued_blocks / max(1, self.waiting)
        return (self.kv_bound or self.usage >= usage_threshold
                or self.free_blocks < next_request)


def group_demands(topology: Topology, loads: Mapping[str, InstanceLoad],
                  reserved: Mapping[str, Reserved] | None = None) -> list[GroupDemand]:
    """The demand of every solo or pipelined group whose leader's load confirms it, in
    topology order (a pipelined group where its leader is listed)."""
    reserved = reserved or {}
    groups: dict[str, list] = {}  # group -> [(stage, id), ...] of a pipelined group
    mixed: set[str] = set()  # groups some member of which is preparing or restoring
    order: list[str] = []  # solo ids and pipelined group ids, in topology order
    for info in topology.instances:
        if info.state == GroupState.SOLO:
            order.append(info.instance_id)
        elif info.state == GroupState.PIPELINED:
            if info.group_id not in groups:
                groups[info.group_id] = []
                order.append(info.group_id)
            groups[info.group_id].append((info.stage, info.instance_id))
        else:
            mixed.add(info.group_id)
    demands = []
    for key in order:
        if key in groups:
            if key in mixed:
                continue
            members = tuple(i for _, i in sorted(groups[key]))
            state = GroupState.PIPELINED
        else:
            members, state = (key,), GroupState.SOLO
        demand = _demand(key, members, state, loads.get(members[0]),
                         reserved.get(members[0], _NOTHING))
        if demand is not None:
            demands.append(demand)
    return demands


def _demand(group_id: str, members: tuple[str, ...], state: str, load: InstanceLoad | None,
            reserved: Reserved) -> GroupDemand | None:
    if load is None or load.blocks_total <= 0 or load.block_size <= 0 or load.state != state:
        return None
    if state == GroupState.PIPELINED and load.group_id != group_id:
        return None
    queued = _blocks(load.queued_tokens, load.block_size) + _blocks(reserved.tokens,
                                                                    load.block_size)
    return GroupDemand(group_id=group_id, members=members, state=state,
                       block_size=load.block_size, blocks_total=load.blocks_total,
                       blocks_used=load.blocks_used, queued_blocks=queued,
                       waiting=load.waiting + max(0, reserved.requests),
                       kv_bound=bool(load.kv_bound))


_NOTHING = Reserved()


def _blocks(tokens: int, block_size: int) -> int:
    return -(-max(0, tokens) // block_size)


def solo_demands(demands: Sequence[GroupDemand]) -> list[GroupDemand]:
    return [d for d in demands if d.state == GroupState.SOLO]
