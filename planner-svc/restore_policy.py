"""When a pipelined group is restored: calm for a whole window. Pure and stateful.

A group's KV demand is the blocks its running requests hold plus those its queued and reserved
requests need (``demand.py``). It is calm while its demand stays below ``peak_fraction`` of the
capacity its members hold solo (the planner passes ``overload_usage``, 0.8 by default: the
usage at which a queue counts as an overload, what the solo instances hold without one). It is ready once it has been calm for
``window_s`` and its mean demand over that window is below ``usage_fraction`` of the solo
capacity (default 0.5: the paper's rule, below half of the no-drop capacity). One observation
at or above the peak starts the window again.

Stricter rules kept groups pipelined long after the burst, serving at the pipeline's
per-token cost: the rule before this one wanted an empty queue and restarted the window when
demand rose by half the threshold, and a calm that only needed demand below half the solo
capacity at every observation (tried) did no better. After a burst requests keep arriving, a
few a second: one is nearly always waiting for its first step, a few arriving together lift a
demand near zero by half the threshold, and one long prompt of the burst benchmark is half of
a solo instance by itself. In that benchmark each of them held the group until the arrivals
stopped (restores 49-52 s into the replay, against 36.5 s with this rule, 5 s after demand
fell).

Why this does not flap: a drop needs queued demand that does not fit and usage at the drop
threshold; a restore needs demand below that threshold's share of the solo capacity at every
observation of the window and below half of it on average, so the solo instances start with
room to spare.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from kunserve.planner.demand import GroupDemand


@dataclass
class _Calm:
    since: float  # the first observation of this calm stretch
    recent: deque[tuple[float, int]] = field(default_factory=deque)  # (when, demand tokens)


class RestorePolicy:
    def __init__(self, window_s: float, usage_fraction: float, peak_fraction: float) -> None:
        self.window_s = window_s
        self.usage_fraction = usage_fraction  # of the solo capacity: the window's mean
        self.peak_fraction = max(peak_fraction, usage_fraction)  # every observation's
        self._calm: dict[str, _Calm] = {}

    def observe(self, now: float, demands: Sequence[GroupDemand],
                solo_tokens: Mapping[str, int]) -> list[GroupDemand]:
        """The groups among ``demands`` (pipelined ones) calm for the window as of ``now``.
        ``solo_tokens``: each instance's KV capacity when solo; a group with a member
        missing there is never ready."""
        calm, ready = {}, []
        for demand in demands:
            solo = self._solo_capacity(demand, solo_tokens)
            if solo is None or demand.demand_tokens >= self.peak_fraction * solo:
                continue  # not calm: its window (if any) ends
            stretch = calm[demand.group_id] = self._calm.get(demand.group_id, _Calm(now))
            stretch.recent.append((now, demand.demand_tokens))
            while stretch.recent[0][0] < now - self.window_s:
                stretch.recent.popleft()  # the mean is over the last window only
            mean = sum(tokens for _, tokens in stretch.recent) / len(stretch.recent)
            if now - stretch.since >= self.window_s and mean < self.usage_fraction * solo:
                ready.append(demand)
        self._calm = calm
        return ready

    def reset(self) -> None:
        self._calm.clear()

    @staticmethod
    def _solo_capacity(demand: GroupDemand, solo_tokens: Mapping[str, int]) -> int | None:
        """What the members hold solo, in tokens (None: a member's solo size unknown)."""
        if any(m not in solo_tokens for m in demand.members):
            return None
        return sum(solo_tokens[m] for m in demand.members)
