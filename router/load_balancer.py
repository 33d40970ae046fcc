"""Which instance gets the next request: scoring by KV-cache demand. Pure Python.

An instance's demand is the KV it holds plus the KV its queue and the router reservations
will soon need, in tokens::

    demand   = (blocks_used + ceil(queued_tokens / block_size)) * block_size + reserved_tokens
    capacity = blocks_total * block_size

The best instance has the lowest ``demand / capacity``; ties go to the fewest requests
(running + waiting + reserved), then to the earlier candidate in the given order. Ratios are
compared by cross-multiplying integers, so the same inputs give the same pick here and in the
Lua script that makes the pick atomic in Redis (``reservations.py``): keep the two in step.

Where its job ends: it reads numbers, it does not fetch them or reserve anything.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from kunserve.protocol import Topology


@dataclass(frozen=True)
class InstanceView:
    """One live instance as the router sees it: its last load plus pending reservations."""

    instance_id: str
    blocks_total: int
    blocks_used: int = 0
    block_size: int = 16
    queued_tokens: int = 0
    running: int = 0
    waiting: int = 0
    reserved_tokens: int = 0
    reserved_requests: int = 0

    @property
    def capacity_tokens(self) -> int:
        return self.blocks_total * self.block_size

    @property
    def demand_tokens(self) -> int:
        queued_blocks = -(-self.queued_tokens // self.block_size)
        return (self.blocks_used + queued_blocks) * self.block_size + max(self.reserved_tokens, 0)

    @property
    def num_requests(self) -> int:
        return self.running + self.waiting + max(self.reserved_requests, 0)

    @property
    def usable(self) -> bool:
        return self.blocks_total > 0 and self.block_size > 0

    @property
    def kv_demand(self) -> float:
        """Demand as a fraction of capacity (may exceed 1 when the instance is overloaded)."""
        return self.demand_tokens / self.capacity_tokens if self.usable else float("inf")


def is_better(a: InstanceView, b: InstanceView) -> bool:
    """Whether ``a`` should get the request rather than ``b`` (strictly better)."""
    left = a.demand_tokens * b.capacity_tokens
    right = b.demand_tokens * a.capacity_tokens
    if left != right:
        return left < right
    return a.num_requests < b.num_requests


def pick(views: Iterable[InstanceView]) -> InstanceView | None:
    """The best usable instance, or None when there is none."""
    best: InstanceView | None = None
    for view in views:
        if view.usable and (best is None or is_better(view, best)):
            best = view
    return best


def dispatch_order(instance_ids: Iterable[str], topology: Topology | None,
                   exclude: Sequence[str] = ()) -> list[str]:
    """The candidates the router may dispatch to, sorted: every instance except those that
    are a non-leader stage of a pipeline group (requests enter a group at stage 0) and
    those in ``exclude``."""
    followers = set()
    if topology is not None:
        followers = {i.instance_id for i in topology.instances if i.stage > 0}
    return sorted(set(instance_ids) - followers - set(exclude))
