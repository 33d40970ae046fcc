"""When a pipelined group is restored: calm for a window, with hysteresis. Pure and stateful.

A group is calm when its queue is empty (no waiting request, nothing reserved on it) and its
KV demand is below ``usage_fraction`` (default 0.5) of the capacity its members hold solo (the
paper's rule: below half of the no-drop capacity). The window starts at the first calm
observation and restarts whenever the demand rises above what it was when the window started
(requests still growing or arriving) or the group stops being calm. A group calm for at least
``window_s`` is ready.

Why this does not flap: a drop needs queued demand that does not fit and usage at the drop
threshold; a restore needs no queue and demand below half of what the members hold solo, so
after a restore each member starts at most half full, well short of another drop.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from kunserve.planner.demand import GroupDemand


@dataclass
class _Window:
    since: float
    demand_tokens: int  # at the start: more than this is rising


class RestorePolicy:
    def __init__(self, window_s: float, usage_fraction: float) -> None:
        self.window_s = window_s
        self.usage_fraction = usage_fraction
        self._windows: dict[str, _Window] = {}

    def observe(self, now: float, demands: Sequence[GroupDemand],
                solo_tokens: Mapping[str, int]) -> list[GroupDemand]:
        """The groups among ``demands`` (pipelined ones) calm for the window as of ``now``.
        ``solo_tokens``: each instance's KV capacity when solo; a group with a member
        missing there is never ready."""
        windows, ready = {}, []
        for demand in demands:
            if not self._calm(demand, solo_tokens):
                continue
            window = self._windows.get(demand.group_id)
            if window is None or demand.demand_tokens > window.demand_tokens:
                window = _Window(now, demand.demand_tokens)
            windows[demand.group_id] = window
            if now - window.since >= self.window_s:
                ready.append(demand)
        self._windows = windows
        return ready

    def reset(self) -> None:
        self._windows.clear()

    def _calm(self, demand: GroupDemand, solo_tokens: Mapping[str, int]) -> bool:
        if any(m not in solo_tokens for m in demand.members):
            return False
        solo = sum(solo_tokens[m] for m in demand.members)
        return (demand.waiting == 0 and demand.queued_blocks == 0
                and demand.demand_tokens < self.usage_fraction * solo)
