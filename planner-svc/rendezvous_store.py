"""The ``torch.distributed.TCPStore`` pipeline groups rendezvous at, hosted by the planner.

One store for the planner's lifetime, on a free port: every ``GroupPlan`` names it, and each
group's members build their gloo/NCCL process group on it under their own key prefix
(``PrefixStore("epoch-<E>")``), so groups of different epochs never see each other's keys.
Hosting it in the planner rather than in a group leader means a group's rendezvous does not
depend on which member is up first, and a leader that dies does not take the store with it.
"""

from __future__ import annotations

import torch.distributed as dist

from kunserve.planner.reconfiguration_coordinator import StoreAddress


class RendezvousStore:
    def __init__(self, host: str) -> None:
        # the server listens on every interface; ``host`` is the address the plans advertise
        self._store = dist.TCPStore(host, 0, is_master=True, wait_for_workers=False)
        self.address = StoreAddress(host, self._store.port)
